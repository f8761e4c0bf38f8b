"""Train a registered model on a registered dataset by name (what ``trustvision train`` runs).

The run folder keeps the settings the run was started with in ``train_settings.json`` (JSON:
``{"format": "trustvision-train-settings", "format_version": 1, "settings": {...}}``, the
arguments of :func:`train_by_name` listed in :data:`RUN_SETTINGS`), so that a resume can reuse them
(:func:`stored_run_settings`) and a resume with another dataset, model, model keyword arguments or
ensemble size is refused in one line instead of mixing two runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from trustvision.errors import TrustVisionError
from trustvision.train.augment import parse_augment
from trustvision.train.ensemble import fit_ensemble
from trustvision.train.input_dropout import check_keep_prob
from trustvision.train.loop import (RESULTS_FILE, STATE_FILE, TrainResult, _plain, _shown,
                                    _write_json, check_train_args, fit, read_train_state,
                                    resolve_device)

__all__ = ["build_model", "train_by_name", "stored_run_settings", "SETTINGS_FILE", "RUN_SETTINGS"]

SETTINGS_FILE = "train_settings.json"
SETTINGS_FORMAT = "trustvision-train-settings"
#: The arguments of :func:`train_by_name` that define a run (stored in ``SETTINGS_FILE``); the
#: others (``out``, ``device``, ``resume``, ``data_root``, ``download``, ``progress``) belong to one
#: invocation.
RUN_SETTINGS = ("data", "model", "epochs", "lr", "batch_size", "seed", "opt", "weight_decay",
                "sched", "input_dropout", "ensemble", "augment", "grad_clip", "model_kwargs")
#: Settings a resume must not change (the others: fit refuses seed/lr/... changes itself against
#: the training state; epochs may grow and grad_clip may be added to get past a divergence).
_SAME_RUN = (("data", "dataset", "--data"), ("model", "model", "--model"),
             ("model_kwargs", "model keyword arguments", "--model-kw"),
             ("ensemble", "ensemble size", "--ensemble"))
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _decode(obj: Any) -> Any:
    """``"inf"``/``"-inf"``/``"nan"`` strings back to floats, through dicts and lists."""
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TrustVisionError(
            f"cannot read {path} ({' '.join(str(exc).split())[:120]}); delete it or choose another --out"
        ) from None


def _legacy_settings(out_dir: Path) -> dict | None:
    """Settings of a run folder written before ``train_settings.json`` existed, recovered from its
    training state (read with ``weights_only=True``) and its final config.json; keys that cannot
    be recovered (e.g. ``augment``) are left out."""
    found: dict[str, Any] = {}
    states = [out_dir / STATE_FILE] + sorted((out_dir / "members").glob(f"member-*/{STATE_FILE}"))
    state_path = next((p for p in states if p.is_file()), None)
    if state_path is not None:
        config = read_train_state(state_path).get("config")
        if isinstance(config, dict):
            for key in ("epochs", "lr", "batch_size", "seed", "opt", "weight_decay", "sched",
                        "input_dropout", "grad_clip"):
                if key in config:
                    found[key] = config[key]
            for src, dst in (("dataset", "data"), ("architecture", "model"),
                             ("model_kwargs", "model_kwargs")):
                if config.get(src) is not None:
                    found[dst] = config[src]
    cfg_path = out_dir / "config.json"
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        if isinstance(cfg, dict):
            training = cfg.get("training") if isinstance(cfg.get("training"), dict) else {}
            kwargs = cfg.get("kwargs") if isinstance(cfg.get("kwargs"), dict) else {}
            if isinstance(cfg.get("dataset"), str):
                found.setdefault("data", cfg["dataset"])
            if training.get("ensemble") and cfg.get("architecture") == "ensemble":
                found["ensemble"] = training["ensemble"]
                found["model"] = kwargs.get("member", found.get("model"))
                found["model_kwargs"] = kwargs.get("member_kwargs") or {}
            elif isinstance(cfg.get("architecture"), str):
                found.setdefault("model", cfg["architecture"])
                found.setdefault("model_kwargs", kwargs)
            for key in ("epochs", "lr", "batch_size", "seed", "opt", "weight_decay", "sched",
                        "input_dropout", "grad_clip"):
                if key in training:
                    found.setdefault(key, training[key])
    return _decode(found) if found else None


def stored_run_settings(out_dir: str | os.PathLike) -> dict | None:
    """The settings the run in ``out_dir`` was started (or last resumed) with, or None when the
    folder holds no run.

    Returns a dict with the keys of :data:`RUN_SETTINGS` (the keyword arguments of
    :func:`train_by_name`: ``data``, ``model``, ``epochs``, ``lr``, ``batch_size``, ``seed``,
    ``opt``, ``weight_decay``, ``sched``, ``input_dropout``, ``ensemble``, ``augment`` (the
    ``--augment`` text or None), ``grad_clip``, ``model_kwargs`` (a dict; ``"inf"``-style strings
    read back as floats)), as stored in ``out_dir/train_settings.json``. For a run folder written
    before that file existed the keys are recovered from ``train_state.pt`` (read with
    ``weights_only=True``) and ``config.json``, and those that cannot be are absent. Nothing in the
    folder is executed; an unreadable file is a one-line :class:`TrustVisionError`.

    Example:
        >>> import tempfile
        >>> from trustvision.train import stored_run_settings
        >>> stored_run_settings(tempfile.mkdtemp()) is None
        True
    """
    out_dir = Path(out_dir)
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        return _legacy_settings(out_dir) if out_dir.is_dir() else None
    doc = _read_json(path)
    if (not isinstance(doc, dict) or doc.get("format") != SETTINGS_FORMAT
            or not isinstance(doc.get("settings"), dict)):
        raise TrustVisionError(f"{path} is not a trustvision run settings file; delete it or choose "
                               "another --out")
    settings = _decode(doc["settings"])
    if not isinstance(settings.get("model_kwargs", {}), dict):
        raise TrustVisionError(f"{path}: 'model_kwargs' must be a JSON object; delete the file or "
                               "choose another --out")
    return settings


def _holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a (finished or interrupted) training run."""
    return ((out_dir / STATE_FILE).exists() or (out_dir / RESULTS_FILE).exists()
            or any((out_dir / "members").glob(f"member-*/{STATE_FILE}")))


