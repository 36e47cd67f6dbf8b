"""One readable line per training epoch: the mean of each loss term, the epoch time; per-iteration values at DEBUG."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ignite.engine import Engine, Events

__all__ = ["EpochLossSummary"]


class EpochLossSummary:
    """Averages the scalar losses of a trainer over each epoch, logs them as one INFO line when the epoch ends
    (``epoch 3/40: loss 0.1234, distillation 0.1200, ... (12.3 s)``) and stores the means in
    ``engine.state.metrics`` as ``<prefix><term>`` (so TensorBoard and MLflow handlers see them). Each
    iteration's terms are logged at DEBUG only, so the console shows the progress bar and the summaries.

    Args:
        output_transform: maps the trainer's ``engine.state.output`` to ``{term: float}`` (e.g.
            :func:`multiad_monai.engines.loss_terms`).
        prefix: prepended to each term in ``engine.state.metrics``.
        name: the logger's name.
    """

    def __init__(self, output_transform: Callable[[dict], dict[str, float]] | None = None, prefix: str = "mean_",
                 name: str = "multiad_monai.train") -> None:
        if output_transform is None:
            from multiad_monai.engines.trainer import loss_terms

            output_transform = loss_terms
        self.output_transform = output_transform
        self.prefix = prefix
        self.logger = logging.getLogger(name)
        self._sums: dict[str, float] = {}
        self._count = 0
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._add)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._summarise)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count, self._start = {}, 0, time.perf_counter()

    def _add(self, engine: Engine) -> None:
        terms = self.output_transform(engine.state.output)
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        if self.logger.isEnabledFor(logging.DEBUG):
            text = ", ".join(f"{key} {value:.4f}" for key, value in terms.items())
            self.logger.debug(f"epoch {engine.state.epoch} iteration {engine.state.iteration}: {text}")

    def _summarise(self, engine: Engine) -> None:
        if not self._count:
            return
        means = {key: total / self._count for key, total in self._sums.items()}
        engine.state.metrics.update({f"{self.prefix}{key}": value for key, value in means.items()})
        text = ", ".join(f"{key} {value:.4f}" for key, value in means.items())
        seconds = time.perf_counter() - self._start
        self.logger.info(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {text} ({seconds:.1f} s)")
