"""Evaluation and inference over whole volumes with a 2D anomaly network, one volume per iteration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.data import MetaTensor, decollate_batch
from monai.engines.utils import default_metric_cmp_fn
from monai.utils import CommonKeys as Keys

from multiad_monai.engines.evaluator import MAP_KEY, NAME_KEY, SCORE_KEY, THRESHOLD_KEY, AnomalyEvaluator
from multiad_monai.inferers.baselines import BASELINE_MAPS_KEY, BASELINE_SCORES_KEY
from multiad_monai.inferers.volume import VolumeAnomalyInferer
from multiad_monai.inferers.volume_baselines import VolumeBaselineInferer
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VolumeAnomalyEvaluator", "SLICE_SCORES_KEY", "FOREGROUND_KEY", "THRESHOLD_KEY"]

SLICE_SCORES_KEY, FOREGROUND_KEY = "slice_scores", "foreground"


def _single_volume(batchdata: Any) -> dict:
    """The one case of a loader batch: a plain dict, a list of one dict, or a collated batch of size 1."""
    if isinstance(batchdata, (list, tuple)):
        if len(batchdata) != 1:
            raise ValueError(f"volume evaluation takes one volume per iteration (batch_size=1), got {len(batchdata)}.")
        return dict(batchdata[0])
    image = batchdata[Keys.IMAGE]
    if isinstance(image, torch.Tensor) and image.ndim == 5:
        if image.shape[0] != 1:
            raise ValueError(f"volume evaluation takes one volume per iteration (batch_size=1), got {image.shape[0]}.")
        return dict(decollate_batch(batchdata)[0])
    return dict(batchdata)


class VolumeAnomalyEvaluator(AnomalyEvaluator):
    """Runs a 2D :class:`~multiad_monai.networks.MultiAD` over every slice of each volume.

    Args:
        device: torch device.
        val_data_loader: one case per iteration (``batch_size=1``): ``image`` ``(C, X, Y, Z)`` in [0, 1]
            (a MetaTensor keeps its geometry), optionally ``label`` and ``foreground`` ``(1, X, Y, Z)``, ``name``.
        network: the 2D network.
        axis, slice_batch_size, image_size, mean, std, quarter_turns: as :class:`VolumeAnomalyInferer`.
        mask_to_foreground: zero the map outside ``foreground`` (the map of brain/organ models).
        crop_to_foreground, crop_margin: run the network on the in-plane foreground box only (as
            :class:`VolumeAnomalyInferer`); use the setting the training slices were cut with.
        score_mode: slice score from the slice map; the volume score is the largest slice score.
        baseline_inferer: baselines measured beside the network on the same volumes and foreground
            (:class:`~multiad_monai.inferers.VolumeBaselineInferer`); fitted when the run starts unless it is.
        key_val_metric, additional_metrics, val_handlers, metric_cmp_fn, epoch_length: as MONAI's evaluators.

    ``engine.state.output``: ``anomaly_map`` MetaTensor ``(1, X, Y, Z)`` on the input's grid, ``slice_scores``
    ``(N,)``, ``score`` (the volume score, shape (1,)), ``threshold``, ``name``, and ``label`` /
    ``foreground`` when given; with a ``baseline_inferer`` also ``baseline_maps`` (name -> ``(1, X, Y, Z)``)
    and ``baseline_scores`` (name -> per-slice scores ``(N,)``).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        axis: int = 2,
        slice_batch_size: int = 16,
        image_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        quarter_turns: int = 0,
        mask_to_foreground: bool = True,
        crop_to_foreground: bool = False,
        crop_margin: int = 8,
        score_mode: str = "max",
        foreground_key: str = FOREGROUND_KEY,
        epoch_length: int | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        baseline_inferer: VolumeBaselineInferer | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            score_mode=score_mode,
            channels_last=True,
            epoch_length=epoch_length,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=val_handlers,
        )
        self.volume_inferer = VolumeAnomalyInferer(
            network,
            axis=axis,
            batch_size=slice_batch_size,
            image_size=image_size,
            mean=mean,
            std=std,
            score_mode=score_mode,
            quarter_turns=quarter_turns,
            device=device,
            mask_to_foreground=mask_to_foreground,
            crop_to_foreground=crop_to_foreground,
            crop_margin=crop_margin,
        )
        self.foreground_key = foreground_key
        self.baseline_inferer = baseline_inferer
        if baseline_inferer is not None and baseline_inferer.names:
            # after the handlers' start events, so that the checkpoint (and its teacher) is loaded first
            self.add_event_handler(Events.STARTED, self._fit_baselines)

    def _fit_baselines(self, engine: VolumeAnomalyEvaluator) -> None:
        if not self.baseline_inferer.is_fitted:
            self.baseline_inferer.fit()

    def _iteration(self, engine: VolumeAnomalyEvaluator, batchdata: Any) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        case = _single_volume(batchdata)
        volume = case[engine.image_key]
        foreground = case.get(engine.foreground_key)
        anomaly_map, slice_scores, volume_score = engine.volume_inferer(volume, foreground)
        name = case.get(NAME_KEY)
        if name is None:
            meta = volume.meta if isinstance(volume, MetaTensor) else {}
            name = str(meta.get("filename_or_obj", f"volume{engine.state.iteration:04d}"))
        output = {
            NAME_KEY: str(name),
            MAP_KEY: anomaly_map,
            SLICE_SCORES_KEY: torch.as_tensor(slice_scores),
            SCORE_KEY: torch.tensor([volume_score], dtype=torch.float64),
            THRESHOLD_KEY: engine.volume_inferer.threshold,
            "source": str(volume.meta.get("filename_or_obj", "")) if isinstance(volume, MetaTensor) else "",
        }
        if engine.baseline_inferer is not None and engine.baseline_inferer.names:
            output[BASELINE_MAPS_KEY], output[BASELINE_SCORES_KEY] = engine.baseline_inferer(volume, foreground)
        if case.get(engine.label_key) is not None:
            output[Keys.LABEL] = case[engine.label_key]
        if foreground is not None:
            output[engine.foreground_key] = foreground
        engine.state.output = output
        return output
