"""From teacher/student feature pairs to one smoothed anomaly map and an image score."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from multiad_monai.inferers.smoothing import GaussianSmoothing
from multiad_monai.networks.fusion import LearnedFusion

__all__ = ["AnomalyMapGenerator", "cosine_distance_maps", "image_score"]

FUSION_MODES = ("mean", "product", "learned")
LEVEL_NORMALIZATIONS = ("none", "level", "pixel")


def cosine_distance_maps(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    size: Sequence[int],
    upsample_features: bool = False,
) -> torch.Tensor:
    """Per-level ``1 - cos(teacher, student)`` over channels, upsampled to ``size``: ``(B, L, *size)``.

    With ``upsample_features`` the features of every level are first interpolated to the grid of the first
    (finest) one and the cosine is taken there, so a coarse level's map follows its features' interpolation
    instead of being a blown-up low-resolution map.
    """
    mode = "bilinear" if len(size) == 2 else "trilinear"
    if upsample_features:
        grid = list(teacher_features[0].shape[2:])
        teacher_features = [F.interpolate(t, size=grid, mode=mode, align_corners=False) for t in teacher_features]
        student_features = [F.interpolate(s, size=grid, mode=mode, align_corners=False) for s in student_features]
    maps = [
        F.interpolate(1.0 - F.cosine_similarity(t, s, dim=1).unsqueeze(1), size=list(size), mode=mode, align_corners=False)
        for t, s in zip(teacher_features, student_features)
    ]
    return torch.cat(maps, dim=1)


def image_score(anomaly_map: torch.Tensor, mode: str = "max", topk_ratio: float = 0.01) -> torch.Tensor:
    """Image score from ``(B, 1, *spatial)`` maps: the maximum, or the mean of the top ``topk_ratio`` pixels. ``(B,)``."""
    flat = anomaly_map.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "topk":
        k = max(1, int(round(flat.shape[1] * topk_ratio)))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown score mode {mode!r}; use 'max' or 'topk'.")


class AnomalyMapGenerator(nn.Module):
    """Fuses per-scale cosine-distance maps and smooths them with a Gaussian.

    Args:
        spatial_dims: 2 or 3.
        num_levels: number of feature levels L.
        fusion: ``"mean"`` (average of levels), ``"product"`` (product of levels, as STFPM) or
            ``"learned"`` (the paper's 1x1 conv + BN + ReLU head, :class:`LearnedFusion`).
        sigma: Gaussian smoothing in pixels of the input; 0 disables it.
        levels: indices of the levels used in the map (default all).
        level_weights: weights of the used levels in the ``"mean"`` fusion (default equal): more weight on the
            fine levels (stride 4 and 8) sharpens the map, the coarse ones see more context. Non-negative, not
            all zero; normalised to sum 1.
        level_normalization: ``"none"`` fuses the raw ``1 - cos`` maps; ``"level"`` first turns each level map
            into a z-score against that level's mean and spread over all pixels of normal images, so levels
            weigh by how unusual their error is rather than by its raw size (no assumption on where the object
            lies); ``"pixel"`` into a per-pixel z-score, ``(map - normal_mean) / normal_std``. The statistics
            are set by :meth:`set_normal_statistics` (see ``fit_normal_statistics``). ``"pixel"`` removes
            errors that every normal image has at the same place, such as the speckle-noise background of
            retina OCT B-scans; it hurts where the object or anatomy moves within the frame (brain slices of
            different levels, rotated parts), so it is a per-modality choice. Neither with ``fusion="product"``.
        upsample_features: take the cosine on features upsampled to the finest level's grid
            (:func:`cosine_distance_maps`) instead of upsampling each level's cosine map.
        min_std: lower bound of ``normal_std``, so that pixels that never vary on normal images (constant
            background) do not turn tiny differences into huge scores.

    ``forward(teacher_features, student_features, size)`` returns ``(B, 1, *size)``.
    The statistics are buffers ``normal_mean`` and ``normal_std`` of shape ``(len(levels), *map_size)`` for
    ``"pixel"`` and ``(len(levels), 1, ...)`` for ``"level"`` (and until fitted, which leaves maps unchanged),
    saved with the weights.
    The smoothing (:class:`GaussianSmoothing`: MONAI's ``GaussianFilter`` numbers in a form that exports to
    ONNX) saves its ``sigma`` too, under the keys of MONAI's filter, and a loaded checkpoint's value wins,
    since the saved threshold was set on maps of that smoothing; a configured ``sigma`` that differs is
    logged as a warning, not silently dropped.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        num_levels: int = 4,
        fusion: str = "mean",
        sigma: float = 4.0,
        levels: Sequence[int] | None = None,
        level_normalization: str = "none",
        min_std: float = 1e-3,
        level_weights: Sequence[float] | None = None,
        upsample_features: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion {fusion!r}; use one of {FUSION_MODES}.")
        if level_normalization not in LEVEL_NORMALIZATIONS:
            raise ValueError(f"unknown level_normalization {level_normalization!r}; use one of {LEVEL_NORMALIZATIONS}.")
        if level_normalization != "none" and fusion == "product":
            raise ValueError(
                f"level_normalization={level_normalization!r} gives signed z-scores, which a product cannot fuse; "
                "use 'mean' or 'learned'."
            )
        self.levels = list(range(num_levels)) if levels is None else list(levels)
        if not self.levels or any(not 0 <= i < num_levels for i in self.levels):
            raise ValueError(f"levels must be indices below num_levels={num_levels}, got {levels}.")
        if level_weights is not None:
            if fusion != "mean":
                raise ValueError(f"level_weights apply to fusion='mean' only, got fusion={fusion!r}.")
            if len(level_weights) != len(self.levels) or min(level_weights) < 0 or sum(level_weights) <= 0:
                raise ValueError(
                    f"level_weights need {len(self.levels)} non-negative values, not all zero; got {level_weights}."
                )
        self.level_weights = None if level_weights is None else [float(w) / sum(level_weights) for w in level_weights]
        self.fusion = fusion
        self.fusion_head = LearnedFusion(spatial_dims, len(self.levels)) if fusion == "learned" else None
        self.smooth = GaussianSmoothing(spatial_dims, sigma) if sigma > 0 else nn.Identity()
        self.level_normalization = level_normalization
        self.upsample_features = upsample_features
        self.min_std = min_std
        if level_normalization != "none":
            # registered only when used, so checkpoints of raw-map models keep loading strictly
            unfitted = (len(self.levels),) + (1,) * spatial_dims
            self.register_buffer("normal_mean", torch.zeros(unfitted))
            self.register_buffer("normal_std", torch.ones(unfitted))

    def raw_level_maps(
        self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        """Per-level ``1 - cos`` maps of the used levels before any normalisation: ``(B, len(levels), *size)``."""
        return cosine_distance_maps(
            [teacher_features[i] for i in self.levels],
            [student_features[i] for i in self.levels],
            size,
            self.upsample_features,
        )

    def level_maps(
        self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        """The per-level maps that are fused (z-scores unless ``level_normalization="none"``): ``(B, len(levels), *size)``."""
        maps = self.raw_level_maps(teacher_features, student_features, size)
        if self.level_normalization == "none":
            return maps
        mean, std = self.normal_mean, self.normal_std
        if mean.shape[1:] != maps.shape[2:] and mean[0].numel() > 1:
            mode = "bilinear" if maps.dim() == 4 else "trilinear"
            mean = F.interpolate(mean[None], size=maps.shape[2:], mode=mode, align_corners=False)[0]
            std = F.interpolate(std[None], size=maps.shape[2:], mode=mode, align_corners=False)[0]
        return (maps - mean) / std.clamp_min(self.min_std)

    def set_normal_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Sets the statistics of the raw level maps on normal images, each ``(len(levels), *map_size)`` (per
        pixel) or ``(len(levels), 1, ...)`` (per level)."""
        if self.level_normalization == "none":
            raise ValueError("normal statistics are used only with level_normalization 'level' or 'pixel'.")
        if mean.shape != std.shape or mean.shape[0] != len(self.levels):
            raise ValueError(f"mean and std must both be (len(levels)={len(self.levels)}, *map_size); got {tuple(mean.shape)} and {tuple(std.shape)}.")
        device = self.normal_mean.device
        self.normal_mean = mean.detach().to(device=device, dtype=torch.float32).clone()
        self.normal_std = std.detach().to(device=device, dtype=torch.float32).clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # fitted statistics have the map's size, unknown at construction: take the saved shape
        for name in ("normal_mean", "normal_std"):
            saved = state_dict.get(prefix + name)
            if name in self._buffers and saved is not None and saved.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty_like(self._buffers[name]).resize_(saved.shape)
        saved = state_dict.get(prefix + "smooth.kernel_sigma_0")
        configured = getattr(self.smooth, "sigma", None)
        if saved is not None and configured is not None and float(saved) != float(configured[0]):
            logging.getLogger(__name__).warning(
                f"the checkpoint's map smoothing sigma {float(saved):g} is used, not the configured "
                f"{float(configured[0]):g}: its saved threshold was set on maps of that smoothing."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fuse(self, level_maps: torch.Tensor) -> torch.Tensor:
        if self.fusion == "mean" and self.level_weights is None:
            fused = level_maps.mean(dim=1, keepdim=True)
        elif self.fusion == "mean":
            weights = torch.tensor(self.level_weights, dtype=level_maps.dtype, device=level_maps.device)
            fused = (level_maps * weights.reshape(1, -1, *([1] * (level_maps.dim() - 2)))).sum(dim=1, keepdim=True)
        elif self.fusion == "product":
            fused = level_maps.prod(dim=1, keepdim=True)
        else:
            fused = self.fusion_head(level_maps)
        return self.smooth(fused)

    def forward(
        self, teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor], size: Sequence[int]
    ) -> torch.Tensor:
        return self.fuse(self.level_maps(teacher_features, student_features, size))
