"""Throughput of the zoo models: inference (eval, no grad) and training steps (Adam)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from registry import Workload, register

INFER_BATCH = 256
TRAIN_BATCH = 64


def _zoo_names() -> list[str]:
    try:
        from trustvision.models.checkpoint import list_zoo

        return [e["name"].split(":", 1)[1] for e in list_zoo()]
    except Exception:  # zoo not built or models not importable
        return []


def _inputs(model, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, model.in_chans, *model.image_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device)
    return x, y


def _inference(name: str):
    def bench(device: torch.device) -> Workload:
        from trustvision import models

        model = models.load(f"zoo:{name}").to(device).eval()
        x, _ = _inputs(model, INFER_BATCH, device)

        @torch.no_grad()
        def run():
            return model(x)

        return Workload(run=run, images=INFER_BATCH)

    return bench


def _training(name: str):
    def bench(device: torch.device) -> Workload:
        from trustvision import models

        model = models.load(f"zoo:{name}").to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x, y = _inputs(model, TRAIN_BATCH, device)

        def run():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return Workload(run=run, images=TRAIN_BATCH)

    return bench


for _name in _zoo_names():
    register(f"infer:{_name}")(_inference(_name))
    register(f"train:{_name}")(_training(_name))
