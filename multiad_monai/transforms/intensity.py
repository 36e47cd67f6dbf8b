"""Intensity presets for medical volumes: MRI percentile scaling, CT Hounsfield windows, finiteness checks.

All presets map a channel-first volume ``(C, X, Y, Z)`` (or any ``(C, *spatial)`` image) to [0, 1], the
range the 2D chain produces before normalisation, so that a 2D model sees slices on its training scale.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRanged, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy

from multiad_monai.data.errors import DatasetError
from multiad_monai.transforms.channels import source_name

__all__ = [
    "ForegroundPercentileScale",
    "ForegroundPercentileScaled",
    "ForegroundPercentileScaleD",
    "ForegroundPercentileScaleDict",
    "HounsfieldWindow",
    "HounsfieldWindowd",
    "HounsfieldWindowD",
    "HounsfieldWindowDict",
    "CheckFinite",
    "CheckFinited",
    "CheckFiniteD",
    "CheckFiniteDict",
]


class ForegroundPercentileScale(Transform):
    """MRI preset: clip each channel to its ``lower``-``upper`` percentiles inside the foreground, scale to [0, 1].

    MRI intensities have no physical unit and a large dark background, so percentiles over the whole
    volume would mostly measure air; they are taken inside the foreground instead. The foreground is,
    in order of preference, the ``foreground`` mask passed to ``__call__``, the voxels above
    ``threshold``, or the voxels differing from the channel's minimum (the background of skull-stripped
    or zero-filled scans).

    Args:
        lower: lower percentile in [0, 100], mapped to 0.
        upper: upper percentile in [0, 100], mapped to 1.
        threshold: voxels above it are foreground when no mask is given.
        outside_value: value given to voxels outside the foreground mask (e.g. 0.0 to blank the
            background of z-scored scans, whose background is not their darkest value); None keeps them
            scaled and clipped like the rest.

    ``__call__(img (C, *spatial), foreground (1 or C, *spatial) | None)`` returns float32 of the same shape.

    Raises:
        DatasetError: naming the file, when a channel has no foreground voxels or is constant inside the
            foreground (all-zero or all-constant volume).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        threshold: float | None = None,
        outside_value: float | None = None,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        self.lower = lower
        self.upper = upper
        self.threshold = threshold
        self.outside_value = outside_value

    def _foreground(self, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if mask is not None:
            return mask
        if self.threshold is not None:
            return values > self.threshold
        return values != values.min()

    def __call__(self, img: NdarrayOrTensor, foreground: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        name = source_name(img)
        values = convert_to_numpy(img, dtype=np.float32)
        mask = None
        if foreground is not None:
            mask = convert_to_numpy(foreground) > 0
            if mask.shape[1:] != values.shape[1:]:
                raise DatasetError(
                    f"{name}: foreground mask {source_name(foreground)} has spatial shape {mask.shape[1:]}, "
                    f"the image {values.shape[1:]}."
                )
            mask = mask.any(axis=0)
        bounds = []
        for channel, channel_values in enumerate(values):
            inside = channel_values[self._foreground(channel_values, mask)]
            if inside.size == 0:
                raise DatasetError(
                    f"{name}: channel {channel} has no foreground voxels (all-zero or all-constant volume); "
                    "cannot scale its intensities."
                )
            low, high = np.percentile(inside, [self.lower, self.upper])
            if not high > low:
                raise DatasetError(
                    f"{name}: channel {channel} is constant ({low:g}) inside the foreground; "
                    "cannot scale its intensities."
                )
            bounds.append((low, high))
        low, high = (np.asarray(b, dtype=np.float32).reshape((-1,) + (1,) * (values.ndim - 1)) for b in zip(*bounds))
        scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
        if mask is not None and self.outside_value is not None:
            scaled[:, ~mask] = self.outside_value
        out, *_ = convert_to_dst_type(scaled, img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return out


class ForegroundPercentileScaled(MapTransform):
    """Dictionary version of :class:`ForegroundPercentileScale`.

    Args:
        keys: images to scale, each ``(C, *spatial)``.
        foreground_key: key of a mask ``(1, *spatial)`` (e.g. a brain mask); None: foreground from
            ``threshold`` or from the voxels differing from the minimum.
        lower, upper, threshold, outside_value: see :class:`ForegroundPercentileScale`.
    """

    backend = ForegroundPercentileScale.backend

    def __init__(
        self,
        keys: KeysCollection,
        foreground_key: str | None = None,
        lower: float = 0.5,
        upper: float = 99.5,
        threshold: float | None = None,
        outside_value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.foreground_key = foreground_key
        self.scaler = ForegroundPercentileScale(lower, upper, threshold, outside_value)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        # a case without a mask (inference on a new scan) falls back to the threshold / minimum rule
        foreground = d.get(self.foreground_key) if self.foreground_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], foreground)
        return d


class HounsfieldWindow(ScaleIntensityRange):
    """CT preset: clip Hounsfield units to the window ``level +- window / 2`` and scale it to [0, 1].

    The default W400/L40 is the abdominal soft-tissue window (liver, kidneys); brain is about W80/L40,
    lung W1500/L-600, bone W1800/L400.
    """

    def __init__(self, window: float = 400.0, level: float = 40.0, dtype=np.float32) -> None:
        if not window > 0:
            raise ValueError(f"window must be positive, got {window}.")
        super().__init__(
            a_min=level - window / 2, a_max=level + window / 2, b_min=0.0, b_max=1.0, clip=True, dtype=dtype
        )


class HounsfieldWindowd(ScaleIntensityRanged):
    """Dictionary version of :class:`HounsfieldWindow`: ``ScaleIntensityRanged`` set to a CT window."""

    def __init__(
        self,
        keys: KeysCollection,
        window: float = 400.0,
        level: float = 40.0,
        dtype=np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        if not window > 0:
            raise ValueError(f"window must be positive, got {window}.")
        super().__init__(
            keys,
            a_min=level - window / 2,
            a_max=level + window / 2,
            b_min=0.0,
            b_max=1.0,
            clip=True,
            dtype=dtype,
            allow_missing_keys=allow_missing_keys,
        )


class CheckFinite(Transform):
    """Pass an image through unchanged, or raise :class:`DatasetError` naming its file when it holds NaN or Inf.

    NaN survives every later transform and turns the anomaly map and all metrics into NaN, far from its cause.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        finite = torch.isfinite(img) if isinstance(img, torch.Tensor) else np.isfinite(np.asarray(img))
        if not bool(finite.all()):
            count = int((~finite).sum())
            raise DatasetError(
                f"{source_name(img)}: {count} voxel(s) are NaN or infinite (shape {tuple(img.shape)}); "
                "the file is corrupt or was saved from a failed computation."
            )
        return img


class CheckFinited(MapTransform):
    """Dictionary version of :class:`CheckFinite`."""

    backend = CheckFinite.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = CheckFinite()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.checker(d[key])
        return d


ForegroundPercentileScaleD = ForegroundPercentileScaleDict = ForegroundPercentileScaled
HounsfieldWindowD = HounsfieldWindowDict = HounsfieldWindowd
CheckFiniteD = CheckFiniteDict = CheckFinited
