"""Caches the frozen teacher's features with the data, so training skips the teacher's forward pass."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["TeacherFeaturesd"]


class TeacherFeaturesd(MapTransform):
    """Adds ``output_key``: the teacher's feature list for one channel-first image ``(C, H, W[, D])``,
    each level ``(C_i, h_i, w_i[, d_i])``, stored as ``dtype`` on the CPU.

    Placed last among the deterministic transforms of a ``CacheDataset``, the teacher runs once per
    image for the whole training. Only valid when no random transform changes the image afterwards.

    Args:
        keys: the image key.
        teacher: the frozen encoder (put in eval mode here).
        output_key: where the features go.
        dtype: storage type; float16 halves the cache (the cosine loss is insensitive to it).
        device: where the teacher runs.
    """

    def __init__(
        self,
        keys: str = "image",
        teacher: torch.nn.Module | None = None,
        output_key: str = "teacher_features",
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(keys)
        if teacher is None:
            raise ValueError("TeacherFeaturesd needs the teacher network.")
        self.teacher = teacher.eval()
        self.output_key = output_key
        self.dtype = dtype
        self.device = torch.device(device)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.keys[0]]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        image = image.float().unsqueeze(0).to(self.device)
        with torch.inference_mode():
            features = self.teacher(image)
        d[self.output_key] = [f[0].to("cpu", self.dtype) for f in features]
        return d
