"""2D slices of channel-first volumes: a sampler of normal training slices and slice/stack helpers.

A volume is ``(C, X, Y, Z)``; slicing along spatial ``axis`` (0, 1 or 2) gives ``(C, H, W)`` slices whose
rows and columns are the two remaining axes in order, turned by ``quarter_turns`` x 90 degrees
(``torch.rot90`` over (H, W), counter-clockwise for positive values). Radiological scans are usually
shown turned: axial slices of a RAS-oriented volume show anterior up with ``quarter_turns=-1`` (3), the
orientation of the BMAD brain slices.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Rotate90, SpatialCrop, SqueezeDim
from monai.transforms.traits import MultiSampleTrait
from monai.utils import TransformBackends, convert_to_tensor

from multiad_monai.data.errors import DatasetError
from multiad_monai.transforms.channels import source_name

__all__ = [
    "foreground_box",
    "crop_plane",
    "plane_region",
    "volume_slices",
    "stack_slices",
    "slice_coverage",
    "RandNormalSliced",
    "RandNormalSliceD",
    "RandNormalSliceDict",
]


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be a spatial axis 0, 1 or 2 of a (C, X, Y, Z) volume, got {axis}.")


def volume_slices(volume: NdarrayOrTensor, axis: int = 2, quarter_turns: int = 0) -> list[torch.Tensor]:
    """All slices of ``volume (C, X, Y, Z)`` along ``axis`` in index order, each a plain tensor ``(C, H, W)``."""
    _check_axis(axis)
    volume = convert_to_tensor(volume, track_meta=False)
    if volume.ndim != 4:
        raise ValueError(f"expected a channel-first volume (C, X, Y, Z), got shape {tuple(volume.shape)}.")
    return [torch.rot90(s, quarter_turns, dims=(1, 2)) for s in volume.unbind(dim=axis + 1)]


def stack_slices(slices: Sequence[NdarrayOrTensor], axis: int = 2, quarter_turns: int = 0) -> torch.Tensor:
    """Inverse of :func:`volume_slices`: ``(C, H, W)`` slices back into a volume ``(C, X, Y, Z)``."""
    _check_axis(axis)
    if len(slices) == 0:
        raise ValueError("stack_slices needs at least one slice.")
    unturned = [torch.rot90(convert_to_tensor(s, track_meta=False), -quarter_turns, dims=(1, 2)) for s in slices]
    return torch.stack(unturned, dim=axis + 1)


def slice_coverage(mask: NdarrayOrTensor, axis: int = 2) -> torch.Tensor:
    """Fraction of each slice plane along ``axis`` where any channel of ``mask (C, X, Y, Z)`` is positive: ``(N,)``."""
    _check_axis(axis)
    inside = (convert_to_tensor(mask, track_meta=False) > 0).any(dim=0)
    other = [d for d in range(3) if d != axis]
    return inside.float().mean(dim=other)


def foreground_box(mask: NdarrayOrTensor, axis: int = 2, margin: int = 8) -> tuple[slice, slice]:
    """In-plane crop around the foreground of ``mask (C, X, Y, Z)`` over all its slices along ``axis``.

    The bounding box of the positive voxels in the two in-plane axes (in order), grown by ``margin`` voxels
    and then to a square (so resizing the crop keeps the aspect ratio), clamped to the plane. An empty mask
    gives the whole plane. Used alike for training slices and at inference, so both see the organ at the
    same scale.
    """
    _check_axis(axis)
    inside = (convert_to_tensor(mask, track_meta=False) > 0).any(dim=0)
    plane_axes = [d for d in range(3) if d != axis]
    sizes = [inside.shape[d] for d in plane_axes]
    if not bool(inside.any()):
        return slice(0, sizes[0]), slice(0, sizes[1])
    bounds = []
    for d in plane_axes:
        present = torch.nonzero(inside.any(dim=tuple(o for o in range(3) if o != d))).flatten()
        bounds.append((int(present.min()) - margin, int(present.max()) + 1 + margin))
    side = max(high - low for low, high in bounds)
    box = []
    for (low, high), size in zip(bounds, sizes):
        if side >= size:
            box.append(slice(0, size))
            continue
        start = min(max((low + high - side) // 2, 0), size - side)
        box.append(slice(start, start + side))
    return box[0], box[1]


def plane_region(axis: int, box: tuple[slice, slice]) -> tuple[slice, slice, slice]:
    """The spatial ``(X, Y, Z)`` slices of an in-plane ``box`` (see :func:`foreground_box`), every slice along ``axis``."""
    region = [slice(None)] * 3
    for d, part in zip([d for d in range(3) if d != axis], box):
        region[d] = part
    return region[0], region[1], region[2]


def crop_plane(volume: NdarrayOrTensor, axis: int, box: tuple[slice, slice]) -> NdarrayOrTensor:
    """``volume (C, X, Y, Z)`` cropped in-plane to ``box`` (see :func:`foreground_box`), all slices kept;
    a MetaTensor's affine follows (MONAI ``SpatialCrop``)."""
    return SpatialCrop(roi_slices=plane_region(axis, box))(volume)


