"""Preprocessing chains for 2D images (PNG/JPEG/BMP/TIFF) and their masks.

Axis convention: tensors are (C, H, W), rows first, exactly as ``numpy.asarray(PIL.Image.open(f))``
after moving channels first. MONAI's ``PILReader`` transposes 2D images to (W, H) by default
(``reverse_indexing=True``) to match medical-image readers; these chains turn that off, so that
ImageNet-pretrained backbones see images upright and heatmaps overlay on the original files
without a transpose. Image and mask are read by the same reader settings and resized to the same
grid, so they stay aligned. The ``spatial_shape`` metadata written by ``PILReader`` remains
(width, height).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image

from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD
from multiad_monai.transforms.channels import EnsureRGBd
from multiad_monai.transforms.masks import EmptyMaskd
from multiad_monai.transforms.synthetic import RandSyntheticDefectd
from multiad_monai.transforms.teacher_features import TeacherFeaturesd

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "pil_to_8bit_scale",
    "pil_to_gray",
    "image_transforms_2d",
    "validation_transforms_2d",
    "denormalize",
    "training_transforms_2d",
]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_KEPT_MODES = ("L", "RGB", "RGBA", "F")
_GRAY_MODES = ("1", "L", "LA", "La")


def pil_to_8bit_scale(image: Image.Image) -> Image.Image:
    """Convert a PIL image so that its pixel values are on the 0..255 scale with 1, 3 or 4 bands.

    8-bit gray/RGB/RGBA pass unchanged. 16-bit gray (``I;16*``, and ``I`` as older Pillow opens
    16-bit PNGs) is mapped to float (mode ``F``) times 255/65535, so full-scale 16-bit white equals
    8-bit white and no precision is lost. Float (``F``) images are assumed to be on 0..255 already.
    Bilevel, gray+alpha, palette, CMYK and other modes are converted to ``L`` or ``RGB``.

    Used as ``PILReader(converter=...)``, so one ``ScaleIntensityRanged(0, 255 -> 0, 1)`` is right
    for 8- and 16-bit files alike.
    """
    if image.mode in _KEPT_MODES:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("F").point(lambda value: value * (255.0 / 65535.0))
    return image.convert("L" if image.mode in _GRAY_MODES else "RGB")


def pil_to_gray(image: Image.Image) -> Image.Image:
    """Reduce a multi-band or palette mask to one band (``L``); single-band masks pass unchanged.

    A palette mask becomes the brightness of its colours, so index 0 (usually black) stays
    background; alpha is ignored, so an opaque RGBA mask is not all foreground.
    """
    if len(image.getbands()) == 1 and image.mode != "P":
        return image
    return image.convert("L")


def _load_and_shape(image_size: int, with_mask: bool, image_key: str, mask_key: str) -> list:
    keys = [image_key, mask_key] if with_mask else [image_key]
    transforms = [
        LoadImaged(
            keys=image_key,
            reader=PILReader(converter=pil_to_8bit_scale, reverse_indexing=False),
            # float64 forces a copy: PIL's float ("F") buffers are read-only and torch must not share them.
            # Resized brings the image back to float32.
            dtype=np.float64,
        ),
        EnsureChannelFirstd(keys=image_key),
        EnsureRGBd(keys=image_key),
    ]
    if with_mask:
        transforms += [
            # Normal images have no mask file; EmptyMaskd adds a zeros mask for them.
            LoadImaged(
                keys=mask_key,
                reader=PILReader(converter=pil_to_gray, reverse_indexing=False),
                allow_missing_keys=True,
            ),
            EnsureChannelFirstd(keys=mask_key, allow_missing_keys=True),
            EmptyMaskd(mask_key=mask_key, image_key=image_key),
        ]
    transforms += [
        Resized(
            keys=keys,
            spatial_size=(image_size, image_size),
            # "nearest-exact" samples pixel centres like the bilinear image resize does; torch's plain
            # "nearest" is shifted by up to half an input pixel, which misaligns thin defects.
            mode=("bilinear", "nearest-exact")[: len(keys)],
            anti_aliasing=(True, False)[: len(keys)],
        ),
        # Pixel values are on the 0..255 scale after pil_to_8bit_scale, for 8- and 16-bit files.
        ScaleIntensityRanged(keys=image_key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    return transforms


def _normalize_and_type(mean: Sequence[float], std: Sequence[float], keys: list[str], image_key: str) -> list:
    return [
        NormalizeIntensityd(
            keys=image_key,
            subtrahend=np.asarray(mean, dtype=np.float32),
            divisor=np.asarray(std, dtype=np.float32),
            channel_wise=True,
        ),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]


def image_transforms_2d(
    image_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    with_mask: bool = True,
    image_key: str = "image",
    mask_key: str = "mask",
) -> Compose:
    """Load, convert to RGB, resize and normalise 2D images (and masks) given as file paths.

    Chain: LoadImaged (PIL, rows first) -> EnsureChannelFirstd -> EnsureRGBd -> [mask: LoadImaged,
    EnsureChannelFirstd, EmptyMaskd] -> Resized (image bilinear + anti-aliasing, mask nearest) ->
    ScaleIntensityRanged (0..255 -> 0..1) -> NormalizeIntensityd (channel-wise) -> EnsureTyped.

    Inputs may be 8-bit or 16-bit gray, RGB or RGBA; 16-bit files are scaled by 65535 (see
    :func:`pil_to_8bit_scale`). See the module docstring for the axis convention.

    Args:
        image_size: output height and width.
        mean: channel means in [0, 1] units, subtracted after scaling to [0, 1].
        std: channel standard deviations in [0, 1] units.
        with_mask: also load ``mask_key`` (absent for normal images) into a binary mask.
        image_key: key of the image path; becomes a float32 MetaTensor (3, image_size, image_size).
        mask_key: key of the mask path; becomes a float32 MetaTensor (1, image_size, image_size) in {0, 1}.
    """
    keys = [image_key, mask_key] if with_mask else [image_key]
    return Compose(
        _load_and_shape(image_size, with_mask, image_key, mask_key) + _normalize_and_type(mean, std, keys, image_key)
    )


def validation_transforms_2d(
    image_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    defect_probability: float = 0.5,
    seed: int = 0,
    image_key: str = "image",
    mask_key: str = "mask",
    label_key: str = "label",
) -> Compose:
    """:func:`image_transforms_2d` with a synthetic defect pasted on part of the images.

    Builds an anomaly validation set from held-out normal images, for early stopping and model
    selection without touching test data. :class:`RandSyntheticDefectd` runs on the [0, 1] image,
    before normalisation. Each image's defect (or its absence) is fixed by ``seed`` and the
    image's file name, so the validation set is the same in every epoch and with any number of
    data loader workers. The default ``defect_probability`` of 0.5 keeps normal images in the set,
    so image-level metrics such as AUROC are defined.

    Outputs as :func:`image_transforms_2d` with ``with_mask=True``; ``label_key`` is set to 1 on
    images that received a defect.
    """
    keys = [image_key, mask_key]
    defect = RandSyntheticDefectd(
        image_key=image_key,
        mask_key=mask_key,
        label_key=label_key,
        prob=defect_probability,
        seed_key=image_key,
        seed=seed,
    )
    return Compose(
        _load_and_shape(image_size, True, image_key, mask_key)
        + [defect]
        + _normalize_and_type(mean, std, keys, image_key)
    )


def denormalize(
    image: NdarrayOrTensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> NdarrayOrTensor:
    """Undo channel-wise normalisation for display: ``image * std + mean``, clipped to [0, 1].

    Args:
        image: (C, H, W) or (B, C, H, W) tensor or array; channels at dim -3.
    """
    shape = (len(mean), 1, 1)
    if isinstance(image, torch.Tensor):
        mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(shape)
        std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(shape)
        return (image * std_t + mean_t).clamp(0.0, 1.0)
    image = np.asarray(image)
    mean_a = np.asarray(mean, dtype=image.dtype).reshape(shape)
    std_a = np.asarray(std, dtype=image.dtype).reshape(shape)
    return np.clip(image * std_a + mean_a, 0.0, 1.0)


def training_transforms_2d(
    image_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    teacher: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    image_key: str = "image",
) -> Compose:
    """The training chain of normal images: :func:`image_transforms_2d` without masks, metadata dropped
    (the trainer needs none and MetaTensor collation is slow), then, when ``teacher`` is given, the
    teacher's features cached by :class:`TeacherFeaturesd`.

    The chain is flat and deterministic, so a ``CacheDataset`` caches everything including the teacher
    features: a nested ``Compose`` would count as random to MONAI and disable the cache.
    """
    transforms = list(image_transforms_2d(image_size, mean, std, with_mask=False, image_key=image_key).transforms)
    transforms.append(EnsureTyped(keys=image_key, dtype=torch.float32, track_meta=False))
    if teacher is not None:
        transforms.append(TeacherFeaturesd(keys=image_key, teacher=teacher, device=device))
    return Compose(transforms)
