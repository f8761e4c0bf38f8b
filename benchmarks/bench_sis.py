"""SIS benchmarks: exact SIS against the model's own forward throughput, find_batch vs one at a
time, Batched Gradient SIS against its limit, and the Table-1 reproduction (Carter et al. 2021).

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s) for the
  runner's table: exact SIS of one digits image, BGSIS of 32 textures images.
* ``python benchmarks/bench_sis.py [--device cuda] [--threads 1] [--only speed|large|table1] [--full]
  [--bgsis-batches 1,32]`` prints tables:

  - ``speed``: exact SIS model evaluations per second vs the model's raw batched forward
    throughput measured in the same run on the same inputs at the chunk size SIS uses (8 x 8
    ``zoo:small-cnn-digits``, 1 image, pixels; 32 x 32 ``zoo:small-cnn-textures``, 1 image, with
    ``patch:2`` features (256 features, the same 32 x 32 candidate images; seconds per image for
    pixels, 524,800 evaluations, are extrapolated from the measured rate, and measured with
    ``--full``); 224 x 224 ``patch:8`` on a random ResNet-18 only with ``--full`` on a CPU);
    ``find_batch`` on 32 digits images vs one at a time (same subsets checked); BGSIS seconds per
    image at 32 x 32 (textures) at batch 1 and 32, and the ratio to ceil(HW / k) x the measured time
    of ceil(HW / k) consecutive forward + backward passes of the same batch, timed once like the
    run, in back-to-back rounds (224 x 224 ResNet-18 with ``--full`` or ``--only large``).
  - ``table1``: the paper's Table 1 on the embedded data: a fresh small-cnn trained only on the 5%
    backward-selection subsets of the training images (exact SIS on digits, BGSIS on textures;
    masks on the same un-augmented images, removed pixels = training-set mean) tested on the 5%
    subsets of the test images, vs random 5% subsets; and the border-only model vs the full-image
    model. ``--train-n`` / ``--test-n`` limit the images (default: all).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import CallRecorder, Workload, best_seconds, emitter, paired, register, replay_seconds, sync  # noqa: E402


def _load(name: str, split: str, device):
    from trustvision import data, models

    net = models.load(f"zoo:small-cnn-{name}").to(device).eval()
    x, y = data.load(name, split=split).tensors()
    return net, x.to(device), y


# -- runner workloads ------------------------------------------------------------------------


@register("sis-exact:small-cnn-digits")
def _w_exact(device):
    from trustvision.explain.sis import SIS

    try:
        net, x, _ = _load("digits", "test", device)
    except Exception:
        return None
    sis = SIS(net, threshold=0.9)
    return Workload(run=lambda: sis.find(x[:1]), images=1, warmup=1, min_seconds=0.5, max_runs=20)


@register("bgsis:small-cnn-textures:b32")
def _w_bgsis(device):
    from trustvision.explain.sis import BatchedGradientSIS

    try:
        net, x, _ = _load("textures", "test", device)
    except Exception:
        return None
    bg = BatchedGradientSIS(net, threshold=0.9)
    return Workload(run=lambda: bg.find(x[:32]), images=32, warmup=1, min_seconds=0.5, max_runs=5)


# -- speed -----------------------------------------------------------------------------------


def forward_rate(net, x1: torch.Tensor, rows: int, device) -> float:
    """Images/s of the model's raw batched forward on ``rows`` copies of ``x1`` (no_grad, eval)."""
    xb = x1.expand(rows, *x1.shape[1:]).contiguous()
    with torch.no_grad():
        return rows / best_seconds(lambda: net(xb), device)


def fwd_bwd_step(net, x: torch.Tensor):
    """One forward + backward of the softmax probability w.r.t. a pixel mask (what one BGSIS
    iteration costs) on the batch ``x``, as a function."""
    n, _, h, w = x.shape

    def step():
        m = torch.zeros(n, 1, h, w, device=x.device, requires_grad=True)
        f = torch.softmax(net(x * (1 - m) + 0.5 * m), 1)[:, 0]
        torch.autograd.grad(f.sum(), m)

    return step


