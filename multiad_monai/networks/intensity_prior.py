"""An intensity prior mixed into the distillation map: how far each pixel's brightness lies outside normal
tissue. It is not part of Multi-AD; it exists because in FLAIR MRI the brightness of a voxel alone outranks the
student's map inside the brain, and a reader should get the better map with its source named (the medical
bundle's brain MRI default; off in the 2D bundle and for liver CT)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["IntensityPrior", "PRIOR_TAILS", "PRIOR_COMBINATIONS"]

PRIOR_TAILS = ("upper", "lower", "both")
PRIOR_COMBINATIONS = ("sum", "product")
_BUFFERS = ("prior_weight", "tails", "is_product", "map_reference", "intensity_median", "intensity_low", "intensity_high")
_STATISTICS = _BUFFERS[3:]


class IntensityPrior(nn.Module):
    """Mixes the map and the rarity of the input's brightness: ``combination="sum"`` gives
    ``(1 - weight) * map / map_reference + weight * intensity_term``, both terms 1 at the normal ``quantile``;
    ``"product"`` gives ``(map / map_reference) ** (1 - weight) * (1 + intensity_term) ** weight``, where
    brightness only raises what the student already finds (a bright normal structure with a small map stays small).

    ``intensity_term`` is ``relu((x - median) / (high - median))`` for ``tail="upper"`` (brighter than normal
    tissue is anomalous, as FLAIR lesions), ``relu((median - x) / (median - low))`` for ``"lower"`` (darker, as
    hypodense CT lesions) and the larger of the two for ``"both"``; ``x`` is the input's brightness (one channel
    or the channel mean), ``median``, ``low`` and ``high`` the median and the ``1 - quantile`` / ``quantile``
    quantiles of normal foreground pixels, and ``map_reference`` the ``quantile`` quantile of the distillation
    map on them (set by :func:`~multiad_monai.handlers.fit_intensity_prior`). The term is linear beyond the
    normal range, so the rank of voxels brighter than any normal one is kept.

    Args:
        weight: share of the intensity term, in [0, 1). 0 turns the prior off: ``forward`` returns the map as it
            is and the module holds no state, so checkpoints of models without it load unchanged.
        tail: ``"upper"``, ``"lower"`` or ``"both"``.
        channel: input channel whose brightness is scored; None: the channel mean.
        quantile: the normal quantile at which both terms are 1, in (0.5, 1).
        combination: ``"sum"`` or ``"product"``.

    ``forward(images (B, C, *spatial), anomaly_map (B, 1, *spatial))`` returns ``(B, 1, *spatial)``; until the
    statistics are fitted (a network not trained yet) the map passes through unchanged. :meth:`unmix` inverts it.
    The weight, tail and combination are buffers too: a checkpoint's values are the ones its threshold was set with.
    """

    def __init__(
        self, weight: float = 0.0, tail: str = "both", channel: int | None = None, quantile: float = 0.99, combination: str = "sum"
    ) -> None:
        super().__init__()
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"intensity prior weight must be in [0, 1), got {weight}.")
        if tail not in PRIOR_TAILS:
            raise ValueError(f"unknown intensity prior tail {tail!r}; use one of {PRIOR_TAILS}.")
        if not 0.5 < quantile < 1.0:
            raise ValueError(f"intensity prior quantile must be in (0.5, 1), got {quantile}.")
        if combination not in PRIOR_COMBINATIONS:
            raise ValueError(f"unknown intensity prior combination {combination!r}; use one of {PRIOR_COMBINATIONS}.")
        self.channel = channel
        self.quantile = quantile
        self.enabled = weight > 0
        if self.enabled:
            nan = torch.tensor(float("nan"))
            self.register_buffer("prior_weight", torch.tensor(float(weight)))
            self.register_buffer("tails", torch.tensor([float(tail in ("upper", "both")), float(tail in ("lower", "both"))]))
            self.register_buffer("is_product", torch.tensor(float(combination == "product")))
            for name in _STATISTICS:
                self.register_buffer(name, nan.clone())

    @property
    def is_fitted(self) -> bool:
        return self.enabled and bool(torch.isfinite(torch.stack([getattr(self, n) for n in _STATISTICS])).all())

    def brightness(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *spatial)`` brightness of ``images`` ``(B, C, *spatial)``."""
        if self.channel is None:
            return images.mean(dim=1, keepdim=True)
        if not 0 <= self.channel < images.shape[1]:
            raise ValueError(f"intensity prior channel {self.channel} does not exist in images of {images.shape[1]} channels.")
        return images[:, self.channel : self.channel + 1]

    def set_statistics(self, map_reference: float, median: float, low: float, high: float) -> None:
        """Sets the normal statistics (see the class docstring); ``low < median < high`` and a positive reference."""
        if not self.enabled:
            raise ValueError("the intensity prior is off (weight 0): it has no statistics to set.")
        if not (map_reference > 0 and low < median < high):
            raise ValueError(
                f"normal statistics need a positive map reference and low < median < high; got {map_reference}, {low}, {median}, {high}: "
                "the normal images show no brightness spread or no map."
            )
        for name, value in zip(_STATISTICS, (map_reference, median, low, high)):
            getattr(self, name).fill_(float(value))

    def describe(self) -> str:
        """The saved settings in words, e.g. ``"weight 0.5, upper tail, sum"``."""
        if not self.enabled:
            return "off"
        upper, lower = (bool(flag) for flag in self.tails.tolist())
        tail = "both tails" if upper and lower else ("upper tail" if upper else "lower tail")
        return f"weight {float(self.prior_weight):g}, {tail}, {'product' if float(self.is_product) else 'sum'}"

    def intensity_term(self, images: torch.Tensor) -> torch.Tensor:
        """The rarity of the brightness, ``(B, 1, *spatial)``: 0 on the median's side of the tail, 1 at the quantile."""
        value = self.brightness(images)
        upper = torch.relu((value - self.intensity_median) / (self.intensity_high - self.intensity_median)) * self.tails[0]
        lower = torch.relu((self.intensity_median - value) / (self.intensity_median - self.intensity_low)) * self.tails[1]
        return torch.maximum(upper, lower)

    def forward(self, images: torch.Tensor, anomaly_map: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return anomaly_map
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if not exporting and not self.is_fitted:  # an untrained network (its threshold is NaN too), e.g. verify_net_in_out
            return anomaly_map
        weight, scaled, term = self.prior_weight, anomaly_map / self.map_reference, self.intensity_term(images)
        # both forms computed so that traced and exported models keep the checkpoint's choice as data
        summed = (1 - weight) * scaled + weight * term
        product = scaled.clamp_min(0).pow(1 - weight) * (1 + term).pow(weight)
        return self.is_product * product + (1 - self.is_product) * summed

    def unmix(self, images: torch.Tensor, mixed_map: torch.Tensor) -> torch.Tensor:
        """The map that :meth:`forward` mixed into ``mixed_map`` ``(B, 1, *spatial)``, from the same ``images``:
        the distillation map recovered without another forward pass of the network (up to float rounding)."""
        if not self.is_fitted:
            return mixed_map
        weight, term = self.prior_weight, self.intensity_term(images)
        if float(self.is_product):
            scaled = (mixed_map.clamp_min(0) / (1 + term).pow(weight)).pow(1 / (1 - weight))
        else:
            scaled = (mixed_map - weight * term) / (1 - weight)
        return scaled * self.map_reference
