"""Batch handling shared by the trainer, the evaluator and the fusion fitting; handler lists per rank."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["to_device", "handlers_for_rank"]


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


def handlers_for_rank(handlers: Sequence[Any]) -> list[Any]:
    """The training handlers one process of a distributed run attaches: all of them on rank 0 (or without
    ``torch.distributed``); on other ranks those that only log (console, TensorBoard, progress bar) are
    left out, while the ones that take part in collective operations (validation, refits of the map
    statistics or fusion head, learning-rate schedule, resume state) stay on every rank, or the ranks
    would wait on each other forever.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        return list(handlers)
    from ignite.handlers import ProgressBar
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    from multiad_monai.handlers.epoch_summary import EpochLossSummary
    from multiad_monai.handlers.report import TensorBoardOverlayHandler

    logging_only = (StatsHandler, TensorBoardStatsHandler, TensorBoardOverlayHandler, ProgressBar, EpochLossSummary)
    return [h for h in handlers if not isinstance(h, logging_only)]
