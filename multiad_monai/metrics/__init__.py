"""Anomaly-detection metrics: plain functions and an ignite epoch metric."""

from multiad_monai.metrics.cumulative import METRIC_NAMES, AnomalyDetectionMetrics, default_output_transform
from multiad_monai.metrics.validation import NormalFitScore, ValidationScore
from multiad_monai.metrics.volume import VOLUME_METRIC_NAMES, VolumeAnomalyMetrics, foreground_auroc, slice_labels, volume_case_summary
from multiad_monai.metrics.baselines import BASELINES_KEY, PER_CASE_KEY, ImageBaselineMetrics, VolumeBaselineMetrics
from multiad_monai.metrics.functional import (
    aupro,
    dice_per_sample,
    dice_score,
    estimate_threshold,
    f1_max,
    image_auroc,
    image_average_precision,
    normalize_scores,
    pixel_auroc,
    pixel_average_precision,
)

__all__ = [
    "METRIC_NAMES",
    "AnomalyDetectionMetrics",
    "ValidationScore",
    "VOLUME_METRIC_NAMES",
    "VolumeAnomalyMetrics",
    "VolumeBaselineMetrics",
    "ImageBaselineMetrics",
    "BASELINES_KEY",
    "PER_CASE_KEY",
    "foreground_auroc",
    "slice_labels",
    "volume_case_summary",
    "NormalFitScore",
    "aupro",
    "default_output_transform",
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
