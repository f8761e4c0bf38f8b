"""Generative classifier (IB-INN) vs its feed-forward twin: IB-loss training steps, likelihood
inference and inversion. Plain inference/CE training of every zoo model (GC and twin included)
is in ``bench_models.py`` (``infer:`` / ``train:``)."""

from __future__ import annotations

import torch

from registry import register, training_run, zoo_workload

TRAIN_BATCH = 64
INFER_BATCH = 256


def _generative_zoo() -> list[str]:
    """The built zoo entries (without ``zoo:``) whose architecture is a generative classifier."""
    try:
        from trustvision import models

        return [e["name"].split(":", 1)[1] for e in models.list_zoo()
                if models.is_generative(e["architecture"])]
    except Exception:  # zoo not built or models not importable
        return []


GC_ZOO = tuple(_generative_zoo())


def _train_ib(model, x, y):
    opt = torch.optim.Adam(model.param_groups(1e-4))
    return training_run(opt, lambda: model.training_loss(x, y)[0])


def _log_px(model, x, y):
    @torch.no_grad()
    def run():
        return model.log_px(x)

    return run


def _invert(model, x, y):
    with torch.no_grad():
        z, _ = model.latent(x)

    @torch.no_grad()
    def run():
        return model.invert(z)

    return run


for _name in GC_ZOO:
    register(f"gc-train-ib:{_name}")(zoo_workload(_name, TRAIN_BATCH, True, _train_ib))
    register(f"gc-log-px:{_name}")(zoo_workload(_name, INFER_BATCH, False, _log_px))
    register(f"gc-invert:{_name}")(zoo_workload(_name, INFER_BATCH, False, _invert))
