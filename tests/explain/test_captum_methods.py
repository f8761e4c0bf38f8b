"""Captum-backed methods and the registry: hand-computed answers, shapes, one-line errors."""

import pytest
import torch
from torch import nn

from trustvision.errors import TrustVisionError
from trustvision import explain


class IGPaperNet(nn.Module):
    """ReLU(ReLU(x1) - 1 - ReLU(x2)) on a 1x1x2 'image' (Sundararajan et al.)."""

    def forward(self, x):
        x1, x2 = x[:, 0, 0, 0], x[:, 0, 0, 1]
        return torch.relu(torch.relu(x1) - 1 - torch.relu(x2)).unsqueeze(1)


def test_integrated_gradients_paper_example():
    x = torch.tensor([[[[3.0, 1.0]]]])
    a = explain.get("integrated-gradients")(IGPaperNet()).attribute(x, target=0, n_steps=500)
    assert a.shape == (1, 1, 1, 2)
    torch.testing.assert_close(a[0, 0, 0], torch.tensor([1.5, -0.5]), atol=2e-2, rtol=0)
    # completeness: attributions sum to f(x) - f(0) = 1
    assert float(a.sum()) == pytest.approx(1.0, abs=2e-2)


def test_saliency_of_a_linear_model_is_its_weights():
    lin = nn.Linear(2 * 4 * 4, 3)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(2, 2, 4, 4)
    s = explain.get("saliency")(model).attribute(x, target=1)
    w = lin.weight[1].detach().view(2, 4, 4).abs().amax(0)
    torch.testing.assert_close(s, w.expand(2, 1, 4, 4))


def test_occlusion_finds_the_only_pixel(one_pixel):
    x = torch.ones(2, 1, 8, 8)
    a = explain.get("occlusion")(one_pixel).attribute(x, target=0, window=1, stride=1)
    assert a.shape == (2, 1, 8, 8)
    assert (a.flatten(1).argmax(1) == 3 * 8 + 5).all()
    assert float(a[0, 0, 3, 5]) == pytest.approx(6.0)  # logit drop a * 1
    assert float(a.abs().sum()) == pytest.approx(12.0)


def test_gradcam_shape_and_sign(tiny_cnn):
    x = torch.rand(3, 1, 8, 8)
    a = explain.attribute(tiny_cnn, x, method="gradcam")
    assert a.shape == (3, 1, 8, 8) and (a >= 0).all()
    with pytest.raises(TrustVisionError, match="convolutional"):
        explain.get("gradcam")(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)))


# methods a plain CNN cannot serve (likelihood-ratio needs a generative classifier) are tested
# in their own files (test_explain_generative.py)
@pytest.mark.parametrize("name", [m for m in explain.list_methods() if not explain.get(m).requires
                                  or m == "gradcam"])
def test_every_method_has_one_signature(name, tiny_cnn):
    x = torch.rand(2, 1, 8, 8)
    fast = {"iterations": 2, "ig_steps": 2, "n_masks": 20}
    kw = {k: v for k, v in fast.items() if k in explain.get(name).keywords()}
    a = explain.get(name)(tiny_cnn).attribute(x, target=None, seed=0, internal_batch_size=None, **kw)
    assert a.shape == (2, 1, 8, 8)
    assert torch.isfinite(a).all()


def test_registry_names_and_errors():
    # list_methods() lists the heatmap methods (SAG, a graph method, only with kind=None)
    assert explain.list_methods() == sorted(
        ["gradcam", "igos", "igos++", "integrated-gradients", "likelihood-ratio", "occlusion",
         "rise", "saliency"]
    )
    assert explain.list_methods(kind=None) == sorted(explain.list_methods() + ["sag", "sis", "bgsis", "xnn"])
    assert explain.list_methods(kind="subset") == ["bgsis", "sis"]
    assert explain.list_methods(kind="concepts") == ["xnn"]
    assert explain.get("igos++") is explain.IGOSPlusPlus
    with pytest.raises(TrustVisionError, match="did you mean 'igos\\+\\+'"):
        explain.get("igos+")


def test_sources_are_device_agnostic():
    """No hard-coded devices: everything follows the inputs' device (CPU here, GPU alike)."""
    from pathlib import Path

    import trustvision.evaluate.faithfulness as fa

    files = list(Path(explain.__file__).parent.glob("*.py")) + [Path(fa.__file__)]
    for f in files:
        text = f.read_text()
        assert ".cuda(" not in text and 'device="cuda' not in text, f
