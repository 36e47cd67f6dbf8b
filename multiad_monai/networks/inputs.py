"""Input normalisation each pretrained teacher expects, for the preprocessing chain."""

from __future__ import annotations

from multiad_monai.networks.efficientnet_lite import LITE_INPUT_MEAN, LITE_INPUT_STD
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["input_mean", "input_std"]

_STATS = {
    "efficientnet-lite0": (LITE_INPUT_MEAN, LITE_INPUT_STD),
    "efficientnet-lite1": (LITE_INPUT_MEAN, LITE_INPUT_STD),
    "efficientnet-lite2": (LITE_INPUT_MEAN, LITE_INPUT_STD),
    "se-resnet50": (IMAGENET_MEAN, IMAGENET_STD),
}


def _stats(teacher_name: str) -> tuple:
    if teacher_name not in _STATS:
        raise ValueError(f"unknown teacher {teacher_name!r}; known: {sorted(_STATS)}.")
    return _STATS[teacher_name]


def input_mean(teacher_name: str) -> list[float]:
    """Channel means (images in [0, 1]) used when the teacher was trained."""
    return list(_stats(teacher_name)[0])


def input_std(teacher_name: str) -> list[float]:
    """Channel standard deviations (images in [0, 1]) used when the teacher was trained."""
    return list(_stats(teacher_name)[1])
