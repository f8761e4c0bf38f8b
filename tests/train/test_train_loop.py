"""fit(): learns, is seeded, resumes to bit-identical weights, uses the model hooks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trustvision import models
from trustvision.errors import TrustVisionError
from trustvision.train import RandomShift, evaluate_accuracy, fit
from trustvision.train.loop import STATE_FILE

from _train_toy import TinyNet, halves


def test_fit_learns_separable_task_and_loss_decreases():
    torch.manual_seed(0)
    net = TinyNet()
    train, val, test = halves(96, seed=0), halves(40, seed=1, split="val"), halves(40, seed=2, split="test")
    assert evaluate_accuracy(net, test) < 0.9
    res = fit(net, train, val, epochs=8, lr=0.05, batch_size=16, test_set=test, progress=False)
    losses = [h.train_loss for h in res.history]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    assert res.test_accuracy == 1.0 and res.val_accuracy == 1.0
    assert res.history[-1].val_accuracy == 1.0
    # cosine schedule: full rate in epoch 1, decaying afterwards
    assert res.history[0].lr == pytest.approx(0.05)
    assert res.history[4].lr == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    json.dumps(res.to_dict())  # serialisable


def test_evaluate_accuracy_known_answer():
    net = TinyNet()
    with torch.no_grad():  # predicts "left" iff left half brighter: exactly the labelling rule
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        w = torch.zeros(1, 4, 4)
        w[:, :, :2], w[:, :, 2:] = 1.0, -1.0
        net.fc.weight[1] = w.flatten()
        net.fc.weight[0] = -w.flatten()
    ds = halves(50)
    assert evaluate_accuracy(net, ds, batch_size=7) == 1.0
    ds.labels = 1 - ds.labels
    assert evaluate_accuracy(net, ds, batch_size=7) == 0.0


def test_fit_is_seeded_and_leaves_global_rng_alone():
    def run(seed):
        torch.manual_seed(123)
        net = TinyNet(dropout=0.3)
        fit(net, halves(), epochs=2, lr=0.05, batch_size=16, seed=seed, progress=False,
            input_dropout=0.8, augment=RandomShift(1))
        return net.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    net = TinyNet(dropout=0.3)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    fit(net, halves(), epochs=1, lr=0.01, batch_size=16, progress=False)
    assert torch.equal(torch.rand(3), expected)


def _small_cnn(seed):
    torch.manual_seed(seed)
    return models.create("small-cnn", num_classes=2, in_chans=1, image_size=4, widths=(4, 8), dropout=0.3)


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    kw = dict(epochs=3, lr=0.01, batch_size=16, seed=7, progress=False, input_dropout=0.8,
              augment=RandomShift(1), opt="sgd", weight_decay=1e-4)
    train, val = halves(90), halves(30, seed=1, split="val")
    straight = _small_cnn(0)
    ref = fit(straight, train, val, out=tmp_path / "a", **kw)

    def stop_after_first(stats):
        if stats.epoch == 1:
            raise KeyboardInterrupt

    interrupted = _small_cnn(0)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, train, val, out=tmp_path / "b", on_epoch_end=stop_after_first, **kw)
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["epoch"] == 1
    with pytest.raises(TrustVisionError, match="--resume"):
        fit(_small_cnn(0), train, val, out=tmp_path / "b", **kw)
    resumed_model = _small_cnn(99)  # different init: everything must come from the state
    resumed = fit(resumed_model, train, val, out=tmp_path / "b", resume=True, **kw)
    assert resumed.resumed_from_epoch == 1
    sa, sb = straight.state_dict(), resumed_model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h.train_loss for h in ref.history] == [h.train_loss for h in resumed.history]
    assert resumed.val_accuracy == ref.val_accuracy


def test_resume_rejects_changed_settings(tmp_path):
    fit(_small_cnn(0), halves(32), epochs=1, lr=0.01, batch_size=16, out=tmp_path, progress=False)
    with pytest.raises(TrustVisionError, match="--lr"):
        fit(_small_cnn(0), halves(32), epochs=2, lr=0.1, batch_size=16, out=tmp_path, resume=True,
            progress=False)


def test_final_checkpoint_is_loadable_with_metrics(tmp_path):
    net = _small_cnn(0)
    res = fit(net, halves(64), halves(20, seed=1, split="val"), test_set=halves(20, seed=2, split="test"),
              epochs=2, lr=0.01, batch_size=16, out=tmp_path, progress=False)
    loaded = models.load(str(tmp_path))
    cfg = loaded.tv_config
    assert cfg["dataset"] == "halves" and cfg["classes"] == ["right", "left"]
    assert cfg["metrics"] == {"test_accuracy": res.test_accuracy, "val_accuracy": res.val_accuracy}
    x = torch.rand(5, 1, 4, 4)
    assert torch.allclose(loaded.eval()(x), net.eval()(x), atol=1e-6)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_accuracy"] == res.test_accuracy and len(saved["history"]) == 2


class HookNet(TinyNet):
    """Uses every optional hook of the loop."""

    def __init__(self):
        super().__init__()
        self.loss_calls = 0
        self.after = None

    def training_loss(self, x, y):
        self.loss_calls += 1
        logits = self(x)
        return F.cross_entropy(logits, y) * 2.0, logits

    def param_groups(self, lr):
        return [{"params": [self.fc.weight], "lr": lr}, {"params": [self.fc.bias], "lr": 0.0}]

    def after_training(self, loader):
        self.after = sum(int(y.shape[0]) for _, y in loader)


def test_model_hooks_are_used():
    net = HookNet()
    bias0 = net.fc.bias.detach().clone()
    fit(net, halves(48), epochs=2, lr=0.05, batch_size=16, progress=False)
    assert net.loss_calls == 6  # 3 batches x 2 epochs
    assert torch.equal(net.fc.bias, bias0)  # its group has lr 0
    assert net.after == 48  # after_training saw the whole training set once


@pytest.mark.parametrize(
    "kw, flag",
    [({"epochs": 0}, "--epochs"), ({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"),
     ({"opt": "lion"}, "--opt"), ({"input_dropout": 0.0}, "(0, 1]"), ({"weight_decay": -1.0}, "--weight-decay")],
)
def test_bad_arguments_raise_one_line_errors(kw, flag):
    args = dict(epochs=1, lr=0.01, batch_size=8, progress=False)
    args.update(kw)
    with pytest.raises(TrustVisionError) as err:
        fit(TinyNet(), halves(16), **args)
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_divergence_is_reported():
    net = TinyNet()
    with torch.no_grad():
        net.fc.weight.fill_(float("nan"))
    with pytest.raises(TrustVisionError, match="diverged"):
        fit(net, halves(16), epochs=1, lr=0.01, batch_size=8, progress=False)


def test_nan_guard_keeps_last_good_checkpoint_and_names_it(tmp_path):
    kw = dict(epochs=3, lr=0.01, batch_size=16, seed=1, progress=False)
    train = halves(64)
    good = {}

    def poison_after_first(stats):
        if stats.epoch == 1:
            good.update({k: v.clone() for k, v in net.state_dict().items()})
            with torch.no_grad():
                net.fc.weight.fill_(float("nan"))

    net = _small_cnn(0)
    with pytest.raises(TrustVisionError) as err:
        fit(net, train, out=tmp_path, on_epoch_end=poison_after_first, **kw)
    msg = str(err.value)
    kept = tmp_path / "model.safetensors"
    assert "\n" not in msg and "epoch 2 (step 1)" in msg and "after epoch 1" in msg
    assert str(kept) in msg and str(tmp_path / STATE_FILE) in msg
    assert "--lr" in msg and "--clip-grad" in msg and "--resume" in msg
    loaded = models.load(tmp_path)  # the kept checkpoint holds the epoch-1 weights
    assert all(torch.equal(loaded.state_dict()[k], good[k]) for k in good)
    assert all(torch.equal(net.state_dict()[k], good[k]) for k in good)  # restored in memory too
    assert loaded.tv_config["diverged_in_epoch"] == 2 and loaded.tv_config["epochs_done"] == 1
    # the advice works: resuming with clipping continues after epoch 1 and finishes
    res = fit(_small_cnn(5), train, out=tmp_path, resume=True, grad_clip=1.0, **kw)
    assert res.resumed_from_epoch == 1 and len(res.history) == 3
    assert "diverged_in_epoch" not in models.load(tmp_path).tv_config

    with pytest.raises(TrustVisionError, match=r"before any epoch finished, so no checkpoint"):
        bad = _small_cnn(0)
        with torch.no_grad():
            bad.fc.weight.fill_(float("nan"))
        fit(bad, train, out=tmp_path / "b", **kw)
    with pytest.raises(TrustVisionError, match=r"no checkpoint was kept \(pass --out"):
        fit(bad, train, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda(tmp_path, no_tf32):
    # The model's own nn.Dropout draws from the device's generator (CUDA's differs from the CPU's),
    # so the comparison uses dropout 0; data order, augmentation and input-dropout masks come from
    # CPU generators and must match. Full fp32 on the GPU (no TF32) so the weights are comparable.

    def cnn():
        torch.manual_seed(0)
        return models.create("small-cnn", num_classes=2, in_chans=1, image_size=4, widths=(4, 8), dropout=0.0)

    net = cnn()
    res = fit(net, halves(64), test_set=halves(20, seed=2), epochs=2, lr=0.01, batch_size=16,
              device="cuda", out=tmp_path, progress=False, input_dropout=0.8, augment=RandomShift(1))
    assert next(net.parameters()).is_cuda and res.test_accuracy is not None
    cpu = cnn()
    fit(cpu, halves(64), epochs=2, lr=0.01, batch_size=16, progress=False, input_dropout=0.8,
        augment=RandomShift(1))
    assert torch.allclose(cpu.fc.weight, net.fc.weight.cpu(), atol=1e-4)
