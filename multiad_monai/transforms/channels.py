"""Make channel-first 2D images three-channel (RGB), as ImageNet-pretrained backbones expect."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = [
    "EnsureRGB",
    "EnsureRGBd",
    "EnsureRGBD",
    "EnsureRGBDict",
    "TwoModalitiesToRGB",
    "TwoModalitiesToRGBd",
    "TwoModalitiesToRGBD",
    "TwoModalitiesToRGBDict",
    "source_name",
]


def source_name(img) -> str:
    """The file an image was loaded from, taken from MetaTensor metadata, or ``"<array>"`` if unknown."""
    if isinstance(img, MetaTensor):
        name = img.meta.get("filename_or_obj")
        if name:
            return str(name)
    return "<array>"


class EnsureRGB(Transform):
    """Convert a channel-first image (C, *spatial) to 3 channels.

    1 channel (gray) is repeated to 3, 4 channels (RGBA) lose alpha, 3 channels pass unchanged.
    Any other channel count raises ``ValueError`` naming the source file.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        num_channels = img.shape[0] if img.ndim > 0 else 0
        if num_channels == 3:
            return img
        if num_channels == 4:
            return img[:3]
        if num_channels == 1:
            if isinstance(img, torch.Tensor):
                return img.repeat(3, *([1] * (img.ndim - 1)))
            return np.repeat(img, 3, axis=0)
        raise ValueError(
            f"{source_name(img)}: expected a channel-first image with 1 (gray), 3 (RGB) or 4 (RGBA) channels, "
            f"got shape {tuple(img.shape)}."
        )


class EnsureRGBd(MapTransform):
    """Dictionary version of :class:`EnsureRGB`."""

    backend = EnsureRGB.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureRGB()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


EnsureRGBD = EnsureRGBDict = EnsureRGBd


class TwoModalitiesToRGB(Transform):
    """A two-channel image (two modalities, e.g. FLAIR and T1c) gets their mean as a third channel.

    ``(2, *spatial)`` -> ``(3, *spatial)``; other channel counts pass unchanged. Only for images whose
    channels are modalities: a 2D gray + alpha picture is not two modalities, so the 2D chain never uses it.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if img.ndim == 0 or img.shape[0] != 2:
            return img
        if isinstance(img, torch.Tensor):
            return torch.cat([img, img.mean(dim=0, keepdim=True)], dim=0)
        return np.concatenate([img, img.mean(axis=0, keepdims=True)], axis=0)


class TwoModalitiesToRGBd(MapTransform):
    """Dictionary version of :class:`TwoModalitiesToRGB`."""

    backend = TwoModalitiesToRGB.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = TwoModalitiesToRGB()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


TwoModalitiesToRGBD = TwoModalitiesToRGBDict = TwoModalitiesToRGBd
