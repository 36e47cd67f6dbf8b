"""Single-number validation metrics for model selection and early stopping."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from monai.networks.utils import eval_mode
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from multiad_monai.metrics.cumulative import AnomalyDetectionMetrics, default_output_transform

__all__ = ["ValidationScore", "NormalFitScore"]


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


class NormalFitScore(Metric):
    """How well the student reproduces the teacher on held-out NORMAL images: minus the mean anomaly-map
    value over label-0 samples (higher is better; a float).

    Unlike :class:`ValidationScore` it needs no synthetic defects, and it keeps improving while the
    student generalises to unseen normal images, so it is the default key metric for checkpoints and
    early stopping (synthetic-defect scores saturate early and stopped training too soon on MVTec bottle).

    Args:
        network: the :class:`MultiAD` being validated. Needed only when its map generator normalises its
            levels (``level_normalization`` ``"pixel"`` or ``"level"``): its maps are then z-scores against the
            training images, which grow as the student fits the training set better than unseen images, so the score is taken on
            the raw ``1 - cos`` level maps instead (one extra forward pass over the normal images). With an
            intensity prior (rescaled at every validation, and holding the images' brightness) the score is
            taken on the map without it (the prior unmixed from the evaluator's map, no extra forward pass), so
            the prior never changes which checkpoint training keeps.
    """

    def __init__(self, output_transform: Callable = lambda output: output, network: torch.nn.Module | None = None) -> None:
        super().__init__(output_transform=output_transform)
        self.network = network

    def _raw_level_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The raw ``1 - cos`` level maps of ``images``, which do not change with the normal statistics."""
        device = next(self.network.parameters()).device
        # the metric runs after the evaluator's iteration, when the network may be back in training mode
        with eval_mode(self.network), torch.inference_mode():
            images = images.to(device)
            teacher, student = self.network.features(images)
            return self.network.map_generator.raw_level_maps(teacher, student, images.shape[2:]).float().cpu()

    def _without_prior(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        prior = self.network.intensity_prior
        with torch.inference_mode():
            statistics = next(prior.buffers()).device
            return prior.unmix(images.to(statistics), maps.to(statistics)).float().cpu()

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.zeros((), dtype=torch.float64)
        self._count = torch.zeros((), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output: dict) -> None:
        maps = torch.as_tensor(output["anomaly_map"]).detach().float().cpu()
        labels = output.get("label")
        normal = torch.ones(maps.shape[0], dtype=torch.bool) if labels is None else torch.as_tensor(labels).reshape(-1).cpu() == 0
        if bool(normal.any()):
            network = self.network
            if network is not None and getattr(network.map_generator, "level_normalization", "none") != "none":
                maps = self._raw_level_maps(torch.as_tensor(output["image"])[normal])
                normal = torch.ones(maps.shape[0], dtype=torch.bool)
            elif network is not None and getattr(network, "has_intensity_prior", False):
                maps = self._without_prior(torch.as_tensor(output["image"]), maps)
            self._sum += maps[normal].mean(dim=tuple(range(1, maps.ndim))).double().sum()
            self._count += float(normal.sum())

    def iteration_completed(self, engine) -> None:
        # the evaluator's output is a dict without ignite's (y_pred, y) keys: pass it through whole
        self.update(self._output_transform(engine.state.output))

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if float(self._count) == 0:
            raise RuntimeError("NormalFitScore saw no normal (label 0) samples.")
        return -float(self._sum / self._count)
