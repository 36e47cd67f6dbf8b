"""Handlers that write evaluation and inference results: metrics JSON, scores CSV, overlay PNGs."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from multiad_monai.atomic import atomic_path
from multiad_monai.engines.evaluator import MAP_KEY, NAME_KEY, SCORE_KEY
from multiad_monai.metrics import BASELINES_KEY, PER_CASE_KEY, normalize_scores
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGE_OUTPUTS_README",
    "VOLUME_OUTPUTS_README",
    "MetricsJSONWriter",
    "ScoreTableWriter",
    "OverlayWriter",
    "atomic_write_text",
    "gather_rows",
    "normalized_score",
]


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    with atomic_path(path, suffix=os.path.basename(path)) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)


IMAGE_OUTPUTS_README = """# Multi-AD outputs

- `scores.csv`: one row per image.
  - `score`: the raw anomaly score, the maximum of the anomaly map (fused 1 - cosine distances between
    teacher and student features; 0 = like the normal training images, larger = more anomalous).
  - `normalized_score`: sigmoid((score - threshold) / score_scale). It is 0.5 exactly at the saved
    threshold, above 0.5 means flagged. It is a rescaled score, not a probability.
  - `prediction`: 1 when score >= threshold (anomalous), 0 otherwise; empty without a saved threshold.
  - `label`: the ground truth when known (1 anomalous).
- `threshold`: the 0.99 quantile of the scores of held-out normal training images, saved in the model;
  about 1 normal image in 100 is flagged.
- `overlays/` or `maps/`: each image with its heatmap, the thresholded region outlined (`*_map.npy`: the raw map).
- `skipped_files.csv` (only with skip_bad_files): the files that could not be read, and why.
"""

VOLUME_OUTPUTS_README = """# Multi-AD volume outputs

- `<case>_anomaly_map.nii.gz`: float32 anomaly map on the scan's own voxel grid (same shape, voxel order
  and affine as the scan file); open it over the scan in 3D Slicer or ITK-SNAP. Larger = more anomalous; 0
  outside the brain/organ mask when one was given.
- `<case>_anomaly_mask.nii.gz`: uint8, 1 where the map is at or above the saved threshold.
- `<case>_scores.json`: `volume_score` (largest slice score), per-slice scores in slice order along
  `slice_axis` of the scan as the network saw it (reoriented to `canonical_axcodes`, RAS by default:
  axial slices from inferior to superior), `threshold`, `anomalous`, and `normalized_score` =
  sigmoid((volume_score - threshold) / score_scale): 0.5 at the threshold, above 0.5 = flagged; a
  rescaled score, not a probability.
- `volumes.csv`: one row per volume with the raw and normalised scores and the decision; with a lesion
  label also lesion and predicted voxels inside the foreground and their Dice.
