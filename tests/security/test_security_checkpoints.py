"""Malicious checkpoints, archives, symlinks, zoo names, run folders and config kwargs: every one is
refused in one line (exit status 2 from the CLI, TrustVisionError from the library) and the code
or path it carries is never run, opened or fetched -- a marker file the payload would create stays
absent and no socket connects."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from trustvision import models
from trustvision.cli import main
from trustvision.errors import TrustVisionError

PROTOCOLS = list(range(pickle.HIGHEST_PROTOCOL + 1))  # 0..5
SUFFIXES = [".pt", ".pth", ".bin", ".ckpt", ".pkl", ""]


class ExecPayload:
    """Unpickling it writes the marker file (proof that code ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('x')",))


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS = {"exec": ExecPayload, "system": SystemPayload}


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "the payload ran"


@pytest.fixture
def no_network(monkeypatch):
    """Record (and block) every connection attempt and name lookup."""
    attempts = []

    def connect(self, address, *a, **k):
        attempts.append(address)
        raise OSError("network access is blocked in this test")

    def getaddrinfo(host, *a, **k):
        attempts.append(host)
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert attempts == [], f"network was reached: {attempts}"


@pytest.fixture
def good_ckpt(tmp_path):
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8, widths=(4, 8))
    return models.save(net, tmp_path / "good", dataset="digits")


def _refused_by_load(path, *words):
    with pytest.raises(TrustVisionError) as e:
        models.load(path)
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _main_without_torch_warnings(argv):
    """``main(argv)``; torch's pickle warnings would print extra stderr lines outside pytest."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(argv)
    noisy = [str(w.message)[:80] for w in seen if "pickle" in str(w.message) or "weights_only" in str(w.message)]
    assert not noisy, noisy
    return code


def _refused_by_cli(path, tmp_path, capsys, *words):
    code = _main_without_torch_warnings(
        ["audit", "--model", str(path), "--data", "digits", "--checks", "accuracy", "--no-progress",
         "--device", "cpu", "--out", str(tmp_path / "audit-out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _refused(entry, path, tmp_path, capsys, *words):
    if entry == "load":
        return _refused_by_load(path, *words)
    return _refused_by_cli(path, tmp_path, capsys, *words)


ENTRIES = ["load", "cli"]


# --- pickles with code, under every name ------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("suffix", SUFFIXES, ids=[s or "no-extension" for s in SUFFIXES])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_raw_pickle_payload(tmp_path, marker, capsys, entry, suffix, protocol, payload):
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"fc.weight": PAYLOADS[payload](marker)}, protocol=protocol))
    _refused(entry, path, tmp_path, capsys)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_raw_pickle_payload_beside_a_config(tmp_path, good_ckpt, marker, capsys, entry, protocol, payload):
    """With a valid config.json beside it the loader gets as far as reading the weights."""
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(good_ckpt / "config.json", folder / "config.json")
    path = folder / "weights.pt"
    path.write_bytes(pickle.dumps({"fc.weight": PAYLOADS[payload](marker)}, protocol=protocol))
    _refused(entry, path, tmp_path, capsys, "refusing to load")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("protocol", PROTOCOLS + ["torch-zip", "torch-legacy"])
def test_pickle_named_model_safetensors(tmp_path, good_ckpt, marker, capsys, entry, protocol):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(good_ckpt / "config.json", folder / "config.json")
    obj = {"fc.weight": ExecPayload(marker)}
    if protocol == "torch-zip":
        torch.save(obj, folder / "model.safetensors")
    elif protocol == "torch-legacy":
        torch.save(obj, folder / "model.safetensors", _use_new_zipfile_serialization=False)
    else:
        (folder / "model.safetensors").write_bytes(pickle.dumps(obj, protocol=protocol))
    _refused(entry, folder, tmp_path, capsys, "not a safetensors file")
    _refused(entry, folder / "model.safetensors", tmp_path, capsys, "not a safetensors file")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_torch_save_archive_payload(tmp_path, marker, capsys, entry, suffix, fmt, payload):
    """torch.save's zip archive (payload in data.pkl) and its legacy non-zip format."""
    path = tmp_path / f"evil{suffix}"
    obj = {"state_dict": {"fc.weight": torch.zeros(2), "fc.bias": PAYLOADS[payload](marker)}}
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    if fmt == "zip":
        assert zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())
    _refused(entry, path, tmp_path, capsys, "refusing to load")


