"""Estimates the anomaly threshold: from the scores of normal validation images, or where labelled lesions of
the training patients exist, from the map value that segments them best."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader

from multiad_monai.engines.evaluator import MAP_KEY, SCORE_KEY
from multiad_monai.metrics.cumulative import all_gather_array
from multiad_monai.metrics.functional import f1_max

__all__ = ["NormalThresholdHandler", "LesionDiceThresholdHandler", "lesion_validation_set", "THRESHOLD_SOURCES"]

THRESHOLD_SOURCES = ("normal_quantile", "lesion_dice")


class NormalThresholdHandler:
    """Sets ``network.threshold`` to a quantile of the image scores of NORMAL samples (label 0) seen by an
    evaluator, and ``network.score_scale`` to their standard deviation (for 0-1 normalised scores).

    When the image score is the map maximum, the same threshold on the map gives a binary mask that is
    empty exactly when the image is called normal. With another image score (the mean of the top pixels, lower
    than the maximum) a threshold from the scores would mark pixels on most normal images; ``use_map_maximum``
    takes each normal image's map maximum instead, so that the mask keeps that meaning.

    Args:
        network: module with ``threshold`` and ``score_scale`` buffers (:class:`MultiAD`).
        quantile: quantile of the normal scores; 0.99 flags about 1% of normal images.
        label_key: key of the image label in ``engine.state.output``.
        use_map_maximum: estimate from the maxima of the maps ``(B, 1, H, W)`` in the output, not from its scores.
    """

    def __init__(
        self, network: torch.nn.Module, quantile: float = 0.99, label_key: str = "label", use_map_maximum: bool = False
    ) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}.")
        self.network = network
        self.quantile = quantile
        self.label_key = label_key
        self.use_map_maximum = use_map_maximum
        self._normal_scores: list[np.ndarray] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._estimate)

    def _reset(self, engine: Engine) -> None:
        self._normal_scores = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        if self.use_map_maximum:
            scores = torch.as_tensor(output[MAP_KEY]).flatten(1).amax(dim=1).float().cpu().numpy()
        else:
            scores = torch.as_tensor(output[SCORE_KEY]).reshape(-1).float().cpu().numpy()
        labels = output.get(self.label_key)
        if labels is None:  # an unlabelled validation set is taken as all normal
            self._normal_scores.append(scores)
        else:
            self._normal_scores.append(scores[torch.as_tensor(labels).reshape(-1).cpu().numpy() == 0])

    def _estimate(self, engine: Engine) -> None:
        normal = np.concatenate(self._normal_scores) if self._normal_scores else np.empty(0, np.float32)
        # every process sets the same threshold from the scores of all processes
        normal = all_gather_array(normal.astype(np.float32))
        if normal.size == 0:
            raise ValueError("no normal (label 0) validation samples: cannot estimate the anomaly threshold.")
        threshold = float(np.quantile(normal, self.quantile, method="higher"))
        scale = float(normal.std()) if normal.size > 1 and normal.std() > 0 else max(abs(threshold), 1e-6) * 0.1
        self.network.threshold.fill_(threshold)
        self.network.score_scale.fill_(scale)
        engine.state.metrics["threshold"] = threshold
        source = "map maxima" if self.use_map_maximum else "scores"
        self.logger.info(f"anomaly threshold {threshold:.5f} from {normal.size} normal validation {source} (q={self.quantile})")


def lesion_validation_set(
    cases: Sequence[dict],
    volume_transform: Callable,
    normal_slices: Sequence[dict],
    slice_transform: Callable,
    **slicing,
) -> list[dict]:
    """A validation set of real lesions: the lesion slices of labelled training patients (label 1, their
    ``mask``; see :func:`multiad_monai.data.lesion_slice_datalist`, ``slicing`` as its keyword arguments) and
    the held-out lesion-free slices (label 0, empty mask), each through ``slice_transform`` (the 2D chain
    without synthetic defects) with its mask resized alike (nearest). Empty when no case has a lesion slice.
    """
    from monai.transforms import Resized
    from monai.utils import convert_to_tensor

    from multiad_monai.data.cases import lesion_slice_datalist

    lesions = lesion_slice_datalist(cases, volume_transform, **slicing)
    if not lesions:
        return []
    items = []
    for item in lesions:
        chained = slice_transform({"image": item["image"], "foreground": item["foreground"]})
        mask = Resized("mask", tuple(chained["image"].shape[1:]), mode="nearest")({"mask": item["mask"]})["mask"]
        items.append({**chained, "mask": convert_to_tensor(mask, track_meta=False).float(), "label": 1})
    for item in normal_slices:
        chained = slice_transform({key: item[key] for key in ("image", "foreground") if key in item})
        items.append({**chained, "mask": torch.zeros((1, *chained["image"].shape[1:])), "label": 0})
    return items


class LesionDiceThresholdHandler:
    """With ``source="lesion_dice"``, sets ``network.threshold`` to the map value with the best pooled Dice on
    the lesion slices of the training patients together with the held-out normal slices.

    Training keeps only lesion-free slices, so a labelled training patient's lesion slices are data the
    student never saw; the threshold is chosen on them (and on the normal validation slices, whose pixels
    are the false positives to avoid), never on a test patient. Attach it to the validation evaluator after
    :class:`NormalThresholdHandler`, whose normal-quantile threshold it replaces (and keeps when the training
    patients have no lesion slice), and before the checkpoint saver: it runs in the rounds where the key metric
    improved, i.e. where a checkpoint is saved. ``score_scale`` stays the normal scores' spread. The set is built on first
    use, so ``source="normal_quantile"`` (the default) loads nothing.

    Args:
        network: module with a ``threshold`` buffer whose forward gives maps ``(B, 1, H, W)`` of images
            ``(B, 3, H, W)`` normalised as the training slices.
        source: ``"normal_quantile"`` (do nothing) or ``"lesion_dice"``.
        cases: labelled case items of the training patients (see :func:`multiad_monai.data.case_folder_datalist`).
        volume_transform: loads a case (the bundle's ``volume_preprocessing``).
        normal_slices: held-out lesion-free slices ``{"image" (C, H, W) in [0, 1], "foreground"?}``.
        slice_transform: the 2D chain of the validation slices without synthetic defects
            (:func:`multiad_monai.transforms.slice_transforms_2d`); masks are resized with it (nearest).
        axis, quarter_turns, min_foreground, lesions_in_foreground_only, crop_to_foreground, crop_margin: as the
            training slices (see :func:`multiad_monai.data.lesion_slice_datalist`).
        batch_size: slices per forward pass.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        source: str = "normal_quantile",
        cases: Sequence[dict] = (),
        volume_transform: Callable | None = None,
        normal_slices: Sequence[dict] = (),
        slice_transform: Callable | None = None,
        axis: int = 2,
        quarter_turns: int = 0,
        min_foreground: float = 0.1,
        lesions_in_foreground_only: bool = False,
        crop_to_foreground: bool = False,
        crop_margin: int = 8,
        batch_size: int = 16,
    ) -> None:
        if source not in THRESHOLD_SOURCES:
            raise ValueError(f"unknown threshold source {source!r}; choose from {THRESHOLD_SOURCES}.")
        if source == "lesion_dice" and (volume_transform is None or slice_transform is None):
            raise ValueError("the lesion_dice threshold needs the volume transform and the slice transform.")
        self.network = network
        self.source = source
        self.cases = list(cases)
        self.volume_transform = volume_transform
        self.normal_slices = list(normal_slices)
        self.slice_transform = slice_transform
        self.slicing = dict(
            axis=axis, quarter_turns=quarter_turns, min_foreground=min_foreground,
            lesions_in_foreground_only=lesions_in_foreground_only, crop_to_foreground=crop_to_foreground,
            crop_margin=crop_margin,
        )
        self.batch_size = batch_size
        self._items: list[dict] | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.source == "lesion_dice":
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def validation_items(self) -> list[dict]:
        """The lesion slices (label 1) and normal slices (label 0), through the slice chain; built once."""
        if self._items is None:
            self._items = lesion_validation_set(
                self.cases, self.volume_transform, self.normal_slices, self.slice_transform, **self.slicing
            )
        return self._items

    @torch.inference_mode()
    def threshold(self) -> float | None:
        """The best-Dice map value on :meth:`validation_items`, or None when there is no lesion slice."""
        items = self.validation_items()
        if not items:
            return None
        device = self.network.threshold.device
        was_training = self.network.training
        self.network.eval()
        values, truths = [], []
        try:
            for batch in DataLoader(items, batch_size=self.batch_size, shuffle=False):
                maps = self.network(batch["image"].to(device)).float().cpu()
                inside = batch["foreground"] > 0 if "foreground" in batch else torch.ones_like(maps, dtype=torch.bool)
                values.append(maps[inside].numpy())
                truths.append(batch["mask"][inside].numpy() > 0)
        finally:
            self.network.train(was_training)
        _, threshold = f1_max(np.concatenate(values), np.concatenate(truths))  # pooled Dice is the pixel F1
        return float(threshold)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine.state, "best_metric_epoch", engine.state.epoch) != engine.state.epoch:
            return  # no checkpoint is saved this round: the forward pass over the lesion slices is not needed
        threshold = self.threshold()
        if threshold is None:
            self.logger.warning("no lesion slice in the training patients: the normal-quantile threshold is kept.")
            return
        self.network.threshold.fill_(threshold)
        engine.state.metrics["threshold"] = threshold
        self.logger.info(f"anomaly threshold {threshold:.5f}: best Dice on the training patients' lesion slices")
