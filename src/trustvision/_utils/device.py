"""Resolve a user's ``--device`` string to a torch.device, or a one-line error."""

from __future__ import annotations

import torch

from trustvision.errors import TrustVisionError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (cuda when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> torch.device.

    Raises a one-line :class:`TrustVisionError` for an unknown name or a device this machine lacks.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TrustVisionError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise TrustVisionError(f"device {device!r} cannot run models here; use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise TrustVisionError(f"unknown device {device!r}; the CPU is 'cpu'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrustVisionError("CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrustVisionError(
                f"device {device} does not exist ({torch.cuda.device_count()} CUDA devices); "
                "use cuda:0"
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TrustVisionError("MPS is not available on this machine; use --device cpu")
    return dev
