"""Adversarial losses of Multi-AD: the discriminator tells teacher (real) from student (fake) features."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DiscriminatorLoss", "StudentAdversarialLoss"]


class DiscriminatorLoss(nn.Module):
    """BCE of the discriminator: teacher features labelled 1 (real), student features 0 (fake).

    ``forward(real_logits, fake_logits)`` with logits ``(B, 1)``; returns the mean of both BCE terms.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        real = self.bce(real_logits, torch.ones_like(real_logits))
        fake = self.bce(fake_logits, torch.zeros_like(fake_logits))
        return 0.5 * (real + fake)


class StudentAdversarialLoss(nn.Module):
    """BCE pushing the discriminator to call student features real (the non-saturating generator loss).

    ``forward(fake_logits)`` with logits ``(B, 1)``; returns a scalar.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, fake_logits: torch.Tensor) -> torch.Tensor:
        return self.bce(fake_logits, torch.ones_like(fake_logits))
