"""Baseline anomaly scorers measured beside the model: the voxel brightness and a nearest-neighbour memory bank
of the frozen teacher's features (PatchCore-style). A model scoring below them does not earn its place."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from monai.utils import convert_to_tensor

__all__ = [
    "IntensityBaseline",
    "FeatureKNNBaseline",
    "INTENSITY_BASELINES",
    "FEATURE_KNN",
    "BASELINE_NAMES",
    "BASELINE_MAPS_KEY",
    "BASELINE_SCORES_KEY",
    "check_baseline_names",
]

INTENSITY_BASELINES = ("intensity_bright", "intensity_dark", "intensity_histogram")
FEATURE_KNN = "feature_knn"
BASELINE_NAMES = (*INTENSITY_BASELINES, FEATURE_KNN)
# engine output keys: name -> map (like ``anomaly_map``) and name -> scores (per image, or per slice of a volume)
BASELINE_MAPS_KEY, BASELINE_SCORES_KEY = "baseline_maps", "baseline_scores"


def check_baseline_names(names: Sequence[str], allowed: Sequence[str] = BASELINE_NAMES) -> tuple[str, ...]:
    """``names`` as a tuple; raises ValueError naming the unknown ones."""
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(allowed)}.")
    return tuple(names)


class IntensityBaseline:
    """Voxel brightness scores of images in [0, 1] (after the intensity preset; one channel, or the channel mean).

    Maps: ``intensity_bright`` (the value), ``intensity_dark`` (1 - value) and ``intensity_histogram``
    (-log of the probability of the value's bin under the histogram of normal foreground voxels seen by
    :meth:`update`; it knows nothing about lesion polarity, only that the value is rare in normal tissue).

    Args:
        bins: histogram bins over [0, 1]; values outside are counted in the end bins.
        pseudo_count: added to every bin, so that an unseen value gets a large but finite score.
        channel: the image channel whose brightness is scored (e.g. FLAIR of FLAIR + T1c, or the centre slice
            of a 2.5D input); None: the mean of all channels.
    """

    def __init__(self, bins: int = 256, pseudo_count: float = 1.0, channel: int | None = None) -> None:
        if bins < 2 or pseudo_count <= 0:
            raise ValueError(f"bins must be at least 2 and pseudo_count positive, got {bins} and {pseudo_count}.")
        self.bins = bins
        self.pseudo_count = pseudo_count
        self.channel = channel
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(self.bins, dtype=torch.float64)

    @property
    def is_fitted(self) -> bool:
        return bool(self.counts.sum() > 0)

    def _brightness(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, *spatial)`` brightness of ``image`` ``(C, *spatial)``."""
        image = torch.as_tensor(image).float()
        if self.channel is None:
            return image.mean(dim=0, keepdim=True)
        if not 0 <= self.channel < image.shape[0]:
            raise ValueError(f"intensity channel {self.channel} does not exist in an image of {image.shape[0]} channels.")
        return image[self.channel : self.channel + 1]

    def _bin_index(self, values: torch.Tensor) -> torch.Tensor:
        return (values.clamp(0.0, 1.0) * self.bins).long().clamp_(max=self.bins - 1)

    def update(self, image: torch.Tensor, foreground: torch.Tensor | None = None) -> None:
        """Count the normal voxels of ``image`` ``(C, *spatial)`` inside ``foreground`` ``(1, *spatial)`` (all when None)."""
        values = self._brightness(image)[0]
        if foreground is not None:
            values = values[torch.as_tensor(foreground).any(dim=0) > 0]
        self.counts += torch.bincount(self._bin_index(values.reshape(-1).cpu()), minlength=self.bins).double()

    def __call__(
        self, image: torch.Tensor, foreground: torch.Tensor | None = None, names: Sequence[str] = INTENSITY_BASELINES
    ) -> dict[str, torch.Tensor]:
        """Maps ``(1, *spatial)`` float32 of ``image`` ``(C, *spatial)``, zero outside ``foreground`` when given."""
        names = check_baseline_names(names, INTENSITY_BASELINES)
        values = self._brightness(image).cpu()
        maps = {}
        if "intensity_bright" in names:
            maps["intensity_bright"] = values.clone()
        if "intensity_dark" in names:
            maps["intensity_dark"] = 1.0 - values
        if "intensity_histogram" in names:
            if not self.is_fitted:
                raise RuntimeError("intensity_histogram needs the normal-tissue histogram: call update() on training data first.")
            probability = (self.counts + self.pseudo_count) / (self.counts.sum() + self.pseudo_count * self.bins)
            maps["intensity_histogram"] = (-probability.log()).float()[self._bin_index(values)]
        if foreground is not None:
            inside = (torch.as_tensor(foreground).cpu() > 0).any(dim=0, keepdim=True)
            maps = {name: amap * inside for name, amap in maps.items()}
        return maps


