"""Tests for the medical-volume path: case datalists, patient-level splits, normal training slices, the slice
chain, volume metrics, the volume evaluator and writer, and the multiad_medical bundle end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.data import DataLoader, Dataset
from PIL import Image

from conftest import MedianDeviationNet, shared_data
from multiad_monai.apps.cli import defines_key, main, root_cause
from multiad_monai.data import (
    DEMO_VOLUME_FILES,
    DatasetError,
    case_folder_datalist,
    lesion_slice_datalist,
    load_volume,
    make_demo_volumes,
    normal_slice_datalist,
    split_cases,
    volume_folder_datalist,
    volume_inference_datalist,
)
from multiad_monai.engines import VolumeAnomalyEvaluator
from multiad_monai.handlers import LesionDiceThresholdHandler, VolumeOutputWriter
from multiad_monai.inferers import VolumeAnomalyInferer
from multiad_monai.metrics import VolumeAnomalyMetrics, aupro, dice_score, image_auroc, pixel_auroc, slice_labels
from multiad_monai.transforms import RandNormalSliced, slice_coverage, slice_transforms_2d, volume_transforms

MEDICAL_BUNDLE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bundles", "multiad_medical"))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> str:
    return make_demo_volumes(str(tmp_path_factory.mktemp("volumes") / "cases"), num_cases=4, shape=(40, 36, 24))


# ----------------------------------------------------------------------------- datalists and splits


def test_demo_volumes_are_deterministic_and_brats_like(phantoms, tmp_path):
    cases = case_folder_datalist(phantoms)
    assert [c["name"] for c in cases] == ["case000", "case001", "case002", "case003"]
    assert all(set(c) == {"image", "label", "foreground", "name"} for c in cases)
    again = make_demo_volumes(str(tmp_path / "again"), num_cases=4, shape=(40, 36, 24))
    for name in DEMO_VOLUME_FILES.values():
        a = nib.load(os.path.join(phantoms, "case001", name))
        b = nib.load(os.path.join(again, "case001", name))
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    lesion = np.asarray(nib.load(cases[0]["label"]).dataobj) > 0
    brain = np.asarray(nib.load(cases[0]["foreground"]).dataobj) > 0
    assert lesion.any() and not (lesion & ~brain).any()


def test_patient_level_split_never_shares_a_case(phantoms):
    cases = case_folder_datalist(phantoms)
    train, test = split_cases(cases, test_fraction=0.5, seed=1)
    assert len(train) == len(test) == 2
    assert not {c["name"] for c in train} & {c["name"] for c in test}
    assert split_cases(cases, test_fraction=0.5, seed=1) == (train, test)
    named_train, named_test = split_cases(cases, test_cases=["case003"])
    assert [c["name"] for c in named_test] == ["case003"] and len(named_train) == 3
    with pytest.raises(DatasetError, match="case009"):
        split_cases(cases, test_cases=["case009"])
    with pytest.raises(DatasetError, match="no training case"):
        split_cases(cases, test_cases=[c["name"] for c in cases])
    with pytest.raises(DatasetError, match="unique"):
        split_cases(cases + cases[:1])


def test_case_datalist_errors_name_the_file(phantoms, tmp_path):
    with pytest.raises(DatasetError, match="t1c.nii.gz"):
        case_folder_datalist(phantoms, image=["flair.nii.gz", "t1c.nii.gz"])
    with pytest.raises(DatasetError, match="nowhere"):
        case_folder_datalist(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="case404"):
        case_folder_datalist(phantoms, cases=["case404"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no case folder"):
        case_folder_datalist(str(tmp_path / "empty"))


def test_multimodal_case_is_channels(phantoms, tmp_path):
    case = tmp_path / "multi" / "p1"
    case.mkdir(parents=True)
    for modality in ("flair", "t1c"):
        os.link(os.path.join(phantoms, "case000", "flair.nii.gz"), case / f"{modality}.nii.gz")
    items = case_folder_datalist(str(tmp_path / "multi"), image=["flair.nii.gz", "t1c.nii.gz"], label=None, foreground=None)
    volume = volume_transforms("mri")(items[0])["image"]  # the teacher takes 3 channels: their mean is the third
    assert volume.shape == (3, 40, 36, 24) and volume.meta["modalities"] == ["flair", "t1c"]
    assert torch.allclose(volume[2], volume[:2].mean(0))
    with pytest.raises(RuntimeError) as info:  # neighbouring slices cannot share the channels with modalities
        volume_transforms("mri", slice_context=1)(items[0])
    assert "flair.nii.gz: slice context needs a one-channel volume" in str(root_cause(info.value))


def test_volume_folder_and_inference_datalists(phantoms, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in (1, 0):
        os.link(os.path.join(phantoms, f"case00{i}", "flair.nii.gz"), folder / f"scan{i}.nii.gz")
    assert [item["name"] for item in volume_folder_datalist(str(folder))] == ["scan0", "scan1"]
    assert volume_folder_datalist(str(folder / "scan1.nii.gz")) == [{"image": str(folder / "scan1.nii.gz"), "name": "scan1"}]
    cases = volume_inference_datalist("", phantoms)
    assert len(cases) == 4 and all("label" not in item and "foreground" in item for item in cases)
    assert volume_inference_datalist(str(folder), "/nonexistent") == volume_folder_datalist(str(folder))
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no volumes"):
        volume_folder_datalist(str(tmp_path / "none"))


# ----------------------------------------------------------------------------- training slices


def test_normal_slices_are_all_lesion_free_slices_in_order(phantoms):
    case = case_folder_datalist(phantoms)[:1]
    loaded = volume_transforms("mri")(case[0])
    sampler = RandNormalSliced(["image"], num_samples=None, foreground_key="foreground", lesion_key="label", min_foreground=0.1)
    slices = normal_slice_datalist(case, volume_transforms("mri"), sampler)
    eligible, anomalous = slice_labels(loaded["label"][0].numpy() > 0, loaded["foreground"][0].numpy() > 0, 2, 0.1)
    expected = np.flatnonzero(eligible & ~anomalous)
    assert [s["slice_index"] for s in slices] == expected.tolist() and len(expected) > 0
    for item in slices:
        assert item["label"] == 0 and item["case"] == "case000" and item["image"].shape == (1, 40, 36)
        torch.testing.assert_close(item["image"], loaded["image"][..., item["slice_index"]].as_tensor())


def test_lesion_slices_are_exactly_the_slices_the_normal_sampler_leaves_out(phantoms):
    items = case_folder_datalist(phantoms)[:2]
    transform = volume_transforms("mri")
    lesion_slices = lesion_slice_datalist(items, transform, axis=2, quarter_turns=-1, min_foreground=0.1)
    sampler = RandNormalSliced(["image"], axis=2, num_samples=None, foreground_key="foreground", lesion_key="label")
    for item in items:
        data = transform(item)
        coverage_ok = set(np.flatnonzero(slice_coverage(data["foreground"], 2).numpy() >= 0.1).tolist())
        normal = set(sampler.normal_slices(data).tolist())
        lesion = {s["slice_index"] for s in lesion_slices if s["case"] == item["name"]}
        assert lesion and lesion.isdisjoint(normal) and lesion | normal == coverage_ok
    first = lesion_slices[0]
    assert first["image"].shape == (1, 36, 40) and first["mask"].shape == (1, 36, 40) and float(first["mask"].sum()) > 0
    assert lesion_slice_datalist([{**items[0], "label": None}], transform) == []  # unlabelled cases give none


def test_lesion_dice_threshold_segments_the_training_lesions(phantoms):
    """The threshold is where the (fake) map separates the lesions of the training patients best; the
    normal-quantile setting leaves the network's threshold alone."""
    items = case_folder_datalist(phantoms)[:2]
    transform = volume_transforms("mri")
    sampler = RandNormalSliced(["image", "foreground"], num_samples=None, foreground_key="foreground", lesion_key="label")
    normal = normal_slice_datalist(items, transform, sampler)[:6]
    chain = slice_transforms_2d(image_size=32, mean=(0.0,) * 3, std=(1.0,) * 3)
    network = MedianDeviationNet(threshold=123.0)
    unused = LesionDiceThresholdHandler(network, "normal_quantile")
    assert unused.validation_items is not None and unused._items is None  # nothing loaded
    handler = LesionDiceThresholdHandler(network, "lesion_dice", items, transform, normal, chain, min_foreground=0.1)
    threshold = handler.threshold()
    assert threshold is not None and threshold != 123.0
    maps, masks = [], []
    for item in handler.validation_items():
        inside = item["foreground"] > 0
        maps.append(network(item["image"][None])[0][inside])
        masks.append(item["mask"][inside] > 0)
    maps, masks = torch.cat(maps), torch.cat(masks)
    dice_at = lambda t: float(2 * ((maps >= t) & masks).sum() / ((maps >= t).sum() + masks.sum()))  # noqa: E731
    assert dice_at(threshold) >= max(dice_at(t) for t in torch.quantile(maps, torch.linspace(0.5, 0.999, 40))) - 1e-6
    assert dice_at(threshold) > 0.5  # the fake map's bright lesions are well segmented at the chosen value
    with pytest.raises(ValueError, match="unknown threshold source"):
        LesionDiceThresholdHandler(network, "lesion-dice")


