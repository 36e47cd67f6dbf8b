"""A small generated dataset in the MVTec AD layout, for demos and tests without downloads.

Normal images are a woven, fabric-like texture with slight random phase, angle, colour and
illumination changes. Test defects are scratches, stains, missing-thread patches and colour spots
of several sizes, each with a binary 0/255 mask under ``ground_truth/<defect_type>/``. The defects
are of moderate contrast, so that finding them needs a model of the texture, not a threshold.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["DEMO_DEFECT_TYPES", "make_demo_dataset", "build_generated_folder"]

DEMO_DEFECT_TYPES = ("scratch", "stain", "missing", "color")
_MANIFEST = "demo.json"
# Bump when the generator's output changes, so that old datasets are rebuilt rather than reused.
_GENERATOR_VERSION = 1
# Sub-seeds that keep each image's random stream independent of how many of the others are made.
_TRAIN, _TEST_GOOD, _TEST_DEFECT = 0, 1, 2


def make_demo_dataset(
    root: str,
    num_train: int = 60,
    num_test_good: int = 12,
    num_test_defect: int = 24,
    image_size: int = 256,
    seed: int = 0,
) -> str:
    """Write a generated MVTec-layout category folder at ``root`` and return its absolute path.

    Files are RGB uint8 PNGs of ``image_size`` x ``image_size`` named ``000.png``, ``001.png``, ...;
    masks are ``<stem>_mask.png`` with values 0/255. Defect types cycle through
    :data:`DEMO_DEFECT_TYPES`. The output is bit-identical for the same arguments.

    The dataset is built in a hidden folder beside ``root`` and renamed into place, so an interrupted
    run leaves no half-written ``root``. If ``root`` already holds a complete dataset made with the
    same arguments (recorded in ``demo.json``), nothing is rewritten. A previous demo dataset with
    other arguments is replaced; any other non-empty folder is left alone and an error is raised.

    Raises:
        FileExistsError: ``root`` exists and is not a demo dataset or an empty folder.
        ValueError: invalid counts or image size.
    """
    if num_train < 1 or num_test_good < 0 or num_test_defect < 0:
        raise ValueError(
            f"need num_train >= 1 and non-negative test counts, got {num_train}, {num_test_good}, {num_test_defect}."
        )
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}.")
    root = os.path.abspath(os.fspath(root))
    manifest = {
        "generator": f"{__name__}.make_demo_dataset",
        "version": _GENERATOR_VERSION,
        "parameters": {
            "num_train": int(num_train),
            "num_test_good": int(num_test_good),
            "num_test_defect": int(num_test_defect),
            "image_size": int(image_size),
            "seed": int(seed),
        },
    }
    return build_generated_folder(root, manifest, _write_dataset)


def build_generated_folder(root: str, manifest: dict, write: Callable[[str, dict], None]) -> str:
    """Make the generated dataset described by ``manifest`` at ``root`` once, atomically; return ``root``.

    ``write(folder, manifest["parameters"])`` fills a hidden staging folder beside ``root``, which is then
    renamed into place, so an interrupted run leaves no half-written ``root``. A folder already holding the
    same ``demo.json`` manifest is reused; a generated folder with another manifest is replaced; any other
    non-empty folder raises ``FileExistsError``.
    """
    if _holds_manifest(root, manifest):
        return root
    _ensure_replaceable(root)

    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{base}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(staging)
    try:
        write(staging, manifest["parameters"])
        # The manifest is written last: its presence marks the dataset as complete.
        with open(os.path.join(staging, _MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        _move_into_place(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _holds_manifest(root: str, manifest: dict) -> bool:
    try:
        with open(os.path.join(root, _MANIFEST)) as f:
            return json.load(f) == manifest
    except (OSError, ValueError):
        return False


def _ensure_replaceable(root: str) -> None:
    if not os.path.exists(root):
        return
    if not os.path.isdir(root):
        raise FileExistsError(f"{root!r} is a file; cannot create a demo dataset there.")
    if os.listdir(root) and not os.path.isfile(os.path.join(root, _MANIFEST)):
        raise FileExistsError(
            f"{root!r} is a non-empty folder that is not a demo dataset (no {_MANIFEST}); refusing to overwrite it."
        )


def _move_into_place(staging: str, root: str, manifest: dict) -> None:
    try:
        # Renaming onto a missing or empty folder is atomic on POSIX.
        os.rename(staging, root)
        return
    except OSError:
        if _holds_manifest(root, manifest):  # another process finished the same dataset first
            return
    _ensure_replaceable(root)
    old = f"{root}.old-{uuid.uuid4().hex[:8]}"
    os.rename(root, old)
    os.rename(staging, root)
    shutil.rmtree(old, ignore_errors=True)


def _write_dataset(folder: str, params: dict) -> None:
    size, seed = params["image_size"], params["seed"]
    train_dir = os.path.join(folder, "train", "good")
    os.makedirs(train_dir)
    for i in range(params["num_train"]):
        rng = np.random.default_rng([seed, _TRAIN, i])
        _save_png(_normal_image(rng, size), os.path.join(train_dir, f"{i:03d}.png"))

    good_dir = os.path.join(folder, "test", "good")
    os.makedirs(good_dir)
    for i in range(params["num_test_good"]):
        rng = np.random.default_rng([seed, _TEST_GOOD, i])
        _save_png(_normal_image(rng, size), os.path.join(good_dir, f"{i:03d}.png"))

    counters = dict.fromkeys(DEMO_DEFECT_TYPES, 0)
    for i in range(params["num_test_defect"]):
        defect_type = DEMO_DEFECT_TYPES[i % len(DEMO_DEFECT_TYPES)]
        # Sizes cycle independently of types so each type gets small, medium and large defects.
        size_class = (i // len(DEMO_DEFECT_TYPES)) % 3
        rng = np.random.default_rng([seed, _TEST_DEFECT, i])
        image = _normal_image(rng, size)
        image, mask = _DEFECTS[defect_type](rng, image, size_class)
        stem = f"{counters[defect_type]:03d}"
        counters[defect_type] += 1
        image_dir = os.path.join(folder, "test", defect_type)
        mask_dir = os.path.join(folder, "ground_truth", defect_type)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(mask_dir, exist_ok=True)
        _save_png(image, os.path.join(image_dir, f"{stem}.png"))
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
            os.path.join(mask_dir, f"{stem}_mask.png"), format="PNG"
        )


def _save_png(image: np.ndarray, path: str) -> None:
    """Save an (H, W, 3) float image in [0, 1] as an 8-bit RGB PNG."""
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG")


def _band_limited_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` pixels, rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return noise / (noise.std() + 1e-12)


def _normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W, 3) float image in [0, 1]: a woven texture with small random nuisance variations."""
    scale = size / 256.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    period = 12.0 * scale * rng.uniform(0.97, 1.03)
    phase_u, phase_v = rng.uniform(0.0, 2.0 * np.pi, 2)
    warp = np.sin(2.0 * np.pi * u / period + phase_u)
    weft = np.sin(2.0 * np.pi * v / period + phase_v)
    # Over-under crossings: which thread is on top flips from cell to cell, as in a plain weave.
    over = np.sign(np.sin(np.pi * u / period + phase_u / 2.0) * np.sin(np.pi * v / period + phase_v / 2.0))
    weave = 0.5 + 0.25 * (warp + weft) * 0.5 + 0.2 * over * np.abs(warp * weft)
    fibres = 0.06 * _band_limited_noise(rng, (size, size), 1.0 * scale)
    mottle = 0.04 * _band_limited_noise(rng, (size, size), 16.0 * scale)
    shading = 0.55 + 0.6 * weave + fibres + mottle

    direction = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy) / size - 0.5
    illumination = rng.uniform(0.95, 1.05) * (1.0 + rng.uniform(0.0, 0.08) * ramp)
    colour = np.array([0.62, 0.50, 0.36]) + rng.normal(0.0, 0.008, 3)
    return np.clip(shading[..., None] * illumination[..., None] * colour, 0.0, 1.0)


