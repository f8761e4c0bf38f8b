"""Tiny hand-built models for the explanation tests."""

import pytest
import torch
from torch import nn


class OnePixel(nn.Module):
    """Two classes; logit_0 = a * x[0, r, c] + b, logit_1 = 0: only pixel (r, c) matters."""

    def __init__(self, r: int = 3, c: int = 5, a: float = 6.0, b: float = -3.0):
        super().__init__()
        self.r, self.c, self.a, self.b = r, c, a, b

    def forward(self, x):
        v = x[:, 0, self.r, self.c]
        return torch.stack([self.a * v + self.b, torch.zeros_like(v)], 1)


class TinyCNN(nn.Module):
    def __init__(self, in_chans: int = 1, classes: int = 3, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, classes)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g) * 0.04)
            self.fc.bias.zero_()

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.flatten(1))


@pytest.fixture
def one_pixel():
    return OnePixel()


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (many threads thrash on a shared CI machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
