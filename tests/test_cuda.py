"""The CUDA paths: every public entry point that takes a device runs on a GPU and gives the CPU's
answer (within float tolerance: cuDNN may use TF32 and other reduction orders). Skipped when no
GPU is present, as on CI; run them with ``pytest tests/test_cuda.py`` on a machine with CUDA."""

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from trustvision import data, explain, models
from trustvision.cli import main
from trustvision.data.shortcut import MARKER_POSITIONS

# TRUSTVISION_TEST_DEVICE=cpu runs these comparisons CPU against CPU (to check the tests themselves).
CUDA = torch.device(os.environ.get("TRUSTVISION_TEST_DEVICE", "cuda"))
# Every comparison runs in full fp32 on the GPU (the shared no_tf32 fixture of tests/conftest.py).
pytestmark = [pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("no_tf32")]


def _shortcut(n=12):
    ds = data.load("shortcut-digits", split="test", marked=True, return_mask=True)
    x, y = ds.tensors()
    return x[:n], y[:n], ds.masks[:n]


def _marker_mass(heat, masks):
    dilated = F.max_pool2d(masks, 3, stride=1, padding=1).flatten(1).to(heat.device)
    h = heat.clamp_min(0).flatten(1)
    return float(((h * dilated).sum(1) / h.sum(1).clamp_min(1e-12)).mean())


@pytest.mark.parametrize("method", ["igos", "igos++"])
def test_igos_on_cuda_matches_cpu_and_finds_the_marker(method):
    net = models.load("zoo:small-cnn-shortcut-digits")
    x, y, masks = _shortcut()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = explain.get(method)(net).attribute(x, target=y, noise=0.0)
        gpu_net = models.load("zoo:small-cnn-shortcut-digits", map_location=CUDA)
        expl = explain.get(method)(gpu_net)
        gpu = expl.attribute(x.to(CUDA), target=y.to(CUDA), noise=0.0)
        noisy = expl.attribute(x.to(CUDA), target=y.to(CUDA))  # the noise generator on the GPU
    assert gpu.device.type == CUDA.type and gpu.shape == (12, 1, 8, 8)
    assert noisy.device.type == CUDA.type and torch.isfinite(noisy).all()
    # Same algorithm, same numbers: the masks agree to float tolerance (Armijo takes the same steps).
    assert (gpu.cpu() - cpu).abs().max() < 1e-3
    assert _marker_mass(gpu, masks) >= 0.5 and _marker_mass(noisy, masks) >= 0.5


def test_igos_internal_batch_size_on_cuda_gives_the_same_heatmaps():
    net = models.load("zoo:small-cnn-shortcut-digits", map_location=CUDA)
    x, y, _ = _shortcut(6)
    x, y = x.to(CUDA), y.to(CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = explain.IGOS(net).attribute(x, target=y, noise=0.0)
        chunked = explain.IGOS(net).attribute(x, target=y, noise=0.0, internal_batch_size=7)
    assert (whole - chunked).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["saliency", "integrated-gradients", "gradcam", "occlusion"])
def test_captum_methods_on_cuda_match_cpu(method):
    net = models.load("zoo:small-cnn-digits")
    x, _ = data.load("digits", split="test").tensors()
    x = x[:8]
    cpu = explain.attribute(net, x, method=method)
    gpu = explain.attribute(models.load("zoo:small-cnn-digits", map_location=CUDA), x.to(CUDA), method=method)
    assert gpu.device.type == CUDA.type and gpu.shape == cpu.shape
    scale = cpu.abs().max().clamp_min(1e-6)
    assert ((gpu.cpu() - cpu).abs().max() / scale) < 1e-3


def test_deletion_insertion_on_cuda_matches_cpu():
    from trustvision.evaluate.faithfulness import deletion_insertion

    net = models.load("zoo:small-cnn-digits")
    x, _ = data.load("digits", split="test").tensors()
    x = x[:8]
    heat = explain.attribute(net, x, method="saliency")
    cpu = deletion_insertion(net, x, heat)
    gpu = deletion_insertion(models.load("zoo:small-cnn-digits", map_location=CUDA), x.to(CUDA), heat.to(CUDA))
    assert torch.allclose(torch.tensor(gpu.deletion_auc), torch.tensor(cpu.deletion_auc), atol=1e-4)
    assert torch.allclose(torch.tensor(gpu.insertion_auc), torch.tensor(cpu.insertion_auc), atol=1e-4)


