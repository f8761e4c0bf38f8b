"""Safe checkpoint I/O: safetensors weights + ``config.json``, and the model zoo.

Loading never executes pickled code: trustvision checkpoints are safetensors files, and foreign
``.pt``/``.pth`` state dicts are read only with ``torch.load(weights_only=True)``. Every problem a
user can cause (missing file, corrupt weights or config, unknown architecture, weights that do not
fit) is a one-line :class:`~trustvision.errors.TrustVisionError` naming the fix.

Layout of a checkpoint directory::

    my-model/
        model.safetensors   # the state dict
        config.json         # {"format": "trustvision-checkpoint", "format_version": 1,
                            #  "architecture", "num_classes", "in_chans", "image_size", "kwargs",
                            #  "classes", "normalization", "dataset", "metrics", ...}

config.json is strict JSON: non-finite floats (e.g. ``beta=inf``) are stored as the strings
``"inf"``, ``"-inf"`` and ``"nan"``, and read back as floats in ``kwargs`` and ``metrics``.

What :func:`load` refuses, each in one line naming the file (config.json and the weights are
checked before the model is built; class names against the built model's classes after):

* a config.json that breaks :data:`trustvision.models._schema.CONFIG_SCHEMA` (wrong types, sizes
  out of range such as ``num_classes`` outside 1..100000, ``in_chans`` outside 1..64, image sides
  outside 1..8192, class names not one per class, a normalization std <= 0);
* config ``kwargs`` that would reach the network or a file the user did not name
  (``pretrained: true``, ``weights``, ``checkpoint_path``, ``pretrained_cfg``, ``file``, ``url``,
  any ``*_path`` / ``*_url`` / ``*_file`` / ``*_dir``, a URL-like string value), also nested;
* ``model.safetensors`` or ``config.json`` that are symlinks leading out of the checkpoint
  folder, or not regular files; ``zoo:`` names that leave the zoo folder;
* pickles that carry code, legacy tar-format torch files, and weights holding NaN or Inf.

Example:
    >>> import tempfile, torch
    >>> from trustvision import models
    >>> net = models.create("small-cnn", num_classes=3, in_chans=1, image_size=8).eval()
    >>> d = models.save(net, tempfile.mkdtemp() + "/ckpt", classes=["a", "b", "c"])
    >>> x = torch.rand(2, 1, 8, 8)
    >>> torch.equal(models.load(d)(x), net(x))
    True
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Any

import torch

from trustvision.errors import TrustVisionError
from trustvision.models._base import ImageClassifier
from trustvision.models._schema import check_config, check_consistency, file_kwarg, shown

__all__ = ["save", "load", "list_zoo", "zoo_dir", "FORMAT", "FORMAT_VERSION"]

FORMAT = "trustvision-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FOREIGN_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_BUILD_KEYS = ("architecture", "num_classes", "in_chans", "image_size")
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few kB; refuse to read a huge one into memory
_LOAD_HINT = ("pass a checkpoint directory (model.safetensors + config.json), a .safetensors file, "
              "a .pt/.pth state dict or zoo:<name> (`trustvision zoo` lists them)")


def _version() -> str:
    from trustvision import __version__

    return __version__


_NONFINITE = {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan")}


def _encode_nonfinite(obj: Any) -> Any:
    """Replace non-finite floats by the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON has
    no ``Infinity``/``NaN``), recursively through dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_nonfinite(v) for v in obj]
    return obj


def _decode_nonfinite(obj: Any) -> Any:
    """Inverse of :func:`_encode_nonfinite` (applied to ``kwargs`` and ``metrics`` on load)."""
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_nonfinite(v) for v in obj]
    return obj


#: timm keywords that only choose the initial weights (already in the saved state dict): dropped
#: from the saved config, since load() refuses keywords that name files.
_INIT_ONLY_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay")


def _without_init_only(kwargs: Any) -> Any:
    if isinstance(kwargs, dict):
        return {k: _without_init_only(v) for k, v in kwargs.items() if k not in _INIT_ONLY_KWARGS}
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --- save ---------------------------------------------------------------------------------------


