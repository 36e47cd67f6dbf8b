"""The model's metrics, computed for the baseline scorers of :mod:`multiad_monai.inferers.baselines` too.

Attached to an evaluator under a name other than its result keys, ``compute`` gives ``{"baselines": {name:
{metric: value}}}`` (volumes also ``"per_case"``), which ignite stores as ``engine.state.metrics["baselines"]``
and :class:`~multiad_monai.handlers.MetricsJSONWriter` writes beside the model's metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from multiad_monai.inferers.baselines import (
    BASELINE_MAPS_KEY,
    BASELINE_NAMES,
    BASELINE_SCORES_KEY,
    FEATURE_KNN,
    check_baseline_names,
)
from multiad_monai.metrics.cumulative import AnomalyDetectionMetrics
from multiad_monai.metrics.volume import VolumeAnomalyMetrics, foreground_auroc

__all__ = ["ImageBaselineMetrics", "VolumeBaselineMetrics", "BASELINES_KEY", "PER_CASE_KEY", "MODEL_KEY"]

BASELINES_KEY, PER_CASE_KEY, MODEL_KEY = "baselines", "per_case", "model"


class VolumeBaselineMetrics(Metric):
    """:class:`VolumeAnomalyMetrics` of each baseline map in the evaluator's output, and per-case voxel AUROCs.

    Args:
        names: baselines expected in ``output["baseline_maps"]`` / ``output["baseline_scores"]`` (per-slice).
        axis, min_foreground, fpr_limit: as :class:`VolumeAnomalyMetrics` (the model's metric).
        output_transform: maps ``engine.state.output`` to the volume evaluator's dict.

    ``compute`` returns ``{"baselines": {name: metrics}, "per_case": {case: {"model": auroc, name: auroc}}}``,
    the per-case values being the voxel AUROC inside the foreground (None for a case without lesion). Each
    baseline's numbers are gathered over processes like the model's; the per-case table too.
    """

    required_output_keys = None

    def __init__(
        self,
        names: Sequence[str] = BASELINE_NAMES,
        axis: int = 2,
        min_foreground: float = 0.1,
        fpr_limit: float = 0.3,
        output_transform=lambda output: output,
    ) -> None:
        self.names = check_baseline_names(names)
        self.axis, self.min_foreground, self.fpr_limit = axis, min_foreground, fpr_limit
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._metrics = {
            name: VolumeAnomalyMetrics(axis=self.axis, min_foreground=self.min_foreground, fpr_limit=self.fpr_limit)
            for name in self.names
        }
        self._per_case: list[tuple[str, dict]] = []

    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        from multiad_monai.data.cases import volume_stem  # the data package imports the metrics

        maps, scores = output.get(BASELINE_MAPS_KEY) or {}, output.get(BASELINE_SCORES_KEY) or {}
        label, foreground = output.get("label"), output.get("foreground")
        if label is None:
            return
        case = {MODEL_KEY: foreground_auroc(output["anomaly_map"], label, foreground)}
        for name in self.names:
            if name not in maps:
                raise ValueError(f"baseline {name!r} missing from the evaluator's output; it has {sorted(maps)}.")
            # no threshold: Dice at the saved threshold is the model's alone
            self._metrics[name].update({**output, "anomaly_map": maps[name], "slice_scores": scores[name], "threshold": float("nan")})
            case[name] = foreground_auroc(maps[name], label, foreground)
        self._per_case.append((volume_stem(str(output.get("name", f"volume{len(self._per_case):04d}"))), case))

    def compute(self) -> dict[str, dict]:
        per_case = self._per_case
        if idist.get_world_size() > 1:
            per_case = [tuple(row) for text in idist.all_gather(json.dumps(per_case)) for row in json.loads(text)]
        return {
            BASELINES_KEY: {name: metric.compute() for name, metric in self._metrics.items()},
            PER_CASE_KEY: dict(per_case),
        }


class ImageBaselineMetrics(Metric):
    """:class:`AnomalyDetectionMetrics` of each baseline map of 2D images in the evaluator's output.

    Args:
        names: baselines expected in ``output["baseline_maps"]`` ``(B, 1, H, W)`` and ``output["baseline_scores"]`` ``(B,)``.
        metrics: which of the model's metrics to compute for them.
        output_transform: maps ``engine.state.output`` to the evaluator's dict.

    ``compute`` returns ``{"baselines": {name: metrics}}``.
    """

    required_output_keys = None

    def __init__(
        self,
        names: Sequence[str] = (FEATURE_KNN,),
        metrics: Sequence[str] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"),
        output_transform=lambda output: output,
    ) -> None:
        self.names = check_baseline_names(names, (FEATURE_KNN,))
        self.metric_names = tuple(metrics)
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._metrics = {name: AnomalyDetectionMetrics(metrics=self.metric_names) for name in self.names}

    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        maps, scores = output.get(BASELINE_MAPS_KEY) or {}, output.get(BASELINE_SCORES_KEY) or {}
        if output.get("label") is None:
            return
        for name in self.names:
            if name not in maps:
                raise ValueError(f"baseline {name!r} missing from the evaluator's output; it has {sorted(maps)}.")
            batch = {"score": scores[name], "label": output["label"], "anomaly_map": maps[name], "mask": output.get("mask")}
            self._metrics[name].update(batch)

    def compute(self) -> dict[str, dict]:
        return {BASELINES_KEY: {name: metric.compute() for name, metric in self._metrics.items()}}
