"""Streaming benchmark (issue 16): the audit of a generated image folder with bounded memory.

``python benchmarks/bench_streaming.py [--sizes 1000,5000] [--threads 1] [--json F]`` writes, for
each size, a seeded ImageFolder of JPEGs at 256 x 256 (10 classes of smooth random colour fields
with a class-dependent tint; written once under ``--root``), then audits it in a fresh process
with torchvision's ResNet-18 (random weights, normalised inside the wrapper) at 224 px
(``--crop 0.875``: shorter side 256, centre crop 224, as timm evaluates), checks accuracy,
calibration and ood. Reported per size: the images the model forwarded (counted by a hook),
seconds, images/s, the model's raw forward images/s on 224 px batches of the same batch size
measured in the same process, their ratio (target >= 0.8) and the process's peak RSS (target
< 3 GB, not growing with the number of images). The OOD sets are tensors of ``ood.n`` images each
(6 sets); the splits themselves are streamed from the files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import emitter  # noqa: E402


def write_folder(root: Path, n: int, size: int = 256, classes: int = 10, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90) in ``root/<class>/`` (seeded), unless already there."""
    import numpy as np
    from PIL import Image

    folder = root / f"jpegs-{n}-{size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0.2, 0.8, (classes, 3))
    for i in range(n):
        c = i % classes
        low = rng.uniform(0, 1, (8, 8, 3))
        img = Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        arr = (0.6 * np.asarray(img, dtype=np.float32) / 255 + 0.4 * tints[c]).clip(0, 1)
        d = folder / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    done.write_text("ok")
    return folder


def child(folder: str, batch: int, ood_n: int) -> dict:
    """One audit in this process (run by the parent in a fresh interpreter)."""
    import resource

    import torch
    import torchvision

    from trustvision import audit, data, models

    net = torchvision.models.resnet18(num_classes=10)
    model = models.wrap(net, num_classes=10, image_size=224, in_chans=3, mean=(0.485, 0.456, 0.406),
                        std=(0.229, 0.224, 0.225)).eval()
    counted = [0]  # images through the network (its first convolution), whichever entry point
    net.conv1.register_forward_pre_hook(lambda m, args: counted.__setitem__(0, counted[0] + len(args[0])))
    # the raw forward throughput on 224 px batches of the audit's batch size
    x = torch.rand(batch, 3, 224, 224)
    with torch.no_grad():
        model(x)
        t0, calls = time.perf_counter(), 0
        while time.perf_counter() - t0 < 10:
            model(x)
            calls += 1
        raw = calls * batch / (time.perf_counter() - t0)
    counted[0] = 0
    spec = f"imagefolder:{folder}"
    splits = audit.LazySplits(lambda s: data.load(spec, split=s, image_size=224, crop=0.875, channels=3))
    t0 = time.perf_counter()
    res = audit.run({"resnet18": model}, splits, checks=["accuracy", "calibration", "ood"],
                    options={"batch_size": batch, "ood.n": ood_n})
    sec = time.perf_counter() - t0
    assert res.ok, res.results["errors"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (Linux: KB)
    sizes = {s: len(data.load(spec, split=s, image_size=224, crop=0.875)) for s in ("train", "val", "test")}
    return {"images_forwarded": counted[0], "seconds": sec, "images_per_s": counted[0] / sec,
            "raw_forward_images_per_s": raw, "ratio": counted[0] / sec / raw, "peak_rss_mb": peak,
            "splits": sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,5000")
    p.add_argument("--root", type=Path, default=Path("/tmp/trustvision-bench"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ood-n", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(child(a.child, a.batch, a.ood_n)))
        return 0
    rows: list[dict] = []
    emit = emitter(rows)
    for n in [int(v) for v in a.sizes.split(",")]:
        folder = write_folder(a.root, n)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--threads", str(a.threads),
                              "--batch", str(a.batch), "--ood-n", str(a.ood_n)],
                             capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        row = {"benchmark": f"audit-stream:imagefolder-{n}", "images": n, "threads": a.threads, "batch": a.batch,
               "ood_n": a.ood_n, **json.loads(out.stdout.strip().splitlines()[-1])}
        emit(row)
    print("\nStreamed audit (accuracy, calibration, ood) of a JPEG image folder at 224 px, ResNet-18, "
          f"{a.threads} thread(s), batch {a.batch}")
    print(f"{'images':>7} {'forwarded':>9} {'seconds':>8} {'img/s':>7} {'raw img/s':>9} {'ratio':>6} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['images']:>7} {r['images_forwarded']:>9} {r['seconds']:>8.1f} {r['images_per_s']:>7.1f} "
              f"{r['raw_forward_images_per_s']:>9.1f} {r['ratio']:>6.2f} {r['peak_rss_mb']:>11.0f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