def save(
    model: ImageClassifier,
    path: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
    **meta: Any,
) -> Path:
    """Write ``path/model.safetensors`` and ``path/config.json``; returns the directory.

    ``model`` must come from :func:`trustvision.models.create` or :func:`load` (it carries
    ``model.tv_config``). ``classes`` defaults to ``model.classes`` or ``["0", "1", ...]``;
    ``dataset`` and ``metrics`` (e.g. ``{"test_accuracy": 0.98}``) default to the values already
    in ``model.tv_config``; extra keyword arguments are stored in config.json as they are. timm's
    initialisation-only keywords (``checkpoint_path``, ``pretrained_cfg``,
    ``pretrained_cfg_overlay``) are left out of the stored model kwargs: the weights they chose are
    in the saved state dict, and :func:`load` refuses keywords that name files.
    """
    from safetensors.torch import save_file

    cfg = dict(getattr(model, "tv_config", None) or {})
    if not all(k in cfg for k in _BUILD_KEYS):
        raise TrustVisionError(
            "cannot save a model without its build config; create it with "
            "trustvision.models.create(name, num_classes, in_chans, image_size) instead of calling "
            "the class directly"
        )
    if classes is None:
        classes = getattr(model, "classes", None) or cfg.get("classes")
    if classes is None:
        classes = [str(i) for i in range(int(cfg["num_classes"]))]
    classes = [str(c) for c in classes]
    if len(classes) != int(cfg["num_classes"]):
        raise TrustVisionError(
            f"got {len(classes)} class names for a model with {cfg['num_classes']} classes; "
            "pass one name per class in classes="
        )
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": cfg["architecture"],
        "num_classes": int(cfg["num_classes"]),
        "in_chans": int(cfg["in_chans"]),
        "image_size": [int(s) for s in cfg["image_size"]],
        "kwargs": _without_init_only(cfg.get("kwargs", {})),
        "classes": classes,
        "normalization": {
            "mean": model.norm_mean.flatten().tolist(),
            "std": model.norm_std.flatten().tolist(),
        },
        "dataset": dataset if dataset is not None else cfg.get("dataset"),
        "metrics": dict(metrics) if metrics is not None else cfg.get("metrics", {}),
        "trustvision_version": _version(),
    }
    config.update(meta)
    try:
        # allow_nan=False: the file is strict JSON (non-finite floats were stored as strings)
        text = json.dumps(_encode_nonfinite(config), indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TrustVisionError(
            f"checkpoint config is not JSON-serialisable ({_first_line(exc)}); pass only numbers, "
            "strings, lists and dicts as model kwargs and metadata"
        ) from None
    out = Path(path)
    if out.suffix == ".safetensors":
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    # clone() breaks storage sharing (tied weights), which safetensors refuses.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    os.chmod(out / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; checkpoints are meant to be shared
    (out / CONFIG_FILE).write_text(text + "\n")
    return out


# --- zoo ----------------------------------------------------------------------------------------


def zoo_dir(root: str | os.PathLike | None = None) -> Path:
    """The zoo folder: ``root``, else ``$TRUSTVISION_ZOO``, else the one shipped in the package."""
    if root is not None:
        return Path(root)
    env = os.environ.get("TRUSTVISION_ZOO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "zoo"


def list_zoo(root: str | os.PathLike | None = None) -> list[dict]:
    """Zoo checkpoints, sorted by name.

    Each entry: ``name`` (``"zoo:small-cnn-digits"``), ``architecture``, ``dataset``, ``metrics``,
    ``num_classes``, ``in_chans``, ``image_size``, ``path`` (the checkpoint directory) and
    ``size_bytes`` (of model.safetensors). Folders without a readable, valid config.json and
    symlinks leading out of the zoo folder are skipped.
    """
    base = zoo_dir(root)
    entries = []
    if not base.is_dir():
        return entries
    for cfg_path in sorted(base.glob(f"*/{CONFIG_FILE}")):
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict) or "architecture" not in cfg or check_config(cfg, cfg_path):
            continue
        if _zoo_entry(base, cfg_path.parent.name) is None:  # a symlink leading out of the zoo
            continue
        weights = cfg_path.parent / WEIGHTS_FILE
        entries.append({
            "name": f"zoo:{cfg_path.parent.name}",
            "architecture": cfg["architecture"],
            "dataset": cfg.get("dataset"),
            "metrics": cfg["metrics"] if isinstance(cfg.get("metrics"), dict) else {},
            "num_classes": cfg.get("num_classes"),
            "in_chans": cfg.get("in_chans"),
            "image_size": cfg.get("image_size"),
            "path": str(cfg_path.parent),
            "size_bytes": weights.stat().st_size if weights.exists() else 0,
        })
    return entries


def _zoo_entry(base: Path, short: str) -> Path | None:
    """``base/short`` when ``short`` is a plain folder name whose real path is directly inside the
    real ``base`` (no ``/``, ``\\``, leading ``.``, absolute path or symlink leaving the zoo)."""
    if (not short or short.startswith(".") or any(c in short for c in "/\\:\0")
            or os.path.isabs(short)):
        return None
    try:
        root, path = base.resolve(), (base / short).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path.parent == root else None


def _resolve_zoo(name: str, root: str | os.PathLike | None = None) -> Path:
    short = name.split(":", 1)[1]
    path = _zoo_entry(zoo_dir(root), short)
    if path is not None and (path / CONFIG_FILE).is_file():
        return path
    names = [e["name"] for e in list_zoo(root)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TrustVisionError(f"unknown zoo model {shown(name)}{hint}; zoo names are folder names in the "
                           "zoo folder, `trustvision zoo` lists them")


# --- load ---------------------------------------------------------------------------------------


def _checked_member(folder: Path, name: str) -> Path:
    """``folder/name``; refuses a symlink whose target lies outside ``folder`` (a checkpoint never
    makes trustvision read a file the user did not name) and anything but a regular file."""
    path = folder / name
    if path.is_symlink():
        try:
            target, inside = path.resolve(), folder.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            target, inside = None, None
        if target is None or not target.is_relative_to(inside):
            where = "that cannot be resolved" if target is None else f"to {target}"
            raise TrustVisionError(
                f"refusing to load {path}: it is a symlink {where}, outside the checkpoint "
                f"folder {folder}; copy the file into the folder instead of linking it"
            )
    if path.exists() and not path.is_file():
        raise TrustVisionError(f"refusing to load {path}: it is not a regular file; {_LOAD_HINT}")
    return path


def _read_config(path: Path) -> dict:
    """config.json, parsed and checked against the schema (one-line errors naming the key)."""
    if not path.exists():
        raise TrustVisionError(
            f"{path} is missing; a checkpoint needs config.json beside its weights — re-save it "
            "with trustvision.models.save, or pass architecture=, num_classes=, in_chans= and "
            "image_size= to load()"
        )
    fix = "fix it in config.json or re-save the checkpoint with trustvision.models.save"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise TrustVisionError(f"{path} is {path.stat().st_size} bytes, too big for a checkpoint "
                                   f"config (at most {MAX_CONFIG_BYTES}); {fix}")
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TrustVisionError(
            f"{path} is not valid JSON ({_first_line(exc)}); re-save the checkpoint with "
            "trustvision.models.save"
        ) from None
    if not isinstance(cfg, dict):
        raise TrustVisionError(f"{path} must hold a JSON object; re-save the checkpoint with "
                               "trustvision.models.save")
    for key in ("kwargs", "metrics"):  # numbers by contract: "inf" / "-inf" / "nan" -> float
        if isinstance(cfg.get(key), dict):
            cfg[key] = _decode_nonfinite(cfg[key])
    head = {k: cfg[k] for k in ("format", "format_version") if k in cfg}
    bad = check_config(head, path)
    if bad:
        raise TrustVisionError(f"{bad}; {fix}")
    if cfg.get("format", FORMAT) != FORMAT or int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise TrustVisionError(
            f"{path} has format {cfg.get('format')!r} version {cfg.get('format_version')!r}, not "
            f"{FORMAT!r} version <= {FORMAT_VERSION}; upgrade trustvision or re-save the checkpoint"
        )
    bad = check_config(cfg, path)
    if bad:
        raise TrustVisionError(f"{bad}; {fix}")
    found = file_kwarg(cfg.get("kwargs") or {})
    if found:
        key, value = found
        raise TrustVisionError(
            f"refusing to load {path}: its 'kwargs' set {key}={shown(value)}, which would make "
            "trustvision download or open a file the user did not name; remove it from "
            "config.json (for pretrained weights, fetch them yourself and pass the file to "
            "models.load(path, architecture=...))"
        )
    return cfg


def _read_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # SafetensorError, OSError, ...
        raise TrustVisionError(
            f"cannot read weights {path}: corrupt or not a safetensors file ({_first_line(exc)}); "
            "re-download it or re-save the checkpoint with trustvision.models.save"
        ) from None


def _read_foreign(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A ``.pt``/``.pth`` state dict, read with ``weights_only=True`` (no code can run); legacy
    tar-format torch files are refused before torch sees them (unpacking them writes files)."""
    try:
        is_tar = tarfile.is_tarfile(path)
    except OSError:
        is_tar = False
    if is_tar:
        raise TrustVisionError(
            f"refusing to load {path}: it is a tar archive (the legacy torch format, or not a "
            "checkpoint at all), which trustvision does not unpack; re-save it with "
            "torch.save(model.state_dict(), path) from a trusted source, or use trustvision.models.save"
        )
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise TrustVisionError(
            f"refusing to load {path}: it is not a plain state dict of tensors and unpickling it "
            "could run arbitrary code; re-save it with torch.save(model.state_dict(), path) from "
            "a trusted source, or use trustvision.models.save"
        ) from None
    except Exception as exc:
        raise TrustVisionError(
            f"cannot read {path} ({_first_line(exc)}); it must be a state dict saved with "
            "torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise TrustVisionError(
            f"{path} does not hold a state dict of tensors; save one with "
            "torch.save(model.state_dict(), path)"
        )
    return obj


def _check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights holding NaN or Inf (such a model answers garbage that looks like a result)."""
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise TrustVisionError(
                f"weights in {source} hold non-finite values (NaN or Inf), first in {key!r}; the "
                "model is broken (e.g. saved after training diverged): retrain it, or load the "
                "checkpoint of an earlier epoch"
            )


def _build(cfg: dict, source: Path) -> ImageClassifier:
    from trustvision.models import create

    missing = [k for k in _BUILD_KEYS if k not in cfg]
    if missing:
        raise TrustVisionError(
            f"checkpoint {source} lacks {', '.join(missing)}; add them to config.json or pass "
            f"{', '.join(k + '=' for k in missing)} to load()"
        )
    kwargs = cfg.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise TrustVisionError(f"'kwargs' in the config of {source} must be a JSON object; "
                               "re-save the checkpoint with trustvision.models.save")
    try:
        return create(cfg["architecture"], cfg["num_classes"], cfg["in_chans"], cfg["image_size"],
                      **kwargs)
    except TrustVisionError as exc:
        raise TrustVisionError(f"cannot rebuild the model of {source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise TrustVisionError(
            f"cannot rebuild {cfg['architecture']!r} from {source} ({_first_line(exc)}); check "
            "'kwargs' and the sizes in its config.json"
        ) from None


def _fit_state(model: ImageClassifier, state: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    # Bare torchvision/timm or DataParallel state dicts: map "conv1.weight" -> "net.conv1.weight"
    # and "module.x" -> "x" where that is what the model has.
    mapped = {}
    for k, v in state.items():
        if k not in own:
            for cand in ("net." + k, k.removeprefix("module."), "net." + k.removeprefix("module.")):
                if cand in own:
                    k = cand
                    break
        mapped[k] = v
    state = mapped
    missing = [k for k in own if k not in state and not k.startswith("norm_")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {k}: file "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
        cfg = model.tv_config
        raise TrustVisionError(
            f"weights in {source} do not fit {cfg['architecture']!r} with num_classes="
            f"{cfg['num_classes']}, in_chans={cfg['in_chans']}, image_size={cfg['image_size']}: "
            f"{'; '.join(parts)}; make config.json (or the arguments to load) match the weights"
        )
    model.load_state_dict(state, strict=False)


def load(
    path_or_name: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    zoo: str | os.PathLike | None = None,
    **kw: Any,
) -> ImageClassifier:
    """Rebuild a model in eval mode from a checkpoint; never executes pickled code.

    ``path_or_name`` is a checkpoint directory, a ``.safetensors`` file with ``config.json``
    beside it, ``"zoo:<name>"`` (looked up in ``zoo`` / ``$TRUSTVISION_ZOO`` / the shipped zoo), or a
    foreign ``.pt``/``.pth`` state dict read with ``torch.load(weights_only=True)``. Keyword
    arguments ``architecture``, ``num_classes``, ``in_chans``, ``image_size`` (and ``classes``)
    override or replace config.json; any other keyword is a model keyword argument. The model
    carries ``model.tv_config`` (the config dict) and ``model.classes``.
    """
    device = str(torch.device(map_location))
    name = str(path_or_name)
    if name.startswith("zoo:"):
        path = _resolve_zoo(name, zoo)
    else:
        path = Path(path_or_name).expanduser()
        if not path.exists():
            raise TrustVisionError(f"checkpoint not found: {path}; {_LOAD_HINT}")

    if path.is_dir():
        weights, cfg_path = _checked_member(path, WEIGHTS_FILE), _checked_member(path, CONFIG_FILE)
        if not weights.exists():
            raise TrustVisionError(
                f"{path} has no {WEIGHTS_FILE}; {_LOAD_HINT}"
            )
    else:  # a weights file the user named; the config.json beside it must stay in that folder
        weights, cfg_path = path, _checked_member(path.parent, CONFIG_FILE)
        if not weights.is_file():
            raise TrustVisionError(f"cannot load {weights}: it is not a regular file; {_LOAD_HINT}")

    overrides = {k: kw.pop(k) for k in (*_BUILD_KEYS, "classes") if k in kw}
    foreign = weights.suffix.lower() in FOREIGN_SUFFIXES
    if not foreign and weights.suffix.lower() != ".safetensors":
        raise TrustVisionError(f"cannot load {weights}: unknown file type; {_LOAD_HINT}")
    all_given = all(k in overrides for k in _BUILD_KEYS)
    if cfg_path.exists() or not (foreign or all_given):
        cfg = _read_config(cfg_path)  # a missing config.json is reported here
    else:
        cfg = {}
    cfg = dict(cfg)
    cfg.update(overrides)
    if kw:
        cfg["kwargs"] = {**(cfg.get("kwargs") or {}), **kw}
    cfg.setdefault("format", FORMAT)
    cfg.setdefault("format_version", FORMAT_VERSION)
    if "image_size" in cfg and isinstance(cfg["image_size"], int):
        cfg["image_size"] = [cfg["image_size"], cfg["image_size"]]

    state = _read_foreign(weights, device) if foreign else _read_safetensors(weights, device)
    _check_finite(state, weights)
    model = _build(cfg, weights)
    _fit_state(model, state, weights)
    classes = cfg.get("classes") or [str(i) for i in range(model.num_classes)]
    cfg["classes"] = [str(c) for c in classes]
    bad = check_consistency(cfg, cfg_path if cfg_path.exists() else "load()")
    if bad:
        raise TrustVisionError(f"{bad}; fix config.json (or the arguments to load) or re-save the "
                               "checkpoint with trustvision.models.save")
    for key, std in model.state_dict().items():
        if key.endswith("norm_std") and not bool((std > 0).all()):
            raise TrustVisionError(f"weights in {weights} have a normalisation std <= 0 in {key!r} "
                                   "(the model would divide by zero); re-save the checkpoint with a "
                                   "positive std")
    cfg.setdefault("kwargs", {})
    cfg.setdefault("metrics", {})
    cfg.setdefault("dataset", None)
    model.tv_config = cfg
    model.classes = cfg["classes"]
    return model.to(device).eval()
