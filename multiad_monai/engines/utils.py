"""Batch handling shared by the trainer, the evaluator and the fusion fitting."""

from __future__ import annotations

from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["to_device"]


def to_device(data: Any, device: torch.device, non_blocking: bool, channels_last: bool) -> Any:
    """Plain float tensors (lists of them for feature pyramids) on ``device``; 4D/5D ones channels-last when asked."""
    if isinstance(data, (list, tuple)):
        return [to_device(d, device, non_blocking, channels_last) for d in data]
    # MetaTensor dispatch costs more than the convolutions on CPU: the networks get plain tensors
    data = data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
    data = data.to(device, non_blocking=non_blocking).float()
    if channels_last and data.ndim in (4, 5):
        data = data.contiguous(memory_format=torch.channels_last if data.ndim == 4 else torch.channels_last_3d)
    return data
