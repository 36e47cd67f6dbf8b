"""Fusion of per-scale anomaly maps into one map."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv, Norm

__all__ = ["LearnedFusion"]


class LearnedFusion(nn.Module):
    """The paper's learned fusion: 1x1 convolution over the stacked per-scale maps, BN, ReLU.

    Initialised to the mean of the scales (weights 1/L, zero bias) with an identity-like BN, so an
    untrained head equals ``mode="mean"`` fusion; :func:`multiad_monai.engines.fit_fusion` trains it.

    Args:
        spatial_dims: 2 or 3.
        num_levels: number of per-scale maps L.

    Input ``(B, L, H, W[, D])``; output ``(B, 1, H, W[, D])``, non-negative.
    """

    def __init__(self, spatial_dims: int = 2, num_levels: int = 4) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](num_levels, 1, kernel_size=1)
        self.norm = Norm[Norm.BATCH, spatial_dims](1, affine=True)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / num_levels)
            self.conv.bias.zero_()

    def forward(self, level_maps: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(level_maps)))