def _same_run(key: str, value: Any) -> Any:
    """``value`` of setting ``key`` in the form two runs are compared in."""
    if key == "ensemble":
        return int(value) if value is not None and int(value) > 1 else 1
    if key == "model_kwargs":
        return _plain(value or {})
    return value


def _check_same_run(out_dir: Path, stored: dict, settings: dict) -> None:
    for key, what, flag in _SAME_RUN:
        if key not in stored:
            continue
        old, new = _same_run(key, stored[key]), _same_run(key, settings[key])
        if old != new:
            raise TrustVisionError(
                f"cannot resume {out_dir}: it was started with {what} {_shown(old)}, not "
                f"{_shown(new)}; resume with the same {flag} or choose another --out"
            )


def _store_settings(out_dir: Path, settings: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json({"format": SETTINGS_FORMAT, "format_version": 1, "settings": _plain(settings)},
                out_dir / SETTINGS_FILE)


def build_model(name: str, dataset, seed: int = 0, ensemble: int | None = None, **model_kwargs):
    """Create model ``name`` sized for ``dataset`` (classes, channels, image size), seeded.

    With ``ensemble=N`` (N >= 2) returns ``models.create("ensemble", member=name, n=N, ...)``.
    The caller's global RNG state is left untouched.
    """
    from trustvision import models

    common = dict(num_classes=dataset.num_classes, in_chans=dataset.num_channels,
                  image_size=tuple(dataset.image_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ensemble is not None and ensemble > 1:
            if name == "ensemble":
                raise TrustVisionError("--ensemble N needs a member architecture, e.g. --model small-cnn")
            model = models.create("ensemble", **common, member=name, n=int(ensemble),
                                  member_kwargs=dict(model_kwargs))
        else:
            try:
                model = models.create(name, **common, **model_kwargs)
            except TypeError as exc:
                raise TrustVisionError(
                    f"model {name!r} does not accept these options ({exc}); check --model-kw"
                ) from None
    check = getattr(models, "check_compatible", None)
    if callable(check):
        check(model, dataset)
    return model


def train_by_name(
    data: str,
    model: str,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = False,
    opt: str = "adam",
    weight_decay: float = 0.0,
    input_dropout: float | None = None,
    ensemble: int | None = None,
    augment: str | None = None,
    sched: str = "cosine",
    grad_clip: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_root: str | None = None,
    download: bool = False,
    progress: bool | str = True,
) -> tuple[torch.nn.Module, TrainResult]:
    """Load ``data`` (train/val/test), build ``model`` and train it; returns ``(model, result)``.

    With ``out``, the run settings (:data:`RUN_SETTINGS`) are stored in ``out/train_settings.json``
    when a new run starts, and again once a resumed run has passed the training state's checks;
    :func:`stored_run_settings` reads them. ``resume=True`` refuses a run folder started with
    another ``data``, ``model``, ``model_kwargs`` or ``ensemble`` before anything is loaded.
    Under ``torchrun`` every process runs this and :func:`fit` trains data-parallel.
    """
    from trustvision import data as tv_data

    if ensemble is not None and (isinstance(ensemble, bool) or int(ensemble) < 1):
        raise TrustVisionError(f"--ensemble needs a number of members >= 1, got {ensemble}")
    if input_dropout is not None:
        check_keep_prob(input_dropout)
    check_train_args(epochs, lr, batch_size, opt, weight_decay, sched, grad_clip)
    resolve_device(device)
    from trustvision.train import distributed

    if ensemble is not None and ensemble > 1 and distributed.is_launched():
        raise TrustVisionError("--ensemble trains its members one after another in one process; "
                               "run it without torchrun")
    settings = dict(data=data, model=model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                    opt=opt, weight_decay=weight_decay, sched=sched, input_dropout=input_dropout,
                    ensemble=ensemble, augment=augment, grad_clip=grad_clip,
                    model_kwargs=dict(model_kwargs or {}))
    out_dir = None if out is None else Path(out)
    if out_dir is not None:
        if resume:
            stored = stored_run_settings(out_dir)
            if stored is not None:
                _check_same_run(out_dir, stored, settings)
        elif _holds_run(out_dir):
            raise TrustVisionError(
                f"{out_dir} already holds a training run; pass --resume to continue it or choose "
                "another --out"
            )
    aug = parse_augment(augment)
    train_set = tv_data.load(data, split="train", root=data_root, download=download)
    val_set = tv_data.load(data, split="val", root=data_root, download=download)
    test_set = tv_data.load(data, split="test", root=data_root, download=download)
    net = build_model(model, train_set, seed=seed, ensemble=ensemble, **(model_kwargs or {}))

    main_rank = distributed.rank() == 0
    stored_now = [False]

    def store() -> None:
        if out_dir is not None and main_rank:
            _store_settings(out_dir, settings)
            stored_now[0] = True

    if out_dir is not None and not _holds_run(out_dir):
        store()  # a new run: nothing for fit to refuse against

    def on_epoch_end(stats) -> None:  # a resumed run got past fit's checks of the training state
        if not stored_now[0]:
            store()

    kw = dict(epochs=epochs, lr=lr, batch_size=batch_size, device=device, out=out, resume=resume,
              opt=opt, weight_decay=weight_decay, input_dropout=input_dropout, progress=progress,
              test_set=test_set, augment=aug, sched=sched, grad_clip=grad_clip, seed=seed,
              on_epoch_end=on_epoch_end)
    if ensemble is not None and ensemble > 1:
        result = fit_ensemble(net, train_set, val_set, **kw)
    else:
        result = fit(net, train_set, val_set, **kw)
    store()
    return net, result
