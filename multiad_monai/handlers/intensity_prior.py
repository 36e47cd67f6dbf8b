"""Fits the normal statistics of the intensity prior (:class:`~multiad_monai.networks.IntensityPrior`)."""

from __future__ import annotations

import numpy as np
import torch

from multiad_monai.engines.utils import to_device
from multiad_monai.handlers.periodic_refit import PeriodicRefitHandler

__all__ = ["IntensityPriorHandler", "fit_intensity_prior"]


def fit_intensity_prior(
    network: torch.nn.Module,
    data_loader,
    device: str | torch.device = "cpu",
    max_images: int = 64,
    foreground_key: str = "foreground",
    max_pixels_per_image: int = 20000,
    seed: int = 0,
) -> int:
    """Sets ``network.intensity_prior``'s statistics from normal training images: the median and the tail
    quantiles of their brightness and the upper quantile of the distillation map, over the pixels inside
    ``batch[foreground_key]`` when the batch has it (else all pixels), at most ``max_pixels_per_image`` per image
    (a seeded sample). Returns the number of images used.

    The loader gives normal training images without augmentation or synthetic defects; the held-out
    validation images stay unseen, so the threshold set on them afterwards is not biased low. Under
    ``torch.distributed`` every rank fits on its own images and DDP keeps rank 0's buffers.
    """
    prior = network.intensity_prior
    generator = np.random.default_rng(seed)
    map_values, brightness_values, count = [], [], 0
    was_training = network.training
    network.eval()
    with torch.no_grad():
        for batch in data_loader:
            images = to_device(batch["image"], torch.device(device), False, True)[: max_images - count]
            maps = network.distillation_map(images).cpu()
            brightness = prior.brightness(images).cpu()
            inside = batch.get(foreground_key) if isinstance(batch, dict) else None
            for index in range(images.shape[0]):
                keep = torch.ones_like(maps[index], dtype=torch.bool) if inside is None else torch.as_tensor(inside[index]).any(dim=0, keepdim=True) > 0
                values_map, values_brightness = maps[index][keep].numpy(), brightness[index][keep].numpy()
                if values_map.size > max_pixels_per_image:
                    chosen = generator.choice(values_map.size, max_pixels_per_image, replace=False)
                    values_map, values_brightness = values_map[chosen], values_brightness[chosen]
                map_values.append(values_map)
                brightness_values.append(values_brightness)
            count += images.shape[0]
            if count >= max_images:
                break
    network.train(was_training)
    if count == 0 or sum(v.size for v in map_values) == 0:
        raise ValueError("the intensity-prior loader gave no normal images (or none with foreground pixels).")
    map_values, brightness_values = np.concatenate(map_values), np.concatenate(brightness_values)
    q = prior.quantile
    low, median, high = np.quantile(brightness_values, [1 - q, 0.5, q])
    prior.set_statistics(float(np.quantile(map_values, q)), float(median), float(low), float(high))
    return count


class IntensityPriorHandler(PeriodicRefitHandler):
    """Refits the intensity prior every ``interval`` training epochs, before validation (attach it before the
    ``ValidationHandler``): the map reference follows the student, and the threshold is then set on the mixed map.

    Args:
        network: a :class:`~multiad_monai.networks.MultiAD`; unless it has an enabled intensity prior the
            handler does nothing.
        data_loader: normal training images, no augmentation.
        interval: epochs between fits.
        max_images: images used per fit.
    """

    def __init__(self, network, data_loader, interval: int = 1, max_images: int = 64) -> None:
        super().__init__(network, data_loader, interval)
        self.max_images = max_images

    def applies(self) -> bool:
        return getattr(self.network, "has_intensity_prior", False)

    def refit(self, device: torch.device | str) -> str:
        count = fit_intensity_prior(self.network, self.data_loader, device, self.max_images)
        prior = self.network.intensity_prior
        return (
            f"intensity prior refitted on {count} images: map reference {float(prior.map_reference):.4f}, brightness "
            f"median {float(prior.intensity_median):.3f} in [{float(prior.intensity_low):.3f}, {float(prior.intensity_high):.3f}]"
        )
