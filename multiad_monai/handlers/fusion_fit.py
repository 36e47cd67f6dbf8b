"""Fits the paper's learned fusion head (1x1 conv + BN + ReLU) on synthetic defects of training images."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from multiad_monai.engines.utils import to_device
from multiad_monai.handlers.periodic_refit import PeriodicRefitHandler

__all__ = ["FusionFitHandler", "fit_learned_fusion"]


def fit_learned_fusion(
    network: torch.nn.Module,
    data_loader,
    device: str | torch.device = "cpu",
    max_images: int = 32,
    steps: int = 150,
    learning_rate: float = 0.05,
) -> float:
    """Fits ``network.map_generator.fusion_head`` as a per-pixel logistic regression on the per-level maps.

    The loader gives images with synthetic defects and their masks (e.g. ``validation_transforms_2d`` over
    TRAINING images, never the validation or test set). The class-balanced BCE is taken on the head's
    pre-ReLU output; the ReLU then keeps only evidence for an anomaly. Returns the final loss.
    """
    head = network.map_generator.fusion_head
    if head is None:
        raise ValueError("the network's map generator has no learned fusion head (fusion != 'learned').")
    level_maps, masks = [], []
    network.eval()
    with torch.no_grad():
        for batch in data_loader:
            images = to_device(batch["image"], torch.device(device), False, True)
            teacher, student = network.features(images)
            level_maps.append(network.map_generator.level_maps(teacher, student, images.shape[2:]).cpu())
            masks.append(to_device(batch["mask"], torch.device("cpu"), False, False))
            if sum(m.shape[0] for m in masks) >= max_images:
                break
    level_maps, masks = torch.cat(level_maps)[:max_images], torch.cat(masks)[:max_images]
    positives = float(masks.sum())
    if positives == 0:
        raise ValueError("the fusion-fitting images hold no defect pixels: give a loader with synthetic defects.")
    pos_weight = torch.tensor((masks.numel() - positives) / positives)
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    head.train()
    for _ in range(steps):
        logits = head.norm(head.conv(level_maps))
        loss = F.binary_cross_entropy_with_logits(logits, masks, pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    return float(loss)


class FusionFitHandler(PeriodicRefitHandler):
    """Refits the learned fusion head every ``interval`` training epochs (attach it before the
    ``ValidationHandler`` so validation scores the refitted head).

    Args:
        network: a :class:`MultiAD` with ``fusion="learned"``; without a learned head the handler does nothing.
        data_loader: images with synthetic defects and masks, made from training images.
        interval: epochs between fits.
        max_images, steps, learning_rate: see :func:`fit_learned_fusion`.
    """

    def __init__(self, network, data_loader, interval: int = 1, max_images: int = 32, steps: int = 150, learning_rate: float = 0.05) -> None:
        super().__init__(network, data_loader, interval)
        self.kwargs = {"max_images": max_images, "steps": steps, "learning_rate": learning_rate}

    def applies(self) -> bool:
        return self.network.map_generator.fusion_head is not None

    def refit(self, device: torch.device | str) -> str:
        loss = fit_learned_fusion(self.network, self.data_loader, device, **self.kwargs)
        weights = self.network.map_generator.fusion_head.conv.weight.flatten().tolist()
        return f"learned fusion refitted: loss {loss:.4f}, level weights {[round(w, 3) for w in weights]}"