# Defect extent as a fraction of the image side for size classes small / medium / large.
_SIZE_FRACTIONS = (0.05, 0.1, 0.18)


def _centre(rng: np.random.Generator, size: int, margin: float) -> np.ndarray:
    margin = min(margin, size / 2.0 - 1.0)
    return rng.uniform(margin, size - margin, 2)


def _irregular_blob(rng: np.random.Generator, size: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A blob of about ``radius`` pixels with a noisy outline: (soft (H, W) alpha in [0, 1], hard mask)."""
    radius = max(radius, 2.0)
    cy, cx = _centre(rng, size, radius * 1.3)
    yy, xx = np.mgrid[0:size, 0:size]
    envelope = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * radius**2))
    outline_noise = _band_limited_noise(rng, (size, size), max(radius / 3.0, 1.0))
    hard = envelope * (1.0 + 0.35 * outline_noise) > 0.45
    if not hard.any():
        hard[int(cy), int(cx)] = True
    # Full strength inside the mask, fading out over a pixel or so outside it, as real stains do.
    soft = np.maximum(hard, ndimage.gaussian_filter(hard.astype(np.float64), 0.8))
    return soft, hard


def _scratch(rng: np.random.Generator, image: np.ndarray, size_class: int) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    length = size * _SIZE_FRACTIONS[size_class] * 2.5
    start = _centre(rng, size, size * 0.1)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    end = start + length * np.array([np.sin(direction), np.cos(direction)])
    bend = (start + end) / 2.0 + rng.uniform(-0.3, 0.3) * length * np.array([np.cos(direction), -np.sin(direction)])
    t = np.linspace(0.0, 1.0, int(4 * length) + 2)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # quadratic Bezier curve
    points = np.round(points).astype(int)
    inside = np.all((points >= 0) & (points < size), axis=1)
    line = np.zeros((size, size), dtype=bool)
    line[points[inside, 0], points[inside, 1]] = True
    if not line.any():
        line[size // 2, size // 4 : 3 * size // 4] = True
    half_width = max(int(round(size / 256.0 * (1 + size_class * 0.5))), 0)
    mask = ndimage.binary_dilation(line, iterations=half_width) if half_width else line
    # Scratches catch the light: brighter, desaturated line, partly covering the weave.
    alpha = rng.uniform(0.45, 0.6) * mask[..., None]
    target = np.full(3, image.mean() * 1.45)
    return (1 - alpha) * image + alpha * target, mask


def _stain(rng: np.random.Generator, image: np.ndarray, size_class: int) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    soft, mask = _irregular_blob(rng, size, size * _SIZE_FRACTIONS[size_class] / 2.0)
    tint = np.array([0.78, 0.74, 0.68]) * rng.uniform(0.95, 1.05)
    factor = 1.0 - soft[..., None] * (1.0 - tint)
    return image * factor, mask


def _missing(rng: np.random.Generator, image: np.ndarray, size_class: int) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    side = max(size * _SIZE_FRACTIONS[size_class], 3.0)
    cy, cx = _centre(rng, size, side)
    half_h, half_w = side / 2.0 * rng.uniform(0.6, 1.4, 2)
    angle = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    along = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    across = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    mask = (np.abs(along) <= half_h) & (np.abs(across) <= half_w)
    if not mask.any():
        mask[int(cy), int(cx)] = True
    # Threads are gone: only the blurred, darker backing shows, keeping the local mean colour.
    backing = ndimage.gaussian_filter(image, (6.0 * size / 256.0, 6.0 * size / 256.0, 0)) * rng.uniform(0.8, 0.9)
    alpha = np.maximum(mask, ndimage.gaussian_filter(mask.astype(np.float64), 0.7))[..., None]
    return (1 - alpha) * image + alpha * backing, mask


def _colour_spot(rng: np.random.Generator, image: np.ndarray, size_class: int) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    soft, mask = _irregular_blob(rng, size, size * _SIZE_FRACTIONS[size_class] / 2.0)
    # A hue change at about constant brightness: visible only through colour, not texture.
    shift = rng.choice([np.array([-0.07, 0.0, 0.09]), np.array([0.08, -0.05, -0.03]), np.array([-0.05, 0.07, -0.02])])
    return image + soft[..., None] * shift, mask


_DEFECTS = {"scratch": _scratch, "stain": _stain, "missing": _missing, "color": _colour_spot}
