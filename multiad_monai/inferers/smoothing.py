"""Gaussian smoothing of anomaly maps that exports (ONNX, TorchScript): a fixed kernel, separable convolutions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

__all__ = ["GaussianSmoothing"]


class GaussianSmoothing(nn.Module):
    """Gaussian blur with zero padding, the same numbers as MONAI's ``GaussianFilter(spatial_dims, sigma)``.

    MONAI's filter builds its kernel from ``sigma`` inside ``forward``, which the ONNX exporter cannot follow;
    here the 1D kernels (MONAI's ``gaussian_1d``, ``erf`` approximation) are built once and kept as buffers,
    and ``forward`` is one 1D convolution per spatial axis.

    Args:
        spatial_dims: 2 or 3.
        sigma: standard deviation in pixels, one value or one per spatial axis; positive.
        truncated: the kernel reaches ``truncated * sigma`` pixels either side (MONAI's default 4).

    ``forward(x)`` with ``x`` ``(B, C, H, W[, D])`` returns the smoothed ``(B, C, H, W[, D])``.
    The sigmas are saved as buffers ``kernel_sigma_0``, ``kernel_sigma_1``, ... (the keys of MONAI's
    ``GaussianFilter``, so checkpoints of either load into the other); loading a state dict with other sigmas
    rebuilds the kernels from the loaded ones. The kernels themselves are not saved.
    """

    def __init__(self, spatial_dims: int = 2, sigma: Sequence[float] | float = 4.0, truncated: float = 4.0) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        sigmas = [float(s) for s in sigma] if isinstance(sigma, Sequence) else [float(sigma)] * spatial_dims
        if len(sigmas) != spatial_dims or min(sigmas) <= 0:
            raise ValueError(f"sigma needs {spatial_dims} positive values (or one), got {sigma}.")
        self.spatial_dims = spatial_dims
        self.truncated = truncated
        for axis, value in enumerate(sigmas):
            self.register_buffer(f"kernel_sigma_{axis}", torch.tensor(value))
        self._build_kernels()

    @property
    def sigma(self) -> list[float]:
        """The sigma of each spatial axis."""
        return [float(getattr(self, f"kernel_sigma_{axis}")) for axis in range(self.spatial_dims)]

    def _build_kernels(self) -> None:
        for axis, value in enumerate(self.sigma):
            kernel = gaussian_1d(torch.tensor(value), truncated=self.truncated, approx="erf")
            device = getattr(self, f"kernel_sigma_{axis}").device
            self.register_buffer(f"kernel_{axis}", kernel.to(device), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._build_kernels()  # the kernels of the loaded sigmas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = x.reshape((-1, 1) + tuple(shape[2:]))  # each channel alone: one kernel serves any channel count
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.spatial_dims - 1]
        for axis in range(self.spatial_dims):
            kernel = getattr(self, f"kernel_{axis}").to(out.dtype)
            size = [1] * self.spatial_dims
            size[axis] = kernel.numel()
            padding = [0] * self.spatial_dims
            padding[axis] = (kernel.numel() - 1) // 2
            out = conv(out, kernel.reshape([1, 1] + size), padding=padding)
        return out.reshape(shape)