- `threshold`: the 0.99 quantile of the slice scores of held-out normal training slices, saved in the model.
"""


def gather_rows(rows: list) -> list:
    """Rows (JSON-serialisable) of every process, rank by rank; the rows themselves in a single process."""
    if idist.get_world_size() == 1:
        return list(rows)
    return [row for text in idist.all_gather(json.dumps(rows)) for row in json.loads(text)]


def normalized_score(score: float, threshold: float, scale: float) -> float:
    """The 0-1 score of :func:`multiad_monai.metrics.normalize_scores` (0.5 at the threshold); NaN without a threshold."""
    if not (math.isfinite(threshold) and math.isfinite(scale) and scale > 0):
        return float("nan")
    return normalize_scores(score, threshold, scale)


def _sample_names(output: dict, batch_size: int, start: int) -> list[str]:
    names = output.get(NAME_KEY)
    return [str(n) for n in names] if names is not None else [f"sample_{start + i:05d}" for i in range(batch_size)]


def _json_numbers(value):
    """Nested dicts of numbers as JSON-ready floats (None for None)."""
    if isinstance(value, dict):
        return {str(k): _json_numbers(v) for k, v in value.items()}
    return None if value is None else float(value)


PIXEL_METRICS_SKIPPED = "pixel metrics skipped: not every anomalous test image has a pixel mask (image-level test set)"


class MetricsJSONWriter:
    """After an evaluator's epoch, writes ``engine.state.metrics`` (floats only) to a JSON file, with the
    baselines' metrics and the per-case table when the evaluator has them
    (:mod:`multiad_monai.metrics.baselines`) as ``"baselines"`` and ``"per_case"`` beside ``"metrics"``.

    Args:
        output_path: the JSON file.
        extra: entries written beside the metrics (e.g. the data set and the checkpoint); a callable value is
            called when writing (e.g. ``MultiAD.map_description``, once the checkpoint is loaded).
    """

    def __init__(self, output_path: str, extra: dict | None = None) -> None:
        self.output_path = output_path
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() > 0:  # metrics are gathered over processes already: one writer is enough
            return
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float, np.floating))}
        tables = {
            key: _json_numbers(engine.state.metrics[key])
            for key in (BASELINES_KEY, PER_CASE_KEY)
            if isinstance(engine.state.metrics.get(key), dict) and engine.state.metrics[key]
        }
        notes = {}
        if "image_auroc" in metrics and "pixel_auroc" not in metrics:  # an image-level test set (good / defect folders)
            notes["notes"] = [PIXEL_METRICS_SKIPPED]
            logging.getLogger(__name__).info(PIXEL_METRICS_SKIPPED)
        extra = {key: value() if callable(value) else value for key, value in self.extra.items()}
        content = {**extra, "metrics": metrics, **notes, **tables}
        atomic_write_text(self.output_path, json.dumps(content, indent=2) + "\n")
        logging.getLogger(__name__).info(f"metrics written to {self.output_path}")


class ScoreTableWriter:
    """Collects per-sample scores and writes a CSV: name, raw score, normalised score, prediction, label.

    The normalised score is ``sigmoid((score - threshold) / score_scale)`` with the network's saved
    threshold: 0.5 at the threshold, ``prediction`` is 1 when the raw score is at or above it.

    Args:
        output_path: the CSV file.
        network: module with ``threshold`` and ``score_scale`` buffers.
    """

    HEADER = ("name", "score", "normalized_score", "prediction", "label")

    def __init__(self, output_path: str, network: torch.nn.Module) -> None:
        self.output_path = output_path
        self.network = network
        self.rows: list[tuple] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        scores = torch.as_tensor(output[SCORE_KEY]).reshape(-1).tolist()
        labels = output.get("label")
        labels = [""] * len(scores) if labels is None else torch.as_tensor(labels).reshape(-1).int().tolist()
        threshold, scale = float(self.network.threshold), float(self.network.score_scale)
        for name, score, label in zip(_sample_names(output, len(scores), len(self.rows)), scores, labels):
            prediction = "" if math.isnan(threshold) else int(score >= threshold)
            self.rows.append((name, f"{score:.6g}", f"{normalized_score(score, threshold, scale):.4f}", prediction, label))

    def _write(self, engine: Engine) -> None:
        rows = gather_rows(self.rows)
        if idist.get_rank() > 0:
            return
        atomic_write_text(os.path.join(os.path.dirname(os.path.abspath(self.output_path)), "README.md"), IMAGE_OUTPUTS_README)
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(self.HEADER)
        writer.writerows(rows)
        atomic_write_text(self.output_path, table.getvalue())


class OverlayWriter:
    """Saves, for each sample, a PNG with the input, the heatmap over it and (when a threshold is known)
    the outline of the predicted anomalous region; optionally the raw map as ``.npy``.

    Args:
        output_dir: folder for ``<name>.png`` (``/`` in names become sub-folders).
        network: module with a ``threshold`` buffer.
        mean, std: the normalisation of the images, undone for display.
        max_samples: stop after this many samples (None: all).
        save_raw_maps: also save the float map as ``<name>_map.npy``.
    """

    def __init__(
        self,
        output_dir: str,
        network: torch.nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_samples: int | None = None,
        save_raw_maps: bool = False,
    ) -> None:
        from multiad_monai.handlers.overlay import NetworkOverlays

        self.output_dir = output_dir
        self.overlays = NetworkOverlays(network, mean, std)
        self.max_samples = max_samples
        self.save_raw_maps = save_raw_maps
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.count = 0

    def __call__(self, engine: Engine) -> None:
        from multiad_monai.handlers.overlay import save_png

        output = engine.state.output
        images, maps = output["image"], output[MAP_KEY]
        if images.ndim != 4:
            raise ValueError("OverlayWriter handles 2D images; use the volume writer for 3D maps.")
        names = _sample_names(output, len(maps), self.count)
        for name, image, amap in zip(names, images, maps):
            if self.max_samples is not None and self.count >= self.max_samples:
                return
            relative = os.path.basename(name) if os.path.isabs(name) else name
            stem = os.path.join(self.output_dir, os.path.splitext(relative)[0])
            save_png(stem + ".png", self.overlays(image, amap))
            if self.save_raw_maps:
                np.save(stem + "_map.npy", amap[0].float().numpy())
            self.count += 1
