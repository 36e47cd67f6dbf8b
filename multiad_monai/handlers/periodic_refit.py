"""Base of the handlers that refit a fitted part of the network on training images between epochs."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events

__all__ = ["PeriodicRefitHandler"]


class PeriodicRefitHandler:
    """Refits a part of ``network`` every ``interval`` training epochs and logs what it fitted. Attach it before
    the ``ValidationHandler``, so that validation sees the refitted part. Subclasses give :meth:`applies` (whether
    the network has the part; otherwise the handler attaches nothing) and :meth:`refit` (fit, return a log line).

    Args:
        network: the :class:`~multiad_monai.networks.MultiAD` being trained.
        data_loader: the training images the part is fitted on.
        interval: epochs between fits, at least 1.
    """

    def __init__(self, network: torch.nn.Module, data_loader, interval: int = 1) -> None:
        if interval < 1:
            raise ValueError(f"{type(self).__name__} interval must be at least 1 epoch, got {interval}.")
        self.network = network
        self.data_loader = data_loader
        self.interval = interval

    def applies(self) -> bool:
        raise NotImplementedError

    def refit(self, device: torch.device | str) -> str:
        raise NotImplementedError

    def attach(self, engine: Engine) -> None:
        if self.applies():
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        logging.getLogger(type(self).__module__).info(self.refit(engine.state.device))
