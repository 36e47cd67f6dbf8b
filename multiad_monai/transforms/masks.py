"""Ground-truth masks for 2D anomaly detection: always present, always binary."""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping

import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

__all__ = ["EmptyMaskd", "EmptyMaskD", "EmptyMaskDict", "zeros_mask_like"]


def zeros_mask_like(image: NdarrayOrTensor) -> torch.Tensor:
    """A float32 zeros mask of shape (1, *spatial) for a channel-first ``image``.

    A MetaTensor image passes a copy of its metadata and applied operations on, so that spatial
    transforms treat the mask like the image (and can invert it the same way).
    """
    zeros = torch.zeros((1, *image.shape[1:]), dtype=torch.float32, device=getattr(image, "device", None))
    if isinstance(image, MetaTensor):
        return MetaTensor(
            zeros, meta=copy.deepcopy(image.meta), applied_operations=copy.deepcopy(image.applied_operations)
        )
    return zeros


class EmptyMaskd(MapTransform):
    """Give every item a binary float mask of shape (1, *spatial).

    Normal ("good") images come without a mask: a zeros mask with the image's spatial shape and
    metadata is added. A present mask is binarised to {0, 1} (``> threshold``); several channels
    (e.g. an RGB mask) are merged, a pixel being foreground if any channel is.

    Args:
        mask_key: key of the mask (C, *spatial); may be missing.
        image_key: key of the channel-first image (C, *spatial) that sets the shape of an added mask.
        threshold: mask values above it are foreground.
    """

    def __init__(self, mask_key: str = "mask", image_key: str = "image", threshold: float = 0.0) -> None:
        super().__init__(keys=mask_key, allow_missing_keys=True)
        self.mask_key = mask_key
        self.image_key = image_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = d.get(self.mask_key)
        if mask is None:
            d[self.mask_key] = zeros_mask_like(d[self.image_key])
            return d
        mask = convert_to_tensor(mask, track_meta=isinstance(mask, MetaTensor))
        d[self.mask_key] = (mask > self.threshold).any(dim=0, keepdim=True).to(torch.float32)
        return d


EmptyMaskD = EmptyMaskDict = EmptyMaskd
