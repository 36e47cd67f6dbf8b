"""Statistics of the per-level maps on normal training images: per pixel for ``level_normalization="pixel"``,
per level for ``"level"``."""

from __future__ import annotations

import torch
import torch.distributed as dist

from multiad_monai.engines.utils import to_device
from multiad_monai.handlers.periodic_refit import PeriodicRefitHandler

__all__ = ["NormalStatisticsHandler", "fit_normal_statistics"]


def _normal_batches(network: torch.nn.Module, data_loader, device, max_images: int, cache: list | None, cache_bytes: int):
    """``(images, teacher features)`` of the first ``max_images`` images of ``data_loader``; from ``cache`` when it
    holds them, filling an empty ``cache`` on the way unless they would take more than ``cache_bytes``. Without a
    cache (or past its budget) the teacher features are None: the caller runs ``network.features``."""
    if cache:
        yield from cache
        return
    kept, size, count = ([] if cache is not None else None), 0, 0
    for batch in data_loader:
        images = to_device(batch["image"], torch.device(device), False, True)[: max_images - count]
        teacher = network.teacher(images) if kept is not None else None
        count += images.shape[0]
        if kept is not None:
            size += sum(t.numel() * t.element_size() for t in [images, *teacher])
            if size <= cache_bytes:
                kept.append((images, teacher))
            else:
                kept = None  # too large: not cached at all
        yield images, teacher
        if count >= max_images:
            break
    if kept:
        cache.extend(kept)


def fit_normal_statistics(
    network: torch.nn.Module,
    data_loader,
    device: str | torch.device = "cpu",
    max_images: int = 200,
    cache: list | None = None,
    cache_bytes: int = 1 << 30,
) -> int:
    """Sets ``network.map_generator``'s ``normal_mean`` / ``normal_std``: the mean and standard deviation of the
    raw level maps, per pixel (``level_normalization="pixel"``) or per level over all pixels (``"level"``),
    over the first ``max_images`` images of ``data_loader`` (per rank; summed over ranks when
    ``torch.distributed`` is initialised).

    The loader gives normal images without augmentation or synthetic defects, from the training split:
    the held-out validation images stay unseen, so the threshold estimated on them is not biased low.
    ``cache``: a list kept between fits (empty at first), where the images and the frozen teacher's features are
    kept after the first fit (up to ``cache_bytes``), so that later fits run only the student; for a loader that
    gives the same images every time, the statistics are those without it.
    Returns the number of images used.
    """
    generator = network.map_generator
    total, total_sq, count = None, None, 0
    was_training = network.training
    network.eval()
    with torch.no_grad():
        for images, teacher in _normal_batches(network, data_loader, device, max_images, cache, cache_bytes):
            teacher, student = network.features(images) if teacher is None else (teacher, network.student(images))
            maps = generator.raw_level_maps(teacher, student, images.shape[2:]).to("cpu", torch.float64)
            total = maps.sum(0) if total is None else total + maps.sum(0)
            total_sq = maps.square().sum(0) if total_sq is None else total_sq + maps.square().sum(0)
            count += maps.shape[0]
    network.train(was_training)
    if count == 0:
        raise ValueError("the normal-statistics loader gave no images.")
    values_per_image = 1
    if generator.level_normalization == "level":
        # one mean and spread per level over all pixels: no assumption on where the object lies in the frame
        values_per_image = total[0].numel()
        spatial = tuple(range(1, total.dim()))
        total, total_sq = total.sum(spatial, keepdim=True), total_sq.sum(spatial, keepdim=True)
    stacked = torch.stack([total, total_sq, torch.full_like(total, count * values_per_image)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)
    total, total_sq, n = stacked
    mean = total / n
    # unbiased variance; float64 sums keep the difference of squares exact enough
    variance = (total_sq - n * mean.square()).clamp_min(0) / (n - 1).clamp_min(1)
    generator.set_normal_statistics(mean.float(), variance.sqrt().float())
    return int(n.flatten()[0]) // values_per_image


class NormalStatisticsHandler(PeriodicRefitHandler):
    """Refits the normal statistics of the level maps every ``interval`` training epochs. Attach it before the
    ``FusionFitHandler`` and the ``ValidationHandler``, which then see normalised maps.

    Args:
        network: a :class:`MultiAD`; unless its map generator normalises its levels (``level_normalization``
            ``"pixel"`` or ``"level"``) the handler does nothing.
        data_loader: normal training images, no augmentation.
        interval: epochs between fits.
        max_images: images used per fit (per rank).
        cache_bytes: memory for keeping the images and the frozen teacher's features between fits (the loader must
            give the same images every time, as the bundles' does); 0: load and run the teacher at every fit.
    """

    def __init__(self, network, data_loader, interval: int = 1, max_images: int = 200, cache_bytes: int = 1 << 30) -> None:
        super().__init__(network, data_loader, interval)
        self.max_images = max_images
        self.cache_bytes = cache_bytes
        self._cache: list = []

    def applies(self) -> bool:
        return getattr(self.network.map_generator, "level_normalization", "none") != "none"

    def refit(self, device: torch.device | str) -> str:
        cache = self._cache if self.cache_bytes > 0 else None
        count = fit_normal_statistics(self.network, self.data_loader, device, self.max_images, cache, self.cache_bytes)
        std = self.network.map_generator.normal_std.flatten(1).median(dim=1).values
        return f"normal statistics refitted on {count} images; median std per level {[round(s, 4) for s in std.tolist()]}"
