"""Folding what runs beside the convolutions into them, for inference: frozen batch norms and zero padding.

In eval mode a batch norm is a per-channel affine map, so a convolution followed by one equals a single
convolution with rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``); and a symmetric
zero padding before a convolution is the convolution's own ``padding``, which it applies without copying its
input. The folded encoder computes the same features (to float rounding) with fewer passes over its activations.
"""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.padding import _ConstantPadNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batch_norms", "fold_zero_padding"]

# MONAI's EfficientNet and MBConvBlock call these by name in their forward, each norm right after its convolution
_NAMED_PAIRS = (("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def fold_batch_norms(module: nn.Module) -> int:
    """Folds every batch norm of ``module`` that directly follows a convolution into it, in place; the norm
    becomes ``nn.Identity``. Returns the number folded.

    Recognised: MONAI's EfficientNet(-Lite) blocks (``_depthwise_conv`` then ``_bn1`` and the like), and in any
    ``nn.Sequential`` a convolution followed by a batch norm or by a sequence that starts with one (MONAI's
    ``Convolution`` with its ``ADN``, as in SE-ResNet). The module must be in eval mode (its norms use their
    running statistics); the folded module has other weights (``state_dict`` keys), so it is for inference only.

    Raises:
        ValueError: when a batch norm to fold is in training mode.
    """
    folded = 0
    for parent in list(module.modules()):
        for conv_name, norm_name in _NAMED_PAIRS:
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if isinstance(conv, _ConvNd) and isinstance(norm, _BatchNorm):
                setattr(parent, conv_name, _folded(conv, norm))
                setattr(parent, norm_name, nn.Identity())
                folded += 1
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for name, next_name in zip(names, names[1:]):
                conv, follower = parent._modules[name], parent._modules[next_name]
                if not isinstance(conv, _ConvNd):
                    continue
                if isinstance(follower, _BatchNorm):
                    owner, norm_name = parent, next_name
                elif isinstance(follower, nn.Sequential) and len(follower) and isinstance(follower[0], _BatchNorm):
                    owner, norm_name = follower, next(iter(follower._modules))
                else:
                    continue
                parent._modules[name] = _folded(conv, owner._modules[norm_name])
                owner._modules[norm_name] = nn.Identity()
                folded += 1
    return folded


def _folded(conv: _ConvNd, norm: _BatchNorm) -> _ConvNd:
    if norm.training or conv.training:
        raise ValueError("batch norms are folded in eval mode only (their running statistics are used): call .eval() first.")
    return fuse_conv_bn_eval(conv, norm)


def fold_zero_padding(module: nn.Module) -> int:
    """Moves every symmetric zero padding module named ``X_padding`` (MONAI's EfficientNet "same" padding) into
    the ``padding`` of the unpadded convolution ``X`` beside it, in place; the padding module becomes
    ``nn.Identity``. Asymmetric paddings (TensorFlow's "same" for even sizes at stride 2) stay. Returns the
    number folded.
    """
    folded = 0
    for parent in list(module.modules()):
        for name in list(parent._modules):
            if not name.endswith("_padding"):
                continue
            pad, conv = parent._modules[name], parent._modules.get(name[: -len("_padding")])
            if not (isinstance(pad, _ConstantPadNd) and isinstance(conv, _ConvNd) and pad.value == 0 and conv.padding_mode == "zeros"):
                continue
            spatial_dims = len(conv.kernel_size)
            # the padding module lists (before, after) per dimension from the last one; convolutions from the first
            pairs = [pad.padding[2 * i : 2 * i + 2] for i in range(len(pad.padding) // 2)][::-1]
            if len(pairs) != spatial_dims or any(before != after for before, after in pairs) or any(conv.padding):
                continue
            conv.padding = tuple(before for before, _ in pairs)
            parent._modules[name] = nn.Identity()
            folded += 1
    return folded
