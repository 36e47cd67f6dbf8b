"""The paper's SE-ResNet50 encoder: MONAI's SENet with SE after the stem and dilated 3x3 convolutions.

Multi-AD's teacher and student are an SE-ResNet50 with squeeze-and-excitation after the stem and
after every bottleneck, and dilated 3x3 convolutions; features are tapped after each of the four
bottleneck stages (strides 4, 8, 16, 32). Parameter names follow MONAI's ``SEResNet50`` so its
ImageNet weights load directly (``weights="imagenet"`` downloads them through MONAI; a local file
saved from ``monai.networks.nets.SEResNet50(pretrained=True).state_dict()`` works offline).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import ChannelSELayer, SEBlock
from monai.networks.blocks.convolutions import Convolution
from monai.networks.layers.factories import Norm
from monai.networks.nets import SENet, SEResNet50

__all__ = ["SEResNetEncoder", "DilatedSEResNetBottleneck", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DilatedSEResNetBottleneck(SEBlock):
    """SE-ResNet bottleneck (stride in the first 1x1 conv, as MONAI's ``SEResNetBottleneck``) whose 3x3
    convolution is dilated; the SE layer sits at the end of the block, before the residual sum."""

    expansion = 4

    def __init__(
        self,
        spatial_dims: int,
        inplanes: int,
        planes: int,
        groups: int,
        reduction: int,
        stride: int = 1,
        downsample: Convolution | None = None,
        dilation: int = 1,
    ) -> None:
        common = {"norm": Norm.BATCH, "bias": False}
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=inplanes,
            n_chns_1=planes,
            n_chns_2=planes,
            n_chns_3=planes * self.expansion,
            conv_param_1={"strides": stride, "kernel_size": 1, "act": ("relu", {"inplace": True}), **common},
            conv_param_2={
                "strides": 1,
                "kernel_size": 3,
                "dilation": dilation,
                "padding": dilation,
                "act": ("relu", {"inplace": True}),
                "groups": groups,
                **common,
            },
            conv_param_3={"strides": 1, "kernel_size": 1, "act": None, **common},
            project=downsample,
            r=reduction,
        )


class SEResNetEncoder(SENet):
    """SE-ResNet feature encoder (SE-ResNet50 by default) returning features at strides 4, 8, 16, 32.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        layers: bottleneck blocks per stage; (3, 4, 6, 3) is SE-ResNet50.
        dilations: dilation of the 3x3 convolution in each of the four stages.
        reduction: SE reduction ratio.
        stem_se: add squeeze-and-excitation after the stem (the paper's design). It has no ImageNet
            weights, so a pretrained teacher usually sets it False.
        weights: ``None`` (random), ``"imagenet"`` (MONAI's download; needs internet) or a path to a
            MONAI-format ``SEResNet50`` state dict.
        width_divisor: divide all widths by this for a lighter student (1 = SE-ResNet50 widths).

    Input ``(B, in_channels, H, W[, D])``; output four feature maps ``(B, C_i, H / s_i, W / s_i[, D / s_i])``
    with ``C_i`` = ``out_channels`` (256, 512, 1024, 2048 for SE-ResNet50).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        layers: Sequence[int] = (3, 4, 6, 3),
        dilations: Sequence[int] = (2, 2, 2, 2),
        reduction: int = 16,
        stem_se: bool = True,
        weights: str | None = None,
        width_divisor: int = 1,
    ) -> None:
        if len(dilations) != 4 or len(layers) != 4:
            raise ValueError(f"layers and dilations need one entry per stage (4), got {layers} and {dilations}.")
        # SENet builds its stages inside its constructor; _make_layer reads the dilation of each stage from here.
        self._stage_dilations = list(dilations)
        self._width_divisor = width_divisor
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            block=DilatedSEResNetBottleneck,
            layers=layers,
            groups=1,
            reduction=reduction,
            dropout_prob=None,
            inplanes=64 // width_divisor,
            downsample_kernel_size=1,
            input_3x3=False,
        )
        del self.adaptive_avg_pool, self.last_linear, self.dropout
        self.stem_se = ChannelSELayer(spatial_dims, 64 // width_divisor, r=reduction) if stem_se else nn.Identity()
        self.out_channels = [64 // width_divisor * 4 * 2**i for i in range(4)]
        if weights is not None:
            if width_divisor != 1 or tuple(layers) != (3, 4, 6, 3) or spatial_dims != 2 or in_channels != 3:
                raise ValueError("ImageNet SE-ResNet50 weights need the default layers, widths, spatial_dims=2 and 3 channels.")
            load_seresnet50_weights(self, weights)

    def _make_layer(self, block, planes, blocks, groups, reduction, stride=1, downsample_kernel_size=1):
        planes = planes // self._width_divisor
        dilation = self._stage_dilations.pop(0)
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Convolution(
                spatial_dims=self.spatial_dims,
                in_channels=self.inplanes,
                out_channels=planes * block.expansion,
                strides=stride,
                kernel_size=downsample_kernel_size,
                act=None,
                norm=Norm.BATCH,
                bias=False,
            )
        stage = [block(self.spatial_dims, self.inplanes, planes, groups, reduction, stride, downsample, dilation)]
        self.inplanes = planes * block.expansion
        stage += [block(self.spatial_dims, self.inplanes, planes, groups, reduction, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem_se(self.layer0(x))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def load_seresnet50_weights(encoder: SEResNetEncoder, weights: str) -> None:
    """Load ImageNet SE-ResNet50 weights into ``encoder`` from MONAI's download or a local state-dict file.

    Every tensor of the backbone must be found with its shape; only the stem SE (not part of
    SE-ResNet50) keeps its initialisation.
    """
    if weights == "imagenet":
        source = SEResNet50(spatial_dims=2, in_channels=3, pretrained=True).state_dict()
        origin = "MONAI's SE-ResNet50 ImageNet download"
    else:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"SE-ResNet50 weights file not found: {weights}")
        try:
            source = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read SE-ResNet50 weights from {weights}: {e}") from e
        if isinstance(source, dict) and "state_dict" in source:
            source = source["state_dict"]
        origin = weights
    target = encoder.state_dict()
    backbone_keys = [k for k in target if not k.startswith("stem_se.")]
    bad = [k for k in backbone_keys if k not in source or source[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"{origin} is not a MONAI SE-ResNet50 state dict: {len(bad)} tensors missing or mis-shaped, e.g. {bad[:3]}")
    target.update({k: source[k] for k in backbone_keys})
    encoder.load_state_dict(target)