def fwd_bwd_seconds(net, x: torch.Tensor, device) -> float:
    """Seconds of the best of three single forward + backward passes (:func:`fwd_bwd_step`)."""
    return best_seconds(fwd_bwd_step(net, x), device)


def passes_seconds(step, count: int, device) -> float:
    """Seconds of ``count`` consecutive calls of ``step``, timed once (as a run is)."""

    def passes():
        for _ in range(count):
            step()

    return best_seconds(passes, device, repeat=1, warm=False)


def pass_limit_seconds(net, x1: torch.Tensor, rows: list[int], device) -> float:
    """The raw forward's time at the pass sizes of a run, on copies of one image (best of 3,
    measured once per distinct size): the limit where the run's inputs are too large to keep."""
    seconds = {r: 1.0 / forward_rate(net, x1, r, device) * r for r in sorted(set(rows))}
    return sum(seconds[r] for r in rows)


def exact_row(label: str, net, x1: torch.Tensor, features: str, device, full_p: int | None = None,
              remaining: int | None = None) -> dict:
    """Exact SIS of one image: evaluations/s against the raw forward at the chunk size, at the
    mean pass, and at the very passes backward selection made (the model's own limit for one
    image: its steps are sequential). ``remaining``: select among that many features only (the
    rest masked from the start, as a SIS collection does), for inputs whose full backward
    selection takes hours; the seconds of the full one are then extrapolated at the rate."""
    from trustvision.explain.sis import SIS, _auto_rows, parse_features

    # the run's inputs are kept for the replay (a copy of each pass: about 0.3% of a 224 px pass's
    # time, counted against the run)
    rec = CallRecorder(net).eval()
    sis = SIS(rec, threshold=0.9, features=features)
    rows = _auto_rows(x1[0].numel() * x1.element_size(), x1.device)
    h, w = x1.shape[-2:]
    k = parse_features(features)
    p_all = math.ceil(h / k) * math.ceil(w / k)

    def run(on=sis):
        if remaining is None:
            return on.backselect(x1)
        t = on._targets(x1, None)
        excluded = torch.ones(1, p_all, dtype=torch.bool, device=x1.device)
        excluded[0, :remaining] = False
        return on._backselect(x1, t, excluded)[0]

    if full_p is None and remaining is None:
        run()  # warm-up (cheap cases only)
    elif rows <= 64:  # a long run: the model once at every pass size it can make, so that neither
        with torch.no_grad():  # the run nor its replay pays for building kernels for a new shape
            for r in range(1, rows + 1):
                net(x1.expand(r, *x1.shape[1:]).contiguous())
    rec.clear()
    t0 = time.perf_counter()
    b = run()
    sync(device)
    sec = time.perf_counter() - t0
    if sec < 60 and rec.calls:  # the run on the bare model (no copies) against the replay, in rounds
        bare = SIS(net, threshold=0.9, features=features)  # (21 where a run takes under 2 s, else 3)
        sec, replay, ratio, _ = paired(lambda: run(bare),
                                       lambda: replay_seconds(net, rec.calls, device, repeat=1, warm=False), device,
                                       rounds=21 if sec < 2 else 3, budget=6.0 if sec < 2 else 300.0)
    else:  # one run and one replay (a long replay warms itself up)
        replay = replay_seconds(net, rec.calls, device, repeat=1, warm=False)
        ratio = None if replay is None else replay / sec
    rate = b.evaluations / sec
    fwd = forward_rate(net, x1, rows, device)
    limit = replay if replay is not None else pass_limit_seconds(net, x1, rec.rows, device)
    out = {"benchmark": f"sis-exact:{label}", "features": features, "evaluations": b.evaluations,
           "seconds_per_image": sec, "evals_per_s": rate, "forward_images_per_s": fwd, "ratio": rate / fwd,
           "chunk": rows, "forward_passes": len(rec.rows), "limit_seconds": limit,
           "limit": "replay of its inputs" if replay is not None else "copies of the image at its pass sizes",
           "ratio_to_limit": ratio if ratio is not None else limit / sec}
    if remaining is not None:
        out["features_selected"] = remaining
        out["features_total"] = p_all
        out["full_evaluations"] = p_all * (p_all + 1) // 2 + 1
        out["full_seconds_extrapolated"] = out["full_evaluations"] / rate
    if full_p is not None:
        out["pixel_evaluations"] = full_p * (full_p + 1) // 2 + 1
        out["pixel_seconds_extrapolated"] = out["pixel_evaluations"] / rate
    return out


