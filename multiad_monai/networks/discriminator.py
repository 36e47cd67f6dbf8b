"""The Multi-AD feature discriminator: tells teacher features (real) from student features (fake)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool

__all__ = ["FeatureDiscriminator"]


class FeatureDiscriminator(nn.Module):
    """3x3 convolutions (128-256-512-1024 channels) with BN, LeakyReLU and dropout, then global pooling
    and a fully connected layer.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the deepest feature level it judges.
        channels: output channels of the convolutions.
        strides: stride of each convolution (the deepest level is small: 8x8 for a 256 px input).
        dropout: dropout after each convolution.
        negative_slope: LeakyReLU slope.

    Input ``(B, in_channels, h, w[, d])``; output logits ``(B, 1)``; ``torch.sigmoid`` of them is the
    paper's probability "real". Losses use the logits (``BCEWithLogitsLoss``) for numerical stability.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 320,
        channels: Sequence[int] = (128, 256, 512, 1024),
        strides: Sequence[int] = (2, 1, 2, 1),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels and strides need the same length, got {channels} and {strides}.")
        layers = []
        for out_channels, stride in zip(channels, strides):
            layers.append(
                Convolution(
                    spatial_dims,
                    in_channels,
                    out_channels,
                    strides=stride,
                    kernel_size=3,
                    act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
                    norm="batch",
                    dropout=dropout,
                )
            )
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.classifier = nn.Linear(in_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(features)).flatten(1))