def _legacy_tar(path: Path, marker: Path) -> None:
    """The pre-zip torch format: a tar of 'sys_info', 'pickle', 'storages' and 'tensors' pickles."""
    blob = pickle.dumps(ExecPayload(marker), protocol=2)
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".tar"])
def test_legacy_tar_format_checkpoint(tmp_path, marker, capsys, entry, suffix):
    path = tmp_path / f"legacy{suffix}"
    _legacy_tar(path, marker)
    _refused(entry, path, tmp_path, capsys)
    assert not any(p.name in ("storages", "tensors", "pickle") for p in tmp_path.rglob("*"))


# --- archives with path-traversal member names ----------------------------------------------


def _traversal_names(marker: Path) -> list[str]:
    return ["../../MARKER", "../../../MARKER", str(marker), "ok/../../../MARKER"]


@pytest.fixture
def deep_cwd(tmp_path, monkeypatch):
    """Work from tmp/a/b/c so that '../../MARKER' would land inside tmp_path."""
    cwd = tmp_path / "a" / "b" / "c"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    yield cwd
    assert not list(tmp_path.rglob("MARKER")), "an archive member was extracted"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("suffix", [".zip", ".pt", ".pth", ".safetensors", ""])
def test_zip_with_path_traversal_members(tmp_path, deep_cwd, marker, capsys, entry, suffix):
    path = tmp_path / f"evil{suffix}"
    with zipfile.ZipFile(path, "w") as zf:
        for name in _traversal_names(marker):
            zf.writestr(name, "x")
        zf.writestr("archive/data.pkl", pickle.dumps({"w": ExecPayload(marker)}, protocol=2))
    _refused(entry, path, tmp_path, capsys)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".pt", ".ckpt", ".safetensors", ""])
def test_tar_with_path_traversal_members(tmp_path, deep_cwd, marker, capsys, entry, suffix):
    path = tmp_path / f"evil{suffix}"
    mode = "w:gz" if suffix == ".tar.gz" else "w:"
    with tarfile.open(path, mode) as tar:
        for name in _traversal_names(marker):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        link = tarfile.TarInfo("storages")
        link.type, link.linkname = tarfile.SYMTYPE, str(marker)
        tar.addfile(link)
    _refused(entry, path, tmp_path, capsys)


# --- symlinks out of a checkpoint folder ------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("target", ["real-safetensors-elsewhere", "/etc/passwd", "dangling", "/dev/zero"])
def test_weights_symlink_leaving_the_folder(tmp_path, good_ckpt, capsys, entry, target):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(good_ckpt / "config.json", folder / "config.json")
    if target == "real-safetensors-elsewhere":
        target = good_ckpt / "model.safetensors"
    elif target == "dangling":
        target = tmp_path / "nothing-here.safetensors"
    (folder / "model.safetensors").symlink_to(target)
    _refused(entry, folder, tmp_path, capsys, "symlink", "outside the checkpoint folder")


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("target", ["valid-config-elsewhere", "/etc/passwd", "/dev/zero"])
def test_config_symlink_leaving_the_folder(tmp_path, good_ckpt, capsys, entry, target):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(good_ckpt / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").symlink_to(good_ckpt / "config.json" if target.startswith("valid") else target)
    _refused(entry, folder, tmp_path, capsys, "symlink", "outside the checkpoint folder")
    _refused(entry, folder / "model.safetensors", tmp_path, capsys, "symlink", "config.json")


def test_symlinks_inside_the_folder_still_load(tmp_path, good_ckpt):
    folder = tmp_path / "ck"
    folder.mkdir()
    shutil.copy(good_ckpt / "model.safetensors", folder / "weights-v1.safetensors")
    shutil.copy(good_ckpt / "config.json", folder / "config-v1.json")
    (folder / "model.safetensors").symlink_to("weights-v1.safetensors")
    (folder / "config.json").symlink_to(folder / "config-v1.json")
    assert models.load(folder).num_classes == 10


# --- zoo names ----------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path, good_ckpt, monkeypatch):
    root = tmp_path / "zoo" / "inner"
    root.mkdir(parents=True)
    shutil.copytree(good_ckpt, tmp_path / "x")  # the target of the escapes
    shutil.copytree(good_ckpt, tmp_path / "zoo" / "x")
    (root / "link").symlink_to(tmp_path / "x", target_is_directory=True)
    monkeypatch.setenv("TRUSTVISION_ZOO", str(root))
    return root


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", ["zoo:../../x", "zoo:../x", "zoo:/abs", "zoo:link", "zoo:./../x",
                                  "zoo:..\\x", "zoo:x/../../x", "zoo:~/x", "zoo:.."])
