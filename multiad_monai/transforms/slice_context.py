"""Neighbouring slices as channels (2.5D input): each 2D slice then carries its through-plane context.

An ImageNet teacher takes three channels. For a one-channel volume the 2D path repeats the slice three
times; with slice context the three channels are the slices ``offset`` before, at and after each slice
along the slicing axis, so a lesion that grows or shrinks across slices looks different from normal
anatomy that continues smoothly. Applied to the whole volume before slicing, so training slices,
validation slices and the volume inferer all see the same input.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from multiad_monai.transforms.channels import source_name

__all__ = ["SliceContextChannels", "SliceContextChannelsd", "SliceContextChannelsD", "SliceContextChannelsDict"]


class SliceContextChannels(Transform):
    """``(1, X, Y, Z)`` -> ``(3, X, Y, Z)``: channels are the slices ``i - offset``, ``i``, ``i + offset`` along ``axis``.

    At the volume's ends the nearest existing slice is repeated (edge padding), so the first and last slices
    keep a defined context. ``offset=0`` returns the input unchanged.

    Args:
        axis: spatial axis the volume is sliced along (0, 1 or 2 of ``(C, X, Y, Z)``).
        offset: distance in slices of the two neighbours, at least 0.

    Raises:
        ValueError: naming the source file, for an image that is not a one-channel volume.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, axis: int = 2, offset: int = 1) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be a spatial axis 0, 1 or 2 of a (C, X, Y, Z) volume, got {axis}.")
        if offset < 0:
            raise ValueError(f"offset must be at least 0, got {offset}.")
        self.axis = axis
        self.offset = offset

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if self.offset == 0:
            return img
        if img.ndim != 4 or img.shape[0] != 1:
            raise ValueError(
                f"{source_name(img)}: slice context needs a one-channel volume (1, X, Y, Z), got shape "
                f"{tuple(img.shape)}; several modalities already fill the channels."
            )
        volume = convert_to_tensor(img, track_meta=False)
        dim = self.axis + 1
        size = volume.shape[dim]
        index = torch.arange(size, device=volume.device)
        before = volume.index_select(dim, (index - self.offset).clamp(min=0))
        after = volume.index_select(dim, (index + self.offset).clamp(max=size - 1))
        stacked = torch.cat([before, volume, after], dim=0)
        out, *_ = convert_to_dst_type(stacked, img)
        if isinstance(img, MetaTensor) and isinstance(out, MetaTensor):
            out.meta = dict(img.meta)
        return out


class SliceContextChannelsd(MapTransform):
    """Dictionary version of :class:`SliceContextChannels`."""

    backend = SliceContextChannels.backend

    def __init__(self, keys: KeysCollection, axis: int = 2, offset: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = SliceContextChannels(axis=axis, offset=offset)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


SliceContextChannelsD = SliceContextChannelsDict = SliceContextChannelsd
