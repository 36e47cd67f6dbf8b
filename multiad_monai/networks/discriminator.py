"""The Multi-AD feature discriminators: they tell teacher features (real) from student features (fake)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm

__all__ = ["FeatureDiscriminator", "MultiLevelDiscriminator", "feature_discriminator"]

FeatureLevels = torch.Tensor | Sequence[torch.Tensor]


class FeatureDiscriminator(nn.Module):
    """3x3 convolutions (128-256-512-1024 channels) with BN, LeakyReLU and dropout, then global pooling
    and a fully connected layer.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the feature level it judges.
        channels: output channels of the convolutions.
        strides: stride of each convolution (the deepest level is small: 8x8 for a 256 px input).
        dropout: dropout after each convolution.
        negative_slope: LeakyReLU slope.
        spectral_norm: spectral normalisation of every convolution and of the classifier, in place of batch
            norm (which would undo the Lipschitz bound), so that its logits follow its input smoothly. The plain
            discriminator wins within a few epochs (its loss near 0.005); on raw features a bounded one wins too,
            on their length (see ``normalize_features``).
        level: the level judged when ``forward`` is given all levels (default the deepest, as in the paper).
        normalize_features: judge features scaled to unit length at every position. The distillation loss and
            the map see only the direction of the feature vectors (cosine); on raw features the discriminator
            wins on their length alone, and its gradient then corrects a length that no map uses.

    Input ``(B, in_channels, h, w[, d])``, or the list of all feature levels; output logits ``(B, 1)``;
    ``torch.sigmoid`` of them is the paper's probability "real". Losses use the logits
    (``BCEWithLogitsLoss``) for numerical stability.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 320,
        channels: Sequence[int] = (128, 256, 512, 1024),
        strides: Sequence[int] = (2, 1, 2, 1),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
        spectral_norm: bool = False,
        level: int = -1,
        normalize_features: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels and strides need the same length, got {channels} and {strides}.")
        self.level = level
        self.normalize_features = normalize_features
        layers = []
        for out_channels, stride in zip(channels, strides):
            block = Convolution(
                spatial_dims,
                in_channels,
                out_channels,
                strides=stride,
                kernel_size=3,
                act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
                norm=None if spectral_norm else "batch",
                dropout=dropout,
            )
            if spectral_norm:
                with_spectral_norm(block.conv)
            layers.append(block)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.classifier = nn.Linear(in_channels, 1)
        if spectral_norm:
            with_spectral_norm(self.classifier)

    def forward(self, features: FeatureLevels) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            features = features[self.level]
        if self.normalize_features:
            features = F.normalize(features, dim=1)
        return self.classifier(self.pool(self.features(features)).flatten(1))


class MultiLevelDiscriminator(nn.Module):
    """One :class:`FeatureDiscriminator` per judged feature level, so that the adversarial signal reaches the
    fine levels the anomaly map relies on, not only the deepest one.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of every feature level, finest first (the encoder's ``out_channels``).
        levels: indices of the judged levels (negative from the deepest).
        channels: output channels of each level's convolutions; half the paper's widths by default, which
            keeps four discriminators at about 1.7 times the cost of the paper's one (batch 16 at 256 px,
            forward and backward: 0.25 s against 0.15 s on 2 CPU cores; the paper's widths: 0.86 s).
        dropout, negative_slope, spectral_norm, normalize_features: as in :class:`FeatureDiscriminator`.

    Each level is brought down by stride-2 convolutions, one more per level above the deepest (at most one
    per convolution), so that every level ends on a grid as coarse as the deepest level's and the fine
    levels stay cheap to judge.

    Input: the list of all feature levels ``[(B, C_i, h_i, w_i[, d_i])]``; output logits ``(B, len(levels))``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: Sequence[int] = (24, 40, 112, 320),
        levels: Sequence[int] = (0, 1, 2, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        dropout: float = 0.3,
        negative_slope: float = 0.2,
        spectral_norm: bool = False,
        normalize_features: bool = False,
    ) -> None:
        super().__init__()
        num_levels = len(in_channels)
        indices = [level % num_levels if -num_levels <= level < num_levels else None for level in levels]
        if not indices or None in indices or len(set(indices)) != len(indices):
            raise ValueError(f"levels {list(levels)} must be distinct indices of the {num_levels} feature levels.")
        self.levels = indices
        self.discriminators = nn.ModuleList()
        for index in indices:
            halvings = min(len(channels), 2 + (num_levels - 1 - index))
            # the deepest level keeps the single-level discriminator's strides (2, 1, 2, 1)
            if halvings == 2 and len(channels) == 4:
                strides = [2, 1, 2, 1]
            else:
                strides = [2] * halvings + [1] * (len(channels) - halvings)
            self.discriminators.append(
                FeatureDiscriminator(
                    spatial_dims, in_channels[index], channels, strides, dropout, negative_slope, spectral_norm,
                    level=index, normalize_features=normalize_features,
                )
            )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([discriminator(features) for discriminator in self.discriminators], dim=1)


def feature_discriminator(
    in_channels: Sequence[int],
    levels: Sequence[int] = (-1,),
    spectral_norm: bool = False,
    normalize_features: bool = False,
    spatial_dims: int = 2,
) -> nn.Module:
    """The bundles' discriminator: the paper's :class:`FeatureDiscriminator` on the deepest level (``levels``
    ``[-1]``, the weights of models trained before the option existed), else a :class:`MultiLevelDiscriminator`.
    ``in_channels``: channels of every feature level, finest first."""
    levels = list(levels)
    options = {"spectral_norm": spectral_norm, "normalize_features": normalize_features}
    if levels == [-1] or levels == [len(in_channels) - 1]:
        return FeatureDiscriminator(spatial_dims, in_channels[-1], **options)
    return MultiLevelDiscriminator(spatial_dims, in_channels, levels, **options)
