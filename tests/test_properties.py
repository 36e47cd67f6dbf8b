"""Property-based tests (hypothesis) of maps, intensity transforms, slicing and volume metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multiad_monai.inferers import AnomalyMapGenerator
from multiad_monai.metrics import VolumeAnomalyMetrics
from multiad_monai.transforms import ForegroundPercentileScale, HounsfieldWindow, stack_slices, volume_slices

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    teacher=hnp.arrays(np.float32, (2, 4, 3, 3), elements=finite),
    student=hnp.arrays(np.float32, (2, 4, 3, 3), elements=finite),
    fusion=st.sampled_from(["mean", "product"]),
)
def test_maps_are_finite_and_non_negative(teacher, student, fusion):
    """Any features, zero vectors included, give a finite map in [0, 2] (1 - cosine, fused, smoothed)."""
    generator = AnomalyMapGenerator(num_levels=1, fusion=fusion, sigma=1.0)
    anomaly_map = generator([torch.from_numpy(teacher)], [torch.from_numpy(student)], (12, 12))
    assert anomaly_map.shape == (2, 1, 12, 12)
    assert torch.isfinite(anomaly_map).all()
    assert anomaly_map.min() >= -1e-6 and anomaly_map.max() <= 2.0 + 1e-5


@settings(max_examples=40, deadline=None)
@given(volume=hnp.arrays(np.float32, (1, 5, 4, 3), elements=finite))
def test_intensity_presets_map_into_the_unit_interval(volume):
    assume(np.unique(volume).size > 2)
    scaled = ForegroundPercentileScale(lower=0.0, upper=100.0, threshold=float(volume.min()))(torch.from_numpy(volume))
    assert torch.isfinite(scaled).all() and scaled.min() >= 0.0 and scaled.max() <= 1.0
    windowed = HounsfieldWindow()(torch.from_numpy(volume))
    assert windowed.min() >= 0.0 and windowed.max() <= 1.0
    # monotone: a brighter voxel never ends darker
    flat_in, flat_out = volume.reshape(-1), np.asarray(windowed).reshape(-1)
    order = np.argsort(flat_in, kind="stable")
    assert np.all(np.diff(flat_out[order]) >= -1e-6)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    axis=st.integers(0, 2),
    quarter_turns=st.integers(-3, 3),
)
def test_slicing_round_trip(shape, axis, quarter_turns):
    volume = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    slices = volume_slices(volume, axis, quarter_turns)
    assert len(slices) == shape[axis + 1]
    torch.testing.assert_close(stack_slices(slices, axis, quarter_turns), volume)


@settings(max_examples=25, deadline=None)
@given(
    values=hnp.arrays(np.float32, (6, 5, 4), elements=st.integers(0, 20).map(float)),
    lesion=hnp.arrays(np.bool_, (6, 5, 4)),
    transform=st.sampled_from([lambda m: np.exp(m / 5.0), lambda m: m**3 + 1.0, lambda m: 0.5 * m]),
)
def test_volume_ranking_metrics_invariant_to_monotone_maps(values, lesion, transform):
    assume(lesion.any() and not lesion.all())

    def compute(anomaly_map):
        metric = VolumeAnomalyMetrics(min_foreground=0.0)
        metric.update(
            {
                "anomaly_map": torch.from_numpy(anomaly_map)[None],
                "label": torch.from_numpy(lesion)[None],
                "slice_scores": torch.from_numpy(anomaly_map.max(axis=(0, 1))),
            }
        )
        return metric.compute()

    plain, transformed = compute(values), compute(transform(values).astype(np.float32))
    for key in ("voxel_auroc", "aupro", "slice_pixel_auroc", "voxel_f1_max"):
        assert transformed[key] == pytest.approx(plain[key], abs=1e-9), key
    if "slice_auroc" in plain:
        assert transformed["slice_auroc"] == pytest.approx(plain["slice_auroc"], abs=1e-12)
