"""Torch devices named by users: checked to exist here before any work."""

from __future__ import annotations

import torch

from multifi.errors import MultifiError


def existing_device(text: str | torch.device) -> torch.device:
    """The torch device `text` names (cpu, cuda, cuda:1, mps), or a one-line error when it is no device or this
    machine has none of its kind."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MultifiError(f"not a device: {text!r} (cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):  # meta, lazy...: devices without data to compute with
        raise MultifiError(f"{text}: not a device to run a model on (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MultifiError(f"{text}: no CUDA device on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MultifiError(f"{text}: no MPS device on this machine")
    return device
