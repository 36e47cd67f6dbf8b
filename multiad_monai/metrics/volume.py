"""Patient-level metrics of volumetric anomaly maps: slice-level detection and voxel-level localisation.

The BMAD protocol for volumes cut into slices: a slice counts when its foreground (brain or organ) covers
at least ``min_foreground`` of the plane, and it is anomalous when it holds a lesion voxel; slice-level
AUROC/AP rank the per-slice scores. Voxel AUROC/AP and AUPRO pool the voxels inside the foreground of
every volume (all voxels when a volume has no foreground mask), with lesions as connected components in
3D. Dice is computed per volume at the network's saved threshold, the mask a user gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import ignite.distributed as idist
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from skimage.measure import label as label_connected_components

from multiad_monai.metrics import functional as F
from multiad_monai.metrics.cumulative import add_if_computable, all_gather_array

__all__ = ["VolumeAnomalyMetrics", "VOLUME_METRIC_NAMES", "slice_labels", "volume_case_summary", "foreground_auroc"]

VOLUME_METRIC_NAMES = (
    "slice_auroc", "slice_ap", "voxel_auroc", "voxel_ap", "aupro", "voxel_f1_max", "dice", "slice_pixel_auroc"
)


def _spatial(array: Any, name: str) -> np.ndarray:
    """(1, X, Y, Z) or (X, Y, Z) -> (X, Y, Z) numpy."""
    values = F.to_numpy(array)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3:
        raise ValueError(f"{name} must be (1, X, Y, Z) or (X, Y, Z), got shape {values.shape}.")
    return values


def slice_labels(
    lesion: np.ndarray, foreground: np.ndarray | None, axis: int = 2, min_foreground: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Per slice along ``axis`` of (X, Y, Z) masks: (eligible, anomalous) boolean arrays ``(N,)``.

    Eligible: foreground covers at least ``min_foreground`` of the plane (every slice without foreground).
    Anomalous: the slice holds a lesion voxel.
    """
    other = tuple(d for d in range(3) if d != axis)
    anomalous = lesion.any(axis=other)
    if foreground is None:
        return np.ones_like(anomalous), anomalous
    return foreground.mean(axis=other) >= min_foreground, anomalous


def volume_case_summary(
    anomaly_map: Any, lesion: Any | None, foreground: Any | None, threshold: float
) -> dict[str, float | int | None]:
    """One volume at ``threshold``: predicted and lesion voxel counts inside the foreground and their Dice.

    Dice is None without a lesion mask or a finite threshold, and 1.0 when both prediction and lesion are empty.
    """
    values = _spatial(anomaly_map, "anomaly_map")
    inside = np.ones(values.shape, bool) if foreground is None else _spatial(foreground, "foreground") > 0
    summary: dict[str, float | int | None] = {"foreground_voxels": int(inside.sum())}
    if not np.isfinite(threshold):
        return {**summary, "predicted_voxels": None, "lesion_voxels": None, "dice": None}
    predicted = (values >= threshold) & inside
    summary["predicted_voxels"] = int(predicted.sum())
    if lesion is None:
        return {**summary, "lesion_voxels": None, "dice": None}
    truth = (_spatial(lesion, "label") > 0) & inside
    denominator = int(predicted.sum()) + int(truth.sum())
    overlap = int((predicted & truth).sum())
    summary["lesion_voxels"] = int(truth.sum())
    summary["dice"] = 1.0 if denominator == 0 else 2.0 * overlap / denominator
    return summary


def foreground_auroc(anomaly_map: Any, label: Any, foreground: Any | None = None) -> float | None:
    """Voxel AUROC of one volume ``(1, X, Y, Z)`` inside ``foreground``; None when a class is missing."""
    values = _spatial(anomaly_map, "anomaly_map").astype(np.float32, copy=False)
    lesion = _spatial(label, "label") > 0
    inside = np.ones(values.shape, bool) if foreground is None else _spatial(foreground, "foreground") > 0
    normal, abnormal = values[inside & ~lesion], values[inside & lesion]
    if normal.size == 0 or abnormal.size == 0:
        return None
    # boolean indexing made copies, so sort_scores may sort them in place
    return F.auroc_from_sorted(F.sort_scores(normal, abnormal))


