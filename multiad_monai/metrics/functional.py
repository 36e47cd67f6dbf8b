"""Anomaly-detection metrics as plain functions of numpy arrays or torch tensors.

Conventions used throughout:

* label / mask value 1 means anomalous, 0 means normal;
* a sample or pixel is predicted anomalous when ``score >= threshold``;
* pixel-level functions pool all pixels of all images (as in MVTec AD), except
  :func:`dice_per_sample` and the region labelling inside :func:`aupro`.

The pixel-level metrics never build a ``(num_pixels,)`` float64 copy: pixel scores keep
their floating dtype (float16/32/64; other dtypes become float32), are split once into
normal and anomalous pixels and sorted in place, and every metric is then read off the
two sorted arrays with ``np.searchsorted``. Peak memory is therefore about one extra copy
of the maps plus small per-threshold arrays; runtime is dominated by one sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from skimage.measure import label as label_connected_components
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "aupro",
    "dice_per_sample",
    "dice_score",
    "estimate_threshold",
    "f1_max",
    "image_auroc",
    "image_average_precision",
    "normalize_scores",
    "pixel_auroc",
    "pixel_average_precision",
]

ArrayLike = Any  # numpy array, torch tensor (MetaTensor included) or nested sequence of numbers


# ----------------------------------------------------------------------------- conversions


def to_numpy(values: ArrayLike) -> np.ndarray:
    """Numpy view of ``values`` without copying when it is already a CPU array/tensor."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.device.type != "cpu":
            values = values.cpu()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16
            values = values.float()
        return np.asarray(values.numpy())
    return np.asarray(values)


def as_float_array(values: ArrayLike) -> np.ndarray:
    """Floating numpy array; float16/32/64 inputs are not copied, anything else becomes float32."""
    array = to_numpy(values)
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return array


def as_binary_array(values: ArrayLike, name: str = "mask") -> np.ndarray:
    """Boolean array from a bool or 0/1-valued array; anything else is an error, not silently thresholded."""
    array = to_numpy(values)
    if array.dtype == np.bool_:
        return array
    if np.any((array != 0) & (array != 1)):
        raise ValueError(f"{name} must be binary (only 0 and 1), got values {np.unique(array)[:10]} ...")
    return array != 0


def _flat_scores_and_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    flat_scores = as_float_array(scores).reshape(-1)
    flat_labels = as_binary_array(labels, name="labels").reshape(-1)
    if flat_scores.size != flat_labels.size:
        raise ValueError(f"scores and labels differ in size: {flat_scores.size} vs {flat_labels.size}.")
    return flat_scores, flat_labels


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    num_anomalous = int(np.count_nonzero(labels))
    if num_anomalous == 0 or num_anomalous == labels.size:
        raise ValueError(
            f"{what} needs both normal and anomalous samples; got {num_anomalous} anomalous of {labels.size}."
        )


# ----------------------------------------------------------------------------- image level


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of image scores. ``scores``, ``labels``: any shape, same size."""
    flat_scores, flat_labels = _flat_scores_and_labels(scores, labels)
    _require_both_classes(flat_labels, "AUROC")
    return float(roc_auc_score(flat_labels, flat_scores))


def image_average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (area under the precision-recall curve, step-wise) of image scores."""
    flat_scores, flat_labels = _flat_scores_and_labels(scores, labels)
    _require_both_classes(flat_labels, "Average precision")
    return float(average_precision_score(flat_labels, flat_scores))


# ----------------------------------------------------------------------------- sorted-score core


@dataclass
class SortedScores:
    """Scores split by ground truth, each sorted ascending.

    ``region_weights[i]`` (only when built with regions) is ``1 / (size of the region holding
    positives[i] * number of regions)``, so summing it over pixels above a threshold gives the
    per-region overlap (PRO) at that threshold.
    """

    negatives: np.ndarray
    positives: np.ndarray
    region_weights: np.ndarray | None = None
    num_regions: int = 0


