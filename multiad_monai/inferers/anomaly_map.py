"""From teacher/student feature pairs to one smoothed anomaly map and an image score."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from multiad_monai.networks.fusion import LearnedFusion

__all__ = ["AnomalyMapGenerator", "cosine_distance_maps", "image_score"]

FUSION_MODES = ("mean", "product", "learned")


def cosine_distance_maps(
    teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
) -> torch.Tensor:
    """Per-level ``1 - cos(teacher, student)`` over channels, upsampled to ``size``: ``(B, L, *size)``."""
    mode = "bilinear" if len(size) == 2 else "trilinear"
    maps = [
        F.interpolate(1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1), size=list(size), mode=mode, align_corners=False)
        for t, s in zip(teacher_features, student_features)
    ]
    return torch.cat(maps, dim=1)


def image_score(anomaly_map: torch.Tensor, mode: str = "max", topk_ratio: float = 0.01) -> torch.Tensor:
    """Image score from ``(B, 1, *spatial)`` maps: the maximum, or the mean of the top ``topk_ratio`` pixels. ``(B,)``."""
    flat = anomaly_map.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "topk":
        k = max(1, int(round(flat.shape[1] * topk_ratio)))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown score mode {mode!r}; use 'max' or 'topk'.")


class AnomalyMapGenerator(nn.Module):
    """Fuses per-scale cosine-distance maps and smooths them with a Gaussian.

    Args:
        spatial_dims: 2 or 3.
        num_levels: number of feature levels L.
        fusion: ``"mean"`` (average of levels), ``"product"`` (product of levels, as STFPM) or
            ``"learned"`` (the paper's 1x1 conv + BN + ReLU head, :class:`LearnedFusion`).
        sigma: Gaussian smoothing in pixels of the input; 0 disables it.
        levels: indices of the levels used in the map (default all).

    ``forward(teacher_features, student_features, size)`` returns ``(B, 1, *size)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        num_levels: int = 4,
        fusion: str = "mean",
        sigma: float = 4.0,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {FUSION_MODES}.")
        self.levels = list(range(num_levels)) if levels is None else list(levels)
        if not self.levels or any(not 0 <= i < num_levels for i in self.levels):
            raise ValueError(f"levels must be indices below num_levels={num_levels}, got {levels}.")
        self.fusion = fusion
        self.fusion_head = LearnedFusion(spatial_dims, len(self.levels)) if fusion == "learned" else None
        self.smooth = GaussianFilter(spatial_dims, sigma) if sigma > 0 else nn.Identity()

    def level_maps(
        self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        """The per-level maps that are fused: ``(B, len(levels), *size)``."""
        return cosine_distance_maps(
            [teacher_features[i] for i in self.levels], [student_features[i] for i in self.levels], size
        )

    def fuse(self, level_maps: torch.Tensor) -> torch.Tensor:
        if self.fusion == "mean":
            fused = level_maps.mean(dim=1, keepdim=True)
        elif self.fusion == "product":
            fused = level_maps.prod(dim=1, keepdim=True)
        else:
            fused = self.fusion_head(level_maps)
        return self.smooth(fused)

    def forward(
        self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        return self.fuse(self.level_maps(teacher_features, student_features, size))
