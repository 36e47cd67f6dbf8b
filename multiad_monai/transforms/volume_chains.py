"""Preprocessing chains for medical volumes and for the 2D slices cut from them.

Volumes: :class:`LoadVolumed` (NIfTI, DICOM series, MHA/NRRD; one file or several modality files as
channels; label and foreground checked against the image's voxel grid) then an intensity preset that maps
the image to [0, 1] (``"mri"``: foreground percentiles, ``"ct"``: Hounsfield window, ``"none"``: already
in [0, 1]) and binary label/foreground masks.

Slices: the 2D chain of in-memory ``(C, H, W)`` slices in [0, 1] (resize, 3 channels, normalisation),
the same operations :class:`~multiad_monai.inferers.VolumeAnomalyInferer` applies slice by slice at
inference, so the network sees training and test slices alike.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    Resized,
)

from multiad_monai.data.errors import DatasetError
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD
from multiad_monai.transforms.channels import EnsureRGBd, TwoModalitiesToRGBd
from multiad_monai.transforms.intensity import ForegroundPercentileScaled, HounsfieldWindowd
from multiad_monai.transforms.masks import EmptyMaskd
from multiad_monai.transforms.slice_context import SliceContextChannelsd
from multiad_monai.transforms.synthetic import RandSyntheticDefectd
from multiad_monai.transforms.teacher_features import TeacherFeaturesd

__all__ = ["LoadVolumed", "volume_transforms", "slice_transforms_2d", "INTENSITY_PRESETS"]

INTENSITY_PRESETS = ("mri", "ct", "none")


class LoadVolumed(MapTransform):
    """Load volumes with :func:`~multiad_monai.data.load_volume` and check that masks share the image's grid.

    A key may hold one path (file or DICOM series folder) or a list of paths, the modalities of one case
    stacked as channels (:func:`~multiad_monai.data.multimodal_volume`). Keys other than ``image_key``
    are masks: they may be all zero and must lie on the image's voxel grid (shape and affine).

    Args:
        keys: keys to load; the first key present that equals ``image_key`` is the reference grid.
        image_key: key of the image.
        canonical_axcodes: orientation every volume is brought to, e.g. ``"RAS"``; None keeps the stored order.
        reader: MONAI reader name or instance; None: MONAI's choice.
        allow_missing_keys: skip keys missing from the data (e.g. no label at inference).

    Raises:
        DatasetError: naming the file, for every problem :func:`~multiad_monai.data.load_volume` reports
            and for masks on another grid.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        canonical_axcodes: str | None = "RAS",
        reader: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.canonical_axcodes = canonical_axcodes
        self.reader = reader

    def _load(self, key: Hashable, value) -> torch.Tensor:
        # multiad_monai.data imports this package (for source_name): import late.
        from multiad_monai.data.cases import volume_stem
        from multiad_monai.data.volumes import load_volume, multimodal_volume

        if isinstance(value, (list, tuple)):
            if not value:
                raise DatasetError(f"{key!r} lists no files.")
            paths = {volume_stem(p): p for p in value}
            if len(paths) != len(value):
                raise DatasetError(f"{key!r} lists modality files with the same name: {list(value)}.")
            return multimodal_volume(paths, list(paths), reader=self.reader, canonical_axcodes=self.canonical_axcodes)
        return load_volume(
            value, reader=self.reader, canonical_axcodes=self.canonical_axcodes, allow_empty=key != self.image_key
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], torch.Tensor):
                continue  # already loaded
            d[key] = self._load(key, d[key])
        from multiad_monai.data.volumes import check_image_label_pair

        image = d.get(self.image_key)
        if isinstance(image, torch.Tensor):
            for key in self.key_iterator(d):
                if key != self.image_key:
                    check_image_label_pair(image, d[key])
        return d


