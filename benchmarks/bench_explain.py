"""Explanation benchmarks: I-GOS / iGOS++ quality and speed, batched vs one image at a time, and SAG.

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s) for
  the runner's table (I-GOS / iGOS++ on a batch of 32 digits and one image at a time, SAG at
  grid 7; the 224 px ResNet-18 entries only on CUDA, they take minutes per call on a CPU).
* ``python benchmarks/bench_explain.py [--device cuda] [--json FILE] [--only ...]`` prints tables:

  - ``--only quality``: deletion / insertion AUC of I-GOS and iGOS++ (default l2 and l2 = 20: the
    paper's value; since issue 10 l2 is in the paper's units, so 20 is the default bit for bit,
    while the code before took it as an unscaled weight; ``--quality-l2`` chooses) on
    ``zoo:small-cnn-digits``, ``zoo:small-cnn-textures`` and a digits32 model
    (digits upsampled to 3x32x32, a small-cnn trained here for a few seconds, seeded), scored with
    the metric's own baseline (the paper's blur) and with an uninformative baseline
    (:func:`trustvision._utils.images.uninformative_baseline`), and the number of blank (constant)
    heatmaps on confidently classified images (p >= 0.5). ``--quality-save FILE`` stores the
    heatmaps; ``--compare FILE`` scores heatmaps stored by another version of the code (run it
    with ``--src DIR``, e.g. a checkout of the previous commit) beside the current ones.
  - ``--only speed``: per method and model, images/s of one call on a batch and of the same code
    called once per image, forward+backward and forward passes per image, the chunk sizes used,
    and the ratio of the measured time to the model limit: (fwd+bwd passes x the model's own
    measured seconds per fwd+bwd image at the chunk size used) + (fwd passes x its seconds per
    fwd image at the forward chunk size), and to the limit at the very batch shapes of the run's
    calls (per call shape the model's best of 3 timed calls at that many rows). Digits (zoo) at
    batches 8 and 32, ResNet-18 224 px (random weights) at batch 2 with reduced settings on a CPU.
  - ``--only paper-batching``: ResNet-18 224 px (random weights) at the paper's settings (15
    iterations, 20 IG points; ``--paper-iterations``), a batch of 2 against the same 2 images one
    at a time, a fresh explainer per run (a user's first call: the chunk probing included), in
    ``--paper-rounds`` alternating rounds (default 2), for ``--paper-methods`` (default
    igos,igos++): s / image per run, the chunks chosen, the ratio of the batched images/s to the
    one-at-a-time images/s per round and the largest heatmap difference between the two.
    Minutes per round on a CPU (iGOS++: about 7).
  - ``--only digits`` / ``--only resnet`` / ``--only sag``: the earlier per-model reports.

``--src DIR`` imports trustvision from DIR instead of this checkout (to measure another version;
what that version lacks is reported as missing). The run tunes glibc's malloc as the
``trustvision`` command does (:func:`trustvision.tune_cpu_allocator`, this checkout's, whatever
``--src``); ``--malloc-default`` keeps its defaults.
"""

from __future__ import annotations

import argparse
import collections
import math
import json
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import CallRecorder, Workload, best_seconds, paired, register, replay_seconds, sync  # noqa: E402

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


def _digits32(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)