class RandNormalSliced(Randomizable, MapTransform, MultiSampleTrait):
    """Draw ``num_samples`` normal 2D slices from channel-first volumes, for training a 2D anomaly model.

    A slice qualifies when its foreground covers at least ``min_foreground`` of the plane (slices at the
    edge of the body or brain carry little anatomy) and, when ``lesion_key`` is given, when it holds no
    lesion voxel (the model must learn normal anatomy only). Slices are drawn uniformly among those,
    without replacement when there are enough of them; with ``num_samples=None`` every qualifying slice is
    returned in index order (deterministic, e.g. to cache a whole training set). Like
    ``RandSpatialCropSamplesd`` it returns a list of dicts; items not in ``keys`` are shared (not copied)
    by the samples.

    Args:
        keys: volumes ``(C, X, Y, Z)`` to slice; each becomes ``(C, H, W)``. Include ``foreground_key`` or
            ``lesion_key`` to get the matching mask slices too.
        axis: spatial axis to slice along (2: axial for RAS volumes).
        num_samples: slices drawn per call; None: all qualifying slices, in order.
        foreground_key: mask ``(1, X, Y, Z)`` of the body or organ; None: the voxels of the first key's
            volume that differ from its minimum.
        min_foreground: smallest foreground fraction of the plane, in [0, 1].
        lesion_key: label or mask ``(1, X, Y, Z)`` whose positive voxels are lesions; None: no exclusion.
        lesions_in_foreground_only: count only lesion voxels inside the foreground mask, for organ models
            whose maps are confined to the organ (a kidney tumour does not make a liver slice abnormal).
        quarter_turns: in-plane 90-degree turns of each slice (see the module docstring).
        crop_to_foreground: crop every slice to the volume's in-plane foreground box (:func:`foreground_box`),
            so a small organ fills the network's input; the inferer must use the same setting.
        crop_margin: margin of that box, voxels.
        slice_index_key: key receiving each sample's slice index; None: not recorded.
        allow_missing_keys: don't raise for keys missing from the data.

    MetaTensor slices get a 2D affine (the volume's, with the sliced axis removed, as ``SqueezeDim`` does)
    and ``slice_axis``/``slice_index`` metadata.

    Raises:
        DatasetError: naming the file, when no slice qualifies or a mask's shape differs from the volume's.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        axis: int = 2,
        num_samples: int | None = 4,
        foreground_key: str | None = None,
        min_foreground: float = 0.1,
        lesion_key: str | None = None,
        lesions_in_foreground_only: bool = False,
        quarter_turns: int = 0,
        crop_to_foreground: bool = False,
        crop_margin: int = 8,
        slice_index_key: str | None = "slice_index",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        _check_axis(axis)
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], got {min_foreground}.")
        self.axis = axis
        self.num_samples = num_samples
        self.foreground_key = foreground_key
        self.min_foreground = min_foreground
        self.lesion_key = lesion_key
        self.lesions_in_foreground_only = lesions_in_foreground_only
        self.quarter_turns = quarter_turns
        self.crop_to_foreground = crop_to_foreground
        self.crop_margin = crop_margin
        self.slice_index_key = slice_index_key
        self._indices: list[int] = []

    def randomize(self, candidates: np.ndarray) -> None:
        if self.num_samples is None:
            self._indices = [int(i) for i in candidates]
            return
        replace = len(candidates) < self.num_samples
        self._indices = [int(i) for i in self.R.choice(candidates, size=self.num_samples, replace=replace)]

    def normal_slices(self, data: Mapping[Hashable, NdarrayOrTensor]) -> np.ndarray:
        """Indices of the qualifying slices of ``data``, ascending."""
        reference = data[self.first_key(data)]
        name = source_name(reference)
        shape = tuple(reference.shape[1:])
        if len(shape) != 3:
            raise DatasetError(
                f"{name}: expected a channel-first volume (C, X, Y, Z), got shape {tuple(reference.shape)}."
            )
        # masks are optional per case: no foreground -> the minimum rule, no label -> no lesion exclusion
        foreground = data.get(self.foreground_key) if self.foreground_key is not None else None
        if foreground is None:
            reference_t = convert_to_tensor(reference, track_meta=False)
            foreground = reference_t != reference_t.min()
        self._check_shape(name, foreground, shape, "foreground mask")
        coverage = slice_coverage(foreground, self.axis)
        qualifies = coverage >= self.min_foreground
        with_lesion = torch.zeros_like(qualifies)
        if self.lesion_key is not None and data.get(self.lesion_key) is not None:
            lesion = data[self.lesion_key]
            self._check_shape(name, lesion, shape, "lesion mask")
            lesion = convert_to_tensor(lesion, track_meta=False) > 0
            if self.lesions_in_foreground_only:
                lesion = lesion & (convert_to_tensor(foreground, track_meta=False) > 0).any(dim=0, keepdim=True)
            with_lesion = slice_coverage(lesion, self.axis) > 0
        candidates = torch.nonzero(qualifies & ~with_lesion).flatten().numpy()
        if len(candidates) == 0:
            lesion_note = f", {int(with_lesion.sum())} of them hold lesions" if self.lesion_key is not None else ""
            raise DatasetError(
                f"{name}: no normal slice along axis {self.axis}: none of its {len(coverage)} slices has foreground "
                f"covering at least {self.min_foreground:.0%} of the plane and no lesion (largest coverage "
                f"{float(coverage.max()):.1%}, {int(qualifies.sum())} slices with enough foreground{lesion_note})."
            )
        return candidates

    @staticmethod
    def _check_shape(name: str, mask: NdarrayOrTensor, shape: tuple, what: str) -> None:
        if tuple(mask.shape[1:]) != shape:
            raise DatasetError(
                f"{name}: {what} {source_name(mask)} has spatial shape {tuple(mask.shape[1:])}, the volume {shape}."
            )

    def _take(self, volume: NdarrayOrTensor, index: int) -> NdarrayOrTensor:
        roi = [slice(None)] * 3
        roi[self.axis] = slice(index, index + 1)
        # SpatialCrop and SqueezeDim keep a MetaTensor's affine true to the slice's position.
        plane = SqueezeDim(dim=self.axis + 1)(SpatialCrop(roi_slices=roi)(volume))
        if self.quarter_turns % 4:
            plane = Rotate90(k=self.quarter_turns, spatial_axes=(0, 1))(plane)
        if isinstance(plane, MetaTensor):
            plane.meta["slice_axis"] = self.axis
            plane.meta["slice_index"] = index
        return plane

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> list[dict[Hashable, NdarrayOrTensor]]:
        self.randomize(self.normal_slices(data))
        volumes = {key: data[key] for key in self.key_iterator(dict(data))}
        foreground = data.get(self.foreground_key) if self.foreground_key is not None else None
        if self.crop_to_foreground and foreground is not None:
            box = foreground_box(foreground, self.axis, self.crop_margin)
            volumes = {key: crop_plane(volume, self.axis, box) for key, volume in volumes.items()}
        samples = []
        for index in self._indices:
            sample = dict(data)
            for key, volume in volumes.items():
                sample[key] = self._take(volume, index)
            if self.slice_index_key is not None:
                sample[self.slice_index_key] = index
            samples.append(sample)
        return samples


RandNormalSliceD = RandNormalSliceDict = RandNormalSliced
