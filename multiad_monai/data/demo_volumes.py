"""Generated brain-MRI-like phantom volumes with lesions, for demos and tests without downloads.

Each case is an ellipsoid "brain" of textured tissue with two dark "ventricles", stored like the BraTS
cases (``flair.nii.gz``, ``seg.nii.gz``, ``brainmask.nii.gz``, 1 mm voxels, LPS storage order) in its own
folder. Every case holds one or two irregular hyperintense lesions (FLAIR-like), so training uses only
its lesion-free slices, as with real patients.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from multiad_monai.data.demo import build_generated_folder

__all__ = ["make_demo_volumes", "DEMO_VOLUME_FILES"]

DEMO_VOLUME_FILES = {"image": "flair.nii.gz", "label": "seg.nii.gz", "foreground": "brainmask.nii.gz"}
_GENERATOR_VERSION = 1
# LPS storage, as the BraTS files: loading in RAS flips the first two axes.
_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def make_demo_volumes(
    root: str, num_cases: int = 8, shape: tuple[int, int, int] = (96, 96, 48), seed: int = 0
) -> str:
    """Write ``num_cases`` phantom cases ``case000``, ``case001``, ... under ``root``; return its absolute path.

    Bit-identical for the same arguments; built in a staging folder and renamed into place (see
    :func:`~multiad_monai.data.demo.build_generated_folder`).
    """
    if num_cases < 2:
        raise ValueError(f"need at least 2 cases (a training and a test case), got {num_cases}.")
    if min(shape) < 16:
        raise ValueError(f"every dimension of shape must be at least 16 voxels, got {shape}.")
    manifest = {
        "generator": f"{__name__}.make_demo_volumes",
        "version": _GENERATOR_VERSION,
        "parameters": {"num_cases": int(num_cases), "shape": [int(s) for s in shape], "seed": int(seed)},
    }
    return build_generated_folder(os.path.abspath(os.fspath(root)), manifest, _write_cases)


def _write_cases(folder: str, params: dict) -> None:
    shape = tuple(params["shape"])
    for index in range(params["num_cases"]):
        rng = np.random.default_rng([params["seed"], index])
        image, lesion, brain = _phantom(rng, shape)
        case_dir = os.path.join(folder, f"case{index:03d}")
        os.makedirs(case_dir)
        for key, array in (("image", image), ("label", lesion), ("foreground", brain)):
            nib.save(nib.Nifti1Image(array, _AFFINE), os.path.join(case_dir, DEMO_VOLUME_FILES[key]))


def _ellipsoid(grid: list[np.ndarray], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip(grid, centre, radii)) <= 1.0


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.asarray(shape, np.float32) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.asarray(shape, np.float32) * rng.uniform(0.38, 0.44, 3)
    brain = _ellipsoid(grid, centre, radii)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    texture /= texture.std() + 1e-12
    image = np.where(brain, 100.0 + 6.0 * texture, 0.0)
    for side in (-1, 1):  # ventricles
        offset = np.asarray([side * radii[0] * 0.22, 0.0, 0.0])
        image[_ellipsoid(grid, centre + offset, radii * np.asarray([0.1, 0.35, 0.3]))] = 45.0
    lesion = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 3))):
        lesion_centre = centre + rng.uniform(-0.5, 0.5, 3) * radii
        blob = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
        radius = rng.uniform(0.12, 0.22) * min(shape)
        lesion |= _ellipsoid(grid, lesion_centre, np.full(3, radius)) & (blob > -0.3 * blob.std())
    lesion &= brain
    image = np.where(lesion, image + 45.0, image)
    image += np.where(brain, rng.normal(0.0, 2.0, shape), 0.0)
    return image.astype(np.float32), lesion.astype(np.uint8), brain.astype(np.uint8)
