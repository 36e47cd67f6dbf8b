"""Rendering of anomaly heatmaps over images for review."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from multiad_monai.atomic import atomic_path

__all__ = ["render_overlay", "save_png", "heat_colormap", "NetworkOverlays"]


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Maps values in [0, 1] ``(H, W)`` to RGB ``(H, W, 3)`` in [0, 1]: blue - cyan - yellow - red."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    anchors = np.array([[0.0, 0.0, 0.5], [0.0, 0.8, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    position = v[..., 0] * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return anchors[low] * (1 - frac) + anchors[low + 1] * frac


def render_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, threshold: float = float("nan"), alpha: float = 0.45
) -> np.ndarray:
    """Side by side: the image, and the heatmap blended over it with the thresholded region outlined in white.

    Args:
        image: ``(C, H, W)`` in [0, 1] (1 or 3 channels), rows first (the layout of the 2D chain).
        anomaly_map: ``(H, W)`` raw map; shown scaled so the threshold (when known) sits at 0.5.
        threshold: the saved anomaly threshold; NaN draws no outline and scales to the map's own range.

    Returns an ``(H, 2W, 3)`` uint8 array.
    """
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
    rgb = np.transpose(rgb, (1, 2, 0))
    amap = anomaly_map
    if math.isfinite(threshold) and threshold > 0:
        scaled = amap / (2.0 * threshold)
    else:
        span = float(amap.max() - amap.min())
        scaled = (amap - amap.min()) / span if span > 0 else np.zeros_like(amap)
    blended = (1 - alpha) * rgb + alpha * heat_colormap(scaled)
    if math.isfinite(threshold):
        region = amap >= threshold
        edge = region & ~ndimage.binary_erosion(region, iterations=1)
        blended[edge] = 1.0
    return (np.concatenate([rgb, blended], axis=1) * 255).round().astype(np.uint8)


def save_png(path: str, array: np.ndarray) -> None:
    """Saves a uint8 ``(H, W[, 3])`` array as PNG, creating folders and writing through a temporary file."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


class NetworkOverlays:
    """Renders :func:`render_overlay` images of a network's outputs: a normalised ``(C, H, W)`` image tensor
    (``mean``/``std`` undone for display) and its ``(1, H, W)`` map, outlined at the network's saved threshold."""

    def __init__(self, network: torch.nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        self.network = network
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, image: torch.Tensor, anomaly_map: torch.Tensor) -> np.ndarray:
        rgb = np.clip(image.float().numpy() * self.std + self.mean, 0, 1)
        return render_overlay(rgb, anomaly_map[0].float().numpy(), float(self.network.threshold))
