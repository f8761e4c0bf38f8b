"""Why trustvision writes its own invertible blocks instead of using FrEIA 0.2 (on torch 2.x).

These tests pin the FrEIA defects we hit; if one starts failing, FrEIA fixed it and the block
in ``trustvision.models.inn_blocks`` could be replaced by FrEIA's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

Fm = pytest.importorskip("FrEIA.modules")

from trustvision.models import inn_blocks as B  # noqa: E402


def test_freia_haar_inverse_overwrites_its_input():
    torch.manual_seed(0)
    haar = Fm.HaarDownsampling([(2, 4, 4)])
    x = torch.randn(3, 2, 4, 4)
    (y,), _ = haar([x])
    y_before = y.clone()
    (x_rec,), _ = haar([y], rev=True)
    assert torch.allclose(x_rec, x, atol=1e-5)
    assert not torch.equal(y, y_before)  # FrEIA scaled the caller's tensor in place
    # ours leaves its input alone
    ours = B.HaarDownsampling(2)
    y2, _ = ours(x)
    keep = y2.clone()
    ours(y2, rev=True)
    assert torch.equal(y2, keep)


def test_freia_all_in_one_block_breaks_autograd_with_relu_last_subnet():
    torch.manual_seed(0)
    block = Fm.AllInOneBlock(
        [(4, 2, 2)],
        subnet_constructor=lambda ci, co: nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.ReLU()),
    )
    (y,), ld = block([torch.randn(2, 4, 2, 2)])
    with pytest.raises(RuntimeError, match="inplace"):
        (y.sum() + ld.sum()).backward()  # it does `a *= 0.1` on the subnet's output


def test_freia_all_in_one_block_is_float32_accurate_only():
    torch.manual_seed(0)
    sub = lambda ci, co: nn.Sequential(nn.Conv2d(ci, 8, 3, padding=1), nn.ReLU(),  # noqa: E731
                                       nn.Conv2d(8, co, 3, padding=1))
    block = Fm.AllInOneBlock([(4, 2, 2)], subnet_constructor=sub, permute_soft=True).double()
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    (y,), _ = block([x])
    (x_rec,), _ = block([y], rev=True)
    # its orthogonal matrix was rounded to float32 before .double(): the inverse is off by ~1e-7
    assert (x_rec - x).abs().max() > 1e-10
    # ours is exact to float64 precision
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours = B.CouplingBlock(4, B.conv_subnet(8, batchnorm=False), torch.Generator().manual_seed(0))
    finally:
        torch.set_default_dtype(old)
    y2, _ = ours(x)
    assert (ours(y2, rev=True)[0] - x).abs().max() < 1e-12