def test_sag_on_cuda_matches_cpu_and_contains_the_marker():
    x, y, _ = _shortcut(4)
    grid = 4
    cpu_sag = explain.SAG(models.load("zoo:small-cnn-shortcut-digits"), grid=grid)
    gpu_sag = explain.SAG(models.load("zoo:small-cnn-shortcut-digits", map_location=CUDA), grid=grid)
    for i in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = cpu_sag.explain(x[i], target=int(y[i]))
            b = gpu_sag.explain(x[i].to(CUDA), target=int(y[i]))
        r, c = MARKER_POSITIONS[int(y[i])]
        patch = (r * grid // 8) * grid + c * grid // 8
        assert b.roots and all(patch in root for root in b.roots)
        assert sorted(map(sorted, a.roots)) == sorted(map(sorted, b.roots))
        json.dumps(b.to_json())  # plain numbers, no CUDA tensors left in the result


def test_ibinn_on_cuda_inverts_and_matches_cpu_likelihoods():
    from trustvision.explain.generative import LatentCounterfactual, sample_grid

    x, _ = data.load("digits", split="test").tensors()
    x = x[:16]
    cpu = models.load("zoo:ibinn-small-digits")
    gpu = models.load("zoo:ibinn-small-digits", map_location=CUDA)
    xg = x.to(CUDA)
    with torch.no_grad():
        z, _ = gpu.latent(xg)
        assert (gpu.invert(z) - xg).abs().max() < 1e-4
        lp_cpu, lp_gpu = cpu.log_px(x), gpu.log_px(xg)
        assert torch.allclose(lp_gpu.cpu(), lp_cpu, rtol=1e-4, atol=1e-2)
        assert torch.equal(gpu(xg).argmax(1).cpu(), cpu(x).argmax(1))
        s = gpu.sample(3, n=4)
        assert s.device.type == CUDA.type and torch.isfinite(s).all()
    grid = sample_grid(gpu, classes=[0, 1], n=2)
    assert grid.shape[:2] == (2, 2) and torch.isfinite(grid).all()
    cf = LatentCounterfactual(gpu).attribute(xg[:4], target=7)
    assert cf.probs[:, -1].min() > 0.5  # the end point is classified as the target class


def test_checkpoint_saved_from_cuda_loads_on_cpu(tmp_path):
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).to(CUDA)
    models.save(net, tmp_path / "m")
    back = models.load(tmp_path / "m")
    for (k, a), (_, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert b.device.type == "cpu" and torch.equal(a.cpu(), b), k


def test_train_ibinn_on_cuda(tmp_path):
    assert main(["train", "--model", "ibinn-small", "--data", "digits", "--epochs", "2", "--device", str(CUDA),
                 "--out", str(tmp_path), "--no-progress"]) == 0
    net = models.load(tmp_path)
    x, y = data.load("digits", split="test").tensors()
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    assert acc > 0.5, acc


def test_audit_on_cuda_gives_the_cpu_figures(tmp_path):
    args = ["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--checks", "accuracy,calibration",
            "--no-progress"]
    assert main(args + ["--device", str(CUDA), "--out", str(tmp_path / "gpu")]) == 0
    assert main(args + ["--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    g = json.loads((tmp_path / "gpu" / "results.json").read_text())["models"][0]["metrics"]
    c = json.loads((tmp_path / "cpu" / "results.json").read_text())["models"][0]["metrics"]
    assert g.keys() == c.keys() and g
    for k in g:
        if isinstance(c[k], float):
            assert abs(g[k] - c[k]) < 1e-4, (k, g[k], c[k])


def test_explain_cli_on_cuda(tmp_path):
    assert main(["explain", "--model", "zoo:small-cnn-shortcut-digits", "--data", "shortcut-digits",
                 "--method", "igos", "--n", "4", "--device", str(CUDA), "--out", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert len(scores["images"]) == 4