def _check_no_nan(sorted_values: np.ndarray) -> None:
    # np.sort puts NaN last, so one look at the end is enough.
    if sorted_values.size and np.isnan(sorted_values[-1]):
        raise ValueError("scores contain NaN.")


def sorted_scores_from_samples(
    samples: Sequence[tuple[np.ndarray, np.ndarray | None]], *, with_regions: bool = False
) -> SortedScores:
    """Split and sort the pixels of ``samples`` = [(map, mask or None), ...] of one spatial shape each.

    ``mask`` None means an all-normal sample. With ``with_regions`` the connected components
    of every mask (full connectivity: 8-neighbourhood in 2D, 26 in 3D) become the regions of
    the PRO curve; they are labelled per sample, in the sample's own dimensionality.
    """
    maps = [as_float_array(sample_map) for sample_map, _ in samples]
    masks = [None if sample_mask is None else as_binary_array(sample_mask) for _, sample_mask in samples]
    for sample_map, sample_mask in zip(maps, masks):
        if sample_mask is not None and sample_mask.shape != sample_map.shape:
            raise ValueError(f"map shape {sample_map.shape} differs from mask shape {sample_mask.shape}.")
    dtype = np.result_type(*[m.dtype for m in maps]) if maps else np.dtype(np.float32)
    positive_counts = [0 if k is None else int(np.count_nonzero(k)) for k in masks]
    total_pixels = sum(m.size for m in maps)
    total_positives = sum(positive_counts)

    # Preallocated so the pooled arrays are the only full-size copies.
    negatives = np.empty(total_pixels - total_positives, dtype=dtype)
    positives = np.empty(total_positives, dtype=dtype)
    inverse_region_sizes = np.empty(total_positives, dtype=np.float64) if with_regions else None
    num_regions = 0
    neg_offset = pos_offset = 0
    for sample_map, sample_mask, num_pos in zip(maps, masks, positive_counts):
        if sample_mask is None or num_pos == 0:
            negatives[neg_offset : neg_offset + sample_map.size] = sample_map.reshape(-1)
            neg_offset += sample_map.size
            continue
        negatives[neg_offset : neg_offset + sample_map.size - num_pos] = sample_map[~sample_mask]
        neg_offset += sample_map.size - num_pos
        positives[pos_offset : pos_offset + num_pos] = sample_map[sample_mask]
        if inverse_region_sizes is not None:
            region_ids, sample_regions = label_connected_components(sample_mask, return_num=True)
            region_sizes = np.bincount(region_ids.reshape(-1), minlength=sample_regions + 1)
            # Boolean indexing walks both arrays in the same C order, so pixels stay aligned.
            inverse_region_sizes[pos_offset : pos_offset + num_pos] = 1.0 / region_sizes[region_ids[sample_mask]]
            num_regions += sample_regions
        pos_offset += num_pos

    return sort_scores(negatives, positives, inverse_region_sizes, num_regions)


def sort_scores(
    negatives: np.ndarray,
    positives: np.ndarray,
    inverse_region_sizes: np.ndarray | None = None,
    num_regions: int = 0,
) -> SortedScores:
    """:class:`SortedScores` of normal and anomalous scores (1-D arrays, sorted here in place).

    ``inverse_region_sizes[i]``, when given, is 1 / size of the region holding ``positives[i]`` (before
    sorting) among ``num_regions`` regions; it becomes the PRO weight of that pixel.
    """
    negatives.sort()
    _check_no_nan(negatives)
    region_weights = None
    if inverse_region_sizes is not None:
        order = np.argsort(positives, kind="stable")
        positives = positives[order]
        region_weights = inverse_region_sizes[order] / max(num_regions, 1)
    else:
        positives.sort()
    _check_no_nan(positives)
    return SortedScores(negatives, positives, region_weights, num_regions)


def _sorted_scores_from_arrays(maps: ArrayLike, masks: ArrayLike) -> SortedScores:
    flat_maps, flat_masks = _flat_scores_and_labels(maps, masks)
    return sorted_scores_from_samples([(flat_maps, flat_masks)])