def speed(device, full: bool, emit, small: bool = True, batches=(1, 32)) -> None:
    """The speed rows: the small models' (``small``), and with ``full`` (or on a GPU) the 32 x 32
    pixel exact SIS and the 224 px ResNet-18 rows; BGSIS at the ``batches``."""
    from trustvision.explain.sis import SIS, BatchedGradientSIS

    nets = []
    if small:
        dnet, dx, _ = _load("digits", "test", device)
        tnet, tx, _ = _load("textures", "test", device)
        emit(exact_row("small-cnn-digits-8px", dnet, dx[:1], "pixel", device))
        emit(exact_row("small-cnn-textures-32px", tnet, tx[:1], "patch:2", device, full_p=1024))
        if full:
            emit(exact_row("small-cnn-textures-32px", tnet, tx[:1], "pixel", device))

        # find_batch on 32 images vs one at a time
        rec = CallRecorder(dnet).eval()
        sis = SIS(rec, threshold=0.9)
        xs = dx[:32]
        batched = sis.find_batch(xs)  # (recorded: its passes are replayed)
        evals = sum(b.evaluations for b in batched)
        passes = len(rec.rows)
        bare = SIS(dnet, threshold=0.9)
        tb, limit, ratio, _ = paired(lambda: bare.find_batch(xs),
                                     lambda: replay_seconds(dnet, rec.calls, device, repeat=1, warm=False), device, rounds=5,
                                     budget=20)
        fwd = forward_rate(dnet, dx[:1], max(rec.rows), device)
        t0 = time.perf_counter()
        single = [sis.find(xs[i : i + 1]) for i in range(32)]
        sync(device)
        ts = time.perf_counter() - t0
        same = all(a.indices == b.indices and a.status == b.status for a, b in zip(batched, single))
        emit({"benchmark": "sis-find-batch:small-cnn-digits-8px", "images": 32, "batched_images_per_s": 32 / tb,
              "one_at_a_time_images_per_s": 32 / ts, "speedup": ts / tb, "same_subsets": same,
              "evaluations": evals, "evals_per_s": evals / tb, "forward_images_per_s": fwd,
              "ratio": evals / tb / fwd, "limit_seconds": limit, "ratio_to_limit": ratio,
              "forward_passes": passes})
        nets.append(("small-cnn-textures-32px", tnet, tx))
    if full or device.type == "cuda":
        from trustvision import models

        torch.manual_seed(0)
        rn = models.create("torchvision:resnet18", num_classes=1000, in_chans=3, image_size=224).to(device).eval()
        xr = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
        # 784 features: 307,721 evaluations (hours on a CPU): measured on the last 64 of them
        emit(exact_row("resnet18-224-random", rn, xr, "patch:8", device,
                       remaining=None if device.type == "cuda" else 64))
        nets.append(("resnet18-224-random", rn, torch.rand(32, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)))

    # BGSIS against ceil(p / k) forward + backward passes
    for label, net, xall in nets:
        p = xall.shape[-1] * xall.shape[-2]
        k = math.ceil(p / 100)
        iters = math.ceil(p / k)
        for bsz in batches:
            bg = BatchedGradientSIS(net, threshold=0.9)
            x = xall[:bsz]
            step = fwd_bwd_step(net, x)
            step()
            # a round: the run and its limit (iters consecutive passes), each timed once
            sec, limit, ratio, rounds = paired(lambda: bg.find(x), lambda: passes_seconds(step, iters, device),
                                               device, rounds=15, budget=5)
            best = fwd_bwd_seconds(net, x, device)
            emit({"benchmark": f"bgsis:{label}", "batch": bsz, "k": k, "iterations": iters,
                  "seconds_per_image": sec / bsz, "fwd_bwd_seconds": limit / iters, "limit_seconds": limit,
                  "rounds": rounds, "ratio_to_limit": 1 / ratio,  # run / limit, the median round's
                  "best_pass_seconds": best, "ratio_to_best_pass": sec / (iters * best)})


