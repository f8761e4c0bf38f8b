"""Throughput of the zoo models: inference (eval, no grad) and training steps (Adam)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from registry import register, training_run, zoo_names, zoo_workload

INFER_BATCH = 256
TRAIN_BATCH = 64


def _inference(model, x, y):
    @torch.no_grad()
    def run():
        return model(x)

    return run


def _training(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return training_run(opt, lambda: F.cross_entropy(model(x), y))


for _name in zoo_names():
    register(f"infer:{_name}")(zoo_workload(_name, INFER_BATCH, False, _inference))
    register(f"train:{_name}")(zoo_workload(_name, TRAIN_BATCH, True, _training))
