"""GPU check (issue 16): one script, one table, run whenever a GPU is lent (and in CI on the CPU).

``python benchmarks/gpu_check.py [--device auto|cpu|cuda] [--scale S] [--threads 1] [--json F]``

The model is torchvision's ResNet-50 with random weights (seed 0), wrapped with the ImageNet
normalisation inside (as ``bench_streaming.py`` wraps ResNet-18), 10 classes. Its BatchNorm
statistics are set from the folder's first 64 training images (train-mode forwards, no weight is
trained): with the initialisation's statistics (mean 0, variance 1) the activations grow through
the 16 blocks and every image gets class 9 with p = 1.0 at 224 px, so no gradient would reach the
explanation masks and the bf16 vs float32 comparison would compare constants.

Measured, at ``--scale 1`` (the issue's sizes, the default on a GPU):

- the streamed audit (checks accuracy, calibration, ood; ``ood.n`` 200, batch 32; ``--workers``
  DataLoader processes decode the JPEGs, default 8 on a GPU, 0 on the CPU) of a seeded
  ImageFolder of 5,000 JPEGs at 256 px (``bench_streaming.write_folder``) read at 224 px with
  ``crop=0.875``: the images the network forwarded (counted at its first convolution; expected:
  the 8-image compatibility probe + train + val + 2 x test (the ood check forwards the test split
  again, for the features) + 6 OOD sets x min(ood.n, test)), images/s, and the model's raw forward
  images/s at the same batch (target: the audit at >= 0.8 of it);
- I-GOS, iGOS++ (default 15 iterations, 20 IG steps) and Batched Gradient SIS (100 iterations) on
  a batch of 32 test images: images/s in float32 and with ``autocast=True`` (bf16 autocast of the
  model's passes), and per image the Spearman rank correlation of the bf16 heatmap with the float32
  one (BGSIS: of each pixel's position in the removal order), mean over the batch (target >= 0.95);
- exact SIS (backward selection) with ``features="patch:8"`` (28 x 28 = 784 features, 307,720
  forwards per image at 224 px) of 1 image: images/s;
- PGD-Linf (10 steps, eps = ``headline_eps``: 8/255 from 32 px up) of 256 test images: images/s;
- what bf16 does to the model itself on the explanation batch: the mean |p_bf16 - p_fp32| of the
  predicted class and the Spearman correlation of the input gradients (the floor under every
  explainer's agreement: a heatmap cannot agree better than the gradients it is built from allow).

``--scale S`` (0 < S <= 1; default 1 on a GPU, 0.1 on the CPU: "the same at a tenth of the size")
scales every size: round(5000 S) images (at least 50), ``ood.n`` max(10, round(200 S)), the pixel
count (side 224 sqrt(S) rounded to a multiple of 8, at least 32: 72 px at 0.1; JPEGs at side /
0.875), the explanation batch max(2, round(32 S)), the I-GOS iterations and IG steps max(2,
round(15 S)) and max(2, round(20 S)), the BGSIS iterations max(10, round(100 S)), the PGD images
max(4, round(256 S)); the audit batch (32), the ``patch:8`` features and 1 SIS image stay.

Each explanation and attack is timed once, after a warm-up forward + backward of the model in both
precisions on the same batch (kernels built, cuDNN initialised); the explainers' own chunk
measurements are part of their first call and are timed. Rows print as JSON lines, then one table
(metric, value, target, verdict); ``--json F`` writes the rows, the settings and per-image details.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from bench_streaming import write_folder  # noqa: E402
from registry import emitter, rss_kb, sync  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP = 0.875
AUDIT_BATCH = 32
RANK_TARGET = 0.95
RAW_RATIO_TARGET = 0.8
OOD_SETS = 6  # trustvision.evaluate.ood.OOD_SETS
PROBE = 8  # images of the audit's compatibility check (models.validate.check_compatible)
METHODS = (("igos", "I-GOS"), ("igos++", "iGOS++"), ("bgsis", "BGSIS"))


def settings(scale: float) -> dict:
    """The sizes of a run at ``scale`` (1 = the issue's GPU sizes; see the module docstring)."""
    if not 0 < scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {scale}")
    side = 224 if scale == 1 else max(32, 8 * round(224 * math.sqrt(scale) / 8))
    return {
        "scale": scale, "images": max(50, round(5000 * scale)), "image_size": side,
        "jpeg_size": round(side / CROP), "ood_n": max(10, round(200 * scale)), "audit_batch": AUDIT_BATCH,
        "explain_batch": max(2, round(32 * scale)), "iterations": max(2, round(15 * scale)),
        "ig_steps": max(2, round(20 * scale)), "bgsis_iterations": max(10, round(100 * scale)),
        "sis_images": 1, "sis_features": "patch:8", "pgd_images": max(4, round(256 * scale)), "pgd_steps": 10,
    }


def make_model(size: int, calibration: torch.Tensor, device: torch.device, zero_init_residual: bool = False):
    """Random-weight ResNet-50 (seed 0) with the normalisation inside, its BatchNorm statistics
    set from ``calibration`` images (see the module docstring); returns (model, network)."""
    import torchvision

    from trustvision import models

    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10, zero_init_residual=zero_init_residual)
    model = models.wrap(net, num_classes=10, image_size=size, in_chans=3, mean=MEAN, std=STD).to(device)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(calibration), 16):
            model(calibration[i : i + 16].to(device))
    return model.eval(), net


def spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per image the Spearman rank correlation of (N, ...) tensors (ties: average ranks); a constant
    map on either side counts 1.0 when both are equal, else 0.0."""
    from scipy.stats import spearmanr

    out = []
    for u, v in zip(a.detach().float().cpu(), b.detach().float().cpu()):
        u, v = u.flatten(), v.flatten()
        if float(u.max() - u.min()) == 0 or float(v.max() - v.min()) == 0:
            out.append(1.0 if torch.equal(u, v) else 0.0)
        else:
            out.append(float(spearmanr(u.numpy(), v.numpy()).statistic))
    return out


def timed(device: torch.device, fn):
    """(result, seconds) of ``fn()``, the device synchronised before both clock reads."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def warm_up(model, x: torch.Tensor) -> None:
    """One forward + backward in float32 and under bf16 autocast (kernels, cuDNN, autocast casts)."""
    from trustvision.explain.igos import model_logits

    for ac in (False, True):
        xi = x.clone().requires_grad_(True)
        model_logits(model, xi, ac).float().logsumexp(1).sum().backward()
    model.zero_grad(set_to_none=True)


def precision_effect(model, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per image |p_bf16 - p_fp32| of the float32-predicted class and the Spearman correlation of
    the input gradients of that probability: how much bf16 autocast changes the model itself."""
    from trustvision.explain.igos import model_logits

    with torch.no_grad():
        t = model(x).argmax(1)
    probs, grads = [], []
    for ac in (False, True):
        xi = x.clone().requires_grad_(True)
        p = torch.softmax(model_logits(model, xi, ac).float(), 1).gather(1, t[:, None]).squeeze(1)
        (g,) = torch.autograd.grad(p.sum(), xi)
        probs.append(p.detach())
        grads.append(g)
    model.zero_grad(set_to_none=True)
    return (probs[1] - probs[0]).abs().tolist(), spearman(grads[0], grads[1])


def raw_forward_rate(model, x: torch.Tensor, device: torch.device, seconds: float = 2.0) -> float:
    """Images/s of ``model(x)`` under no_grad (x: one audit batch), over at least ``seconds``."""
    with torch.no_grad():
        model(x)
        sync(device)
        t0, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - t0 < seconds:
            model(x)
            calls += 1
        sync(device)
        return calls * x.shape[0] / (time.perf_counter() - t0)


def run_check(device: torch.device, cfg: dict, root: Path, workers: int = 0,
              zero_init_residual: bool = False) -> tuple[list[dict], dict]:
    """All measurements; returns the table rows and the details (per image values, sizes)."""
    from trustvision import audit, data
    from trustvision.evaluate.adversarial import attack, headline_eps
    from trustvision.explain import IGOS, IGOSPlusPlus
    from trustvision.explain.sis import SIS, BatchedGradientSIS, removal_ranks

    rows: list[dict] = []
    emit = emitter(rows)
    details: dict = {}

    def row(metric: str, value, target: str = "-", verdict: str = "-", **extra) -> None:
        emit({"metric": metric, "value": value, "target": target, "verdict": verdict, **extra})

    size = cfg["image_size"]
    folder = write_folder(root, cfg["images"], size=cfg["jpeg_size"])
    spec = f"imagefolder:{folder}"

    def load(split: str):
        return data.load(spec, split=split, image_size=size, crop=CROP, channels=3)

    n_split = {s: len(load(s)) for s in ("train", "val", "test")}
    train_x = load("train").subset(list(range(min(64, n_split["train"])))).tensors()[0]
    model, net = make_model(size, train_x, device, zero_init_residual)
    counted = [0]
    net.conv1.register_forward_pre_hook(lambda m, args: counted.__setitem__(0, counted[0] + len(args[0])))

    # -- the streamed audit ------------------------------------------------------------------------
    raw = raw_forward_rate(model, torch.rand(AUDIT_BATCH, 3, size, size, device=device), device)
    counted[0] = 0
    splits = audit.LazySplits(load)
    res, sec = timed(device, lambda: audit.run({"resnet50": model}, splits, checks=["accuracy", "calibration", "ood"],
                                               options={"batch_size": AUDIT_BATCH, "ood.n": cfg["ood_n"],
                                                        "num_workers": workers},
                                               device=str(device)))
    if not res.ok:
        raise RuntimeError(f"the audit failed: {res.results.get('errors')}")
    forwarded = counted[0]
    expected = (PROBE + n_split["train"] + n_split["val"] + 2 * n_split["test"]
                + OOD_SETS * min(cfg["ood_n"], n_split["test"]))
    details["audit"] = {"splits": n_split, "forwarded": forwarded, "expected": expected, "seconds": sec,
                        "raw_forward_images_per_s": raw, "peak_rss_mb": (rss_kb("VmHWM") or 0) / 1024}
    split_text = " / ".join(str(n_split[s]) for s in ("train", "val", "test"))
    row(f"audit: images forwarded (train / val / test {split_text})", forwarded, f"= {expected}",
        "pass" if forwarded == expected else "FAIL")
    rate = forwarded / sec
    row("audit (accuracy, calibration, ood): images/s", round(rate, 2))
    row(f"raw forward images/s (batch {AUDIT_BATCH})", round(raw, 2))
    row("audit / raw forward", round(rate / raw, 3), f">= {RAW_RATIO_TARGET}",
        "pass" if rate / raw >= RAW_RATIO_TARGET else "FAIL")

    # -- explanations: float32 and bf16 autocast on one batch --------------------------------------
    test = load("test")
    b = min(cfg["explain_batch"], n_split["test"])
    x = test.subset(list(range(b))).tensors()[0].to(device)
    warm_up(model, x)
    # what bf16 does to the model itself: its class probability and its input gradient
    dp, rho_grad = precision_effect(model, x)
    details["model_bf16"] = {"abs_dp": dp, "input_gradient_spearman": rho_grad}
    row("model bf16 vs fp32: mean abs. change of the predicted class probability", round(sum(dp) / b, 4))
    row("model bf16 vs fp32: input-gradient Spearman, mean", round(sum(rho_grad) / b, 4))
    p = size * size
    k = math.ceil(p / cfg["bgsis_iterations"])
    explainers = {
        "igos": lambda ac: IGOS(model).attribute(x, iterations=cfg["iterations"], ig_steps=cfg["ig_steps"],
                                                 autocast=ac),
        "igos++": lambda ac: IGOSPlusPlus(model).attribute(x, iterations=cfg["iterations"],
                                                           ig_steps=cfg["ig_steps"], autocast=ac),
        "bgsis": lambda ac: BatchedGradientSIS(model, k=k).attribute(x, autocast=ac),
    }
    for name, title in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # low-confidence flags of a random network: expected
            ref, t32 = timed(device, lambda: explainers[name](False))
            bf, t16 = timed(device, lambda: explainers[name](True))
        if name == "bgsis":
            maps = (removal_ranks(ref), removal_ranks(bf))
            details[name + "_status"] = [r.status for r in ref]
        else:
            maps = (ref, bf)
            details[name + "_dtype"] = str(bf.dtype)
        rho = spearman(*maps)
        mean = sum(rho) / len(rho)
        details[name] = {"spearman": rho, "seconds_fp32": t32, "seconds_bf16": t16, "images": b}
        row(f"{title} fp32: images/s (batch {b})", round(b / t32, 4))
        row(f"{title} bf16 autocast: images/s", round(b / t16, 4))
        row(f"{title} bf16 / fp32 speed", round(t32 / t16, 3), ">= 1 on a GPU",
            ("pass" if t32 >= t16 else "FAIL") if device.type == "cuda" else "-")
        row(f"{title} bf16 vs fp32 Spearman, mean (min {min(rho):.3f})", round(mean, 4), f">= {RANK_TARGET}",
            "pass" if mean >= RANK_TARGET else "FAIL")

    # -- exact SIS with patch:8 features -------------------------------------------------------------
    xs = x[: cfg["sis_images"]]
    sis, t = timed(device, lambda: SIS(model, features=cfg["sis_features"]).attribute(xs))
    details["sis"] = {"status": [r.status for r in sis], "evaluations": [r.evaluations for r in sis],
                      "grid": list(sis[0].grid), "seconds": t}
    row(f"exact SIS {cfg['sis_features']} ({sis[0].grid[0]} x {sis[0].grid[1]} features, "
        f"{sis[0].evaluations:,} forwards/image): images/s", round(len(xs) / t, 5))

    # -- PGD -------------------------------------------------------------------------------------------
    n_pgd = min(cfg["pgd_images"], n_split["test"])
    xp, yp = test.subset(list(range(n_pgd))).tensors()
    xp, yp = xp.to(device), yp.to(device)
    eps = headline_eps(size)
    adv, t = timed(device, lambda: attack(model, xp, yp, "pgd-linf", eps, steps=cfg["pgd_steps"], seed=0,
                                         batch_size=AUDIT_BATCH * 4))
    details["pgd"] = {"images": n_pgd, "eps": eps, "seconds": t,
                      "max_linf": float((adv - xp).abs().amax())}
    row(f"PGD-Linf {cfg['pgd_steps']} steps eps {eps * 255:.1f}/255: images/s ({n_pgd} images)", round(n_pgd / t, 3))
    return rows, details


def print_table(rows: list[dict], header: str) -> None:
    print("\n" + header)
    w = max(len(r["metric"]) for r in rows)
    vw = max(len(f"{r['value']}") for r in rows)
    tw = max(len(r["target"]) for r in rows)
    print(f"| {'metric':<{w}} | {'value':>{vw}} | {'target':<{tw}} | verdict |")
    print(f"|{'-' * (w + 2)}|{'-' * (vw + 1)}:|{'-' * (tw + 2)}|---------|")
    for r in rows:
        print(f"| {r['metric']:<{w}} | {r['value']:>{vw}} | {r['target']:<{tw}} | {r['verdict']:<7} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--scale", type=float, default=None,
                   help="sizes relative to the issue's (default 1 on a GPU, 0.1 on the CPU)")
    p.add_argument("--root", type=Path, default=Path("/tmp/trustvision-bench"), help="where the JPEG folders go")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes of the audit (default 8 on a GPU, at most the cores; 0 on the CPU)")
    p.add_argument("--json", default=None, help="also write the rows, settings and details to this file")
    p.add_argument("--zero-init-residual", action="store_true",
                   help="torchvision's zero_init_residual=True: every residual block starts as the identity (the "
                        "random network is then well conditioned; its bf16 gradients stay close to float32's)")
    a = p.parse_args(argv)
    from trustvision._utils.device import resolve_device
    from trustvision.errors import TrustVisionError

    try:
        device = resolve_device(a.device)
    except TrustVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scale = a.scale if a.scale is not None else (1.0 if device.type == "cuda" else 0.1)
    try:
        cfg = settings(scale)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    workers = a.workers if a.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {a.threads} torch thread(s)"
    t0 = time.perf_counter()
    rows, details = run_check(device, cfg, a.root, workers, a.zero_init_residual)
    total = time.perf_counter() - t0
    init = ", zero_init_residual" if a.zero_init_residual else ""
    header = (f"GPU check at scale {scale:g} on {where} (torch {torch.__version__}): ResNet-50 (random weights{init}) at "
              f"{cfg['image_size']} px, {cfg['images']} JPEGs, explanation batch {cfg['explain_batch']} "
              f"({cfg['iterations']} iterations, {cfg['ig_steps']} IG steps; BGSIS {cfg['bgsis_iterations']} "
              f"iterations), audit with {workers} loader worker(s); {total:.0f} s in all")
    print_table(rows, header)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "where": where, "torch": torch.__version__,
                                            "settings": {**cfg, "workers": workers, "threads": a.threads,
                                                         "zero_init_residual": a.zero_init_residual}, "seconds": total, "rows": rows, "details": details},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
