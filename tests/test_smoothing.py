"""The map smoothing: MONAI's GaussianFilter numbers from a fixed kernel, and checkpoints of either kind load."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.layers import GaussianFilter

from multiad_monai.inferers import AnomalyMapGenerator
from multiad_monai.inferers.smoothing import GaussianSmoothing


@pytest.mark.parametrize(
    "spatial_dims, shape, sigma",
    [(2, (2, 3, 64, 48), 4.0), (2, (1, 1, 256, 256), 0.3), (3, (1, 2, 20, 24, 16), (1.0, 2.5, 0.5)), (1, (2, 1, 50), 6.0)],
)
def test_smoothing_gives_monai_gaussian_filter_numbers(spatial_dims, shape, sigma):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)) ** 4  # peaky, like anomaly maps
    expected = GaussianFilter(spatial_dims, sigma)(x)
    torch.testing.assert_close(GaussianSmoothing(spatial_dims, sigma)(x), expected, atol=1e-5, rtol=0)


def test_old_checkpoints_load_and_their_sigma_wins(caplog):
    """A generator saved with MONAI's GaussianFilter (checkpoints before the exportable smoothing) loads strictly;
    its sigma (4) replaces the configured one (2), with the warning, and the maps are the old ones."""
    old = AnomalyMapGenerator(num_levels=2, sigma=4.0)
    old.smooth = GaussianFilter(2, 4.0)
    state = old.state_dict()
    assert "smooth.kernel_sigma_0" in state and "smooth.kernel_sigma_1" in state
    configured = AnomalyMapGenerator(num_levels=2, sigma=2.0)
    with caplog.at_level(logging.WARNING):
        configured.load_state_dict(state)
    assert "sigma 4 is used, not the configured 2" in caplog.text
    assert configured.smooth.sigma == [4.0, 4.0]
    level_maps = torch.rand(1, 2, 40, 40)
    torch.testing.assert_close(configured.fuse(level_maps), old.fuse(level_maps), atol=1e-5, rtol=0)

    # and the other way: a new checkpoint loads into MONAI's filter (same keys)
    monai_filter = GaussianFilter(2, 1.0)
    monai_filter.load_state_dict(GaussianSmoothing(2, 3.0).state_dict())
    assert [float(s) for s in monai_filter.sigma] == [3.0, 3.0]


def test_smoothing_kernels_are_fixed_buffers_not_saved():
    smoothing = GaussianSmoothing(2, 4.0)
    assert set(smoothing.state_dict()) == {"kernel_sigma_0", "kernel_sigma_1"}
    assert smoothing.kernel_0.numel() == 2 * 16 + 1  # 4 sigma either side, as MONAI's default truncation
    assert list(smoothing.parameters()) == []
    with pytest.raises(ValueError, match="positive"):
        GaussianSmoothing(2, 0.0)
    with pytest.raises(ValueError, match="2 positive values"):
        GaussianSmoothing(2, (1.0, 2.0, 3.0))