def _distinct_descending(sorted_ascending: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array, largest first, with their multiplicities."""
    if sorted_ascending.size == 0:
        return sorted_ascending[:0], np.zeros(0, dtype=np.int64)
    descending = sorted_ascending[::-1]
    is_start = np.empty(descending.size, dtype=bool)
    is_start[0] = True
    np.not_equal(descending[1:], descending[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    counts = np.diff(np.append(starts, descending.size))
    return descending[starts], counts


def _count_at_or_above(sorted_ascending: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return sorted_ascending.size - np.searchsorted(sorted_ascending, thresholds, side="left")


def auroc_from_sorted(scores: SortedScores) -> float:
    """Mann-Whitney AUROC (ties count 1/2), identical to the trapezoidal ROC area."""
    num_neg, num_pos = scores.negatives.size, scores.positives.size
    if num_neg == 0 or num_pos == 0:
        raise ValueError(f"AUROC needs both normal and anomalous pixels; got {num_pos} anomalous, {num_neg} normal.")
    below = np.searchsorted(scores.negatives, scores.positives, side="left").sum(dtype=np.int64)
    at_or_below = np.searchsorted(scores.negatives, scores.positives, side="right").sum(dtype=np.int64)
    # below + ties/2 = (below + at_or_below) / 2, kept in integers until the end for exactness.
    return float((int(below) + int(at_or_below)) / (2.0 * num_neg * num_pos))


def average_precision_from_sorted(scores: SortedScores) -> float:
    """Step-wise average precision, sum over recall steps of precision (as scikit-learn)."""
    num_pos = scores.positives.size
    if num_pos == 0:
        raise ValueError("Average precision needs at least one anomalous pixel.")
    thresholds, step_counts = _distinct_descending(scores.positives)
    true_pos = _count_at_or_above(scores.positives, thresholds)
    false_pos = _count_at_or_above(scores.negatives, thresholds)
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(step_counts * precision) / num_pos)


def f1_max_from_sorted(scores: SortedScores) -> tuple[float, float]:
    """Best F1 and its threshold. Only thresholds equal to a positive score can be optimal:
    lowering the threshold past negatives alone adds false positives and no true positives."""
    num_pos = scores.positives.size
    if num_pos == 0:
        raise ValueError("F1 needs at least one anomalous sample/pixel.")
    thresholds, _ = _distinct_descending(scores.positives)
    true_pos = _count_at_or_above(scores.positives, thresholds)
    false_pos = _count_at_or_above(scores.negatives, thresholds)
    f1 = 2.0 * true_pos / (true_pos + false_pos + num_pos)
    best = int(np.argmax(f1))  # first maximum = highest threshold among equals
    return float(f1[best]), float(thresholds[best])


def dice_from_sorted(scores: SortedScores, threshold: float, *, empty_score: float = 1.0) -> float:
    """Pooled Dice of ``score >= threshold`` vs ground truth (equals F1 at that threshold)."""
    num_pos = scores.positives.size
    true_pos = int(_count_at_or_above(scores.positives, np.asarray([threshold]))[0])
    false_pos = int(_count_at_or_above(scores.negatives, np.asarray([threshold]))[0])
    denominator = true_pos + false_pos + num_pos
    return empty_score if denominator == 0 else 2.0 * true_pos / denominator


def aupro_from_sorted(scores: SortedScores, *, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the PRO-vs-FPR curve up to ``fpr_limit``.

    The curve runs through (0, 0) and (FPR(t), PRO(t)) for every distinct score t, largest
    first. Between two consecutive distinct *normal* scores only PRO moves (vertical steps,
    no area), so the area is a sum over distinct normal scores t with count c_t of the
    trapezoid (c_t / N_normal) * (PRO(> t) + PRO(>= t)) / 2; anomalous pixels tied with t
    make that piece a diagonal, exactly as in the reference implementation.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    if scores.region_weights is None:
        raise ValueError("AUPRO needs SortedScores built with with_regions=True.")
    num_neg = scores.negatives.size
    if scores.num_regions == 0 or scores.positives.size == 0:
        raise ValueError("AUPRO needs at least one anomalous region (a mask pixel equal to 1); none found.")
    if num_neg == 0:
        raise ValueError("AUPRO needs normal pixels (mask == 0) to measure the false-positive rate; none found.")

    # Only the highest normal scores matter: those needed to reach fpr_limit, plus one for rounding.
    needed = min(num_neg, math.ceil(fpr_limit * num_neg) + 1)
    cutoff_value = scores.negatives[num_neg - needed]
    top_negatives = scores.negatives[np.searchsorted(scores.negatives, cutoff_value, side="left") :]
    thresholds, counts = _distinct_descending(top_negatives)

    fpr = np.cumsum(counts) / num_neg
    fpr_before = np.concatenate(([0.0], fpr[:-1]))
    # pro_above[k] = PRO of the pixels at index >= k of the ascending positives.
    pro_above = np.concatenate((np.cumsum(scores.region_weights[::-1])[::-1], [0.0]))
    pro_at_or_above = pro_above[np.searchsorted(scores.positives, thresholds, side="left")]
    pro_strictly_above = pro_above[np.searchsorted(scores.positives, thresholds, side="right")]

    inside = fpr <= fpr_limit  # a prefix, fpr is increasing
    area = float(np.sum((fpr - fpr_before)[inside] * (pro_strictly_above + pro_at_or_above)[inside]) / 2.0)
    if not inside.all():
        crossing = int(np.argmin(inside))
        start_fpr, end_fpr = fpr_before[crossing], fpr[crossing]
        start_pro, end_pro = pro_strictly_above[crossing], pro_at_or_above[crossing]
        pro_at_limit = start_pro + (end_pro - start_pro) * (fpr_limit - start_fpr) / (end_fpr - start_fpr)
        area += (fpr_limit - start_fpr) * (start_pro + pro_at_limit) / 2.0
    # Rounding in the weight sums can overshoot 1 by ~1e-16.
    return float(min(max(area / fpr_limit, 0.0), 1.0))


# ----------------------------------------------------------------------------- pixel level


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel AUROC pooled over all pixels. ``maps`` float and ``masks`` binary, same size, e.g. (N,1,H,W[,D])."""
    return auroc_from_sorted(_sorted_scores_from_arrays(maps, masks))


def pixel_average_precision(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel average precision pooled over all pixels (same inputs as :func:`pixel_auroc`)."""
    return average_precision_from_sorted(_sorted_scores_from_arrays(maps, masks))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """Maximum F1 over the precision-recall curve and the threshold reaching it (rule ``score >= threshold``).

    Works for image scores (N,) with labels (N,) or pixel maps with masks of any matching shape.
    """
    flat_scores, flat_labels = _flat_scores_and_labels(scores, labels)
    return f1_max_from_sorted(sorted_scores_from_samples([(flat_scores, flat_labels)]))


def spatial_samples(maps: ArrayLike, masks: ArrayLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-sample (map, mask) pairs without channel axis from (N,H,W), (N,1,H,W), (N,1,H,W,D) or (H,W)."""
    map_array, mask_array = as_float_array(maps), as_binary_array(masks)
    if map_array.shape != mask_array.shape:
        raise ValueError(f"maps shape {map_array.shape} differs from masks shape {mask_array.shape}.")
    if map_array.ndim == 2:
        map_array, mask_array = map_array[None], mask_array[None]
    elif map_array.ndim in (4, 5):
        if map_array.shape[1] != 1:
            raise ValueError(f"expected one channel, (N,1,H,W) or (N,1,H,W,D); got shape {map_array.shape}.")
        map_array, mask_array = map_array[:, 0], mask_array[:, 0]
    elif map_array.ndim != 3:
        raise ValueError(f"expected (N,H,W), (N,1,H,W) or (N,1,H,W,D) maps; got shape {map_array.shape}.")
    return list(zip(map_array, mask_array))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD, Bergmann et al. 2021).

    Args:
        maps: anomaly maps (N,H,W), (N,1,H,W) or (N,1,H,W,D); higher = more anomalous.
        masks: binary ground truth of the same shape. Each connected component (full
            connectivity, labelled per image, in 3D for volumes) is one region.
        fpr_limit: upper integration limit on the false-positive rate, in (0, 1].

    Returns:
        area / fpr_limit, so a perfect map gives 1.0. Computed exactly from one sort of the
        pixel scores (every distinct score is a threshold), with the curve interpolated
        linearly at ``fpr_limit``.

    Raises:
        ValueError: no anomalous region, no normal pixel, NaN scores or bad shapes.
    """
    sorted_scores = sorted_scores_from_samples(spatial_samples(maps, masks), with_regions=True)
    return aupro_from_sorted(sorted_scores, fpr_limit=fpr_limit)


def dice_score(maps: ArrayLike, masks: ArrayLike, threshold: float, *, empty_score: float = 1.0) -> float:
    """Dice of ``maps >= threshold`` vs ``masks`` over all pixels pooled; ``empty_score`` if both are empty."""
    flat_maps, flat_masks = _flat_scores_and_labels(maps, masks)
    predicted = flat_maps >= threshold
    overlap = np.count_nonzero(predicted & flat_masks)
    denominator = np.count_nonzero(predicted) + np.count_nonzero(flat_masks)
    return empty_score if denominator == 0 else float(2.0 * overlap / denominator)


def dice_per_sample(maps: ArrayLike, masks: ArrayLike, threshold: float, *, empty_score: float = 1.0) -> list[float]:
    """Dice per sample (first axis) of ``maps >= threshold``; ``empty_score`` where prediction and mask are empty."""
    map_array, mask_array = as_float_array(maps), as_binary_array(masks)
    if map_array.shape != mask_array.shape:
        raise ValueError(f"maps shape {map_array.shape} differs from masks shape {mask_array.shape}.")
    return [dice_score(m, k, threshold, empty_score=empty_score) for m, k in zip(map_array, mask_array)]


# ----------------------------------------------------------------------------- thresholds


def estimate_threshold(normal_scores: ArrayLike, quantile: float = 0.99) -> float:
    """Decision threshold from scores of NORMAL validation samples only.

    Uses ``np.quantile(..., method="higher")``: the threshold is always an observed normal
    score (the ``ceil(quantile * (n - 1))``-th smallest, 0-based), never an interpolation
    between two of them, and at least a fraction ``quantile`` of the normal scores are
    ``<= threshold``, so at most ``1 - quantile`` of them are strictly above it.
    """
    values = as_float_array(normal_scores).reshape(-1)
    if values.size == 0:
        raise ValueError("estimate_threshold needs at least one normal score; got none.")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
    if not np.all(np.isfinite(values)):
        raise ValueError("normal_scores contain NaN or infinity.")
    return float(np.quantile(values, quantile, method="higher"))


def normalize_scores(scores: ArrayLike, threshold: float, scale: float) -> ArrayLike:
    """Map raw scores to (0, 1) with ``sigmoid((scores - threshold) / scale)``.

    No min/max of the test set is involved, so a score means the same across batches and
    sets: ``threshold`` maps to 0.5 and ``scale`` (> 0, in score units) sets how fast the
    value saturates (threshold +/- scale maps to about 0.73 / 0.27). Returns a tensor for
    tensor input, a float for a Python number, a numpy array otherwise.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}.")
    if isinstance(scores, torch.Tensor):
        return torch.sigmoid((scores - threshold) / scale)
    if isinstance(scores, (int, float)):
        return float(expit((scores - threshold) / scale))
    return expit((as_float_array(scores) - threshold) / scale)
