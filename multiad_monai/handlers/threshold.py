"""Estimates the anomaly threshold from the scores of normal validation images."""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Engine, Events

from multiad_monai.engines.evaluator import SCORE_KEY
from multiad_monai.metrics.cumulative import all_gather_array

__all__ = ["NormalThresholdHandler"]


class NormalThresholdHandler:
    """Sets ``network.threshold`` to a quantile of the image scores of NORMAL samples (label 0) seen by an
    evaluator, and ``network.score_scale`` to their standard deviation (for 0-1 normalised scores).

    Because the image score is the map maximum, the same threshold on the map gives a binary mask that is
    empty exactly when the image is called normal.

    Args:
        network: module with ``threshold`` and ``score_scale`` buffers (:class:`MultiAD`).
        quantile: quantile of the normal scores; 0.99 flags about 1% of normal images.
        label_key: key of the image label in ``engine.state.output``.
    """

    def __init__(self, network: torch.nn.Module, quantile: float = 0.99, label_key: str = "label") -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
        self.network = network
        self.quantile = quantile
        self.label_key = label_key
        self._normal_scores: list[np.ndarray] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._estimate)

    def _reset(self, engine: Engine) -> None:
        self._normal_scores = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        scores = torch.as_tensor(output[SCORE_KEY]).reshape(-1).float().cpu().numpy()
        labels = output.get(self.label_key)
        if labels is None:  # an unlabelled validation set is taken as all normal
            self._normal_scores.append(scores)
        else:
            self._normal_scores.append(scores[torch.as_tensor(labels).reshape(-1).cpu().numpy() == 0])

    def _estimate(self, engine: Engine) -> None:
        normal = np.concatenate(self._normal_scores) if self._normal_scores else np.empty(0, np.float32)
        # every process sets the same threshold from the scores of all processes
        normal = all_gather_array(normal.astype(np.float32))
        if normal.size == 0:
            raise ValueError("no normal (label 0) validation samples: cannot estimate the anomaly threshold.")
        threshold = float(np.quantile(normal, self.quantile, method="higher"))
        scale = float(normal.std()) if normal.size > 1 and normal.std() > 0 else max(abs(threshold), 1e-6) * 0.1
        self.network.threshold.fill_(threshold)
        self.network.score_scale.fill_(scale)
        engine.state.metrics["threshold"] = threshold
        self.logger.info(f"anomaly threshold {threshold:.5f} from {normal.size} normal validation scores (q={self.quantile})")