def print_speed(rows: list[dict]) -> None:
    print("\nExact SIS: model evaluations/s vs the model's raw batched forward (same run)")
    print("('fwd img/s': copies of the image in batches of the chunk size; 'limit s': the bare model's forward")
    print(" replayed on the very inputs and passes of the run: its own limit for this work; the last ratio is the")
    print(" median of back-to-back rounds of the run and the replay where a run takes under a minute: 21 rounds")
    print(" under 2 s, else 3)")
    print(f"{'model':28} {'features':9} {'evals':>9} {'s/image':>9} {'evals/s':>9} {'fwd img/s':>10} {'ratio':>6} "
          f"{'passes':>7} {'limit s':>8} {'ratio':>6}")
    for r in rows:
        if r["benchmark"].startswith("sis-exact:"):
            print(f"{r['benchmark'][10:]:28} {r['features']:9} {r['evaluations']:>9} {r['seconds_per_image']:>9.2f} "
                  f"{r['evals_per_s']:>9.0f} {r['forward_images_per_s']:>10.0f} {r['ratio']:>6.2f} "
                  f"{r['forward_passes']:>7} {r['limit_seconds']:>8.2f} {r['ratio_to_limit']:>6.2f}"
                  + ("" if r["limit"].startswith("replay") else " (limit: copies of the image at its pass sizes)"))
            if "pixel_seconds_extrapolated" in r:
                print(f"{'':28} pixel     {r['pixel_evaluations']:>9} {r['pixel_seconds_extrapolated']:>9.1f}"
                      "   (extrapolated at the measured rate)")
            if "full_seconds_extrapolated" in r:
                print(f"{'':28} (the last {r['features_selected']} of {r['features_total']} features; all "
                      f"{r['full_evaluations']} evaluations: {r['full_seconds_extrapolated']:.0f} s per image "
                      "at the measured rate)")
    for r in rows:
        if r["benchmark"].startswith("sis-find-batch"):
            print(f"\nfind_batch, 32 digits images: {r['batched_images_per_s']:.1f} images/s batched vs "
                  f"{r['one_at_a_time_images_per_s']:.1f} one at a time ({r['speedup']:.2f}x; same subsets: "
                  f"{r['same_subsets']}); {r['evaluations']} evaluations in {r['forward_passes']} passes, "
                  f"{r['evals_per_s']:.0f}/s = {r['ratio']:.2f} of the raw forward at its largest pass, "
                  f"{r['ratio_to_limit']:.2f} of the raw forward replayed on its inputs")
    print("\nBatched Gradient SIS vs ceil(HW/k) x one forward+backward of the same batch (ratio: the median of")
    print("back-to-back rounds of the run and ceil(HW/k) consecutive passes, each timed once; times: the best")
    print("round's; 'vs best': the best run against ceil(HW/k) x the best of three single passes)")
    print(f"{'model':28} {'batch':>5} {'k':>4} {'iters':>5} {'s/image':>9} {'fwd+bwd s':>10} {'ratio':>6} "
          f"{'best s':>8} {'vs best':>7}")
    for r in rows:
        if r["benchmark"].startswith("bgsis:"):
            print(f"{r['benchmark'][6:]:28} {r['batch']:>5} {r['k']:>4} {r['iterations']:>5} "
                  f"{r['seconds_per_image']:>9.3f} {r['fwd_bwd_seconds']:>10.4f} {r['ratio_to_limit']:>6.2f} "
                  f"{r['best_pass_seconds']:>8.4f} {r['ratio_to_best_pass']:>7.2f}")


# -- Table 1 ---------------------------------------------------------------------------------