class FeatureKNNBaseline(nn.Module):
    """Distance of each patch's frozen teacher features to the nearest patch of normal training images.

    Features: the teacher's outputs at ``levels`` (default 1 and 2: strides 8 and 16 of the 4-level
    EfficientNet-Lite teacher), each averaged over ``pool_size`` x ``pool_size`` neighbours (PatchCore's
    local context), the coarser ones upsampled to the finest of them and concatenated. The memory bank is a
    seeded uniform random sample of at most ``memory_size`` patches of all normal patches seen by
    :meth:`update` (kept by the smallest random keys, so memory stays bounded while fitting). PatchCore's
    greedy coreset would cover rare patches better but costs minutes on a CPU.

    Args:
        teacher: frozen encoder, ``(B, 3, H, W) -> list of (B, C_i, H / s_i, W / s_i)``; kept in eval mode.
        levels: indices of the teacher outputs used.
        memory_size: largest number of patches kept.
        pool_size: odd size of the average pooling of each level.
        sigma: Gaussian smoothing of the map, pixels of the input (0: none), as the model's map.
        seed: seed of the patch sampling.
        chunk_size: query patches per ``torch.cdist`` call (bounds memory to ``chunk_size * memory_size`` floats).
        fit_data: what :meth:`fit` reads when given nothing: batches ``(B, 3, H, W)`` or dicts holding them
            under ``image_key`` (e.g. a DataLoader of the normal training images, normalised like the test images).
        image_key: key of the images in dict batches.

    ``forward(images (B, 3, H, W))`` returns the distance map ``(B, 1, H, W)``, upsampled bilinearly and smoothed.
    """

    def __init__(
        self,
        teacher: nn.Module,
        levels: Sequence[int] = (1, 2),
        memory_size: int = 10000,
        pool_size: int = 3,
        sigma: float = 4.0,
        seed: int = 0,
        chunk_size: int = 4096,
        fit_data: Iterable | None = None,
        image_key: str = "image",
    ) -> None:
        super().__init__()
        if memory_size < 1 or chunk_size < 1 or pool_size < 1 or pool_size % 2 == 0 or not levels:
            raise ValueError("memory_size and chunk_size must be positive, pool_size odd and levels not empty.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.levels = tuple(levels)
        self.memory_size = memory_size
        self.pool_size = pool_size
        self.smooth = GaussianFilter(spatial_dims=2, sigma=sigma) if sigma > 0 else None
        self.seed = seed
        self.chunk_size = chunk_size
        self.fit_data = fit_data
        self.image_key = image_key
        self.reset()

    def train(self, mode: bool = True) -> FeatureKNNBaseline:
        super().train(mode)
        self.teacher.eval()  # BN statistics of the pretrained teacher must never move
        return self

    def reset(self) -> None:
        self.memory: torch.Tensor | None = None  # (M, D) on the teacher's device after fit
        self._keys = torch.zeros(0)
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def is_fitted(self) -> bool:
        return self.memory is not None and self.memory.shape[0] > 0

    def _device(self) -> torch.device:
        parameter = next(self.teacher.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, concatenated teacher features ``(B, D, h, w)`` at the finest of ``levels``."""
        with torch.inference_mode():
            images = convert_to_tensor(images, track_meta=False).to(self._device(), torch.float32)
            outputs = self.teacher(images)
            selected = [
                F.avg_pool2d(outputs[i], self.pool_size, stride=1, padding=self.pool_size // 2, count_include_pad=False)
                for i in self.levels
            ]
            size = max((f.shape[2:] for f in selected), key=lambda s: s[0] * s[1])
            selected = [f if f.shape[2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in selected]
            return torch.cat(selected, dim=1)

    def update(self, images: torch.Tensor) -> None:
        """Add the patches of normal images ``(B, 3, H, W)`` to the candidates of the memory bank."""
        features = self.patch_features(images)
        patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float().cpu()
        keys = torch.rand(patches.shape[0], generator=self._generator)
        memory = patches if self.memory is None else torch.cat([self.memory.cpu(), patches])
        keys = torch.cat([self._keys, keys])
        if keys.numel() > self.memory_size:
            keep = keys.topk(self.memory_size, largest=False).indices
            memory, keys = memory[keep], keys[keep]
        self.memory, self._keys = memory.contiguous(), keys

    def fit(self, batches: Iterable | None = None) -> FeatureKNNBaseline:
        """Build the memory bank from ``batches`` (or ``fit_data``): image tensors or dicts of them."""
        batches = self.fit_data if batches is None else batches
        if batches is None:
            raise ValueError("FeatureKNNBaseline.fit needs normal training images (batches or fit_data).")
        self.reset()
        for batch in batches:
            self.update(batch[self.image_key] if isinstance(batch, dict) else batch)
        if not self.is_fitted:
            raise ValueError("FeatureKNNBaseline.fit got no images.")
        self.memory = self.memory.to(self._device())
        return self

    def nearest_distances(self, patches: torch.Tensor) -> torch.Tensor:
        """Euclidean distance ``(N,)`` of each patch ``(N, D)`` to its nearest memory patch, in chunks."""
        if not self.is_fitted:
            raise RuntimeError("FeatureKNNBaseline has no memory bank: call fit() on normal training images first.")
        memory = self.memory.to(patches.device)
        return torch.cat([torch.cdist(chunk, memory).amin(dim=1) for chunk in patches.split(self.chunk_size)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.patch_features(images)
        batch, channels, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(-1, channels).float()
        with torch.inference_mode():
            distances = self.nearest_distances(patches).reshape(batch, 1, height, width)
            maps = F.interpolate(distances, size=images.shape[2:], mode="bilinear", align_corners=False)
            return self.smooth(maps) if self.smooth is not None else maps
