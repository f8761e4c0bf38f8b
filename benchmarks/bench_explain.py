"""Explanation benchmarks: I-GOS / iGOS++ batched vs one image at a time, and SAG.

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s) for
  the runner's table (I-GOS / iGOS++ on a batch of 32 digits and one image at a time, SAG at
  grid 7; the 224 px ResNet-18 entries only on CUDA, they take minutes per call on a CPU).
* ``python benchmarks/bench_explain.py [--device cuda] [--json FILE]`` runs the full report:
  per method images/s batched and one at a time (speedup), forward+backward and forward passes
  per image, the ratio of the measured time to (passes x the model's own measured time per
  pass), deletion/insertion AUCs of the batched and one-at-a-time heatmaps (they must agree
  within noise), and SAG seconds and forward passes per image at grid 7.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, register, sync  # noqa: E402

BATCH = 32


# -- models and inputs -----------------------------------------------------------------------


def digits_model(device: torch.device):
    """zoo:small-cnn-digits when built, else a small-cnn trained for a few seconds."""
    from trustvision import data, models
    from trustvision.errors import TrustVisionError

    try:
        net = models.load("zoo:small-cnn-digits")
    except TrustVisionError:
        torch.manual_seed(0)
        net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
        x, y = data.load("digits", split="train").tensors()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(100):
            i = torch.randint(0, len(y), (64,))
            loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    x, _ = data.load("digits", split="test").tensors()
    return net.to(device).eval(), x[:BATCH].to(device)


def resnet18_model(device: torch.device, n: int = BATCH):
    from trustvision import models

    torch.manual_seed(0)
    net = models.create("torchvision:resnet18", num_classes=1000, in_chans=3, image_size=224)
    g = torch.Generator().manual_seed(0)
    # smooth random images (a blurred noise field) rather than white noise
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 14, 14, generator=g), size=224,
                                        mode="bilinear", align_corners=False)
    return net.to(device).eval(), x.to(device)


# -- runner workloads ------------------------------------------------------------------------


def _igos_workload(method: str, batched: bool, model_fn, settings: dict, cuda_only: bool = False):
    def bench(device: torch.device):
        if cuda_only and device.type != "cuda":
            return None
        from trustvision import explain

        net, x = model_fn(device)
        expl = explain.get(method)(net)

        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if batched:
                    return expl.attribute(x, **settings)
                return [expl.attribute(x[i : i + 1], **settings) for i in range(x.shape[0])]

        return Workload(run=run, images=x.shape[0], warmup=1, min_seconds=0.5, max_runs=3)

    return bench


def _sag_workload(model_fn, grid: int, n: int, cuda_only: bool = False, random_weights: bool = False):
    def bench(device: torch.device):
        if cuda_only and device.type != "cuda":
            return None
        from trustvision import explain

        net, x = model_fn(device)
        sag = explain.SAG(net, grid=grid)
        # random weights: explain the class each image raises most (the predicted class of a
        # random net is often sufficient with no patch at all, which makes SAG trivial)
        targets = image_specific_targets(net, x[:n]) if random_weights else [None] * n
        return Workload(run=lambda: [sag.explain(x[i], target=targets[i]) for i in range(n)], images=n,
                        warmup=0, min_seconds=0.0, max_runs=1)

    return bench


for _m in ("igos", "igos++"):
    register(f"{_m}:small-cnn-digits:batch32")(_igos_workload(_m, True, digits_model, {}))
    register(f"{_m}:small-cnn-digits:one-at-a-time")(_igos_workload(_m, False, digits_model, {}))
    register(f"{_m}:resnet18-224:batch32")(
        _igos_workload(_m, True, resnet18_model, {"internal_batch_size": 320 if _m == "igos" else 128},
                       cuda_only=True))
register("sag:small-cnn-digits:grid7")(_sag_workload(digits_model, 7, 8))
register("sag:resnet18-224:grid7")(_sag_workload(resnet18_model, 7, 2, cuda_only=True, random_weights=True))


# -- the full report -------------------------------------------------------------------------


def time_per_pass(net, x: torch.Tensor, chunk: int, device: torch.device,
                  reps: int = 3) -> tuple[float, float]:
    """Seconds per image of the model's forward+backward (w.r.t. the input) and of its forward,
    at batch size ``chunk`` (the chunk size the explainer used)."""
    chunk = max(1, chunk)
    xb = x[torch.arange(chunk, device=x.device) % x.shape[0]]
    t = torch.zeros(chunk, dtype=torch.long, device=x.device)

    def fb():
        z = xb.detach().requires_grad_(True)
        p = torch.softmax(net(z), 1).gather(1, t.view(-1, 1)).sum()
        torch.autograd.grad(p, z)

    def fw():
        with torch.no_grad():
            torch.softmax(net(xb), 1)

    out = []
    for fn in (fb, fw):
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / reps / chunk)
    return out[0], out[1]


def igos_report(name: str, method: str, net, x: torch.Tensor, device: torch.device, settings: dict,
                n_single: int | None = None) -> dict:
    from trustvision import explain
    from trustvision.evaluate.faithfulness import deletion_insertion

    expl = explain.get(method)(net)
    n = x.shape[0]
    n_single = n if n_single is None else n_single
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # warm-up at both shapes that are timed (cuDNN picks kernels per shape on first use)
        expl.attribute(x, **{**settings, "iterations": 1})
        expl.attribute(x[:1], **{**settings, "iterations": 1})
        sync(device)
        t0 = time.perf_counter()
        heat = expl.attribute(x, **settings)
        sync(device)
        t_batch = time.perf_counter() - t0
        info = expl.last_info
        singles = []
        sync(device)
        t0 = time.perf_counter()
        for i in range(n_single):
            singles.append(expl.attribute(x[i : i + 1], **settings))
        sync(device)
        t_single = (time.perf_counter() - t0) / n_single
        # the same batch with another noise seed: how much the scores move from noise alone
        heat_seed1 = expl.attribute(x, **{**settings, "seed": 1})
    single = torch.cat(singles)
    fb, fw = info.forward_backward_passes / n, info.forward_passes / n
    rows_per_chunk = settings.get("internal_batch_size") or n * settings.get("ig_steps", 20) * (
        4 if method == "igos++" else 1)
    t_fb, t_fw = time_per_pass(net, x, min(rows_per_chunk, 4096), device)
    limit = fb * t_fb + fw * t_fw  # seconds per image if only the model's own passes cost time
    di_b = deletion_insertion(net, x[:n_single], heat[:n_single])
    di_s = deletion_insertion(net, x[:n_single], single)
    di_1 = deletion_insertion(net, x[:n_single], heat_seed1[:n_single])
    sb, ss, s1 = di_b.summary(), di_s.summary(), di_1.summary()
    return {
        "benchmark": f"{method}:{name}", "method": method, "model": name, "device": str(device),
        "batch": n, "settings": {k: v for k, v in settings.items()},
        "images_per_s_batched": n / t_batch,
        "images_per_s_one_at_a_time": 1 / t_single,
        "speedup": (n / t_batch) * t_single,
        "fwd_bwd_passes_per_image": fb, "fwd_passes_per_image": fw,
        "model_s_per_fwd_bwd_image": t_fb, "model_s_per_fwd_image": t_fw,
        "ratio_to_model_limit": (t_batch / n) / limit,
        "deletion_batched": sb["deletion_mean"], "deletion_one_at_a_time": ss["deletion_mean"],
        "insertion_batched": sb["insertion_mean"], "insertion_one_at_a_time": ss["insertion_mean"],
        "deletion_batched_seed1": s1["deletion_mean"], "insertion_batched_seed1": s1["insertion_mean"],
        "heatmap_max_abs_diff": float((heat[:n_single] - single).abs().max()),
    }


def image_specific_targets(net, x: torch.Tensor) -> list[int]:
    """For random weights: the class whose probability the image raises most over the black
    image (the predicted class of a random net often wins on a black image too, which makes
    the empty patch set sufficient and SAG trivial)."""
    with torch.no_grad():
        d = torch.softmax(net(x), 1) - torch.softmax(net(torch.zeros_like(x[:1])), 1)
    return d.argmax(1).tolist()


def sag_report(name: str, net, x: torch.Tensor, grid: int, n: int, targets=None) -> dict:
    from trustvision import explain

    sag = explain.SAG(net, grid=grid)
    targets = targets or [None] * n
    res = [sag.explain(x[i], target=targets[i]) for i in range(n)]
    return {
        "benchmark": f"sag:{name}:grid{grid}", "images": n,
        "seconds_per_image": sum(r.seconds for r in res) / n,
        "forward_passes_per_image": sum(r.forward_passes for r in res) / n,
        "heatmap_passes_per_image": sum(r.heatmap_passes for r in res) / n,
        "roots_per_image": sum(len(r.roots) for r in res) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--only", choices=["digits", "resnet", "sag"], default=None)
    p.add_argument("--ibs", default=None,
                   help="comma-separated internal_batch_size values for the CUDA ResNet-18 runs "
                        "(default: 320 for I-GOS, 128 for iGOS++)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = []

    def emit(r):
        out.append(r)
        print(json.dumps(r), flush=True)

    if args.only in (None, "digits", "sag"):
        net, x = digits_model(device)
        if args.only != "sag":
            for m in ("igos", "igos++"):
                emit(igos_report("small-cnn-digits-8px", m, net, x, device, {"seed": 0}))
        emit(sag_report("small-cnn-digits-8px", net, x, 7, 8))
    if args.only == "sag" and not args.skip_resnet:
        net, x = resnet18_model(device, 4)
        emit(sag_report("resnet18-224-random", net, x, 7, 2 if not cuda else 4,
                        image_specific_targets(net, x)))
    elif args.only in (None, "resnet") and not args.skip_resnet:
        if cuda:
            net, x = resnet18_model(device, BATCH)
            for m in ("igos", "igos++"):
                sizes = ([int(v) for v in args.ibs.split(",")] if args.ibs
                         else [320 if m == "igos" else 128])
                for ibs in sizes:
                    emit(igos_report("resnet18-224-random", m, net, x, device,
                                     {"seed": 0, "internal_batch_size": ibs}))
            emit(sag_report("resnet18-224-random", net, x, 7, 4, image_specific_targets(net, x[:4])))
        else:  # a CPU cannot run the full settings in minutes: 8 images, 2 iterations, 5 IG points
            net, x = resnet18_model(device, 8)
            for m in ("igos", "igos++"):
                emit(igos_report("resnet18-224-random", m, net, x, device,
                                 {"seed": 0, "iterations": 2, "ig_steps": 5, "internal_batch_size": 40},
                                 n_single=4))
            emit(sag_report("resnet18-224-random", net, x, 7, 2, image_specific_targets(net, x[:2])))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
