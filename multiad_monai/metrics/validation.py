"""One number to select models and stop early on: the mean of chosen anomaly-detection metrics."""

from __future__ import annotations

from collections.abc import Sequence

from multiad_monai.metrics.cumulative import AnomalyDetectionMetrics, default_output_transform

__all__ = ["ValidationScore"]


class ValidationScore(AnomalyDetectionMetrics):
    """Mean of ``components`` (default image AUROC, pixel AUROC and AUPRO) as a single float, usable as a
    MONAI key metric for ``CheckpointSaver(save_key_metric=True)`` and ``EarlyStopHandler``.

    Meant for a validation set of held-out normal images plus synthetic defects, never the test set.
    A component that cannot be computed (e.g. no masks) is left out of the mean.
    """

    def __init__(
        self,
        components: Sequence[str] = ("image_auroc", "pixel_auroc", "aupro"),
        output_transform=default_output_transform,
        fpr_limit: float = 0.3,
    ) -> None:
        allowed = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")
        unknown = set(components) - set(allowed)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {allowed}.")
        super().__init__(output_transform, metrics=tuple(components), fpr_limit=fpr_limit, map_dtype="float16")
        self.components = tuple(components)

    def compute(self) -> float:
        results = super().compute()
        values = [results[k] for k in self.components if k in results]
        if not values:
            raise RuntimeError(f"none of {self.components} could be computed on the validation set.")
        return float(sum(values) / len(values))
