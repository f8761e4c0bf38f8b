"""OOD detector scoring speed vs the model's own forward throughput.

``python benchmarks/bench_ood.py [--device cuda] [--threads 1]`` prints, per detector, images/s of
``Detector.score`` on the test split (after fitting on the training split; fitting not timed) and
the ratio to the model's raw forward images/s on the same batches (the target for the post-hoc
detectors that need one forward pass: >= 0.8). ``benchmarks/run.py`` picks up one runner entry
per detector (``ood:<detector>:small-cnn-textures``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, best_seconds, register, sync  # noqa: E402

BATCH = 256


def _setup(device: torch.device, name: str = "textures"):
    from trustvision import data, models

    net = models.load(f"zoo:small-cnn-{name}").to(device).eval()
    xtr, ytr = data.load(name, split="train").tensors()
    xte, _ = data.load(name, split="test").tensors()
    return net, xtr, ytr, xte


def rows(device: torch.device, name: str = "textures") -> list[dict]:
    from trustvision.evaluate.ood import get_detector, list_detectors

    net, xtr, ytr, xte = _setup(device, name)

    @torch.no_grad()
    def forward():
        for i in range(0, len(xte), BATCH):
            net(xte[i: i + BATCH].to(device))
        sync(device)

    t_fwd = best_seconds(forward, device, repeat=5)
    out = []
    for det_name in list_detectors(net):
        det = get_detector(det_name)().fit(net, xtr, ytr, batch_size=BATCH)
        t = best_seconds(lambda: det.score(net, xte, batch_size=BATCH), device, repeat=5)
        out.append({"benchmark": f"ood:{det_name}:small-cnn-{name}", "images": len(xte),
                    "images_per_s": len(xte) / t, "forward_images_per_s": len(xte) / t_fwd,
                    "ratio": t_fwd / t})
    return out


def _runner_entry(det_name: str):
    def make(device: torch.device) -> Workload:
        from trustvision.evaluate.ood import get_detector

        net, xtr, ytr, xte = _setup(device)
        det = get_detector(det_name)().fit(net, xtr, ytr, batch_size=BATCH)
        return Workload(run=lambda: det.score(net, xte, batch_size=BATCH), images=len(xte))

    return make


for _d in ("max-softmax", "energy", "mahalanobis", "knn", "vim"):
    register(f"ood:{_d}:small-cnn-textures")(_runner_entry(_d))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default="textures", help="zoo small-cnn dataset: digits or textures")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = rows(torch.device(args.device), args.data)
    print(f"\nOOD scoring on the {args.data} test split (batch {BATCH}, fitted on the training split; "
          f"{torch.get_num_threads()} threads)")
    print("| detector | images/s | model forward images/s | ratio |")
    print("|---|---:|---:|---:|")
    for row in r:
        print(f"| {row['benchmark'].split(':')[1]} | {row['images_per_s']:.0f} | {row['forward_images_per_s']:.0f} | "
              f"{row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
