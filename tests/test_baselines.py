"""Tests for the baselines measured beside the model: intensity and teacher-feature nearest-neighbour scorers,
their volume inferer and metrics, and what the evaluation writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset

from multiad_monai.data import case_folder_datalist, make_demo_volumes, split_cases
from multiad_monai.engines import AnomalyEvaluator, VolumeAnomalyEvaluator
from multiad_monai.handlers import MetricsJSONWriter
from multiad_monai.handlers.report import baselines_html
from multiad_monai.inferers import BASELINE_NAMES, FeatureKNNBaseline, IntensityBaseline, VolumeBaselineInferer
from multiad_monai.metrics import ImageBaselineMetrics, VolumeAnomalyMetrics, VolumeBaselineMetrics, foreground_auroc
from multiad_monai.networks import EfficientNetLiteEncoder
from multiad_monai.transforms import volume_transforms

from conftest import MedianDeviationNet


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    return make_demo_volumes(str(tmp_path_factory.mktemp("volumes") / "cases"), num_cases=3, shape=(40, 36, 24))


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)  # random weights: the tests need a fixed feature map, not a good one
    return EfficientNetLiteEncoder(model_name="efficientnet-lite0", pretrained=False, image_size=64).eval()


def test_intensity_bright_finds_a_bright_blob_and_dark_inverts_it():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0.2, 0.4, (1, 16, 16, 8)), dtype=torch.float32)
    lesion = torch.zeros(1, 16, 16, 8)
    lesion[:, 5:8, 5:8, 2:5] = 1
    image[lesion > 0] = 0.8
    foreground = torch.zeros(1, 16, 16, 8)
    foreground[:, 2:14, 2:14] = 1
    maps = IntensityBaseline()(image, foreground, ["intensity_bright", "intensity_dark"])  # no fitting needed
    assert foreground_auroc(maps["intensity_bright"], lesion, foreground) == 1.0
    assert foreground_auroc(maps["intensity_dark"], lesion, foreground) == 0.0
    assert float(maps["intensity_bright"][foreground == 0].abs().max()) == 0.0  # nothing outside the foreground


def test_intensity_histogram_scores_unseen_values_high_whatever_their_polarity():
    baseline = IntensityBaseline(bins=64)
    with pytest.raises(RuntimeError, match="histogram"):
        baseline(torch.zeros(1, 4, 4), names=["intensity_histogram"])
    normal = torch.as_tensor(np.random.default_rng(1).uniform(0.4, 0.6, (3, 32, 32)), dtype=torch.float32)
    baseline.update(normal)  # three channels: their mean is counted
    probe = torch.tensor([[[0.5, 0.05, 0.95]]])
    scores = baseline(probe, names=["intensity_histogram"])["intensity_histogram"].reshape(-1)
    assert scores[1] > scores[0] + 3 and scores[2] > scores[0] + 3  # both a dark and a bright unseen value stand out
    assert torch.isclose(scores[1], scores[2])


def test_intensity_channel_scores_one_channel_only():
    image = torch.stack([torch.full((4, 4), 0.9), torch.full((4, 4), 0.1)])  # e.g. FLAIR, T1c
    image[0, 0, 0] = 0.2
    first = IntensityBaseline(channel=0)(image, names=["intensity_bright"])["intensity_bright"]
    mean = IntensityBaseline()(image, names=["intensity_bright"])["intensity_bright"]
    assert first.shape == (1, 4, 4) and torch.allclose(first[0], image[0]) and torch.allclose(mean[0], image.mean(0))
    with pytest.raises(ValueError, match="channel 2 does not exist"):
        IntensityBaseline(channel=2)(image, names=["intensity_bright"])


def test_feature_knn_is_zero_on_training_images_and_larger_on_a_changed_one(teacher):
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    knn = FeatureKNNBaseline(teacher, memory_size=100000, sigma=0.0).fit([images[:2], images[2:]])
    assert knn.memory.shape == (4 * 8 * 8, teacher.out_channels[1] + teacher.out_channels[2])
    maps = knn(images)
    assert maps.shape == (4, 1, 64, 64) and float(maps.abs().max()) < 1e-2
    changed = images[:1].clone()
    changed[:, :, 20:44, 20:44] = 1.0
    changed_map = knn(changed)
    # random teacher weights: small feature scale, so compare with the training images' residual (float rounding)
    assert float(changed_map[..., 28:36, 28:36].min()) > 50 * float(maps.abs().max())
    assert float(changed_map[..., 28:36, 28:36].mean()) > float(changed_map[..., :6, :6].mean())


def test_feature_knn_memory_is_bounded_seeded_and_chunked(teacher):
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batches = [{"image": images[i : i + 2]} for i in range(0, 6, 2)]
    first = FeatureKNNBaseline(teacher, memory_size=50, seed=3, chunk_size=7).fit(batches)
    second = FeatureKNNBaseline(teacher, memory_size=50, seed=3, chunk_size=1000, fit_data=batches).fit()
    assert first.memory.shape[0] == 50
    torch.testing.assert_close(first.memory, second.memory)
    torch.testing.assert_close(first(images[:2]), second(images[:2]))  # chunking does not change the distances
    with pytest.raises(RuntimeError, match="fit"):
        FeatureKNNBaseline(teacher)(images[:1])


def test_volume_baselines_fit_on_normal_training_slices_and_score_each_slice(phantoms, teacher):
    train, test = split_cases(case_folder_datalist(phantoms), test_cases=["case000"])
    inferer = VolumeBaselineInferer(
        teacher=teacher, train_datalist=train, volume_transform=volume_transforms("mri"), image_size=64, memory_size=500
    )
    case = volume_transforms("mri")(test[0])
    maps, slice_scores = inferer(case["image"], case["foreground"])
    assert inferer.is_fitted and inferer.knn.memory.shape[0] == 500
    assert list(maps) == list(BASELINE_NAMES) == list(slice_scores)
    for name in BASELINE_NAMES:
        assert maps[name].shape == case["image"].shape and slice_scores[name].shape == (case["image"].shape[3],)
        assert float(maps[name][case["foreground"] == 0].abs().max()) == 0.0
    # the phantoms' lesions are hyperintense, as FLAIR lesions: brightness alone finds them
    bright = foreground_auroc(maps["intensity_bright"], case["label"], case["foreground"])
    assert bright > 0.75 and foreground_auroc(maps["intensity_histogram"], case["label"], case["foreground"]) > 0.5
    assert foreground_auroc(maps["intensity_dark"], case["label"], case["foreground"]) == pytest.approx(1 - bright)


def test_volume_evaluation_writes_baselines_and_per_case_numbers(phantoms, teacher, tmp_path):
    train, test = split_cases(case_folder_datalist(phantoms), test_cases=["case000", "case001"])
    inferer = VolumeBaselineInferer(
        teacher=teacher, train_datalist=train, volume_transform=volume_transforms("mri"), image_size=64, memory_size=500
    )
    loader = DataLoader(Dataset(test, volume_transforms("mri")), batch_size=1)
    path = tmp_path / "metrics.json"
    evaluator = VolumeAnomalyEvaluator(
        device="cpu", val_data_loader=loader, network=MedianDeviationNet(), image_size=64,
        additional_metrics={"test": VolumeAnomalyMetrics(), "baseline_metrics": VolumeBaselineMetrics()},
        val_handlers=[MetricsJSONWriter(str(path))], baseline_inferer=inferer,
    )
    evaluator.run()
    written = json.loads(path.read_text())
    assert set(written["baselines"]) == set(BASELINE_NAMES)
    for values in written["baselines"].values():
        assert {"voxel_auroc", "voxel_ap", "slice_auroc", "aupro"} <= set(values) and "dice" not in values
    assert written["baselines"]["intensity_bright"]["voxel_auroc"] > 0.75
    assert set(written["per_case"]) == {"case000", "case001"}
    assert set(written["per_case"]["case000"]) == {"model", *BASELINE_NAMES}
    assert written["per_case"]["case000"]["model"] == pytest.approx(
        written["metrics"]["voxel_auroc"], abs=0.2
    )  # same definition as the pooled model metric
    page = baselines_html(evaluator.state.metrics)
    assert "Model vs baselines" in page and "does not earn its place" in page and "case001" in page


def test_image_baselines_metrics_on_2d_batches(teacher):
    generator = torch.Generator().manual_seed(2)
    normal = torch.rand(4, 3, 64, 64, generator=generator) * 0.2
    knn = FeatureKNNBaseline(teacher, fit_data=[normal]).eval()
    test = torch.rand(4, 3, 64, 64, generator=generator) * 0.2
    masks = torch.zeros(4, 1, 64, 64)
    test[2:, :, 16:40, 16:40] = 1.0
    masks[2:, :, 16:40, 16:40] = 1
    batch = {"image": test, "label": torch.tensor([0, 0, 1, 1]), "mask": masks}
    metric = ImageBaselineMetrics()
    evaluator = AnomalyEvaluator(
        device="cpu", val_data_loader=[batch], network=MedianDeviationNet(),
        additional_metrics={"baseline_metrics": metric}, baselines={"feature_knn": knn},
    )
    evaluator.run()
    results = evaluator.state.metrics["baselines"]["feature_knn"]
    assert results["image_auroc"] == 1.0 and results["pixel_auroc"] > 0.9 and "aupro" in results
    with pytest.raises(ValueError, match="unknown baselines"):
        ImageBaselineMetrics(names=["intensity_bright"])
