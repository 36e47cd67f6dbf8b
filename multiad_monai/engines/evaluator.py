"""Evaluation on ignite: anomaly maps and image scores for every batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.engines import Evaluator
from monai.engines.utils import default_metric_cmp_fn
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys

from multiad_monai.engines.utils import to_device
from multiad_monai.inferers.anomaly_map import image_score
from multiad_monai.inferers.baselines import BASELINE_MAPS_KEY, BASELINE_SCORES_KEY

__all__ = ["AnomalyEvaluator", "MAP_KEY", "SCORE_KEY", "MASK_KEY", "NAME_KEY", "THRESHOLD_KEY"]

MAP_KEY, SCORE_KEY, MASK_KEY, NAME_KEY, THRESHOLD_KEY = "anomaly_map", "score", "mask", "name", "threshold"


def batch_names(batchdata: dict, image_key: str = Keys.IMAGE, name_key: str = NAME_KEY) -> list[str] | None:
    """Per-sample names of a collated batch: the datalist's ``name`` or the image file names from MONAI meta data."""
    if name_key in batchdata:
        return list(batchdata[name_key])
    meta = getattr(batchdata.get(image_key), "meta", None) or {}
    names = meta.get("filename_or_obj")
    return None if names is None else [str(n) for n in names]


class AnomalyEvaluator(Evaluator):
    """Runs a :class:`~multiad_monai.networks.MultiAD` network over a loader and outputs maps and scores.

    Args:
        device: torch device.
        val_data_loader: batches of dicts with ``image`` ``(B, C, H, W[, D])`` and optionally ``label``
            ``(B,)`` (0 normal, 1 anomalous), ``mask`` ``(B, 1, H, W[, D])`` and ``name``.
        network: returns anomaly maps ``(B, 1, H, W[, D])`` for images.
        score_mode: ``"max"`` or ``"topk"`` (mean of the top ``topk_ratio`` of pixels): image score from the map.
        inferer: optional MONAI inferer (e.g. ``SlidingWindowInferer`` for large images); default a plain call.
        channels_last: run in channels-last memory format (faster on CPU).
        baselines: name -> scorer measured beside the network on the same images (e.g.
            :class:`~multiad_monai.inferers.FeatureKNNBaseline`): a module mapping images to maps
            ``(B, 1, H, W)``; one with ``is_fitted`` False is fitted (``fit()``) when the run starts, after the
            handlers' start events (the checkpoint is loaded first).
        epoch_length, non_blocking, postprocessing, key_val_metric, additional_metrics, metric_cmp_fn,
        val_handlers, amp, decollate: as in :class:`monai.engines.SupervisedEvaluator`.

    ``engine.state.output``: ``image``, ``anomaly_map`` ``(B, 1, ...)``, ``score`` ``(B,)``, and ``label``,
    ``mask``, ``name`` when the batch has them, all on the CPU; ``threshold`` (float) when the network has
    one (the saved threshold of a trained MultiAD); with ``baselines`` also ``baseline_maps``
    and ``baseline_scores``: name -> maps ``(B, 1, ...)`` and scores ``(B,)``.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        score_mode: str = "max",
        topk_ratio: float = 0.01,
        inferer: Inferer | None = None,
        image_key: str = Keys.IMAGE,
        label_key: str = Keys.LABEL,
        mask_key: str = MASK_KEY,
        channels_last: bool = True,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        postprocessing: Callable | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        val_handlers: Sequence | None = None,
        amp: bool = False,
        decollate: bool = False,
        baselines: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            postprocessing=postprocessing,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            val_handlers=None,
            amp=amp,
            decollate=decollate,
        )
        if key_val_metric is None:
            # MONAI's Workflow attaches additional metrics only beside a key metric; test-set evaluation has none
            for name, metric in (additional_metrics or {}).items():
                metric.attach(self, name)
        # handlers after the metrics, so that writers see this epoch's metrics at EPOCH_COMPLETED
        for handler in val_handlers or []:
            handler.attach(self)
        if channels_last:
            network.to(memory_format=torch.channels_last)
        self.network = network
        self.inferer = inferer
        self.score_mode = score_mode
        self.topk_ratio = topk_ratio
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.channels_last = channels_last
        self.baselines = dict(baselines or {})
        if self.baselines:
            self.add_event_handler(Events.STARTED, self._fit_baselines)

    def _fit_baselines(self, engine: AnomalyEvaluator) -> None:
        for baseline in self.baselines.values():
            if not getattr(baseline, "is_fitted", True):
                baseline.fit()

    def _iteration(self, engine: AnomalyEvaluator, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images = to_device(batchdata[engine.image_key], engine.state.device, engine.non_blocking, engine.channels_last)
        with engine.mode(engine.network), torch.inference_mode():
            maps = engine.inferer(images, engine.network) if engine.inferer is not None else engine.network(images)
            scores = image_score(maps, engine.score_mode, engine.topk_ratio)
        output = {Keys.IMAGE: images.cpu(), MAP_KEY: maps.cpu(), SCORE_KEY: scores.cpu()}
        threshold = getattr(getattr(engine.network, "module", engine.network), THRESHOLD_KEY, None)
        if threshold is not None:
            output[THRESHOLD_KEY] = float(threshold)
        if engine.baselines:
            with torch.inference_mode():
                baseline_maps = {name: baseline(images).cpu() for name, baseline in engine.baselines.items()}
            output[BASELINE_MAPS_KEY] = baseline_maps
            output[BASELINE_SCORES_KEY] = {
                name: image_score(amap, engine.score_mode, engine.topk_ratio) for name, amap in baseline_maps.items()
            }
        if engine.label_key in batchdata:
            output[Keys.LABEL] = torch.as_tensor(batchdata[engine.label_key]).reshape(-1).cpu()
        if engine.mask_key in batchdata:
            output[MASK_KEY] = torch.as_tensor(batchdata[engine.mask_key]).cpu()
        names = batch_names(batchdata, engine.image_key)
        if names is not None:
            output[NAME_KEY] = names
        engine.state.output = output
        return output