def digits32_model(device: torch.device, steps: int = 150, seed: int = 0):
    """Digits upsampled to 3x32x32 RGB and a small-cnn trained on them for ``steps`` Adam steps
    (batch 64, lr 3e-3; seeded, one thread: the same weights for every version of the code).
    Returns the model and the test images."""
    from trustvision import data, models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        xtr, ytr = data.load("digits", split="train").tensors()
        xte, _ = data.load("digits", split="test").tensors()
        xtr, xte = _digits32(xtr), _digits32(xte)
        net = models.create("small-cnn", num_classes=10, in_chans=3, image_size=32)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(steps):
            i = torch.randint(0, len(ytr), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(net(xtr[i]), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.to(device).eval(), xte.to(device)


_QUALITY_MODELS: dict = {}


def quality_models(device: torch.device, n: int, n_digits: int = 450) -> dict:
    """name -> (model, its first test images: ``n_digits`` for digits, ``n`` for the others);
    built once per process (the digits32 model is trained here)."""
    from trustvision import data, models

    key = (str(device), n, n_digits)
    if key in _QUALITY_MODELS:
        return _QUALITY_MODELS[key]
    out = _QUALITY_MODELS[key] = {}
    for name, k in (("digits", n_digits), ("textures", n)):
        net = models.load(f"zoo:small-cnn-{name}").to(device).eval()
        x, _ = data.load(name, split="test").tensors()
        out[f"zoo:small-cnn-{name}"] = (net, x[:k].to(device))
    net, x = digits32_model(device)
    out["digits32 small-cnn"] = (net, x[:n])
    return out


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


# -- helpers ---------------------------------------------------------------------------------


def time_per_pass(net, x: torch.Tensor, chunk: int, device: torch.device,
                  reps: int = 3, only: str | None = None):
    """Seconds per image of the model's forward+backward (w.r.t. the input) and of its forward,
    at batch size ``chunk`` (the chunk size the explainer used), best of ``reps`` timed calls
    (``only`` = "fb" or "fw": that one alone, a float)."""
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

    if only:
        return best_seconds(fb if only == "fb" else fw, device, reps) / chunk
    return best_seconds(fb, device, reps) / chunk, best_seconds(fw, device, reps) / chunk


def limit_at_shapes(net, x: torch.Tensor, shapes: collections.Counter, device: torch.device,
                    reps: int = 3) -> float:
    """Seconds of the model's own calls at the very batch shapes a run used: per (rows, grad) the
    best of ``reps`` timed calls of a forward (+ backward w.r.t. the input) on that many rows,
    times the number of such calls."""
    total = 0.0
    for (rows, grad), count in shapes.items():
        sec = time_per_pass(net, x, rows, device, reps, only="fb" if grad else "fw")
        total += count * sec * rows
    return total


def _chunk_sizes(expl, x: torch.Tensor, settings: dict, method: str) -> tuple[int, int]:
    """The forward+backward and forward chunk sizes the explainer used on images like ``x``."""
    ibs = settings.get("internal_batch_size")
    if ibs:
        return ibs, ibs
    rows = x.shape[0] * settings.get("ig_steps", 20) * (4 if method == "igos++" else 1)
    chunkers = getattr(expl, "_chunkers", None)
    if not chunkers:  # code without automatic chunking: every row of a pass at once
        return rows, rows
    sizes = {}
    autocast = bool(settings.get("autocast", False))
    for key, ch in chunkers.items():  # key: (image shape, dtype, device, grad, autocast)
        if key[0] == tuple(x.shape[1:]) and key[4] == autocast:
            sizes[key[3]] = min(ch.chunk_size() or rows, rows)  # a pass is never cut below its rows
    return sizes.get(True, rows), sizes.get(False, rows)


def _fingerprint(net) -> float:
    """A number that changes with the weights (the stored heatmaps must be scored on the model that
    made them)."""
    return float(sum(p.detach().double().abs().sum() for p in net.parameters()))


def _constant(heat: torch.Tensor) -> torch.Tensor:
    flat = heat.flatten(1)
    return (flat.amax(1) - flat.amin(1)) < 1e-4


# -- speed -----------------------------------------------------------------------------------


def igos_report(name: str, method: str, net, x: torch.Tensor, device: torch.device, settings: dict,
                n_single: int | None = None, with_scores: bool = True, rounds: int = 3) -> dict:
    """Speed of ``method`` on ``x``: one batched call vs one call per image (both shapes warmed
    up first; the two timed in ``rounds`` alternating rounds, ``registry.paired``, the best of
    each), passes per image, the chunk sizes used and the ratio to the model limit; with
    ``with_scores`` also deletion/insertion of the batched and one-at-a-time heatmaps."""
    from trustvision import explain

    expl = explain.get(method)(net)
    n = x.shape[0]
    n_single = n if n_single is None else n_single
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # warm-up at both shapes that are timed (cuDNN / oneDNN pick kernels per shape on first
        # use; the automatic chunking measures the model on the first passes)
        expl.attribute(x, **{**settings, "iterations": 1})
        expl.attribute(x[:1], **{**settings, "iterations": 1})
        got: dict = {}

        def batched() -> None:
            got["heat"], got["info"] = expl.attribute(x, **settings), expl.last_info

        def one_at_a_time() -> float:  # seconds per image
            def run():
                got["singles"], got["fb1"], got["fw1"] = [], 0, 0
                for i in range(n_single):
                    got["singles"].append(expl.attribute(x[i : i + 1], **settings))
                    got["fb1"] += expl.last_info.forward_backward_passes
                    got["fw1"] += expl.last_info.forward_passes
            return best_seconds(run, device, repeat=1, warm=False) / n_single

        # (this machine's speed moves over seconds: the two alternate in rounds, the best of each)
        t_batch, t_single, _, _ = paired(batched, one_at_a_time, device, rounds=rounds, budget=math.inf)
        heat, info, singles, fb1, fw1 = (got[k] for k in ("heat", "info", "singles", "fb1", "fw1"))
        fb_chunk, fw_chunk = _chunk_sizes(expl, x, settings, method)
        fb_chunk1, fw_chunk1 = _chunk_sizes(expl, x[:1], settings, method)
        # the shapes of the model's calls (one more run of each, untimed) and the model's own
        # time at exactly those shapes (the limit "at that batch shape")
        shapes_b, shapes_1 = CallRecorder(net, keep_bytes=0).eval(), CallRecorder(net, keep_bytes=0).eval()
        explain.get(method)(shapes_b).attribute(x, **settings)
        e1 = explain.get(method)(shapes_1)
        for i in range(n_single):
            e1.attribute(x[i : i + 1], **settings)
    at_shapes = limit_at_shapes(net, x, shapes_b.shapes, device) / n
    at_shapes1 = limit_at_shapes(net, x, shapes_1.shapes, device) / n_single
    single = torch.cat(singles)
    fb, fw = info.forward_backward_passes / n, info.forward_passes / n
    t_fb, t_fw = time_per_pass(net, x, min(fb_chunk, 4096), device)
    _, t_fw_at = time_per_pass(net, x, min(fw_chunk, 4096), device)
    limit = fb * t_fb + fw * t_fw_at  # seconds per image if only the model's own passes cost time
    t_fb1, _ = time_per_pass(net, x, min(fb_chunk1, 4096), device)
    _, t_fw1 = time_per_pass(net, x, min(fw_chunk1, 4096), device)
    limit1 = (fb1 / n_single) * t_fb1 + (fw1 / n_single) * t_fw1
    row = {
        "benchmark": f"{method}:{name}", "method": method, "model": name, "device": str(device),
        "threads": torch.get_num_threads(), "batch": n, "settings": dict(settings),
        "images_per_s_batched": n / t_batch,
        "images_per_s_one_at_a_time": 1 / t_single,
        "speedup": (n / t_batch) * t_single,
        "fwd_bwd_passes_per_image": fb, "fwd_passes_per_image": fw,
        "fwd_passes_per_image_one_at_a_time": fw1 / n_single,
        "chunk_fwd_bwd": fb_chunk, "chunk_fwd": fw_chunk,
        "chunk_fwd_bwd_one_at_a_time": fb_chunk1, "chunk_fwd_one_at_a_time": fw_chunk1,
        "model_s_per_fwd_bwd_image": t_fb, "model_s_per_fwd_image": t_fw_at,
        "ratio_to_model_limit": (t_batch / n) / limit,
        "ratio_to_model_limit_one_at_a_time": t_single / limit1,
        "limit_at_shapes_s_per_image": at_shapes, "limit_at_shapes_s_per_image_one_at_a_time": at_shapes1,
        "ratio_to_limit_at_shapes": (t_batch / n) / at_shapes, "ratio_to_limit_at_shapes_one_at_a_time": t_single / at_shapes1,
        "heatmap_max_abs_diff": float((heat[:n_single] - single).abs().max()),
    }
    if with_scores:
        from trustvision.evaluate.faithfulness import deletion_insertion

        sb = deletion_insertion(net, x[:n_single], heat[:n_single]).summary()
        ss = deletion_insertion(net, x[:n_single], single).summary()
        row.update({"deletion_batched": sb["deletion_mean"], "deletion_one_at_a_time": ss["deletion_mean"],
                    "insertion_batched": sb["insertion_mean"], "insertion_one_at_a_time": ss["insertion_mean"]})
    return row


def speed_rows(device: torch.device, emit, skip_resnet: bool = False) -> None:
    """The speed table: digits at batches 8 and 32, ResNet-18 224 px at batch 2 (reduced settings
    on a CPU: 2 iterations, 5 IG points)."""
    net, x = digits_model(device)
    for m in ("igos", "igos++"):
        for b in (8, 32):
            emit(igos_report(f"small-cnn-digits-8px-batch{b}", m, net, x[:b], device, {"seed": 0},
                             n_single=8, with_scores=False))
    if skip_resnet:
        return
    cuda = device.type == "cuda"
    net, x = resnet18_model(device, 8 if cuda else 2)
    settings = {"seed": 0} if cuda else {"seed": 0, "iterations": 2, "ig_steps": 5}
    for m in ("igos", "igos++"):
        emit(igos_report("resnet18-224-random", m, net, x, device, settings, with_scores=False))
    if not cuda:  # the automatic chunking against the chunk the issue found fastest by hand
        emit(igos_report("resnet18-224-random", "igos++", net, x, device, {**settings, "internal_batch_size": 20},
                         with_scores=False))


def print_speed(rows: list[dict]) -> None:
    print("\n| method | model | settings | img/s batched | img/s one at a time | batched / single | "
          "fwd+bwd / img | fwd / img | chunk fwd+bwd / fwd (batch; single) | time / model limit batched | "
          "one at a time | time / limit at the call shapes batched | one at a time |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        s = {k: v for k, v in r["settings"].items() if k != "seed"} or "defaults"
        print(f"| {r['method']} | {r['model']} | {s} | {r['images_per_s_batched']:.2f} | "
              f"{r['images_per_s_one_at_a_time']:.2f} | {r['speedup']:.2f}x | {r['fwd_bwd_passes_per_image']:.0f} | "
              f"{r['fwd_passes_per_image']:.0f} | {r['chunk_fwd_bwd']} / {r['chunk_fwd']}; "
              f"{r['chunk_fwd_bwd_one_at_a_time']} / {r['chunk_fwd_one_at_a_time']} | "
              f"{r['ratio_to_model_limit']:.2f} | {r['ratio_to_model_limit_one_at_a_time']:.2f} | "
              f"{r['ratio_to_limit_at_shapes']:.2f} | {r['ratio_to_limit_at_shapes_one_at_a_time']:.2f} |")


# -- replay: the model's own time for the very calls a run makes --------------------------------


def replay_rows(device: torch.device, emit, n: int = 8, rounds: int = 9, budget: float = 12.0,
                resnet: bool = True) -> None:
    """I-GOS / iGOS++ on the 8x8 digits model (paper defaults, ``n`` images) and, with ``resnet``,
    on ResNet-18 at 224 px (random weights, 2 images; on a CPU at the speed table's reduced
    settings), one image at a time and as one batch: time per image against the bare model
    replaying the very calls of the run (same inputs, shapes and order), timed in alternating
    rounds (``registry.paired``): the best run against the best replay, and the median of the
    rounds' ratios. What exceeds 1 is the explainer's own work outside the model; the issue's
    model limit (forwards counted at the forward chunk's speed) is stricter still."""
    net, x = digits_model(device)
    cases = [("small-cnn-digits-8px", net, x[:n], {"seed": 0}, rounds, budget)]
    if resnet:
        cuda = device.type == "cuda"
        rnet, rx = resnet18_model(device, 2)
        cases.append(("resnet18-224-random", rnet, rx, {"seed": 0} if cuda else {"seed": 0, "iterations": 2, "ig_steps": 5},
                      3, 60.0))
    for name, model, xs, settings, rounds_, budget_ in cases:
        for method in ("igos", "igos++"):
            for batched in (False, True):
                emit(_replay_row(name, method, model, xs, settings, batched, device, rounds_, budget_))


def _replay_row(name, method, net, x, settings, batched, device, rounds, budget) -> dict:
    from trustvision import explain

    n = x.shape[0]
    rec = CallRecorder(net).eval()
    recorded, bare = explain.get(method)(rec), explain.get(method)(net)

    def run(e):
        if batched:
            e.attribute(x, **settings)
        else:
            for i in range(n):
                e.attribute(x[i : i + 1], **settings)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(recorded)  # records the calls (and warms up the automatic chunking)
        rec.clear()
        run(recorded)
        run(bare)  # warm-up of the bare explainer's chunking
        calls = rec.calls
        # the run and the replay of its calls back to back in alternating rounds (this
        # machine's speed moves over seconds: the median of the rounds' ratios is robust)
        sec, limit, inv, took = paired(lambda: run(bare), lambda: replay_seconds(net, calls, device, 1, False),
                                       device, rounds=rounds, budget=budget)
    return {"benchmark": f"{method}-replay:{name}", "method": method, "model": name,
            "mode": "batch" if batched else "one at a time", "images": n, "seconds_per_image": sec / n,
            "replay_seconds_per_image": limit / n, "ratio_to_replay": sec / limit,
            "median_round_ratio": 1 / inv, "rounds": took,
            "grad_calls_per_image": sum(g for _, g in calls) / n,
            "forward_calls_per_image": sum(not g for _, g in calls) / n,
            "rows_per_image": sum(z.shape[0] for z, _ in calls) / n}


def print_replay(rows: list[dict]) -> None:
    print("\n| model | method | mode | s / image | replay of its calls (s / image) | time / replay (best / best) "
          "| median of the rounds | rounds | fwd+bwd calls / image | fwd calls / image | rows / image |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "-replay:" in r["benchmark"]:
            print(f"| {r['model']} | {r['method']} | {r['mode']} | {r['seconds_per_image']:.4f} | {r['replay_seconds_per_image']:.4f} | "
                  f"{r['ratio_to_replay']:.2f} | {r['median_round_ratio']:.2f} | {r['rounds']} | {r['grad_calls_per_image']:.0f} | {r['forward_calls_per_image']:.0f} | "
                  f"{r['rows_per_image']:.0f} |")


# -- quality ---------------------------------------------------------------------------------


def quality_heatmaps(device: torch.device, n: int, n_digits: int, l2s=(None, 20.0),
                     baselines: str | None = None) -> dict:
    """(model, method, l2) -> heatmaps and seconds, for :func:`quality_models`; ``baselines``:
    the explainers' baseline (None: their default)."""
    from trustvision import explain

    out = {}
    for mname, (net, x) in quality_models(device, n, n_digits).items():
        out[("__model__", mname)] = _fingerprint(net)
        for method in ("igos", "igos++"):
            for l2 in l2s:
                kw = ({} if l2 is None else {"l2": l2}) | ({} if baselines is None else {"baselines": baselines})
                expl = explain.get(method)(net)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sync(device)
                    t0 = time.perf_counter()
                    heat = expl.attribute(x, **kw)
                    sync(device)
                info = expl.last_info
                out[(mname, method, "default" if l2 is None else f"{l2:g}")] = {
                    "heat": heat.cpu(), "seconds": time.perf_counter() - t0, "n": x.shape[0],
                    "fwd_bwd": info.forward_backward_passes / x.shape[0],
                    "fwd": info.forward_passes / x.shape[0],
                }
                print(f"  {mname} {method} l2={l2}: {out[(mname, method, 'default' if l2 is None else f'{l2:g}')]['seconds']:.1f}s",
                      file=sys.stderr, flush=True)
    return out


def score_heatmaps(device: torch.device, n: int, n_digits: int, heatmaps: dict) -> dict:
    """Deletion / insertion with the paper's blur (the metric's default) and with an
    uninformative baseline, and blank heatmaps on confident images, per key of ``heatmaps``."""
    from trustvision.evaluate.faithfulness import DeletionInsertionResult, deletion_insertion

    if "baseline_keeps_class" not in DeletionInsertionResult.__dataclass_fields__:
        raise ImportError("this version's metric has no baseline_keeps_class / adaptive-blur")
    models_ = quality_models(device, n, n_digits)
    scores = {}
    for key, r in heatmaps.items():
        if key[0] == "__model__":
            if abs(r - _fingerprint(models_[key[1]][0])) > 1e-3 * abs(r):
                print(f"warning: {key[1]} has other weights than the run that stored these heatmaps",
                      file=sys.stderr)
            continue
        net, x = models_[key[0]]
        heat = r["heat"].to(device)
        with torch.no_grad():
            p = torch.softmax(net(x), 1)
        t, conf = p.argmax(1), p.max(1).values
        blur = deletion_insertion(net, x, heat, target=t)
        unin = deletion_insertion(net, x, heat, target=t, baseline="adaptive-blur")
        const = _constant(heat).cpu()
        mean = (lambda v: float(torch.tensor(v).mean()))
        # the images on which the paper's blur takes the class away (the blur metric means
        # something there) and those on which the model still sees the class on it
        gone = [not k for k in blur.baseline_keeps_class]
        part = (lambda v, keep: float(torch.tensor([a for a, k in zip(v, gone) if k == keep]).mean())
                if any(k == keep for k in gone) else float("nan"))
        scores[key] = {
            "deletion_blur": mean(blur.deletion_auc), "insertion_blur": mean(blur.insertion_auc),
            "blur_keeps_class": int(sum(blur.baseline_keeps_class)),
            "deletion_blur_class_gone": part(blur.deletion_auc, True),
            "insertion_blur_class_gone": part(blur.insertion_auc, True),
            "deletion_blur_class_kept": part(blur.deletion_auc, False),
            "insertion_blur_class_kept": part(blur.insertion_auc, False),
            "deletion_uninformative": mean(unin.deletion_auc), "insertion_uninformative": mean(unin.insertion_auc),
            "blank_confident": int((const & (conf.cpu() >= 0.5)).sum()), "blank": int(const.sum()),
            "confident": int((conf >= 0.5).sum()), "n": int(x.shape[0]), "seconds": r["seconds"],
            "fwd_bwd": r["fwd_bwd"], "fwd": r["fwd"],
        }
    return scores


def print_quality(new: dict, old: dict | None) -> None:
    def cell(d, k, fmt="{:.3f}"):
        return fmt.format(d[k]) if d is not None and k in d else "-"

    main, split = [], []
    for key, s in new.items():
        o = (old or {}).get(key)
        pair = (lambda k, fmt="{:.3f}": f"{cell(o, k, fmt)} / {cell(s, k, fmt)}")
        per = (lambda d: f"{d['seconds'] / d['n']:.3f}" if d else "-")
        head = f"| {key[0]} | {key[1]} | {key[2]} | "
        main.append(head + f"{pair('deletion_blur')} | {pair('insertion_blur')} | "
                    f"{pair('deletion_uninformative')} | {pair('insertion_uninformative')} | "
                    f"{cell(o, 'blank_confident', '{:d}')} / {cell(s, 'blank_confident', '{:d}')} of {s['confident']} | "
                    f"{per(o)} / {per(s)} |")
        split.append(head + f"{s['blur_keeps_class']} of {s['n']} | "
                     f"{pair('deletion_blur_class_gone')} | {pair('insertion_blur_class_gone')} | "
                     f"{pair('deletion_blur_class_kept')} | {pair('insertion_blur_class_kept')} |")
    print("\n| model | method | l2 | deletion AUC, blur (today / new) | insertion AUC, blur | "
          "deletion AUC, uninformative baseline | insertion AUC, uninformative baseline | "
          "blank heatmaps on confident images | s / image (today / new) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(main))
    print("\nThe blur metric split by whether the model still sees the class on the paper's blur of the"
          " image (p on the blur >= half of p on the image):")
    print("\n| model | method | l2 | images where the blur keeps the class | deletion AUC, blur, class gone "
          "(today / new) | insertion AUC, blur, class gone | deletion AUC, blur, class kept | "
          "insertion AUC, blur, class kept |")
    print("|---|---|---|---:|---|---|---|---|")
    print("\n".join(split))


# -- SAG -------------------------------------------------------------------------------------


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


# -- main ------------------------------------------------------------------------------------


def paper_batching_rows(device: torch.device, emit, methods, rounds: int = 2, iterations: int = 15) -> None:
    """ResNet-18 224 px, a batch of 2 vs its images one at a time at the paper's settings, a fresh
    explainer per run, alternating rounds (see the module docstring)."""
    from trustvision import explain

    net, x = resnet18_model(device, 2)
    for method in methods:
        secs: dict[str, list[float]] = {"batch": [], "single": []}
        heat: dict[str, torch.Tensor] = {}
        chunks: dict[str, list] = {"batch": [], "single": []}
        for r in range(rounds):
            for mode in (("batch", "single") if r % 2 == 0 else ("single", "batch")):
                expl = explain.get(method)(net)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sync(device)
                    t0 = time.perf_counter()
                    if mode == "batch":
                        h = expl.attribute(x, iterations=iterations)
                    else:
                        h = torch.cat([expl.attribute(x[i : i + 1], iterations=iterations) for i in range(2)])
                    sync(device)
                secs[mode].append((time.perf_counter() - t0) / 2)
                heat[mode] = h
                fb, fw = _chunk_sizes(expl, x if mode == "batch" else x[:1], {"ig_steps": 20}, method)
                chunks[mode].append({"fwd+bwd": fb, "fwd": fw})
                print(f"  {method} round {r} {mode}: {secs[mode][-1]:.2f} s/img", file=sys.stderr, flush=True)
        emit({"benchmark": f"{method}-paper-batching:resnet18-224-random", "method": method,
              "iterations": iterations, "ig_steps": 20, "images": 2,
              "seconds_per_image_batched": secs["batch"], "seconds_per_image_one_at_a_time": secs["single"],
              "batched_over_one_at_a_time": [b / a for a, b in zip(secs["batch"], secs["single"])],
              "chunks_batched": chunks["batch"], "chunks_one_at_a_time": chunks["single"],
              "heatmap_max_abs_diff": float((heat["batch"] - heat["single"]).abs().max())})


def print_paper_batching(rows: list[dict]) -> None:
    print("\n| method | s / image batched (per round) | one at a time | batched / one-at-a-time images/s "
          "| chunks fwd+bwd / fwd (batch; single) | max abs heatmap diff |")
    print("|---|---|---|---|---|---:|")
    for r in rows:
        f = lambda v: ", ".join(f"{a:.2f}" for a in v)  # noqa: E731
        ch = lambda v: "/".join(str(v[-1].get(k)) for k in ("fwd+bwd", "fwd"))  # noqa: E731
        print(f"| {r['method']} | {f(r['seconds_per_image_batched'])} | {f(r['seconds_per_image_one_at_a_time'])} "
              f"| {', '.join(f'{a:.3f}x' for a in r['batched_over_one_at_a_time'])} "
              f"| {ch(r['chunks_batched'])}; {ch(r['chunks_one_at_a_time'])} | {r['heatmap_max_abs_diff']:.2g} |")


def _tune_allocator() -> bool:
    """This checkout's ``tune_cpu_allocator`` (loaded from its file: ``--src`` may name a version
    without it)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "src" / "trustvision" / "_utils" / "allocator.py"
    spec = importlib.util.spec_from_file_location("_tv_allocator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tune_cpu_allocator()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--only", choices=["digits", "resnet", "sag", "quality", "speed", "replay", "paper-batching"],
                   default=None,
                   help="replay: I-GOS / iGOS++ on 8x8 digits against the bare model replaying the run's calls")
    p.add_argument("--ibs", default=None,
                   help="comma-separated internal_batch_size values for the CUDA ResNet-18 runs "
                        "(default: 320 for I-GOS, 128 for iGOS++)")
    p.add_argument("--quality-n", type=int, default=64,
                   help="test images of textures and digits32 in the quality table (the first N)")
    p.add_argument("--quality-n-digits", type=int, default=450,
                   help="test images of digits in the quality table (default: the whole split)")
    p.add_argument("--quality-baselines", default=None,
                   help="the explainers' baseline in --only quality (e.g. blur: the metric's; default: theirs)")
    p.add_argument("--quality-l2", default="default,20",
                   help="comma-separated l2 values of the quality table (default: the default and 20)")
    p.add_argument("--quality-save", type=Path, default=None, help="store the quality heatmaps here")
    p.add_argument("--compare", type=Path, default=None,
                   help="heatmaps stored by --quality-save of another version: scored beside these")
    p.add_argument("--paper-methods", default="igos,igos++", help="methods of --only paper-batching")
    p.add_argument("--paper-rounds", type=int, default=2, help="alternating rounds of --only paper-batching")
    p.add_argument("--paper-iterations", type=int, default=15, help="iterations of --only paper-batching")
    p.add_argument("--src", type=Path, default=None, help="import trustvision from this source folder")
    p.add_argument("--malloc-default", action="store_true",
                   help="keep glibc's malloc defaults (by default the run tunes the allocator as the "
                        "trustvision command does, whatever --src: the versions compared run alike)")
    args = p.parse_args(argv)
    if not args.malloc_default:
        print(f"allocator tuned: {_tune_allocator()}", file=sys.stderr)
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    out = []

    def emit(r):
        out.append(r)
        print(json.dumps(r), flush=True)

    if args.only == "quality":
        l2s = tuple(None if v == "default" else float(v) for v in args.quality_l2.split(","))
        heat = quality_heatmaps(device, args.quality_n, args.quality_n_digits, l2s, args.quality_baselines)
        if args.quality_save:
            torch.save(heat, args.quality_save)
        try:
            new = score_heatmaps(device, args.quality_n, args.quality_n_digits, heat)
        except ImportError:  # a version without the uninformative baseline: store, score elsewhere
            print("this version cannot score the heatmaps (run the current code with --compare)")
            return 0
        old = (score_heatmaps(device, args.quality_n, args.quality_n_digits, torch.load(args.compare))
               if args.compare else None)
        print_quality(new, old)
        out = [{"key": list(k), "new": v, "today": (old or {}).get(k)} for k, v in new.items()]
    elif args.only == "speed":
        speed_rows(device, emit, args.skip_resnet)
        print_speed(out)
    elif args.only == "replay":
        replay_rows(device, emit, resnet=not args.skip_resnet)
        print_replay(out)
    elif args.only == "paper-batching":
        paper_batching_rows(device, emit, args.paper_methods.split(","), args.paper_rounds, args.paper_iterations)
        print_paper_batching(out)
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
        else:  # a CPU cannot run the full settings in minutes: 2 images, 2 iterations, 5 IG points
            net, x = resnet18_model(device, 2)
            for m in ("igos", "igos++"):
                emit(igos_report("resnet18-224-random", m, net, x, device,
                                 {"seed": 0, "iterations": 2, "ig_steps": 5}, with_scores=False))
            emit(sag_report("resnet18-224-random", net, x, 7, 2, image_specific_targets(net, x[:2])))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
