"""Write each volume's anomaly map, mask and scores, and a table of all volumes."""

from __future__ import annotations

import csv
import io
import math
import os

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from multiad_monai.data.cases import volume_stem
from multiad_monai.handlers.writers import VOLUME_OUTPUTS_README, atomic_write_text, gather_rows, normalized_score
from multiad_monai.inferers.volume import write_volume_outputs
from multiad_monai.metrics.volume import volume_case_summary

__all__ = ["VolumeOutputWriter"]

_COLUMNS = (
    "name",
    "volume_score",
    "normalized_score",
    "anomalous",
    "threshold",
    "foreground_voxels",
    "predicted_voxels",
    "lesion_voxels",
    "dice",
    "anomaly_map",
    "source",
)


class VolumeOutputWriter:
    """Per volume (``VolumeAnomalyEvaluator`` output): ``<name>_anomaly_map.nii.gz``, ``<name>_anomaly_mask.nii.gz``
    and ``<name>_scores.json`` via :func:`~multiad_monai.inferers.write_volume_outputs`; at the end of the
    epoch ``volumes.csv`` with one row per volume.

    ``normalized_score`` is ``sigmoid((volume_score - threshold) / score_scale)``: 0.5 at the saved
    threshold, so above 0.5 means flagged; the raw score is kept beside it. ``dice`` (at the saved
    threshold, inside the foreground) is filled when the volume has a lesion label. Every file is written
    atomically.

    Args:
        output_dir: folder of the outputs.
        network: the network, for its ``threshold`` and ``score_scale`` buffers.
        axis, quarter_turns: recorded in each JSON, to tell how slices were taken.
    """

    def __init__(self, output_dir: str, network: torch.nn.Module, axis: int = 2, quarter_turns: int = 0) -> None:
        self.output_dir = output_dir
        self.network = network
        self.axis = axis
        self.quarter_turns = quarter_turns
        self._rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_volume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write_table)

    def _reset(self, engine: Engine) -> None:
        self._rows = []

    def _write_volume(self, engine: Engine) -> None:
        output = engine.state.output
        name = volume_stem(str(output["name"]))
        threshold = float(output["threshold"])
        score = float(output["score"].reshape(-1)[0])
        scale = float(getattr(self.network, "score_scale", float("nan")))
        normalized = normalized_score(score, threshold, scale)
        files = write_volume_outputs(
            self.output_dir,
            name,
            output["anomaly_map"],
            threshold,
            output["slice_scores"].numpy(),
            score,
            extra={
                "normalized_score": normalized if math.isfinite(normalized) else None,
                "normalized_score_meaning": "sigmoid((volume_score - threshold) / score_scale): 0.5 at the threshold",
                "slice_axis": self.axis,
                "quarter_turns": self.quarter_turns,
                "source": output.get("source", ""),
            },
        )
        summary = volume_case_summary(output["anomaly_map"], output.get("label"), output.get("foreground"), threshold)
        self._rows.append(
            {
                "name": name,
                "volume_score": score,
                "normalized_score": normalized,
                "anomalous": "" if math.isnan(threshold) else int(score >= threshold),
                "threshold": threshold,
                **{k: "" if v is None else v for k, v in summary.items()},
                "anomaly_map": os.path.basename(files["map"]),
                "source": output.get("source", ""),
            }
        )

    def _write_table(self, engine: Engine) -> None:
        rows = gather_rows(self._rows)
        if idist.get_rank() > 0:
            return
        atomic_write_text(os.path.join(self.output_dir, "README.md"), VOLUME_OUTPUTS_README)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(os.path.join(self.output_dir, "volumes.csv"), buffer.getvalue())
