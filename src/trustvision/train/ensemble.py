"""Train a deep ensemble member by member (Lakshminarayanan et al., NeurIPS 2017).

Each member of a :class:`trustvision.models.ensemble.Ensemble` is trained on its own with seed
``seed + i`` (its own shuffling, augmentation and dropout randomness) and its own resumable state
in ``out/members/member-<i>``; the ensemble, whose output is the mean of the members' softmax
probabilities, is then evaluated and saved as one loadable checkpoint in ``out``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from trustvision.errors import TrustVisionError
from trustvision.train.loop import (RESULTS_FILE, TrainResult, _write_json, evaluate_accuracy, fit,
                                    resolve_device)

__all__ = ["fit_ensemble"]


def fit_ensemble(
    ensemble: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    test_set: Dataset | None = None,
    eval_batch_size: int = 256,
    progress: bool | str = True,
    **fit_kwargs,
) -> TrainResult:
    """Train every ``ensemble.members[i]`` with :func:`fit` (seed ``seed + i``), then evaluate the ensemble.

    ``fit_kwargs`` (epochs, lr, batch_size, opt, resume, input_dropout, augment, ...) go to every
    member's :func:`fit`. The returned result holds the ensemble's val/test accuracy, the members'
    results under ``extra["members"]`` and, with ``out``, the checkpoint path.
    """
    members = getattr(ensemble, "members", None)
    if members is None or len(members) == 0:
        raise TrustVisionError("fit_ensemble needs a model with members; build it with "
                               "models.create('ensemble', ..., member=NAME, n=N)")
    dev = resolve_device(device)
    out_dir = None if out is None else Path(out)
    if out_dir is not None and (out_dir / RESULTS_FILE).exists() and not fit_kwargs.get("resume"):
        raise TrustVisionError(
            f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out"
        )
    member_results = []
    for i, member in enumerate(members):
        res = fit(
            member,
            train_set,
            val_set,
            seed=seed + i,
            device=dev,
            out=None if out_dir is None else out_dir / "members" / f"member-{i}",
            test_set=test_set,
            eval_batch_size=eval_batch_size,
            progress=progress,
            progress_label=f"member {i + 1}/{len(members)} ",
            **fit_kwargs,
        )
        member_results.append(res)
    ensemble.to(dev).eval()
    first = member_results[0]
    result = TrainResult(
        epochs=first.epochs,
        seed=int(seed),
        history=[],
        resumed_from_epoch=min(r.resumed_from_epoch for r in member_results),
        config={**first.config, "seed": int(seed), "ensemble": len(members)},
        extra={"members": [asdict(r) for r in member_results]},
    )
    if val_set is not None and len(val_set) > 0:
        result.val_accuracy = evaluate_accuracy(ensemble, val_set, eval_batch_size, dev)
    if test_set is not None and len(test_set) > 0:
        result.test_accuracy = evaluate_accuracy(ensemble, test_set, eval_batch_size, dev)
    if out_dir is not None:
        from trustvision import models

        if getattr(ensemble, "tv_config", {}).get("architecture"):
            models.save(
                ensemble,
                out_dir,
                classes=list(getattr(train_set, "classes", []) or []) or None,
                dataset=getattr(train_set, "name", None),
                metrics=result.metrics(),
                training=result.config,
            )
            result.checkpoint = str(out_dir)
        _write_json(result.to_dict(), out_dir / RESULTS_FILE)
    return result
