"""Forward knowledge-distillation loss between teacher and student feature pyramids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CosineDistillationLoss"]


class CosineDistillationLoss(nn.Module):
    """Sum over levels of ``mean(1 - cos(teacher, student))``, the cosine taken over channels at every position.

    Args:
        level_weights: weight of each level (default 1 each).

    ``forward(teacher_features, student_features)``: two lists of L tensors ``(B, C_i, *spatial_i)``;
    returns a scalar.
    """

    def __init__(self, level_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]

    def forward(self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(teacher_features) != len(student_features):
            raise ValueError(f"{len(teacher_features)} teacher levels but {len(student_features)} student levels.")
        weights = self.level_weights or [1.0] * len(teacher_features)
        if len(weights) != len(teacher_features):
            raise ValueError(f"{len(weights)} level weights for {len(teacher_features)} levels.")
        loss = teacher_features[0].new_zeros(())
        for weight, t, s in zip(weights, teacher_features, student_features):
            loss = loss + weight * (1.0 - F.cosine_similarity(t.float(), s.float(), dim=1)).mean()
        return loss