def table1(device, train_n, test_n, emit, remedies: bool = False, datasets=("digits", "textures")) -> None:
    from trustvision import data, models
    from trustvision.evaluate.overinterpretation import overinterpretation

    for name in datasets:
        net = models.load(f"zoo:small-cnn-{name}").to(device).eval()
        t0 = time.perf_counter()
        r = overinterpretation(net, data.load(name, split="test"), data.load(name, split="train"), n=test_n,
                               train_n=train_n, fractions=(0.05,), with_remedies=remedies, device=str(device),
                               log=lambda m: print(f"  {name}: {m}", file=sys.stderr, flush=True))
        row = {"benchmark": f"table1:{name}", "method": r.method, "n_train": r.retrain["n_train"],
               "n_test": r.retrain["n_test"], "epochs": r.retrain["epochs"],
               "subset_bs_accuracy": r.subsets[0]["bs_accuracy"], "subset_random_accuracy": r.subsets[0]["random_accuracy"],
               "subset_bs_confidence": r.subsets[0]["bs_confidence"],
               "retrained_bs_accuracy": r.retrain["bs_accuracy"], "retrained_random_accuracy": r.retrain["random_accuracy"],
               "border_width": r.border["width"], "border_fraction": r.border["border_fraction"],
               "border_accuracy": r.border["border_accuracy"], "full_accuracy": r.border["full_accuracy"],
               "chance": r.retrain["chance"], "median_sis_fraction": r.sis["median_fraction"],
               "seconds": time.perf_counter() - t0}
        if remedies:
            row["remedies"] = [{k: v for k, v in m.items() if k != "fractions"} for m in r.remedies]
        emit(row)


def print_table1(rows: list[dict]) -> None:
    print("\nTable 1 (Carter et al. 2021) on the embedded data: test accuracy")
    print(f"{'data':9} {'method':6} {'train':>5} {'test':>5} {'5% BS (orig)':>12} {'5% rnd (orig)':>13} "
          f"{'retrained 5% BS':>15} {'retrained 5% rnd':>16} {'border':>14} {'full':>6} {'chance':>6} {'s':>6}")
    for r in rows:
        if r["benchmark"].startswith("table1:"):
            print(f"{r['benchmark'][7:]:9} {r['method']:6} {r['n_train']:>5} {r['n_test']:>5} "
                  f"{r['subset_bs_accuracy']:>12.3f} {r['subset_random_accuracy']:>13.3f} "
                  f"{r['retrained_bs_accuracy']:>15.3f} {r['retrained_random_accuracy']:>16.3f} "
                  f"{r['border_accuracy']:>6.3f} ({r['border_fraction']:.1%}) {r['full_accuracy']:>6.3f} "
                  f"{r['chance']:>6.3f} {r['seconds']:>6.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["speed", "large", "table1"], default=None,
                   help="large: only the 224 px ResNet-18 rows (as --full adds them to speed)")
    p.add_argument("--full", action="store_true", help="also exact SIS of a 32x32 image in pixels and the 224 px "
                                                       "ResNet-18 rows on a CPU (minutes)")
    p.add_argument("--train-n", type=int, default=0, help="training images of the Table-1 models (0 = all)")
    p.add_argument("--test-n", type=int, default=0, help="test images of the Table-1 models (0 = all)")
    p.add_argument("--datasets", default="digits,textures", help="Table-1 datasets (comma-separated)")
    p.add_argument("--remedies", action="store_true", help="add the remedies (ensemble, input dropout) to table1")
    p.add_argument("--bgsis-batches", default="1,32", help="BGSIS batch sizes (comma-separated; 32 at 224 px on a "
                                                          "CPU: about 13 minutes)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out: list[dict] = []
    emit = emitter(out)

    if args.only in (None, "speed", "large"):
        speed(device, args.full or args.only == "large", emit, small=args.only != "large",
              batches=[int(b) for b in args.bgsis_batches.split(",") if b.strip()])
        print_speed(out)
    if args.only in (None, "table1"):
        table1(device, args.train_n or None, args.test_n or None, emit, args.remedies,
               [d.strip() for d in args.datasets.split(",") if d.strip()])
        print_table1(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