def test_lesions_outside_the_organ_do_not_exclude_slices():
    volume = torch.rand(1, 8, 8, 6)
    organ = torch.zeros(1, 8, 8, 6)
    organ[:, 2:6, 2:6, :] = 1
    lesion = torch.zeros(1, 8, 8, 6)
    lesion[:, 0, 0, 1] = 1  # outside the organ
    lesion[:, 3, 3, 4] = 1  # inside
    data = {"image": volume, "organ": organ, "lesion": lesion}
    strict = RandNormalSliced(["image"], num_samples=None, foreground_key="organ", lesion_key="lesion")
    organ_only = RandNormalSliced(
        ["image"], num_samples=None, foreground_key="organ", lesion_key="lesion", lesions_in_foreground_only=True
    )
    assert [s["slice_index"] for s in strict(data)] == [0, 2, 3, 5]
    assert [s["slice_index"] for s in organ_only(data)] == [0, 1, 2, 3, 5]


def test_slice_chain_matches_the_volume_inferer_input():
    """The training chain and the inferer must present a slice to the network identically."""
    volume = torch.rand(1, 50, 40, 3)
    seen = []

    class Recorder(nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return images[:, :1]

    VolumeAnomalyInferer(Recorder(), image_size=32, batch_size=3)(volume)
    chain = slice_transforms_2d(image_size=32)
    for index in range(3):
        expected = chain({"image": volume[..., index]})["image"]
        torch.testing.assert_close(seen[0][index], expected, atol=1e-5, rtol=0)


def test_cropped_training_slices_match_the_cropped_inferer_input():
    """With crop_to_foreground, sampler and inferer cut the same box, so the network sees the same slices."""
    volume = torch.rand(1, 60, 50, 4)
    organ = torch.zeros(1, 60, 50, 4)
    organ[:, 20:35, 10:22, :] = 1
    seen = []

    class Recorder(nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return images[:, :1]

    inferer = VolumeAnomalyInferer(Recorder(), image_size=32, batch_size=4, crop_to_foreground=True, crop_margin=3, quarter_turns=1)
    anomaly_map, _, _ = inferer(volume, organ)
    sampler = RandNormalSliced(
        ["image"], num_samples=None, foreground_key="organ", min_foreground=0.0, crop_to_foreground=True, crop_margin=3, quarter_turns=1
    )
    chain = slice_transforms_2d(image_size=32)
    samples = sampler({"image": volume, "organ": organ})
    assert len(samples) == 4 and samples[0]["image"].shape == (1, 21, 21)  # 15 + 2 * 3 rows, squared
    for sample in samples:
        expected = chain({"image": sample["image"]})["image"]
        torch.testing.assert_close(seen[0][sample["slice_index"]], expected, atol=1e-5, rtol=0)
    outside = torch.ones_like(organ, dtype=torch.bool)
    outside[:, 17:38, 5:26, :] = False
    assert anomaly_map[outside].abs().max() == 0


def test_synthetic_validation_slices_are_fixed_per_name():
    chain = slice_transforms_2d(image_size=32, synthetic_defects=True, seed=5)
    item = {"image": torch.full((1, 40, 40), 0.5), "name": "case_slice0003", "label": 0, "synthetic_defect": 1}
    first, second = chain(dict(item)), chain(dict(item))
    assert first["label"] == 1 and first["mask"].sum() > 0
    torch.testing.assert_close(first["image"], second["image"])
    normal = chain({**item, "synthetic_defect": 0})
    assert normal["label"] == 0 and normal["mask"].sum() == 0


def test_augmented_training_slices_vary_and_keep_the_chain_otherwise():
    torch.manual_seed(0)
    image = torch.zeros(1, 40, 40)
    image[:, 10:30, 4:12] = 1.0  # a bar on the left: a left-right flip moves it to the right
    plain = slice_transforms_2d(image_size=32)({"image": image})["image"]
    chain = slice_transforms_2d(image_size=32, augment=True)
    chain.set_random_state(seed=3)
    outputs = [chain({"image": image})["image"] for _ in range(12)]
    assert all(o.shape == plain.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert any(torch.allclose(o, plain, atol=1e-5) for o in outputs)  # each change has probability 0.5
    assert any(torch.allclose(o, torch.flip(plain, dims=[2]), atol=1e-5) for o in outputs)
    assert sum(not torch.allclose(o, plain, atol=1e-5) and not torch.allclose(o, torch.flip(plain, dims=[2]), atol=1e-5) for o in outputs) > 0
    torch.testing.assert_close(image.sum(), torch.tensor(160.0))  # the input is not modified
    with pytest.raises(ValueError, match="teacher"):
        slice_transforms_2d(image_size=32, augment=True, teacher=nn.Identity())


# ----------------------------------------------------------------------------- metrics


def _volume_output(anomaly_map, label, foreground, axis=2, threshold=0.5):
    other = tuple(d for d in range(3) if d != axis)
    masked = anomaly_map * foreground
    return {
        "anomaly_map": torch.as_tensor(masked)[None],
        "label": torch.as_tensor(label)[None],
        "foreground": torch.as_tensor(foreground)[None],
        "slice_scores": torch.as_tensor(masked.max(axis=other)),
        "threshold": threshold,
    }


def test_volume_metrics_match_the_pooled_definitions():
    rng = np.random.default_rng(0)
    metric = VolumeAnomalyMetrics(axis=2, min_foreground=0.2)
    maps, labels, fgs, outputs = [], [], [], []
    for _ in range(3):
        foreground = np.zeros((12, 10, 8), np.float32)
        foreground[2:10, 1:9, 1:7] = 1
        label = np.zeros_like(foreground)
        label[4:7, 3:6, 2:5] = 1  # one 3D lesion spanning three slices
        anomaly_map = rng.random(foreground.shape).astype(np.float32) + label * rng.uniform(0.0, 1.0)
        outputs.append(_volume_output(anomaly_map, label, foreground))
        maps.append(anomaly_map * foreground)
        labels.append(label)
        fgs.append(foreground)
        metric.update(outputs[-1])
    result = metric.compute()
    inside = np.concatenate([f.reshape(-1) > 0 for f in fgs])
    flat_maps = np.concatenate([m.reshape(-1) for m in maps])[inside]
    flat_labels = np.concatenate([lab.reshape(-1) for lab in labels])[inside]
    assert result["voxel_auroc"] == pytest.approx(pixel_auroc(flat_maps, flat_labels))
    # AUPRO with 3D regions equals the per-volume 3D computation of the 2D/3D helper on the masked volumes
    expected_pro = aupro(np.stack([m[None] for m in maps]), np.stack([lab[None] for lab in labels]))
    assert result["aupro"] == pytest.approx(expected_pro, abs=0.05)
    eligible = [o["foreground"][0].numpy().mean(axis=(0, 1)) >= 0.2 for o in outputs]
    slice_scores = np.concatenate([o["slice_scores"].numpy()[e] for o, e in zip(outputs, eligible)])
    slice_truth = np.concatenate([lab.any(axis=(0, 1))[e] for lab, e in zip(labels, eligible)])
    assert result["slice_auroc"] == pytest.approx(image_auroc(slice_scores, slice_truth))
    assert result["num_volumes"] == 3 and result["num_slices"] == slice_truth.size
    plane_maps = np.concatenate([m[..., e].reshape(-1) for m, e in zip(maps, eligible)])
    plane_truth = np.concatenate([lab[..., e].reshape(-1) for lab, e in zip(labels, eligible)])
    assert result["slice_pixel_auroc"] == pytest.approx(pixel_auroc(plane_maps, plane_truth))
    # mean per-volume Dice of the mask at the saved threshold (0.5), the lesion being inside the foreground
    assert result["dice"] == pytest.approx(np.mean([dice_score(m, lab, 0.5) for m, lab in zip(maps, labels)]))


def test_perfect_volume_maps_score_one():
    metric = VolumeAnomalyMetrics()
    foreground = np.ones((10, 10, 6), np.float32)
    label = np.zeros_like(foreground)
    label[2:5, 2:5, 1:3] = 1
    metric.update(_volume_output(label * 2.0, label, foreground, threshold=1.0))
    result = metric.compute()
    for key in ("slice_auroc", "voxel_auroc", "aupro", "voxel_f1_max", "dice"):
        assert result[key] == pytest.approx(1.0), key
    with pytest.raises(ValueError, match="label"):
        metric.update({**_volume_output(label, label, foreground), "label": None})


# ----------------------------------------------------------------------------- evaluator, writer, bundle


def test_volume_evaluator_writes_maps_on_the_input_grid(phantoms, tmp_path):
    cases = case_folder_datalist(phantoms)
    network = MedianDeviationNet(threshold=1.5)
    loader = DataLoader(Dataset(cases[:2], volume_transforms("mri")), batch_size=1)
    evaluator = VolumeAnomalyEvaluator(
        "cpu",
        loader,
        network,
        image_size=32,
        additional_metrics={"test": VolumeAnomalyMetrics()},
        val_handlers=[VolumeOutputWriter(str(tmp_path), network)],
    )
    evaluator.run()
    assert evaluator.state.metrics["voxel_auroc"] > 0.8  # lesions are the brightest tissue (ventricles deviate too)
    for case in cases[:2]:
        source, written = nib.load(case["image"]), nib.load(str(tmp_path / f"{case['name']}_anomaly_map.nii.gz"))
        # the map is on the input file's own voxel grid, although the network saw it reoriented to RAS
        assert nib.aff2axcodes(source.affine) != ("R", "A", "S")
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        lesion = np.asarray(nib.load(case["label"]).dataobj) > 0
        values = np.asarray(written.dataobj)
        assert values[lesion].mean() > 1.3 * values[~lesion & (values > 0)].mean()
        scores = json.loads((tmp_path / f"{case['name']}_scores.json").read_text())
        assert len(scores["slice_scores"]) == source.shape[2] and scores["normalized_score"] is not None
    rows = list(csv.DictReader(open(tmp_path / "volumes.csv")))
    assert [r["name"] for r in rows] == ["case000", "case001"] and all(r["dice"] != "" for r in rows)
    with pytest.raises(ValueError, match="batch_size=1"):
        VolumeAnomalyEvaluator("cpu", DataLoader(Dataset(cases[:2], volume_transforms("mri")), batch_size=2), network).run()


def test_dicom_series_to_nifti_map(tmp_path):
    """A DICOM series folder (from the pydicom wheel) in, a NIfTI map with the series' geometry out."""
    import pydicom.data

    series = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests", "98892001", "CT5N")
    items = volume_folder_datalist(series)
    assert items == [{"image": series, "name": "CT5N"}]
    network = MedianDeviationNet(threshold=1.5)
    loader = DataLoader(Dataset(items, volume_transforms("ct")), batch_size=1)
    VolumeAnomalyEvaluator("cpu", loader, network, image_size=32, val_handlers=[VolumeOutputWriter(str(tmp_path), network)]).run()
    reference = load_volume(series, canonical_axcodes=None)  # the series' stored voxel order
    written = nib.load(str(tmp_path / "CT5N_anomaly_map.nii.gz"))
    assert written.shape == tuple(reference.shape[1:])
    np.testing.assert_allclose(written.affine, reference.affine.numpy(), atol=1e-4)
    assert json.loads((tmp_path / "CT5N_scores.json").read_text())["files"]["mask"] == "CT5N_anomaly_mask.nii.gz"


def _dataset_error_of(call) -> str:
    """The DatasetError message under MONAI's "applying transform" RuntimeError wrappers."""
    with pytest.raises(Exception) as info:
        call()
    cause = root_cause(info.value)
    assert isinstance(cause, DatasetError), repr(cause)
    return str(cause)


def test_volumetric_bad_input_is_one_clear_error(phantoms, tmp_path):
    flat = tmp_path / "flat.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(flat)
    assert "flat.png" in _dataset_error_of(lambda: volume_transforms("mri")({"image": str(flat)}))
    small = tmp_path / "small_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(small))
    case = case_folder_datalist(phantoms)[0]
    assert "small_label" in _dataset_error_of(lambda: volume_transforms("mri")({**case, "label": str(small)}))
    nan_volume = tmp_path / "nan.nii.gz"
    data = np.ones((8, 8, 8), np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(nan_volume))
    assert "nan.nii.gz" in _dataset_error_of(lambda: volume_transforms("ct")({"image": str(nan_volume)}))
    zeros = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(zeros))
    assert "zeros.nii.gz" in _dataset_error_of(lambda: volume_transforms("mri")({"image": str(zeros)}))


def test_bundles_layout_and_overrides():
    """Both bundles have the model-zoo layout; every override file sets keys its configs define."""
    from monai.bundle import ConfigParser

    from multiad_monai.apps.cli import bundle_configs

    for bundle in (MEDICAL_BUNDLE, os.path.join(os.path.dirname(MEDICAL_BUNDLE), "multiad_2d")):
        for name in ("configs/metadata.json", "configs/train.json", "configs/evaluate.json",
                     "configs/inference.json", "configs/logging.conf", "configs/multi_gpu_train.json",
                     "configs/multi_gpu_evaluate.json", "docs/README.md", "LICENSE"):
            assert os.path.isfile(os.path.join(bundle, name)), (bundle, name)
        assert "network_data_format" in json.load(open(os.path.join(bundle, "configs", "metadata.json")))
        parsers = []  # MONAI workflow sections (initialize, finalize) may be added by any override
        for workflow in ("train", "evaluate", "infer"):
            parser = ConfigParser()
            parser.read_config(bundle_configs(bundle, workflow))
            parsers.append(parser)
        base = ("metadata.json", "train.json", "evaluate.json", "inference.json")
        for override in sorted(f for f in os.listdir(os.path.join(bundle, "configs")) if f.endswith(".json") and f not in base):
            for key in set(json.load(open(os.path.join(bundle, "configs", override)))) - {"initialize", "finalize"}:
                # a new key is fine when it is a new argument of a defined object or a new helper referenced by the file
                target = key.rsplit("#", 1)[0] if "#" in key else key
                referenced = any(f"@{key}" in json.dumps(v) for v in json.load(open(os.path.join(bundle, "configs", override))).values())
                assert referenced or any(defines_key(parser, target) for parser in parsers), (override, key)


def test_augmented_bundle_training_set_leaves_its_cache_alone(phantoms, tmp_path):
    """With ``augment``, random transforms follow the cached part of the chain: the cache must be copied
    on every read, or in-place steps after them (intensity normalisation) would change it epoch by epoch."""
    from monai.bundle import ConfigParser

    from multiad_monai.apps.cli import bundle_configs

    parser = ConfigParser()
    parser.read_config(bundle_configs(MEDICAL_BUNDLE, "train"))
    parser.update({"bundle_root": MEDICAL_BUNDLE, "dataset_dir": phantoms, "output_dir": str(tmp_path), "image_size": 32, "augment": True})
    dataset = parser.get_parsed_content("train#dataset")
    cached = dataset._cache[0]["image"].clone()
    images = [dataset[0]["image"] for _ in range(6)]
    torch.testing.assert_close(dataset._cache[0]["image"], cached)
    assert all(image.shape == (3, 32, 32) for image in images) and "teacher_features" not in dataset[0]


def test_medical_bundle_end_to_end(phantoms, tmp_path):
    output = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", phantoms, "--output_dir", str(output)]
    small = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    assert main(["demo", *common, *small]) == 0
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert set(metrics["test_cases"]).isdisjoint(metrics["training_cases"])
    assert {"slice_auroc", "voxel_auroc", "aupro", "dice"} <= set(metrics["metrics"])
    assert {"intensity_bright", "intensity_dark", "intensity_histogram", "feature_knn"} == set(metrics["baselines"])
    assert "intensity prior" in metrics["map"]  # the brain MRI default, chosen on the BraTS rotation's validation
    assert set(metrics["per_case"]) == set(metrics["test_cases"]) and "model" in metrics["per_case"][metrics["test_cases"][0]]
    report = (output / "eval" / "report.html").read_text()  # slice ROC, histograms and the per-volume table
    assert report.count("<svg") == 2 and all(f"{name}_anomaly_map.nii.gz" in report for name in metrics["test_cases"])
    assert "Model vs baselines" in report
    scan = os.path.join(phantoms, metrics["test_cases"][0], "flair.nii.gz")
    assert main(["infer", *common, "--set", "image_size=64", "--set", f"input_path={scan}"]) == 0
    assert "normalized_score" in (output / "inference" / "README.md").read_text()  # outputs explained beside them
    written = nib.load(str(output / "inference" / "flair_anomaly_map.nii.gz"))
    source = nib.load(scan)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-4)


def test_medical_bundle_with_slice_context_trains_and_evaluates(phantoms, tmp_path):
    """2.5D input (the ``brain_2p5d.json`` preset): three-channel volumes through training, evaluation, the
    intensity prior and the brightness baseline of the centre slice; the threshold from the training patients'
    lesion slices."""
    output = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", phantoms, "--output_dir", str(output)]
    small = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2"]
    context = ["--override", "brain_2p5d.json", "--set", 'baselines=["intensity_bright"]',
               "--set", "threshold_source=lesion_dice", "--set", "val_interval=1"]
    assert main(["demo", *common, *small, *context]) == 0
    settings = json.loads((output / "run.json").read_text())["fingerprint"]["settings"]
    assert settings["slice_context"] == 2 and settings["intensity_channel"] == 1
    assert settings["threshold_source"] == "lesion_dice"
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["voxel_auroc"] <= 1.0 and set(metrics["baselines"]) == {"intensity_bright"}
    assert "intensity prior" in metrics["map"]  # the prior scores the centre slice's brightness
    exported = tmp_path / "exported"
    assert main(["export", "--output_dir", str(output), "--bundle_dir", str(exported), "--format", "torchscript"]) == 0
    inference = json.loads((exported / "configs" / "inference.json").read_text())
    assert inference["slice_context"] == 2 and inference["intensity_channel"] == 1


def test_medical_bundle_with_the_intensity_prior_saves_it_and_exports_it(phantoms, tmp_path, capsys):
    """The intensity prior (the brain MRI default): fitted during training, saved in model.pt, evaluated, refused by a config
    without it, carried by the exported bundle's configs and TorchScript model."""
    output = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", phantoms, "--output_dir", str(output), "--set", "image_size=64"]
    prior = ["--set", "intensity_prior_weight=0.5", "--set", "intensity_prior_tail=upper"]
    small = ["--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1", "--set", 'baselines=["intensity_bright"]']
    assert main(["demo", *common, *small, *prior]) == 0
    state = torch.load(output / "model.pt", weights_only=True)["network"]
    assert float(state["intensity_prior.prior_weight"]) == 0.5 and state["intensity_prior.tails"].tolist() == [1.0, 0.0]
    assert all(np.isfinite(float(state[f"intensity_prior.{name}"])) for name in ("map_reference", "intensity_median", "intensity_high"))
    assert np.isfinite(float(state["threshold"]))
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["metrics"]["voxel_auroc"] <= 1.0
    described = "intensity prior, beyond the method (weight 0.5, upper tail, sum)"
    assert described in metrics["map"] and described in (output / "eval" / "report.html").read_text()
    capsys.readouterr()
    scan = os.path.join(phantoms, metrics["test_cases"][0], "flair.nii.gz")
    assert main(["infer", *common, "--set", f"input_path={scan}", "--set", "intensity_prior_weight=0"]) == 2  # no prior in that config
    assert "intensity_prior" in capsys.readouterr().err
    exported = tmp_path / "exported"
    assert main(["export", "--output_dir", str(output), "--bundle_dir", str(exported)]) == 0
    inference = json.loads((exported / "configs" / "inference.json").read_text())
    assert inference["intensity_prior_weight"] == 0.5 and inference["intensity_prior_tail"] == "upper"
    scripted = torch.jit.load(str(exported / "models" / "model.ts"))
    assert float(scripted.intensity_prior.map_reference) == float(state["intensity_prior.map_reference"])


def test_a_prior_added_after_training_equals_one_trained_with_it(phantoms, tmp_path):
    """scripts/add_intensity_prior.py (how the BraTS rotation measured the prior without retraining) gives the
    weights, prior statistics and threshold that training with the prior gives."""
    small = ["--bundle_root", "multiad_medical", "--dataset_dir", phantoms, "--set", "image_size=64", "--set", "num_epochs=2",
             "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    prior = ["--set", "intensity_prior_weight=0.5", "--set", "intensity_prior_tail=upper"]
    assert main(["train", *small, *prior, "--output_dir", str(tmp_path / "trained" / "fold")]) == 0
    assert main(["train", *small, "--set", "intensity_prior_weight=0", "--output_dir", str(tmp_path / "added" / "fold")]) == 0
    assert not any(key.startswith("intensity_prior.") for key in torch.load(tmp_path / "added" / "fold" / "model.pt", weights_only=True)["network"])
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "add_intensity_prior.py")
    result = subprocess.run([sys.executable, script, "--dataset_dir", phantoms, "--output_dir", str(tmp_path / "added"), "--name", "prior",
                             "--set", "image_size=64", *prior],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    trained = torch.load(tmp_path / "trained" / "fold" / "model.pt", weights_only=True)["network"]
    added = torch.load(tmp_path / "added" / "fold" / "model_prior.pt", weights_only=True)["network"]
    assert set(trained) == set(added) and "intensity_prior.map_reference" in added
    for key in trained:
        torch.testing.assert_close(added[key], trained[key], msg=key)


def test_medical_bundle_bad_dataset_is_one_line(tmp_path, capsys):
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "flair.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "flair.nii.gz").write_bytes(b"not a nifti")
    code = main(["train", "--bundle_root", "multiad_medical", "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "flair.nii.gz" in err[0]
    assert not os.path.exists(tmp_path / "out" / "model.pt")


# ----------------------------------------------------------------------------- real data (skips when absent)


def test_brats_training_slices_are_the_bmad_training_set():
    root = shared_data("brats2015")
    train, _ = split_cases(case_folder_datalist(root), test_cases=["pat0003", "pat0004"])
    sampler = RandNormalSliced(
        ["image"], num_samples=None, foreground_key="foreground", lesion_key="label", min_foreground=0.1, quarter_turns=-1
    )
    slices = normal_slice_datalist(train, volume_transforms("mri"), sampler)
    bmad_train = os.listdir(shared_data("bmad_brain_slices", "train", "good"))
    assert len(slices) == len(bmad_train) == 64
