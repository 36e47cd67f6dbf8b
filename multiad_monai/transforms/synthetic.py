"""Synthetic defects pasted on normal images, to validate anomaly detectors without real anomalies."""

from __future__ import annotations

import os
import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor
from scipy import ndimage

from multiad_monai.transforms.masks import zeros_mask_like

__all__ = [
    "SYNTHETIC_DEFECT_TYPES",
    "RandSyntheticDefectd",
    "RandSyntheticDefectD",
    "RandSyntheticDefectDict",
]

SYNTHETIC_DEFECT_TYPES = ("cutpaste", "blob", "scratch", "lesion")
INDUSTRIAL_DEFECT_TYPES = ("cutpaste", "blob", "scratch")


class RandSyntheticDefectd(RandomizableTransform, MapTransform):
    """Paste one random synthetic defect on a 2D image and mark it in the mask.

    Defect types:

    - ``"cutpaste"``: a patch cut from elsewhere in the same image, rotated, with a slight
      brightness change, pasted over another place (texture continuity breaks at its border);
    - ``"blob"``: a region of random colour and noise inside a smooth irregular outline
      (thresholded low-frequency noise);
    - ``"scratch"``: a thin curved line (quadratic Bezier curve) of random colour;
    - ``"lesion"``: for MRI and CT slices, a bright or dark region (either sign equally likely) with an
      irregular outline and a soft, graded border, whose intensity shift varies smoothly inside it while the
      tissue texture underneath stays visible, as hyperintense lesions in FLAIR or hypodense tumours in CT.

    With ``foreground_key``, every defect is centred inside the item's foreground mask (the organ) and its
    ground truth is cut to it; the ``"lesion"`` also changes no pixel outside it.

    The image must be channel-first (C, H, W), float, in [0, 1], already resized. When a defect is
    applied, ``mask`` becomes the union of any existing mask with the defect, as float (1, H, W)
    in {0, 1}, and ``label`` becomes 1; otherwise the item is returned unchanged.

    Randomness comes from ``self.R``, so the transform is reproducible with ``set_random_state(seed)``.
    For a validation set that must be the same in every epoch whatever the data loader order or
    worker count, set ``seed_key``: each item then gets its own generator seeded from ``seed`` and
    the item's identifier (the file name, without folders, of a MetaTensor under ``seed_key``;
    otherwise ``str`` of the value there), and ``set_random_state`` no longer matters.

    Args:
        image_key: key of the (C, H, W) image in [0, 1].
        mask_key: key of the (1, H, W) mask; created if missing.
        label_key: key of the image-level label.
        prob: probability of adding a defect to an item.
        defect_types: types to draw from, uniformly; a subset of :data:`SYNTHETIC_DEFECT_TYPES`; the default
            :data:`INDUSTRIAL_DEFECT_TYPES` for images, ``("lesion",)`` for medical slices.
        size_range: defect extent as a fraction of the shorter image side, drawn uniformly.
        seed_key: key whose value identifies an item, for per-item seeding (see above).
        seed: base seed of per-item seeding; unused without ``seed_key``.
        force_key: an item holding this key gets a defect exactly when its value is true, whatever
            ``prob`` draws (see :func:`multiad_monai.data.synthetic_validation_datalist`).
        foreground_key: key of a ``(1, H, W)`` organ mask on the image's grid; items without it (or with an
            empty one) get defects anywhere.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        image_key: str = "image",
        mask_key: str = "mask",
        label_key: str = "label",
        prob: float = 1.0,
        defect_types: Sequence[str] = INDUSTRIAL_DEFECT_TYPES,
        size_range: tuple[float, float] = (0.05, 0.25),
        seed_key: str | None = None,
        seed: int = 0,
        force_key: str | None = "synthetic_defect",
        foreground_key: str | None = None,
    ) -> None:
        MapTransform.__init__(self, keys=image_key)
        RandomizableTransform.__init__(self, prob=prob)
        unknown = set(defect_types) - set(SYNTHETIC_DEFECT_TYPES)
        if unknown or not defect_types:
            raise ValueError(
                f"defect_types must be a non-empty subset of {SYNTHETIC_DEFECT_TYPES}, got {defect_types}."
            )
        if not 0.0 < size_range[0] <= size_range[1] <= 1.0:
            raise ValueError(f"size_range must satisfy 0 < low <= high <= 1, got {size_range}.")
        self.image_key = image_key
        self.mask_key = mask_key
        self.label_key = label_key
        self.defect_types = tuple(defect_types)
        self.size_range = (float(size_range[0]), float(size_range[1]))
        self.seed_key = seed_key
        self.seed = seed
        self.force_key = force_key
        self.foreground_key = foreground_key

    def randomize(self, data=None) -> None:
        super().randomize(None)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.seed_key is None:
            rng = self.R
            self.randomize()
            apply = self._do_transform
        else:
            # A local generator keeps per-item draws independent of call order and thread-safe.
            rng = np.random.RandomState(self._item_seed(d[self.seed_key]))
            apply = rng.rand() < self.prob
        if self.force_key is not None and self.force_key in d:
            apply = bool(d[self.force_key])
        if not apply:
            return d

        image = d[self.image_key]
        if image.ndim != 3:
            raise ValueError(f"expected a channel-first 2D image (C, H, W), got shape {tuple(image.shape)}.")
        pixels = convert_to_numpy(image, dtype=np.float32)
        inside = None
        if self.foreground_key is not None and d.get(self.foreground_key) is not None:
            inside = convert_to_numpy(d[self.foreground_key]).reshape(pixels.shape[1:]) > 0
            if not inside.any():
                inside = None
        defect_type = self.defect_types[rng.randint(len(self.defect_types))]
        extent = rng.uniform(*self.size_range) * min(pixels.shape[1:])
        # a cut-paste places itself unless it must land on the organ: drawing no centre for it keeps the
        # validation sets of earlier versions (same seed, same defects)
        centre = None if defect_type == "cutpaste" and inside is None else _centre(rng, pixels.shape[1:], inside)
        pixels, defect = _DEFECTS[defect_type](rng, pixels, extent, centre, inside)
        if inside is not None:
            defect = defect & inside
            if not defect.any():  # a defect that missed the organ: its centre pixel lies inside by construction
                defect[int(centre[0]), int(centre[1])] = True
        d[self.image_key] = convert_to_dst_type(np.clip(pixels, 0.0, 1.0), dst=image, dtype=image.dtype)[0]

        mask = d.get(self.mask_key)
        if mask is None:
            mask = zeros_mask_like(image)
        mask = convert_to_tensor(mask, dtype=torch.float32, track_meta=isinstance(mask, MetaTensor))
        d[self.mask_key] = torch.maximum(mask, torch.as_tensor(defect[None], dtype=torch.float32, device=mask.device))
        d[self.label_key] = 1
        return d

    def _item_seed(self, value) -> int:
        if isinstance(value, MetaTensor) and value.meta.get("filename_or_obj"):
            identifier = os.path.basename(str(value.meta["filename_or_obj"]))
        else:
            identifier = str(value)
        # crc32 rather than hash(): Python salts str hashes per process.
        return zlib.crc32(f"{self.seed}:{identifier}".encode()) & 0x7FFFFFFF


def _smooth_noise(rng: np.random.RandomState, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-12)


def _centre(rng: np.random.RandomState, shape: tuple[int, int], inside: np.ndarray | None) -> np.ndarray:
    """A random pixel position: uniform over the image, or over the ``inside`` pixels."""
    if inside is None:
        return np.array([rng.uniform(0, shape[0]), rng.uniform(0, shape[1])])
    candidates = np.flatnonzero(inside)
    return np.array(np.unravel_index(candidates[rng.randint(len(candidates))], shape), dtype=np.float64)


def _cutpaste(
    rng: np.random.RandomState, image: np.ndarray, extent: float, centre: np.ndarray | None, inside: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    _, height, width = image.shape
    patch_h = int(np.clip(extent * rng.uniform(0.7, 1.3), 2, height - 1))
    patch_w = int(np.clip(extent * rng.uniform(0.7, 1.3), 2, width - 1))
    src_y, dst_y = rng.randint(0, height - patch_h + 1, 2)
    src_x, dst_x = rng.randint(0, width - patch_w + 1, 2)
    if centre is not None:  # the pasted patch sits on the organ
        dst_y = int(np.clip(centre[0] - patch_h // 2, 0, height - patch_h))
        dst_x = int(np.clip(centre[1] - patch_w // 2, 0, width - patch_w))
    patch = image[:, src_y : src_y + patch_h, src_x : src_x + patch_w]
    angle = rng.uniform(-180.0, 180.0)
    # reshape=False keeps the box size; the rotated rectangle's corners that leave it are dropped.
    patch = ndimage.rotate(patch, angle, axes=(1, 2), reshape=False, order=1, mode="nearest")
    inside = ndimage.rotate(np.ones((patch_h, patch_w)), angle, reshape=False, order=0, mode="constant") > 0.5
    if not inside.any():
        inside[patch_h // 2, patch_w // 2] = True
    patch = patch * rng.uniform(0.85, 1.15)
    out = image.copy()
    region = out[:, dst_y : dst_y + patch_h, dst_x : dst_x + patch_w]
    region[:, inside] = patch[:, inside]
    mask = np.zeros((height, width), dtype=bool)
    mask[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = inside
    return out, mask


def _irregular_region(rng: np.random.RandomState, shape: tuple[int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """A blob of about ``radius`` around ``centre`` whose outline is bent by smooth noise: ``(H, W)`` bool."""
    cy, cx = centre
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    envelope = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * radius**2))
    outline = _smooth_noise(rng, shape, max(radius / 3.0, 1.0))
    mask = envelope * (1.0 + 0.4 * outline) > 0.5
    if not mask.any():
        mask[int(np.clip(cy, 0, shape[0] - 1)), int(np.clip(cx, 0, shape[1] - 1))] = True
    return mask


def _blob(
    rng: np.random.RandomState, image: np.ndarray, extent: float, centre: np.ndarray, inside: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = image.shape
    radius = max(extent / 2.0, 1.5)
    mask = _irregular_region(rng, (height, width), centre, radius)
    colour = rng.uniform(0.0, 1.0, (channels, 1, 1))
    texture = colour + 0.1 * _smooth_noise(rng, (height, width), 1.0)[None]
    # Soft edges blend the blob in; the ground truth stays the hard mask.
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)[None] * rng.uniform(0.6, 1.0)
    return (1.0 - alpha) * image + alpha * texture, mask


def _scratch(
    rng: np.random.RandomState, image: np.ndarray, extent: float, centre: np.ndarray, inside: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    channels, height, width = image.shape
    length = max(extent * 2.0, 4.0)
    start = centre
    direction = rng.uniform(0.0, 2.0 * np.pi)
    end = start + length * np.array([np.sin(direction), np.cos(direction)])
    normal = np.array([np.cos(direction), -np.sin(direction)])
    bend = (start + end) / 2.0 + rng.uniform(-0.3, 0.3) * length * normal
    t = np.linspace(0.0, 1.0, int(4 * length) + 2)[:, None]
    points = np.round((1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end).astype(int)
    points = points[(points[:, 0] >= 0) & (points[:, 0] < height) & (points[:, 1] >= 0) & (points[:, 1] < width)]
    mask = np.zeros((height, width), dtype=bool)
    if len(points) == 0:  # the curve left the image: keep its clipped start so the defect exists
        points = np.clip(np.round(start).astype(int), 0, [height - 1, width - 1])[None]
    mask[points[:, 0], points[:, 1]] = True
    half_width = rng.randint(0, max(1, int(round(min(height, width) / 128))) + 1)
    if half_width:
        mask = ndimage.binary_dilation(mask, iterations=half_width)
    colour = rng.uniform(0.0, 1.0, (channels, 1, 1))
    alpha = mask[None] * rng.uniform(0.7, 1.0)
    return (1.0 - alpha) * image + alpha * colour, mask


def _lesion(
    rng: np.random.RandomState, image: np.ndarray, extent: float, centre: np.ndarray, inside: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    _, height, width = image.shape
    radius = max(extent / 2.0, 1.5)
    mask = _irregular_region(rng, (height, width), centre, radius)
    sign = 1.0 if rng.rand() < 0.5 else -1.0
    # heterogeneous shift: strongest in a core, fading over a border of about a quarter of the radius
    shift = sign * rng.uniform(0.1, 0.4) * (1.0 + 0.3 * _smooth_noise(rng, (height, width), max(radius / 4.0, 1.0)))
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), max(radius / 4.0, 1.0))
    if inside is not None:
        alpha = alpha * inside
    return image + (alpha * shift)[None].astype(np.float32), mask


_DEFECTS = {"cutpaste": _cutpaste, "blob": _blob, "scratch": _scratch, "lesion": _lesion}

RandSyntheticDefectD = RandSyntheticDefectDict = RandSyntheticDefectd
