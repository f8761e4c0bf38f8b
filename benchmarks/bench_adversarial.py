"""PGD benchmarks: PGD images/s per step against the model's own forward + backward throughput,
measured in the same run on the same batch (target: ratio >= 0.8).

Two uses:

* ``benchmarks/run.py`` imports this module: it registers throughput workloads (images/s of a
  whole 10-step PGD-Linf attack) for the runner's table: ``zoo:small-cnn-digits`` (8 x 8) and
  ``zoo:small-cnn-textures`` (32 x 32) at batch 64.
* ``python benchmarks/bench_adversarial.py [--device cuda] [--threads 1] [--steps 10] [--json F]``
  prints the table: per model (8 x 8 digits, 32 x 32 textures) and batch (1, 64), PGD-Linf and
  PGD-L2 images x steps per second, the forward + backward images/s of the cross-entropy
  gradient w.r.t. the input (what one PGD step needs at least), and their ratio. One PGD call of
  ``steps`` steps costs ``steps`` forward + backward passes, one scoring forward of the last
  iterate, the seeded random start and the projections; the ratio says how close that comes to
  the passes alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from registry import Workload, best_seconds, emitter, register  # noqa: E402

MODELS = {"small-cnn-digits": "digits", "small-cnn-textures": "textures"}


def _load(name: str, device):
    from trustvision import data, models

    net = models.load(f"zoo:{name}").to(device).eval()
    x, y = data.load(MODELS[name], split="test").tensors()
    return net, x.to(device), y.to(device)


def _batch(x: torch.Tensor, y: torch.Tensor, n: int):
    reps = math.ceil(n / len(x))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n].contiguous()


# -- runner workloads ------------------------------------------------------------------------


def _workload(name: str, batch: int, steps: int = 10):
    def bench(device):
        from trustvision.evaluate.adversarial import headline_eps, pgd

        try:
            net, x, y = _load(name, device)
        except Exception:  # zoo not built
            return None
        xb, yb = _batch(x, y, batch)
        eps = headline_eps(tuple(x.shape[-2:]))
        return Workload(run=lambda: pgd(net, xb, yb, eps, steps=steps, seed=0), images=batch, warmup=1,
                        min_seconds=0.5, max_runs=50)

    return bench


for _name in MODELS:
    register(f"pgd-linf-10:{_name}:b64")(_workload(_name, 64))


# -- the table -------------------------------------------------------------------------------


def fwd_bwd_once(net, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward + backward of the per-image cross-entropy w.r.t. the input."""
    xi = x.detach().requires_grad_(True)
    loss = F.cross_entropy(net(xi), y, reduction="none")
    torch.autograd.grad(loss.sum(), xi)


def speed(device, steps: int, emit, repeat: int = 5, seconds: float = 4.0) -> None:
    """Rows of the table. One round times ``steps`` forward + backward passes of the batch (what
    the attack needs at least) and each attack once, back to back; the ratio is the median over
    the rounds of the per-round ratios (at least ``repeat`` rounds, more until ``seconds`` have
    passed), so that a neighbour's load on a shared machine, which changes over seconds, hits both
    sides of a ratio alike. Rates are the best round's."""
    import statistics

    from trustvision.evaluate.adversarial import headline_eps, pgd

    for name in MODELS:
        net, x, y = _load(name, device)
        size = tuple(x.shape[-2:])
        for batch in (1, 64):
            xb, yb = _batch(x, y, batch)
            attacks = {norm: (lambda norm=norm: pgd(net, xb, yb, headline_eps(size, norm), norm=norm, steps=steps,
                                                    seed=0)) for norm in ("linf", "l2")}

            def passes():
                for _ in range(steps):
                    fwd_bwd_once(net, xb, yb)

            def timed(fn) -> float:
                return best_seconds(fn, device, repeat=1, warm=False)

            for fn in (passes, *attacks.values()):  # warm-up
                fn()
            ratios = {norm: [] for norm in attacks}
            best_fb, best = math.inf, {norm: math.inf for norm in attacks}
            start, rounds = time.perf_counter(), 0
            while rounds < repeat or time.perf_counter() - start < seconds:
                rounds += 1
                fb = timed(passes)
                best_fb = min(best_fb, fb)
                for norm, fn in attacks.items():
                    t = timed(fn)
                    best[norm] = min(best[norm], t)
                    ratios[norm].append(fb / t)
            for norm in ("linf", "l2"):
                emit({"benchmark": f"pgd-{norm}:{name}", "image_size": list(size), "batch": batch, "steps": steps,
                      "eps": headline_eps(size, norm), "seconds_per_attack": best[norm],
                      "pgd_images_steps_per_s": batch * steps / best[norm],
                      "fwd_bwd_images_per_s": batch * steps / best_fb, "rounds": rounds,
                      "ratio": statistics.median(ratios[norm]),
                      "ratio_quartiles": statistics.quantiles(ratios[norm], n=4)[::2]})


def print_speed(rows: list[dict]) -> None:
    print("\nPGD images x steps / s vs the model's forward + backward images / s (same run, same batch; "
          "target >= 0.8)")
    print(f"{'attack':9} {'model':20} {'size':>5} {'batch':>5} {'steps':>5} {'s/attack':>9} {'PGD img*step/s':>15} "
          f"{'fwd+bwd img/s':>14} {'ratio':>6} {'quartiles':>11} {'rounds':>6}")
    print("(rates: the best round's; ratio: the median over rounds of (steps x fwd+bwd) / attack, timed back to back)")
    for r in rows:
        attack, model = r["benchmark"].split(":", 1)
        q = r.get("ratio_quartiles") or [r["ratio"], r["ratio"]]
        print(f"{attack:9} {model:20} {r['image_size'][0]:>5} {r['batch']:>5} {r['steps']:>5} "
              f"{r['seconds_per_attack']:>9.4f} {r['pgd_images_steps_per_s']:>15.0f} {r['fwd_bwd_images_per_s']:>14.0f} "
              f"{r['ratio']:>6.2f} {q[0]:>5.2f}-{q[1]:<5.2f} {r.get('rounds', ''):>6}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=9, help="interleaved timing rounds at least (more until 4 s "
                                                         "have passed per model and batch)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out: list[dict] = []
    emit = emitter(out)

    speed(device, args.steps, emit, args.repeat)
    print_speed(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
