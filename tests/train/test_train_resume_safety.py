"""Issue #9 (train): --resume never mixes two runs or runs pickled code, and the run folder keeps
the settings it was started with (``stored_run_settings``) for the CLI to reuse."""

from __future__ import annotations

import builtins
import json
import pickle

import pytest
import torch

from trustvision import models
from trustvision.errors import TrustVisionError
from trustvision.train import fit, stored_run_settings, train_by_name
from trustvision.train import recipe
from trustvision.train.loop import STATE_FILE
from trustvision.train.recipe import RUN_SETTINGS, SETTINGS_FILE

from _train_toy import halves

BASE = dict(epochs=1, lr=0.01, batch_size=64, progress=False, model_kwargs={"widths": [4, 8]})


def _one_line(fn, *words):
    with pytest.raises(TrustVisionError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _cnn(seed=0, **kw):
    torch.manual_seed(seed)
    return models.create("small-cnn", num_classes=2, in_chans=1, image_size=4, **{"widths": (4, 8), **kw})


# --- fit: the training state names what it trains --------------------------------------------


def test_fit_resume_refuses_another_dataset_model_or_kwargs(tmp_path):
    kw = dict(lr=0.01, batch_size=16, progress=False, out=tmp_path)
    fit(_cnn(), halves(32), epochs=1, **kw)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["config"]["dataset"] == "halves"
    assert state["config"]["architecture"] == "small-cnn"
    assert state["config"]["model_kwargs"] == {"widths": [4, 8]}
    other = halves(32)
    other.name = "other-set"
    _one_line(lambda: fit(_cnn(), other, epochs=2, resume=True, **kw),
              "cannot resume", "dataset 'halves', not 'other-set'", "--data")
    _one_line(lambda: fit(models.create("resnet20", 2, 1, 4), halves(32), epochs=2, resume=True, **kw),
              "model 'small-cnn', not 'resnet20'", "--model")
    _one_line(lambda: fit(_cnn(widths=(4, 16)), halves(32), epochs=2, resume=True, **kw),
              "model keyword arguments", "--model-kw")
    # the same run resumes
    assert fit(_cnn(), halves(32), epochs=2, resume=True, **kw).resumed_from_epoch == 1


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('x')",))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "torch-zip", "torch-legacy"])
def test_fit_resume_refuses_a_malicious_state_without_running_it(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    state = {"format": "trustvision-train-state", "epoch": 1, "model": _Payload(marker)}
    path = tmp_path / "run" / STATE_FILE
    path.parent.mkdir()
    if protocol == "torch-zip":
        torch.save(state, path)
    elif protocol == "torch-legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=protocol))
    assert not marker.exists()
    _one_line(lambda: fit(_cnn(), halves(32), epochs=2, lr=0.01, batch_size=16, progress=False,
                          out=path.parent, resume=True), str(path))
    _one_line(lambda: stored_run_settings(path.parent), str(path))
    assert not marker.exists()


# --- train_by_name: stored settings and refused resumes --------------------------------------


def test_settings_are_stored_when_a_run_starts(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_by_name("digits", "small-cnn", out=tmp_path / "run", seed=3, augment="shift:1",
                      input_dropout=0.8, grad_clip=2.0, **BASE)
    got = stored_run_settings(tmp_path / "run")
    assert set(got) == set(RUN_SETTINGS)
    assert got == dict(data="digits", model="small-cnn", epochs=1, lr=0.01, batch_size=64, seed=3,
                       opt="adam", weight_decay=0.0, sched="cosine", input_dropout=0.8, ensemble=None,
                       augment="shift:1", grad_clip=2.0, model_kwargs={"widths": [4, 8]})
    doc = json.loads((tmp_path / "run" / SETTINGS_FILE).read_text())
    assert doc["format"] == "trustvision-train-settings" and doc["format_version"] == 1


def test_stored_settings_are_the_keywords_of_train_by_name():
    import inspect

    params = inspect.signature(train_by_name).parameters
    assert set(RUN_SETTINGS) <= set(params)
    per_call = {"out", "device", "resume", "data_root", "download", "progress"}
    assert set(params) - set(RUN_SETTINGS) == per_call


def test_non_finite_model_kwargs_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train_by_name("digits", "ibinn-small", out=tmp_path, **{**BASE, "model_kwargs": {"beta": float("inf")}})
    json.loads((tmp_path / SETTINGS_FILE).read_text(), parse_constant=lambda c: 1 / 0)  # strict JSON
    assert stored_run_settings(tmp_path)["model_kwargs"] == {"beta": float("inf")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    train_by_name("digits", "small-cnn", out=out, **BASE)
    return out


@pytest.mark.parametrize("change,words", [
    (dict(data="shortcut-digits"), ["dataset 'digits', not 'shortcut-digits'", "--data"]),
    (dict(model="resnet20"), ["model 'small-cnn', not 'resnet20'", "--model"]),
    (dict(model_kwargs={"widths": [4, 16]}), ["model keyword arguments", "--model-kw"]),
    (dict(model_kwargs={}), ["model keyword arguments", "--model-kw"]),
    (dict(ensemble=2), ["ensemble size 1, not 2", "--ensemble"]),
])
def test_resume_with_another_run_is_refused_before_loading(finished_run, monkeypatch, change, words):
    from trustvision import data as tv_data

    before = (finished_run / SETTINGS_FILE).read_text()
    loads = []
    monkeypatch.setattr(tv_data, "load", lambda *a, **k: loads.append(a))
    args = {"data": "digits", "model": "small-cnn", **BASE, "epochs": 2, **change}
    _one_line(lambda: train_by_name(args.pop("data"), args.pop("model"), out=finished_run, resume=True, **args),
              f"cannot resume {finished_run}", *words)
    assert loads == []  # refused before any dataset was read
    assert (finished_run / SETTINGS_FILE).read_text() == before


def test_refused_resumes_leave_the_stored_settings(finished_run):
    before = (finished_run / SETTINGS_FILE).read_text()
    _one_line(lambda: train_by_name("digits", "small-cnn", out=finished_run, **BASE), "--resume")
    _one_line(lambda: train_by_name("digits", "small-cnn", out=finished_run, resume=True,
                                    **{**BASE, "lr": 0.5, "epochs": 2}), "--lr")
    assert (finished_run / SETTINGS_FILE).read_text() == before


def test_resume_updates_the_stored_epochs(tmp_path):
    out = tmp_path / "run"
    train_by_name("digits", "small-cnn", out=out, **BASE)
    _, res = train_by_name("digits", "small-cnn", out=out, resume=True, **{**BASE, "epochs": 2})
    assert res.resumed_from_epoch == 1
    assert stored_run_settings(out)["epochs"] == 2


def test_legacy_run_folder_without_settings_file(finished_run, tmp_path):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(finished_run, legacy)
    (legacy / SETTINGS_FILE).unlink()
    got = stored_run_settings(legacy)
    assert got["data"] == "digits" and got["model"] == "small-cnn"
    assert got["model_kwargs"] == {"widths": [4, 8]} and got["epochs"] == 1 and got["lr"] == 0.01
    _one_line(lambda: train_by_name("faces", "small-cnn", out=legacy, resume=True, **BASE),
              "dataset 'digits', not 'faces'")


def test_stored_run_settings_of_nothing_and_of_a_broken_file(tmp_path):
    assert stored_run_settings(tmp_path / "missing") is None
    assert stored_run_settings(tmp_path) is None
    (tmp_path / SETTINGS_FILE).write_text("{broken")
    _one_line(lambda: stored_run_settings(tmp_path), str(tmp_path / SETTINGS_FILE), "choose another --out")
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"format": "other"}))
    _one_line(lambda: stored_run_settings(tmp_path), "not a trustvision run settings file")


def test_cli_resume_with_another_dataset_exits_2(finished_run, capsys):
    from trustvision.cli import main

    code = main(["train", "--data", "shortcut-digits", "--model", "small-cnn", "--model-kw", "widths=4,8",
                 "--epochs", "2", "--lr", "0.01", "--out", str(finished_run), "--resume", "--no-progress",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "dataset 'digits', not 'shortcut-digits'" in err
