"""The evaluation's metrics as one log line, with each baseline's metrics under its own name.

MONAI's ``StatsHandler`` flattens nested metric dicts into one namespace, so the baselines' ``image_auroc`` (stored
in ``engine.state.metrics["baselines"]``) would be printed under the model's own name, in its place.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine

from multiad_monai.metrics import BASELINES_KEY

__all__ = ["log_epoch_metrics", "metrics_log_line"]


def _scalars(values: Mapping[str, Any]) -> str:
    return " ".join(f"{name}: {float(value):.4f}" for name, value in sorted(values.items()) if isinstance(value, numbers.Real))


def metrics_log_line(epoch: int, metrics: Mapping[str, Any]) -> str:
    """``Epoch[N] Metrics -- <model's scalars> | baseline <name> -- <its scalars> | ...``; tables such as the
    per-case one are left to ``metrics.json``."""
    line = f"Epoch[{epoch}] Metrics -- {_scalars(metrics)}"
    baselines = metrics.get(BASELINES_KEY)
    for name, values in (baselines.items() if isinstance(baselines, Mapping) else ()):
        if isinstance(values, Mapping):
            line += f" | baseline {name} -- {_scalars(values)}"
    return line


def log_epoch_metrics(engine: Engine, logger_name: str = "StatsHandler") -> None:
    """``StatsHandler(epoch_print_logger=log_epoch_metrics)``: logs :func:`metrics_log_line` at INFO under the
    handler's default logger name."""
    logging.getLogger(logger_name).info(metrics_log_line(engine.state.epoch, engine.state.metrics))
