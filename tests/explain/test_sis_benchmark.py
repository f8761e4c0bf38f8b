"""The SIS benchmark's limit is the bare model replayed on the run's own passes (issue 12): the
recorder (``benchmarks/registry.CallRecorder``) sees every pass SIS makes, with its inputs, and
the row's figures are consistent."""

from __future__ import annotations

import torch
from _benchmarks import load_benchmark  # tests/_benchmarks.py
from torch import nn


def _bench_sis():
    return load_benchmark("bench_sis.py", "tv_bench_sis")


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.norm_mean = torch.full((1, 1, 1, 1), 0.5)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_recorder_sees_every_pass_and_the_row_is_consistent():
    b = _bench_sis()
    torch.manual_seed(0)
    net = Linear().eval()
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    from trustvision.explain.sis import SIS

    rec = b.CallRecorder(net).eval()
    SIS(rec, threshold=0.5).backselect(x)
    # the target's forward, the unmasked image, then one pass per step of 16, 15, ... 1 candidates
    assert rec.rows[-16:] == list(range(16, 0, -1)) and len(rec.calls) == len(rec.rows)
    assert all(t.shape[0] == r and not grad for (t, grad), r in zip(rec.calls, rec.rows))
    assert b.replay_seconds(net, rec.calls, torch.device("cpu"), repeat=1) > 0
    row = b.exact_row("linear-4px", net, x, "pixel", torch.device("cpu"))
    assert row["evaluations"] == 16 * 17 // 2 + 1 and row["limit"] == "replay of its inputs"
    assert row["forward_passes"] == len(rec.rows) and row["ratio_to_limit"] > 0
    part = b.exact_row("linear-4px", net, x, "patch:2", torch.device("cpu"), remaining=2)
    assert part["evaluations"] == 2 * 3 // 2 + 1 and part["full_evaluations"] == 4 * 5 // 2 + 1
    rec.clear()  # a call whose input needs a gradient is recorded as one (I-GOS's passes)
    z = x.clone().requires_grad_(True)
    torch.softmax(rec(z), 1)[:, 0].sum().backward()
    assert rec.rows == [1] and rec.calls[0][1] and torch.equal(rec.calls[0][0], x)
    assert b.replay_seconds(net, rec.calls, torch.device("cpu"), repeat=1) > 0
