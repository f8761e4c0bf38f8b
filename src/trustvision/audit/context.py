"""What a check sees: the model, the dataset splits, options, device, seed and cached predictions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from trustvision._utils.progress import silent_tracker
from trustvision.audit.store import ScratchStore, safe_key
from trustvision.data import SPLITS, ImageDataset
from trustvision.data.loading import image_batches

__all__ = ["AuditContext", "LazySplits", "SPLITS"]


class LazySplits(Mapping):
    """``{"train", "val", "test"} -> ImageDataset`` that loads a split on first access.

    Built from a loader ``fn(split) -> ImageDataset`` (e.g. ``lambda s: data.load("digits", s)``) or
    from a ready dict. Missing splits raise the loader's error (a one-line TrustVisionError).
    """

    def __init__(self, source: Callable[[str], ImageDataset] | Mapping[str, ImageDataset]):
        self._cache: dict[str, ImageDataset] = {}
        if isinstance(source, Mapping):
            self._cache.update(source)
            self._loader = None
        else:
            self._loader = source

    def __getitem__(self, split: str) -> ImageDataset:
        if split not in self._cache:
            if self._loader is None or split not in SPLITS:
                from trustvision.errors import TrustVisionError

                raise TrustVisionError(f"the dataset has no {split!r} split; give a dataset with {split} data")
            self._cache[split] = self._loader(split)
        return self._cache[split]

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS if self._loader is not None else list(self._cache))

    def __len__(self) -> int:
        return len(SPLITS) if self._loader is not None else len(self._cache)

    def loaded(self) -> dict[str, ImageDataset]:
        """The splits loaded so far."""
        return dict(self._cache)


@dataclass
class AuditContext:
    """Everything a check needs; one context per audited model (shared by all its checks).

    Attributes:
        model: the audited classifier (eval mode, on ``device``).
        model_name: its display name.
        datasets: split name -> :class:`ImageDataset` (loaded lazily).
        options: audit options (``n_max``, ``batch_size``, ``n_bins``, ...; see :meth:`option`).
        device: torch device string.
        seed: seed for anything random a check does (use :meth:`generator`).
        compare: an optional second model (e.g. the feed-forward twin of a generative classifier).
        compare_name: its display name.
        track: ``track(iterable, total, description, weight=None)`` wraps long loops in a progress
            bar with an ETA (``weight(item)``: the units an item counts for, e.g. the images of a
            chunk; see :mod:`trustvision._utils.progress`).
        check_options: the declared options of the check now running (set by the runner).
        log: ``log(message)`` reports a finished unit of a long check (e.g. one explanation
            method): a line on the progress console, a plain line with ``--no-progress``.
        scratch_root: where :meth:`scratch` keeps partial results (``out/scratch/<model-key>``,
            set by the runner); None: in memory, for this audit only.
        executor: with ``--ray``, where per-image explanation work runs
            (:class:`trustvision.audit.distributed.RayPool`; pass it to
            :func:`trustvision.explain.explain_images` as ``executor``); None: in this process.
    """

    model: torch.nn.Module
    model_name: str
    datasets: Mapping[str, ImageDataset]
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    compare: torch.nn.Module | None = None
    compare_name: str | None = None
    track: Callable[..., Iterable] = field(default=silent_tracker, repr=False)
    check_options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = field(default=lambda message: None, repr=False)
    scratch_root: Path | None = None
    executor: Callable[..., Any] | None = field(default=None, repr=False)
    _logits: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _scratch: dict[str, ScratchStore] = field(default_factory=dict, repr=False)
    _subsets: dict[str, ImageDataset] = field(default_factory=dict, repr=False)

    def option(self, key: str, default: Any = None) -> Any:
        """The running check's declared option ``key`` (its default or the user's value), else
        the audit option ``options[key]`` (``n_max``, ``batch_size``, ``n_bins``), else ``default``."""
        value = self.check_options.get(key)
        if value is None:
            value = self.options.get(key)
        return default if value is None else value

    def scratch(self, name: str) -> ScratchStore:
        """A :class:`~trustvision.audit.store.ScratchStore` for the partial results of a long check
        (e.g. one entry per image, stored as each finishes): under ``scratch_root / name`` when the
        audit writes files, so a rerun after an interruption finds them; in memory otherwise. Keys
        must name everything a result depends on (the model's weights, the settings, the input)."""
        if name not in self._scratch:
            root = None if self.scratch_root is None else Path(self.scratch_root) / safe_key(name)
            self._scratch[name] = ScratchStore(root)
        return self._scratch[name]

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with ``seed + offset``."""
        return torch.Generator().manual_seed(int(self.seed) + offset)

    def dataset(self, split: str) -> ImageDataset:
        """Split ``split`` limited to ``options["n_max"]`` samples (a seeded random subset)."""
        if split not in self._subsets:
            full = self.datasets[split]
            n_max = self.option("n_max")
            if n_max is None or len(full) <= int(n_max):
                self._subsets[split] = full
            else:
                # Seed depends on the split only, so every model sees the same subset.
                offset = SPLITS.index(split) if split in SPLITS else len(SPLITS)
                g = torch.Generator().manual_seed(int(self.seed) + offset)
                idx = torch.randperm(len(full), generator=g)[: int(n_max)].sort().values
                self._subsets[split] = full.subset(idx)
        return self._subsets[split]

    @property
    def classes(self) -> list[str]:
        """Class names of the dataset (from the test split)."""
        return list(self.datasets["test"].classes)

    def logits(self, split: str, *, compare: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K) float32 and labels (N,) of ``model`` (or ``compare``) on ``dataset(split)``.

        Computed once per split and model (batched, no gradients), kept on the CPU.
        """
        key = (split, compare)
        if key not in self._logits:
            model = self.compare if compare else self.model
            if model is None:
                raise ValueError("this audit has no comparison model (use --compare)")
            self._logits[key] = _predict_logits(
                model, self.dataset(split), batch_size=int(self.option("batch_size", 256)), device=self.device,
                track=self.track, description=f"predict {split}",
            )
        return self._logits[key]

    def predict(self, split: str, *, compare: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (N, K) and labels (N,) on ``dataset(split)`` (cached)."""
        z, y = self.logits(split, compare=compare)
        return torch.softmax(z.double(), dim=1).float(), y


@torch.no_grad()
def _predict_logits(model, ds, *, batch_size: int, device: str, track, description: str):
    was_training = model.training
    model.eval()
    outs = []
    try:
        labels: list[int] = []
        batches = image_batches(ds, batch_size, device=device, labels=labels)  # streamed; --num-workers
        for x in track(batches, total=-(-len(ds) // batch_size), description=description):
            out = model(x.to(device, non_blocking=True))
            outs.append(out.float().cpu())
            del out
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("the dataset split is empty")
    logits = torch.cat(outs)
    ys = torch.tensor(labels, dtype=torch.long)
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"the model's outputs are NaN or infinite on {int(bad.sum())} of {len(bad)} images "
                         f"({description}); check its weights and inputs")
    return logits, ys