def test_zoo_escapes(tmp_path, zoo, capsys, entry, name):
    if name == "zoo:/abs":
        name = f"zoo:{tmp_path / 'x'}"
    _refused(entry, name, tmp_path, capsys, "unknown zoo model")


# --- config.json kwargs that would reach the network or a file ----------------------------------


@pytest.fixture
def opened(monkeypatch):
    """Every path passed to open(), io.open() or os.open() during the test."""
    seen: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):
        seen.append(str(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):
        seen.append(str(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    return seen


KWARG_CASES = [
    ("torchvision:resnet18", {"pretrained": True}),
    ("timm:resnet18", {"pretrained": True}),
    ("small-cnn", {"pretrained": True}),
    ("torchvision:resnet18", {"weights": "DEFAULT"}),
    ("timm:resnet18", {"checkpoint_path": "MARKER_PATH"}),
    ("small-cnn", {"checkpoint_path": "MARKER_PATH"}),
    ("timm:resnet18", {"pretrained_cfg_overlay": {"file": "MARKER_PATH"}}),
    ("timm:resnet18", {"pretrained_cfg": {"hf_hub_id": "timm/resnet18.a1_in1k"}}),
    ("small-cnn", {"init_file": "MARKER_PATH"}),
    ("small-cnn", {"note": "https://example.com/weights.pth"}),
    ("timm:resnet18", {"pretrained_cfg_overlay": {"url": "hf-hub:timm/resnet18"}}),
    ("ensemble", {"member": "torchvision:resnet18", "n": 2, "member_kwargs": {"pretrained": True}}),
    ("ensemble", {"member": "timm:resnet18", "n": 2, "member_kwargs": {"checkpoint_path": "MARKER_PATH"}}),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("arch,kwargs", KWARG_CASES, ids=[f"{a}-{next(iter(k))}" for a, k in KWARG_CASES])
def test_config_kwargs_never_reach_network_or_files(tmp_path, good_ckpt, marker, no_network, opened,
                                                   capsys, entry, arch, kwargs):
    text = json.dumps(kwargs).replace("MARKER_PATH", str(marker).replace("\\", "\\\\"))
    cfg = json.loads((good_ckpt / "config.json").read_text())
    cfg.update(architecture=arch, kwargs=json.loads(text))
    (good_ckpt / "config.json").write_text(json.dumps(cfg))
    _refused(entry, good_ckpt, tmp_path, capsys, "refusing to load", "config.json")
    assert str(marker) not in opened


# --- a malicious training state on `trustvision train --resume` ---------------------------------


def _write_state(path: Path, marker: Path, fmt) -> None:
    obj = {"format": "trustvision-train-state", "format_version": 1, "epoch": 1,
           "model": {"fc.weight": ExecPayload(marker)}, "config": {"lr": SystemPayload(marker)}}
    if fmt == "torch-zip":
        torch.save(obj, path)
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "legacy-tar":
        _legacy_tar(path, marker)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=fmt))


@pytest.mark.parametrize("with_settings", [False, True], ids=["state-only", "with-settings-file"])
@pytest.mark.parametrize("fmt", PROTOCOLS + ["torch-zip", "torch-legacy", "legacy-tar"])
def test_malicious_train_state_on_resume(tmp_path, marker, capsys, fmt, with_settings):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_state(run_dir / "train_state.pt", marker, fmt)
    if with_settings:  # the stored settings agree with the command: the state itself is read
        settings = dict(data="digits", model="small-cnn", epochs=1, lr=1e-3, batch_size=64, seed=0,
                        opt="adam", weight_decay=0.0, sched="cosine", input_dropout=None, ensemble=None,
                        augment=None, grad_clip=None, model_kwargs={})
        (run_dir / "train_settings.json").write_text(json.dumps(
            {"format": "trustvision-train-settings", "format_version": 1, "settings": settings}))
    code = _main_without_torch_warnings(["train", "--data", "digits", "--model", "small-cnn", "--epochs", "1",
                                         "--out", str(run_dir), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "train_state.pt" in err
    assert not (run_dir / "model.safetensors").exists()
