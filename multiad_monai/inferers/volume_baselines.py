"""Baseline maps of whole volumes, fitted on the normal slices of the training cases, sliced like the model's."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.utils import convert_to_tensor

from multiad_monai.inferers.anomaly_map import image_score
from multiad_monai.inferers.baselines import (
    BASELINE_NAMES,
    FEATURE_KNN,
    INTENSITY_BASELINES,
    FeatureKNNBaseline,
    IntensityBaseline,
    check_baseline_names,
)
from multiad_monai.inferers.volume import VolumeAnomalyInferer
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VolumeBaselineInferer"]


class VolumeBaselineInferer:
    """Baseline maps and per-slice scores of volumes, beside a 2D model's (see :mod:`multiad_monai.inferers.baselines`).

    :meth:`fit` reads the training cases one at a time and keeps their normal slices the way the training set
    is cut (:class:`~multiad_monai.transforms.RandNormalSliced`: foreground coverage, no lesion voxel, turns,
    crop): the intensity histogram counts their foreground voxels, the feature memory bank their teacher
    patches after the training slice chain (:func:`~multiad_monai.transforms.slice_transforms_2d`). The
    intensity maps are computed on the volume itself; ``feature_knn`` runs through a
    :class:`VolumeAnomalyInferer` with the model's slicing settings. Maps are zero outside the foreground
    and slice scores are taken inside it (``image_score`` with ``score_mode``), as the model's.

    Args:
        names: baselines to compute, a subset of :data:`BASELINE_NAMES`; empty: none.
        teacher: the model's frozen teacher (``network.teacher``); needed for ``feature_knn``.
        train_datalist: training case items (as :func:`~multiad_monai.data.case_folder_datalist`).
        volume_transform: loads a case, image in [0, 1] (the bundle's ``volume_preprocessing``).
        axis, min_foreground, lesions_in_foreground_only, quarter_turns, crop_to_foreground, crop_margin,
        image_size, mean, std, score_mode: as the training slices and the model's evaluator.
        slice_batch_size: slices per teacher pass.
        device: where ``feature_knn`` runs; None: the teacher's device.
        bins: intensity histogram bins.
        intensity_channel: channel of the volume whose brightness the intensity baselines score; None: the
            channel mean (see :class:`IntensityBaseline`).
        memory_size, knn_levels, sigma, seed: of :class:`FeatureKNNBaseline`.

    ``__call__(volume (C, X, Y, Z), foreground (1, X, Y, Z) | None)`` returns ``(maps, slice_scores)``:
    name -> float32 ``(1, X, Y, Z)`` tensor and name -> float64 ``(N,)`` array along ``axis``.
    """

    def __init__(
        self,
        names: Sequence[str] = BASELINE_NAMES,
        teacher: nn.Module | None = None,
        train_datalist: Sequence[dict] = (),
        volume_transform: Callable | None = None,
        axis: int = 2,
        min_foreground: float = 0.1,
        lesions_in_foreground_only: bool = False,
        quarter_turns: int = 0,
        crop_to_foreground: bool = False,
        crop_margin: int = 8,
        image_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        score_mode: str = "max",
        slice_batch_size: int = 16,
        device: str | torch.device | None = None,
        bins: int = 256,
        intensity_channel: int | None = None,
        memory_size: int = 10000,
        knn_levels: Sequence[int] = (1, 2),
        sigma: float = 4.0,
        seed: int = 0,
    ) -> None:
        self.names = check_baseline_names(names)
        if FEATURE_KNN in self.names and teacher is None:
            raise ValueError("the feature_knn baseline needs the model's teacher.")
        self.train_datalist = list(train_datalist)
        self.volume_transform = volume_transform
        self.axis = axis
        self.score_mode = score_mode
        self.slice_batch_size = slice_batch_size
        self.intensity = IntensityBaseline(bins=bins, channel=intensity_channel)
        self.knn = None
        if FEATURE_KNN in self.names:
            self.knn = FeatureKNNBaseline(teacher, levels=knn_levels, memory_size=memory_size, sigma=sigma, seed=seed)
            self.knn_inferer = VolumeAnomalyInferer(
                self.knn, axis=axis, batch_size=slice_batch_size, image_size=image_size, mean=mean, std=std,
                score_mode=score_mode, quarter_turns=quarter_turns, device=device, mask_to_foreground=True,
                crop_to_foreground=crop_to_foreground, crop_margin=crop_margin,
            )
        # imported here: the transforms package imports the networks, which import this package
        from multiad_monai.transforms import RandNormalSliced, slice_transforms_2d

        self.sampler = RandNormalSliced(
            ["image", "foreground"], axis=axis, num_samples=None, foreground_key="foreground",
            min_foreground=min_foreground, lesion_key="label", lesions_in_foreground_only=lesions_in_foreground_only,
            quarter_turns=quarter_turns, crop_to_foreground=crop_to_foreground, crop_margin=crop_margin,
            allow_missing_keys=True,
        )
        self.slice_chain = slice_transforms_2d(image_size=image_size, mean=mean, std=std)
        self.is_fitted = False

    def fit(self) -> VolumeBaselineInferer:
        """Fit the baselines on the normal slices of ``train_datalist``."""
        if not self.names:
            return self
        if not self.train_datalist or self.volume_transform is None:
            raise ValueError("fitting the baselines needs the training cases and the volume transform.")
        self.intensity.reset()
        if self.knn is not None:
            self.knn.reset()
        pending: list[torch.Tensor] = []
        num_slices = 0
        for item in self.train_datalist:
            for sample in self.sampler(self.volume_transform(item)):
                image = convert_to_tensor(sample["image"], track_meta=False)
                self.intensity.update(image, sample.get("foreground"))
                num_slices += 1
                if self.knn is not None:
                    pending.append(convert_to_tensor(self.slice_chain({"image": image})["image"], track_meta=False))
                    if len(pending) == self.slice_batch_size:
                        self.knn.update(torch.stack(pending))
                        pending = []
        if self.knn is not None:
            if pending:
                self.knn.update(torch.stack(pending))
            self.knn.memory = self.knn.memory.to(self.knn_inferer.device)
        logging.getLogger(__name__).info(
            f"baselines {list(self.names)} fitted on {num_slices} normal slices of {len(self.train_datalist)} cases."
        )
        self.is_fitted = True
        return self

    def _slice_scores(self, volume_map: torch.Tensor) -> np.ndarray:
        slices = volume_map.movedim(self.axis + 1, 0)  # (N, 1, H, W)
        return image_score(slices, self.score_mode).double().numpy()

    def __call__(
        self, volume: torch.Tensor, foreground: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        if not self.is_fitted and self.names:
            self.fit()
        maps: dict[str, torch.Tensor] = {}
        scores: dict[str, np.ndarray] = {}
        intensity_names = [name for name in self.names if name in INTENSITY_BASELINES]
        if intensity_names:
            data = convert_to_tensor(volume, track_meta=False)
            mask = None if foreground is None else convert_to_tensor(foreground, track_meta=False)
            for name, amap in self.intensity(data, mask, intensity_names).items():
                maps[name], scores[name] = amap, self._slice_scores(amap)
        if self.knn is not None:
            amap, slice_scores, _ = self.knn_inferer(volume, foreground)
            maps[FEATURE_KNN], scores[FEATURE_KNN] = amap.as_tensor(), slice_scores
        return {name: maps[name] for name in self.names}, {name: scores[name] for name in self.names}