class VolumeAnomalyMetrics(Metric):
    """Slice- and voxel-level anomaly metrics over the volumes of one epoch.

    Args:
        axis: spatial axis the slices were taken along (as in the inferer).
        min_foreground: smallest foreground fraction of a plane for a slice to count.
        fpr_limit: integration limit of the AUPRO.
        result_prefix: prepended to every result key.
        output_transform: maps ``engine.state.output`` to the per-volume dict described below.

    ``update`` takes one volume's dict: ``anomaly_map`` ``(1, X, Y, Z)``, ``label`` ``(1, X, Y, Z)`` lesion
    mask (positive = lesion), ``slice_scores`` ``(N,)`` along ``axis``, optionally ``foreground``
    ``(1, X, Y, Z)`` and ``threshold`` (for Dice). ``compute`` returns floats: ``slice_auroc``,
    ``slice_ap``, ``voxel_auroc``, ``voxel_ap``, ``aupro``, ``slice_pixel_auroc`` (all pixels of the counted
    slices' whole planes, background included: BMAD's pixel-level protocol, comparable with its tables), ``voxel_f1_max`` (pooled Dice at the best
    threshold, an oracle upper bound), ``dice`` (mean per-volume Dice at the saved threshold over volumes
    holding lesions), and the counts ``num_volumes``, ``num_slices``, ``num_anomalous_slices``. Entries
    that cannot be computed (one class only) are left out with a warning.

    Memory: 4 bytes per foreground voxel (its score), 8 more per lesion voxel (its region's weight) and 4 per
    pixel of the counted slices, on CPU; maps and volumes are not kept. ``compute`` needs about as much again
    to sort.
    """

    required_output_keys = None

    def __init__(
        self,
        axis: int = 2,
        min_foreground: float = 0.1,
        fpr_limit: float = 0.3,
        result_prefix: str = "",
        output_transform=lambda output: output,
    ) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}.")
        self.axis = axis
        self.min_foreground = min_foreground
        self.fpr_limit = fpr_limit
        self.result_prefix = result_prefix
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._slice_scores: list[np.ndarray] = []
        self._slice_labels: list[np.ndarray] = []
        # voxels inside the foreground, split by ground truth; per lesion voxel 1 / size of its 3D region
        self._normal_voxels: list[np.ndarray] = []
        self._lesion_voxels: list[np.ndarray] = []
        self._lesion_inverse_sizes: list[np.ndarray] = []
        self._num_regions = 0
        # all pixels of the counted slices' planes (BMAD's pixel protocol), split by ground truth
        self._normal_pixels: list[np.ndarray] = []
        self._lesion_pixels: list[np.ndarray] = []
        self._dice: list[float] = []
        self._num_volumes = 0

    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def update(self, output: Mapping[str, Any]) -> None:
        """Add one volume (see the class docstring)."""
        if output.get("label") is None:
            raise ValueError("VolumeAnomalyMetrics needs the lesion label of every volume ('label').")
        values = _spatial(output["anomaly_map"], "anomaly_map").astype(np.float32, copy=False)
        lesion = _spatial(output["label"], "label") > 0
        if lesion.shape != values.shape:
            raise ValueError(f"label shape {lesion.shape} differs from anomaly_map shape {values.shape}.")
        foreground = output.get("foreground")
        inside = None if foreground is None else _spatial(foreground, "foreground") > 0
        if inside is not None:
            lesion = lesion & inside
        scores = F.as_float_array(output["slice_scores"]).reshape(-1)
        if scores.size != values.shape[self.axis]:
            raise ValueError(f"{scores.size} slice scores for {values.shape[self.axis]} slices along axis {self.axis}.")
        eligible, anomalous = slice_labels(lesion, inside, self.axis, self.min_foreground)
        self._slice_scores.append(scores[eligible])
        self._slice_labels.append(anomalous[eligible])
        planes = [slice(None)] * 3
        planes[self.axis] = np.flatnonzero(eligible)
        plane_values, plane_lesion = values[tuple(planes)], lesion[tuple(planes)]
        self._normal_pixels.append(plane_values[~plane_lesion])
        self._lesion_pixels.append(plane_values[plane_lesion])

        normal = ~lesion if inside is None else inside & ~lesion
        self._normal_voxels.append(values[normal])
        regions, num_regions = label_connected_components(lesion, connectivity=3, return_num=True)
        region_sizes = np.bincount(regions.reshape(-1), minlength=num_regions + 1)
        # boolean indexing walks values and regions in the same C order, so voxels and weights stay aligned
        self._lesion_voxels.append(values[lesion])
        self._lesion_inverse_sizes.append(1.0 / region_sizes[regions[lesion]])
        self._num_regions += int(num_regions)
        threshold = float(output.get("threshold", float("nan")))
        if lesion.any() and np.isfinite(threshold):
            self._dice.append(float(volume_case_summary(values, lesion, inside, threshold)["dice"]))
        self._num_volumes += 1

    def _gathered(self, parts: list[np.ndarray], dtype) -> np.ndarray:
        joined = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return all_gather_array(joined.astype(dtype, copy=False))

    def _try(self, results: dict[str, float], keys: list[str], compute_fn) -> None:
        add_if_computable(results, keys, compute_fn, type(self).__name__)

    def compute(self) -> dict[str, float]:
        num_volumes = int(idist.all_reduce(self._num_volumes)) if idist.get_world_size() > 1 else self._num_volumes
        if num_volumes == 0:
            raise NotComputableError("VolumeAnomalyMetrics must have at least one volume before compute.")
        slice_scores = self._gathered(self._slice_scores, np.float64)
        slice_truth = self._gathered(self._slice_labels, bool).astype(np.int64)
        results: dict[str, float] = {
            "num_volumes": float(num_volumes),
            "num_slices": float(slice_truth.size),
            "num_anomalous_slices": float(slice_truth.sum()),
        }
        self._try(results, ["slice_auroc"], lambda: F.image_auroc(slice_scores, slice_truth))
        self._try(results, ["slice_ap"], lambda: F.image_average_precision(slice_scores, slice_truth))

        num_regions = int(idist.all_reduce(self._num_regions)) if idist.get_world_size() > 1 else self._num_regions
        sorted_scores = F.sort_scores(
            self._gathered(self._normal_voxels, np.float32),
            self._gathered(self._lesion_voxels, np.float32),
            self._gathered(self._lesion_inverse_sizes, np.float64),
            num_regions,
        )
        self._try(results, ["voxel_auroc"], lambda: F.auroc_from_sorted(sorted_scores))
        self._try(results, ["voxel_ap"], lambda: F.average_precision_from_sorted(sorted_scores))
        self._try(results, ["aupro"], lambda: F.aupro_from_sorted(sorted_scores, fpr_limit=self.fpr_limit))
        self._try(results, ["voxel_f1_max", "voxel_f1_threshold"], lambda: F.f1_max_from_sorted(sorted_scores))
        plane_scores = F.sort_scores(
            self._gathered(self._normal_pixels, np.float32), self._gathered(self._lesion_pixels, np.float32)
        )
        self._try(results, ["slice_pixel_auroc"], lambda: F.auroc_from_sorted(plane_scores))
        dice = self._gathered([np.asarray(self._dice, np.float64)], np.float64)
        if dice.size:
            results["dice"] = float(dice.mean())
        return {self.result_prefix + key: value for key, value in results.items()}
