"""Every invertible block: exact inverse, log-det == autograd slogdet, gradients (float64, CPU)."""

from __future__ import annotations

import pytest
import torch

from trustvision.models import inn_blocks as B
from trustvision.models.generative import _PartialFlow


def _gen():
    return torch.Generator().manual_seed(0)


def _perturb(block: torch.nn.Module, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


# name -> (factory, per-example input shape)
BLOCKS = {
    "actnorm": (lambda: B.ActNorm(4), (4, 2, 2)),
    "orthogonal": (lambda: B.OrthogonalMixing(4, _gen()), (4, 2, 2)),
    "orthogonal-blocked": (lambda: B.OrthogonalMixing(6, _gen(), max_block=2), (6, 1, 2)),
    "coupling": (lambda: B.AffineCoupling(4, B.conv_subnet(8, batchnorm=False), clamp=1.5), (4, 2, 2)),
    "coupling-odd": (lambda: B.AffineCoupling(3, B.conv_subnet(8, batchnorm=False)), (3, 2, 2)),
    "coupling-block": (lambda: B.CouplingBlock(4, B.conv_subnet(8, batchnorm=False), _gen()), (4, 2, 2)),
    "coupling-bottleneck": (lambda: B.CouplingBlock(4, B.bottleneck_subnet(8, batchnorm=False), _gen()),
                            (4, 2, 2)),
    "fc-coupling-block": (lambda: B.CouplingBlock(6, B.fc_subnet(8), _gen(), ndim=0), (6,)),
    "haar": (lambda: B.HaarDownsampling(2), (2, 2, 4)),
    "squeeze": (lambda: B.Squeeze(), (2, 2, 4)),
    "downsample-coupling": (lambda: B.DownsampleCoupling(1, B.conv_subnet(8, batchnorm=False), _gen()),
                            (1, 4, 4)),
    "dct-pooling": (lambda: B.DCTPooling(2, 2, 3), (2, 2, 3)),
    "partial-fc": (lambda: _PartialFlow(B.InvertibleSequential(
        B.CouplingBlock(4, B.fc_subnet(8), _gen(), ndim=0)), 4), (7,)),
}


def _make(name):
    factory, shape = BLOCKS[name]
    block = factory()
    _perturb(block)
    return block.eval(), shape


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_inverse_float64(name, f64):
    block, shape = _make(name)
    x = torch.randn(5, *shape)
    y, ld = block(x)
    assert ld.shape == (5,)
    x_rec, ld_rev = block(y, rev=True)
    assert torch.allclose(x_rec, x, atol=1e-12, rtol=0)
    assert torch.allclose(ld_rev, -ld, atol=1e-12)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_inverse_float32(name):
    block, shape = _make(name)
    x = torch.randn(5, *shape)
    x_rec, _ = block(block(x)[0], rev=True)
    assert (x_rec - x).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_logdet_matches_autograd_slogdet(name, f64):
    block, shape = _make(name)
    x = torch.randn(1, *shape)
    _, ld = block(x)
    jac = torch.autograd.functional.jacobian(lambda t: block(t)[0], x)
    d = x.numel()
    sign, logabs = torch.linalg.slogdet(jac.reshape(d, d))
    assert sign != 0
    assert torch.allclose(ld[0], logabs, atol=1e-10), (float(ld[0]), float(logabs))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_parameter_gets_a_gradient(name):
    block, shape = _make(name)
    block.train()
    x = torch.randn(4, *shape, requires_grad=True)
    y, ld = block(x)
    (y.pow(2).sum() - ld.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


def test_coupling_soft_clamp_bounds_log_scale():
    block = B.AffineCoupling(2, B.fc_subnet(4), clamp=0.5)
    with torch.no_grad():
        block.subnet[-1].bias.fill_(100.0)  # huge raw scale
    _, ld = block(torch.randn(3, 2))
    assert torch.all(ld <= 0.5 + 1e-6)  # one active dimension, |s| <= clamp


def test_zero_init_blocks_start_as_identity():
    x = torch.randn(3, 4, 2, 2)
    block = B.AffineCoupling(4, B.conv_subnet(8))
    y, ld = block.eval()(x)
    assert torch.equal(y, x) and torch.all(ld == 0)


def test_haar_is_orthonormal_with_lowpass_first():
    x = torch.rand(2, 3, 4, 4)
    y, _ = B.HaarDownsampling(3)(x)
    assert torch.allclose(y.pow(2).sum(), x.pow(2).sum(), atol=1e-5)
    # first C channels = 2 x the 2x2 average pooling
    assert torch.allclose(y[:, :3], 2 * torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)


def test_dct_pooling_puts_scaled_channel_means_first():
    x = torch.rand(2, 3, 4, 4)
    y, _ = B.DCTPooling(3, 4, 4)(x)
    assert y.shape == (2, 48)
    assert torch.allclose(y[:, :3], x.mean(dim=(2, 3)) * 4, atol=1e-5)
    assert torch.allclose(y.pow(2).sum(1), x.pow(2).sum(dim=(1, 2, 3)), atol=1e-4)


def test_orthogonal_mixing_is_seeded_not_global():
    torch.manual_seed(0)
    a = B.OrthogonalMixing(5, torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    b = B.OrthogonalMixing(5, torch.Generator().manual_seed(3))
    assert torch.equal(a.blocks, b.blocks)
    w = a.blocks[0].double()
    assert torch.allclose(w @ w.t(), torch.eye(5, dtype=torch.float64), atol=1e-6)
