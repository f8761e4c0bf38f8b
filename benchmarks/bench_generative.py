"""Generative classifier (IB-INN) vs its feed-forward twin: IB-loss training steps, likelihood
inference and inversion. Plain inference/CE training of every zoo model (GC and twin included)
is in ``bench_models.py`` (``infer:`` / ``train:``)."""

from __future__ import annotations

import torch

from registry import Workload, register

TRAIN_BATCH = 64
INFER_BATCH = 256
GC_ZOO = ("ibinn-small-digits", "ibinn-small-textures")


def _load(name: str, device: torch.device):
    from trustvision import models
    from trustvision.models.checkpoint import list_zoo

    if f"zoo:{name}" not in {e["name"] for e in list_zoo()}:
        return None
    return models.load(f"zoo:{name}").to(device)


def _inputs(model, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, model.in_chans, *model.image_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return x, y


def _train_ib(name: str):
    def bench(device: torch.device):
        model = _load(name, device)
        if model is None:
            return None
        model.train()
        opt = torch.optim.Adam(model.param_groups(1e-4))
        x, y = _inputs(model, TRAIN_BATCH, device)

        def run():
            loss, _ = model.training_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return Workload(run=run, images=TRAIN_BATCH)

    return bench


def _log_px(name: str):
    def bench(device: torch.device):
        model = _load(name, device)
        if model is None:
            return None
        model.eval()
        x, _ = _inputs(model, INFER_BATCH, device)

        @torch.no_grad()
        def run():
            return model.log_px(x)

        return Workload(run=run, images=INFER_BATCH)

    return bench


def _invert(name: str):
    def bench(device: torch.device):
        model = _load(name, device)
        if model is None:
            return None
        model.eval()
        x, _ = _inputs(model, INFER_BATCH, device)
        with torch.no_grad():
            z, _ = model.latent(x)

        @torch.no_grad()
        def run():
            return model.invert(z)

        return Workload(run=run, images=INFER_BATCH)

    return bench


for _name in GC_ZOO:
    register(f"gc-train-ib:{_name}")(_train_ib(_name))
    register(f"gc-log-px:{_name}")(_log_px(_name))
    register(f"gc-invert:{_name}")(_invert(_name))