def volume_transforms(
    preset: str = "mri",
    image_key: str = "image",
    label_key: str = "label",
    foreground_key: str = "foreground",
    canonical_axcodes: str | None = "RAS",
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    window: float = 400.0,
    level: float = 40.0,
    reader: str | None = None,
    slice_context: int = 0,
    slice_axis: int = 2,
) -> Compose:
    """Load a case and bring its image to [0, 1] with an intensity preset; masks become binary.

    Chain: :class:`LoadVolumed` (label and foreground optional) -> preset -> ``AsDiscreted`` (masks > 0.5)
    -> [``slice_context`` > 0: :class:`~multiad_monai.transforms.SliceContextChannelsd`, the slices
    ``slice_context`` before and after each slice along ``slice_axis`` as its first and third channels (2.5D;
    one-channel images only)] -> :class:`~multiad_monai.transforms.TwoModalitiesToRGBd` (two modalities get
    their mean as a third channel, as the teacher takes three).
    ``"mri"``: :class:`ForegroundPercentileScaled` inside the foreground mask (else above the minimum),
    with the outside set to 0; ``"ct"``: :class:`HounsfieldWindowd` (default abdominal W400/L40);
    ``"none"``: the image is already in [0, 1].

    Returns a MetaTensor ``image`` ``(C, X, Y, Z)`` (``(3, X, Y, Z)`` with slice context) in [0, 1] and ``label``/``foreground`` ``(1, X, Y, Z)``
    in {0, 1} with the image's affine; a label with values 1-4 (BraTS) becomes "any lesion".
    """
    if preset not in INTENSITY_PRESETS:
        raise ValueError(f"unknown intensity preset {preset!r}; choose from {INTENSITY_PRESETS}.")
    mask_keys = [label_key, foreground_key]
    transforms = [
        LoadVolumed(
            [image_key, *mask_keys],
            image_key=image_key,
            canonical_axcodes=canonical_axcodes,
            reader=reader,
            allow_missing_keys=True,
        )
    ]
    if preset == "mri":
        transforms.append(
            ForegroundPercentileScaled(
                image_key,
                foreground_key=foreground_key,
                lower=lower_percentile,
                upper=upper_percentile,
                outside_value=0.0,
                allow_missing_keys=False,
            )
        )
    elif preset == "ct":
        transforms.append(HounsfieldWindowd(image_key, window=window, level=level))
    transforms.append(AsDiscreted(keys=mask_keys, threshold=0.5, allow_missing_keys=True))
    if slice_context:
        transforms.append(SliceContextChannelsd(image_key, axis=slice_axis, offset=slice_context))
    transforms.append(TwoModalitiesToRGBd(image_key))
    return Compose(transforms)


def slice_transforms_2d(
    image_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    synthetic_defects: bool = False,
    seed: int = 0,
    defect_types: Sequence[str] = ("lesion",),
    teacher: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    augment: bool = False,
    image_key: str = "image",
    mask_key: str = "mask",
    label_key: str = "label",
    name_key: str = "name",
    foreground_key: str = "foreground",
) -> Compose:
    """The 2D chain of in-memory slices ``(1 or 3, H, W)`` in [0, 1], as from :func:`multiad_monai.data.normal_slice_datalist`.

    Chain: Resized (bilinear + anti-aliasing, as the volume inferer) -> EnsureRGBd -> [synthetic defects:
    EmptyMaskd + :class:`RandSyntheticDefectd` of ``defect_types`` (default lesion-like bright or dark
    regions) seeded per slice name, placed inside the slice's ``foreground`` mask when the item has one
    (resized with it, nearest), for the validation set] ->
    NormalizeIntensityd -> EnsureTyped (plain tensors) -> [``teacher``: :class:`TeacherFeaturesd`]. The chain
    is flat and, without synthetic defects, deterministic, so a ``CacheDataset`` caches the teacher features.

    ``augment`` (training only) adds, after EnsureRGBd, a left-right flip (p 0.5; the second in-plane axis,
    left-right for axial slices turned anterior-up) and a small rotation/scaling (p 0.5, up to 10 degrees and
    10%, zero padding): more variety of normal anatomy when few training patients are available. The
    teacher then runs in the training step, so it cannot be given here.

    Returns ``image`` ``(3, image_size, image_size)`` float32; with ``synthetic_defects`` also ``mask``
    ``(1, image_size, image_size)`` and ``label``.
    """
    if augment and (teacher is not None or synthetic_defects):
        raise ValueError("augment=True is for training slices: give no teacher (its features cannot be cached) and no synthetic defects.")
    transforms = [
        Resized(keys=image_key, spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
        Resized(keys=foreground_key, spatial_size=(image_size, image_size), mode="nearest", allow_missing_keys=True),
        EnsureRGBd(keys=image_key),
    ]
    if augment:
        transforms += [
            RandFlipd(keys=image_key, prob=0.5, spatial_axis=1),
            RandAffined(
                keys=image_key, prob=0.5, rotate_range=np.pi / 18, scale_range=0.1, padding_mode="zeros", mode="bilinear"
            ),
        ]
    keys = [image_key]
    if synthetic_defects:
        keys.append(mask_key)
        transforms += [
            EmptyMaskd(mask_key=mask_key, image_key=image_key),
            RandSyntheticDefectd(
                image_key=image_key,
                mask_key=mask_key,
                label_key=label_key,
                prob=0.5,
                defect_types=defect_types,
                seed_key=name_key,
                seed=seed,
                foreground_key=foreground_key,
            ),
        ]
    transforms += [
        NormalizeIntensityd(
            keys=image_key,
            subtrahend=np.asarray(mean, dtype=np.float32),
            divisor=np.asarray(std, dtype=np.float32),
            channel_wise=True,
        ),
        EnsureTyped(keys=[*keys, foreground_key], dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ]
    if teacher is not None:
        transforms.append(TeacherFeaturesd(keys=image_key, teacher=teacher, device=device))
    return Compose(transforms)
