"""Epoch-level anomaly-detection metrics for ignite / MONAI evaluators.

:class:`AnomalyDetectionMetrics` accumulates image scores, labels, anomaly maps and masks
over an epoch and returns a dict of floats. Attached under ``name``, ignite's
``Metric.completed`` (0.4.3+; in 0.5.x with the default ``metrics_result_mode="both"``)
stores the dict in ``engine.state.metrics[name]`` *and* every entry as its own key
(``engine.state.metrics["image_auroc"]`` ...), which is what MONAI's ``StatsHandler`` and
``TensorBoardStatsHandler`` print. ``name`` must therefore differ from the result keys; use
``result_prefix`` when several instances share one engine. To use one entry as a MONAI
``key_val_metric`` wrap it: ``MetricsLambda(lambda r: r["aupro"], metric)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import ignite.distributed as idist
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from multiad_monai.metrics import functional as F

__all__ = ["AnomalyDetectionMetrics", "default_output_transform", "all_gather_array", "METRIC_NAMES"]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro", "f1_max", "dice")
_PIXEL_METRICS = frozenset({"pixel_auroc", "pixel_ap", "aupro", "f1_max", "dice"})
_OUTPUT_KEYS = ("score", "label", "anomaly_map", "mask")


def _optional_numpy(value: Any) -> np.ndarray | None:
    return None if value is None else F.to_numpy(value)


def _split_batch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    scores = F.as_float_array(batch["score"]).reshape(-1)
    labels = F.to_numpy(batch["label"]).reshape(-1)
    if scores.size != labels.size:
        raise ValueError(f"batch has {scores.size} scores but {labels.size} labels.")
    maps, masks = _optional_numpy(batch.get("anomaly_map")), _optional_numpy(batch.get("mask"))
    for name, array in (("anomaly_map", maps), ("mask", masks)):
        if array is not None and array.shape[0] != scores.size:
            raise ValueError(f"batch has {scores.size} scores but {name} has shape {array.shape}.")
    threshold = batch.get("threshold")
    return [
        {
            "score": scores[i],
            "label": labels[i],
            "anomaly_map": None if maps is None else maps[i],
            "mask": None if masks is None else masks[i],
            "threshold": threshold,
        }
        for i in range(scores.size)
    ]


def default_output_transform(output: Any) -> list[dict[str, Any]]:
    """Per-sample dicts {score, label, anomaly_map, mask, threshold} (numpy, float or None) from an engine output.

    Accepts MONAI's decollated output (a list of per-sample dicts), a dict of batched values
    ``score`` (B,), ``label`` (B,), ``anomaly_map`` (B,1,H,W[,D]), ``mask`` (B,1,H,W[,D]), or a
    tuple ``(score, label[, anomaly_map[, mask]])`` of batched values. Missing keys and None
    values mean "not available"; ``threshold`` is the network's saved threshold (one float per batch).
    """
    if isinstance(output, Mapping):
        return _split_batch(output)
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        if all(isinstance(item, Mapping) for item in output):
            return [
                {
                    "score": F.as_float_array(item["score"]).reshape(-1),
                    "label": F.to_numpy(item["label"]).reshape(-1),
                    "anomaly_map": _optional_numpy(item.get("anomaly_map")),
                    "mask": _optional_numpy(item.get("mask")),
                    "threshold": item.get("threshold"),
                }
                for item in output
            ]
        if 2 <= len(output) <= 4:
            return _split_batch(dict(zip(_OUTPUT_KEYS, output)))
    raise TypeError(
        "expected a dict of batched tensors, a list of per-sample dicts or a (score, label[, map[, mask]]) tuple; "
        f"got {type(output).__name__}."
    )


def _scalar(value: np.ndarray | float, name: str) -> float:
    array = np.asarray(value).reshape(-1)
    if array.size != 1:
        raise ValueError(f"each sample needs one {name}, got {array.size} values.")
    return float(array[0])


def _without_channel(array: np.ndarray, name: str) -> np.ndarray:
    """(1,H,W) / (1,H,W,D) -> spatial; a bare (H,W) map is kept as is."""
    if array.ndim in (3, 4):
        if array.shape[0] != 1:
            raise ValueError(f"per-sample {name} must have one channel, (1,H,W[,D]); got shape {array.shape}.")
        return array[0]
    if array.ndim == 2:
        return array
    raise ValueError(f"per-sample {name} must be (1,H,W), (1,H,W,D) or (H,W); got shape {array.shape}.")


def all_gather_array(array: np.ndarray) -> np.ndarray:
    """Concatenation over ranks of 1-D arrays whose lengths may differ between ranks."""
    world_size = idist.get_world_size()
    if world_size == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array).reshape(-1))
    if tensor.dtype == torch.bool:  # uint8 is carried by every backend (gloo, nccl)
        tensor = tensor.to(torch.uint8)
    sizes = idist.all_gather(torch.tensor([tensor.numel()], dtype=torch.int64)).reshape(-1).tolist()
    padded_size = max(max(sizes), 1)  # empty tensors upset some backends
    padded = tensor.new_zeros(padded_size)
    padded[: tensor.numel()] = tensor
    gathered = idist.all_gather(padded).reshape(world_size, padded_size)
    joined = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)]).numpy()
    return joined.astype(array.dtype, copy=False)


def add_if_computable(results: dict[str, float], keys: Sequence[str], compute_fn: Callable[[], Any], owner: str) -> None:
    """Store ``compute_fn()`` (a value or a tuple, one per key) under ``keys``; a ValueError (e.g. one class
    only) leaves them out with a logged warning instead of failing the whole evaluation."""
    try:
        values = compute_fn()
    except ValueError as error:
        logger.warning("%s: skipping %s: %s", owner, ", ".join(keys), error)
        return
    values = values if isinstance(values, tuple) else (values,)
    results.update({key: float(value) for key, value in zip(keys, values)})


class AnomalyDetectionMetrics(Metric):
    """Image- and pixel-level anomaly-detection metrics over one epoch.

    Args:
        output_transform: maps ``engine.state.output`` to what :meth:`update` accepts (see
            :func:`default_output_transform`, the default).
        metrics: which of :data:`METRIC_NAMES` to compute. ``"f1_max"`` gives
            ``image_f1_max``/``image_f1_threshold`` and, with masks, ``pixel_f1_max``/
            ``pixel_f1_threshold`` (the best F1 over thresholds chosen on the test maps themselves: an
            oracle upper bound); ``"dice"`` is the pooled Dice of ``map >= threshold`` at the network's
            saved threshold (the ``threshold`` of the output), the mask a user gets; left out when the
            output carries no finite threshold.
        fpr_limit: integration limit of the AUPRO.
        map_dtype: storage dtype of anomaly maps, ``"float32"`` or ``"float16"`` (half the memory;
            ties from rounding change pixel metrics slightly, values above 65504 overflow).
        result_prefix: prepended to every result key, e.g. ``"bottle/"``.

    ``compute`` returns floats for ``image_auroc, image_ap, image_f1_max, image_f1_threshold,
    pixel_auroc, pixel_ap, aupro, pixel_f1_max, pixel_f1_threshold, dice``, leaving out (with
    a logged warning) those that cannot be computed, e.g. a single class or no masks.

    Masks: a sample without ``mask`` counts as all-normal if its label is 0 (MVTec "good"
    images have no mask file). If any anomalous sample lacks a mask or any sample lacks a
    map, or no sample has a mask (image-level-only data), pixel metrics are skipped and the
    stored maps are dropped.

    Memory: per pixel of each sample with a usable map, 4 bytes (2 with float16) for the map
    plus 1 byte for an explicit mask, on CPU. ``compute`` adds roughly one more copy of
    the maps (split into normal/anomalous and sorted), 8 bytes per anomalous pixel for AUPRO
    weights and, in distributed runs, the gathered data of all ranks (every rank computes).
    Nothing is stored per pixel when no pixel metric is requested.
    """

    required_output_keys = None  # update() takes the whole (transformed) output, see iteration_completed

    def __init__(
        self,
        output_transform: Callable[[Any], Any] = default_output_transform,
        *,
        metrics: Sequence[str] = METRIC_NAMES,
        fpr_limit: float = 0.3,
        map_dtype: str = "float32",
        result_prefix: str = "",
    ) -> None:
        unknown = set(metrics) - set(METRIC_NAMES)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}.")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
        if map_dtype not in ("float32", "float16"):
            raise ValueError(f"map_dtype must be 'float32' or 'float16', got {map_dtype!r}.")
        self.metric_names = tuple(metrics)
        self.fpr_limit = fpr_limit
        self.map_dtype = np.dtype(map_dtype)
        self.result_prefix = result_prefix
        self._stores_maps = bool(_PIXEL_METRICS & set(metrics))
        super().__init__(output_transform=output_transform)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        # Plain counters so sync_all_reduce can sum them over ranks before compute decides anything.
        self._num_samples = 0
        self._num_explicit_masks = 0
        self._num_without_pixel_data = 0
        self._warned_float16_overflow = False
        self._threshold = float("nan")

    def iteration_completed(self, engine: Engine) -> None:
        # Ignite's default turns a dict output into a tuple of required keys and may unroll
        # lists; this metric consumes dicts and lists of per-sample dicts directly.
        self.update(self._output_transform(engine.state.output))

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        """Add a batch: any format accepted by :func:`default_output_transform`."""
        for sample in default_output_transform(output):
            self._add_sample(sample)

    def _add_sample(self, sample: Mapping[str, Any]) -> None:
        score = _scalar(sample["score"], "score")
        label = _scalar(sample["label"], "label")
        if label not in (0.0, 1.0):
            raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got {label}.")
        self._scores.append(score)
        self._labels.append(int(label))
        self._num_samples += 1
        if sample.get("threshold") is not None:
            self._threshold = _scalar(sample["threshold"], "threshold")
        if not self._stores_maps:
            return
        anomaly_map, mask = sample.get("anomaly_map"), sample.get("mask")
        if anomaly_map is None or (mask is None and label == 1):
            self._num_without_pixel_data += 1
            self._maps, self._masks = [], []  # pixel metrics are off for this epoch: free the memory
            return
        self._num_explicit_masks += int(mask is not None)
        if self._num_without_pixel_data:
            return
        spatial_map = _without_channel(F.as_float_array(anomaly_map), "anomaly_map")
        stored_map = spatial_map.astype(self.map_dtype)  # copy: must not pin the engine's batch buffers
        if self.map_dtype == np.float16 and not self._warned_float16_overflow:
            if not np.all(np.isfinite(stored_map)) and np.all(np.isfinite(spatial_map)):
                logger.warning("anomaly map values overflow float16; use map_dtype='float32'.")
                self._warned_float16_overflow = True
        stored_mask = None
        if mask is not None:
            stored_mask = np.array(_without_channel(F.as_binary_array(mask), "mask"), dtype=bool)
            if stored_mask.shape != stored_map.shape:
                raise ValueError(f"mask shape {stored_mask.shape} differs from map shape {stored_map.shape}.")
        self._maps.append(stored_map)
        self._masks.append(stored_mask)

    def _gathered_pixel_samples(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if idist.get_world_size() == 1:
            return list(zip(self._maps, self._masks))
        # Variable-size samples travel flattened, with their shapes padded to 3 dims by -1.
        shapes = np.full((len(self._maps), 3), -1, dtype=np.int64)
        for row, sample_map in zip(shapes, self._maps):
            row[: sample_map.ndim] = sample_map.shape
        flat_maps = np.concatenate([m.reshape(-1) for m in self._maps] or [np.zeros(0, self.map_dtype)])
        flat_masks = np.concatenate(
            [np.zeros(m.size, bool) if k is None else k.reshape(-1) for m, k in zip(self._maps, self._masks)]
            or [np.zeros(0, bool)]
        )
        all_shapes = all_gather_array(shapes.reshape(-1)).reshape(-1, 3)
        all_maps, all_masks = all_gather_array(flat_maps), all_gather_array(flat_masks)
        samples, offset = [], 0
        for row in all_shapes:
            shape = tuple(int(d) for d in row if d >= 0)
            size = int(np.prod(shape))
            samples.append(
                (all_maps[offset : offset + size].reshape(shape), all_masks[offset : offset + size].reshape(shape))
            )
            offset += size
        return samples

    def _try(self, results: dict[str, float], keys: Sequence[str], compute_fn: Callable[[], Any]) -> None:
        add_if_computable(results, keys, compute_fn, type(self).__name__)

    @sync_all_reduce("_num_samples", "_num_explicit_masks", "_num_without_pixel_data")
    def compute(self) -> dict[str, float]:
        """Dict of floats; see the class docstring for keys. Raises NotComputableError with no samples."""
        # The counters are global here, so every rank takes the same branches and collectives.
        if self._num_samples == 0:
            raise NotComputableError(f"{type(self).__name__} must have at least one sample before compute.")
        scores = all_gather_array(np.asarray(self._scores, dtype=np.float64))
        labels = all_gather_array(np.asarray(self._labels, dtype=np.int64))
        wanted = set(self.metric_names)
        results: dict[str, float] = {}
        if "image_auroc" in wanted:
            self._try(results, ["image_auroc"], lambda: F.image_auroc(scores, labels))
        if "image_ap" in wanted:
            self._try(results, ["image_ap"], lambda: F.image_average_precision(scores, labels))
        if "f1_max" in wanted:
            self._try(results, ["image_f1_max", "image_f1_threshold"], lambda: F.f1_max(scores, labels))

        if self._stores_maps:
            if self._num_without_pixel_data or not self._num_explicit_masks:
                logger.warning(
                    "%s: pixel metrics skipped: %d samples lack a map or (anomalous ones) a mask, "
                    "%d samples have a mask.",
                    type(self).__name__,
                    self._num_without_pixel_data,
                    self._num_explicit_masks,
                )
            else:
                results.update(self._pixel_results(wanted))
        return {self.result_prefix + key: value for key, value in results.items()}

    def _dice_at_saved_threshold(self, sorted_scores: F.SortedScores) -> float:
        # ranks without samples hold NaN; the network, and so its threshold, is the same on every rank
        thresholds = all_gather_array(np.asarray([self._threshold], dtype=np.float64))
        thresholds = thresholds[np.isfinite(thresholds)]
        if not thresholds.size:
            raise ValueError("the output carries no saved threshold (an untrained network?)")
        return F.dice_from_sorted(sorted_scores, float(thresholds[0]))

    def _pixel_results(self, wanted: set[str]) -> dict[str, float]:
        results: dict[str, float] = {}
        sorted_scores = F.sorted_scores_from_samples(self._gathered_pixel_samples(), with_regions="aupro" in wanted)
        if "pixel_auroc" in wanted:
            self._try(results, ["pixel_auroc"], lambda: F.auroc_from_sorted(sorted_scores))
        if "pixel_ap" in wanted:
            self._try(results, ["pixel_ap"], lambda: F.average_precision_from_sorted(sorted_scores))
        if "aupro" in wanted:
            self._try(results, ["aupro"], lambda: F.aupro_from_sorted(sorted_scores, fpr_limit=self.fpr_limit))
        if wanted & {"f1_max", "dice"}:
            best: dict[str, float] = {}
            self._try(best, ["pixel_f1_max", "pixel_f1_threshold"], lambda: F.f1_max_from_sorted(sorted_scores))
            if "f1_max" in wanted:
                results.update(best)
            if "dice" in wanted:
                self._try(results, ["dice"], lambda: self._dice_at_saved_threshold(sorted_scores))
        return results
