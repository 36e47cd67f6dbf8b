"""Tests for medical volumes: loading and checks, intensity presets, slice sampling, inference, NIfTI output."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pydicom.data
import pytest
import torch
from monai.data import MetaTensor

from conftest import MedianDeviationNet

from multiad_monai.data import DatasetError, check_image_label_pair, load_volume, multimodal_volume
from multiad_monai.data.nifti_io import save_nifti as save_nifti_gzip
from multiad_monai.inferers import VolumeAnomalyInferer, write_volume_outputs
from multiad_monai.transforms import (
    CheckFinited,
    ForegroundPercentileScaled,
    HounsfieldWindowd,
    RandNormalSliced,
    slice_coverage,
    stack_slices,
    volume_slices,
)

SHAPE = (32, 32, 16)
# LAS storage: loading in RAS flips the first axis, so tests notice a lost or wrong reorientation.
AFFINE = np.array([[-1.5, 0, 0, 24.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
LESION = (slice(20, 24), slice(12, 16), slice(7, 10))  # stored voxel indices
DICOM_DIR = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests")
CT_SERIES = os.path.join(DICOM_DIR, "98892001", "CT5N")  # 5 axial slices, 2.5 mm apart
CT_WITH_GAP = os.path.join(DICOM_DIR, "77654033", "CT2")  # InstanceNumber 18, 180, 181, 182
MR_RADIAL = os.path.join(DICOM_DIR, "98892003", "MR700")  # 7 slices at 7 different orientations


def save_nifti(path, array, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def ras(array: np.ndarray) -> np.ndarray:
    """Stored (LAS) array in the RAS voxel order that load_volume returns."""
    return np.ascontiguousarray(array[::-1])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    """An ellipsoid 'brain' of tissue (100 +- 3) with a bright cubic lesion (180), its brain and lesion masks."""
    folder = tmp_path_factory.mktemp("phantom")
    x, y, z = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    brain = ((x - 15.5) / 13) ** 2 + ((y - 15.5) / 13) ** 2 + ((z - 7.5) / 7.5) ** 2 <= 1
    image = np.where(brain, 100 + 3 * np.random.default_rng(0).standard_normal(SHAPE), 0).astype(np.float32)
    lesion = np.zeros(SHAPE, np.uint8)
    lesion[LESION] = 1
    image[lesion > 0] = 180
    return {
        "image": save_nifti(folder / "t2.nii.gz", image),
        "brain": save_nifti(folder / "brain.nii.gz", brain.astype(np.uint8)),
        "lesion": save_nifti(folder / "lesion.nii.gz", lesion),
        "image_array": image,
        "brain_array": brain,
        "lesion_array": lesion,
    }


@pytest.fixture(scope="module")
def loaded(phantom) -> dict:
    """The phantom loaded in RAS and scaled to [0, 1] inside the brain."""
    data = {
        "image": load_volume(phantom["image"]),
        "brain": load_volume(phantom["brain"]),
        "lesion": load_volume(phantom["lesion"], allow_empty=True),
    }
    return ForegroundPercentileScaled("image", foreground_key="brain")(data)


# ----------------------------------------------------------------------------- loading


def test_load_nifti_in_ras_and_as_stored(phantom):
    volume = load_volume(phantom["image"])
    assert isinstance(volume, MetaTensor) and volume.dtype == torch.float32
    assert tuple(volume.shape) == (1, *SHAPE)
    assert nib.aff2axcodes(volume.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_array_equal(volume[0].numpy(), ras(phantom["image_array"]))
    assert volume.meta["filename_or_obj"] == phantom["image"]

    stored = load_volume(phantom["image"], canonical_axcodes=None)
    np.testing.assert_allclose(stored.affine.numpy(), AFFINE)
    np.testing.assert_array_equal(stored[0].numpy(), phantom["image_array"])


def test_load_mha_via_itk(phantom, tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.transpose(phantom["image_array"]))  # sitk arrays are (Z, Y, X)
    image.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "t2.mha"))
    volume = load_volume(str(tmp_path / "t2.mha"), canonical_axcodes=None)
    assert tuple(volume.shape) == (1, *SHAPE)
    np.testing.assert_allclose(np.abs(np.diag(volume.affine.numpy()))[:3], (1.5, 1.5, 3.0))
    np.testing.assert_array_equal(volume[0].numpy(), phantom["image_array"])


def test_load_dicom_series_and_multiframe_file():
    series = load_volume(CT_SERIES)
    assert tuple(series.shape) == (1, 16, 16, 5)
    np.testing.assert_allclose(np.abs(np.diag(series.affine.numpy()))[:3], (0.488281, 0.488281, 2.5), atol=1e-5)
    assert nib.aff2axcodes(series.affine.numpy()) == ("R", "A", "S")

    dose = load_volume(pydicom.data.get_testdata_file("rtdose.dcm"))  # one file holding 15 frames
    assert tuple(dose.shape) == (1, 10, 10, 15)


def test_multimodal_volume(phantom, tmp_path):
    second = save_nifti(tmp_path / "flair.nii.gz", phantom["image_array"] * 2)
    volume = multimodal_volume({"t2": phantom["image"], "flair": second}, ["flair", "t2"])
    assert tuple(volume.shape) == (2, *SHAPE)
    np.testing.assert_allclose(volume[0].numpy(), 2 * volume[1].numpy())
    assert volume.meta["modalities"] == ["flair", "t2"]
    assert nib.aff2axcodes(volume.affine.numpy()) == ("R", "A", "S")


def test_image_label_pair(phantom, loaded):
    check_image_label_pair(loaded["image"], loaded["lesion"])  # the phantom's own pair is accepted
    shifted = loaded["lesion"].clone()
    shifted.affine[0, 3] += 2.0  # 2 mm off: a label voxel no longer marks the image voxel at its index
    with pytest.raises(DatasetError, match="different affines"):
        check_image_label_pair(loaded["image"], shifted)
    with pytest.raises(DatasetError, match="spatial shape"):
        check_image_label_pair(loaded["image"], loaded["lesion"][:, :-1])


# ----------------------------------------------------------------------------- bad input


def raises_naming(*names: str):
    """pytest.raises(DatasetError) whose message names every one of ``names``."""
    return pytest.raises(DatasetError, match="(?s)" + "".join(f"(?=.*{re.escape(n)})" for n in names))


def test_bad_volumes_raise_naming_the_file(phantom, tmp_path):
    cases = {
        "missing.nii.gz": None,
        "flat.nii.gz": np.ones((32, 32), np.float32),
        "one_slice.nii.gz": np.ones((32, 32, 1), np.float32),
        "nan.nii.gz": np.where(np.arange(32 * 32 * 4).reshape(32, 32, 4) == 7, np.nan, 1.0).astype(np.float32),
        "zeros.nii.gz": np.zeros((8, 8, 4), np.float32),
    }
    for name, array in cases.items():
        path = str(tmp_path / name) if array is None else save_nifti(tmp_path / name, array)
        with raises_naming(path):
            load_volume(path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with raises_naming(str(garbage)):
        load_volume(str(garbage))
    with raises_naming(pydicom.data.get_testdata_file("MR_small.dcm"), "2D"):
        load_volume(pydicom.data.get_testdata_file("MR_small.dcm"))


def test_bad_pairs_and_modalities(phantom, tmp_path):
    image = load_volume(phantom["image"])
    small = load_volume(save_nifti(tmp_path / "small.nii.gz", np.ones((16, 32, 16), np.uint8)))
    shifted_affine = AFFINE.copy()
    shifted_affine[0, 3] += 0.01  # 10 micrometres: above the 1e-3 tolerance
    shifted_path = save_nifti(tmp_path / "shifted.nii.gz", phantom["lesion_array"] + 1, shifted_affine)
    shifted = load_volume(shifted_path)
    with raises_naming(phantom["image"], str(tmp_path / "small.nii.gz")):
        check_image_label_pair(image, small)
    with raises_naming(phantom["image"], shifted_path, "affine"):
        check_image_label_pair(image, shifted)
    with raises_naming("case7", "flair"):
        multimodal_volume({"t2": phantom["image"]}, ["t2", "flair"], case="case7")
    with raises_naming("'t2'", "'flair'", shifted_path):
        multimodal_volume({"t2": phantom["image"], "flair": shifted_path}, ["t2", "flair"])


def test_bad_dicom_folders(tmp_path):
    two_series = tmp_path / "two_series"
    shutil.copytree(CT_SERIES, two_series)
    shutil.copy(os.path.join(MR_RADIAL, "4467"), two_series / "4467")
    with raises_naming(str(two_series), "2 DICOM series"):
        load_volume(str(two_series))

    missing_slice = tmp_path / "missing_slice"
    shutil.copytree(CT_SERIES, missing_slice)
    os.remove(missing_slice / "2693")  # the middle one of five
    with raises_naming(str(missing_slice), "missing slices"):
        load_volume(str(missing_slice))

    with raises_naming(CT_WITH_GAP, "missing slices"):
        load_volume(CT_WITH_GAP)
    with raises_naming(MR_RADIAL, "not parallel"):
        load_volume(MR_RADIAL)
    (tmp_path / "empty").mkdir()
    with raises_naming(str(tmp_path / "empty"), "no DICOM"):
        load_volume(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- intensity presets


def test_foreground_percentile_scaling(phantom, loaded):
    image = loaded["image"]
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    lesion = ras(phantom["lesion_array"]) > 0
    assert np.all(image[0].numpy()[lesion] == 1.0)
    tissue = image[0].numpy()[ras(phantom["brain_array"]) & ~lesion]
    assert 0.0 < np.median(tissue) < 0.3

    raw = load_volume(phantom["image"])
    before = raw.clone()
    by_min = ForegroundPercentileScaled("image")({"image": raw})["image"]
    by_threshold = ForegroundPercentileScaled("image", threshold=50.0)({"image": raw})["image"]
    torch.testing.assert_close(by_min, by_threshold)
    torch.testing.assert_close(by_min.as_tensor(), image.as_tensor())
    assert torch.equal(raw, before)  # input untouched

    blanked = ForegroundPercentileScaled("image", "brain", outside_value=0.0)(
        {"image": raw + 500, "brain": loaded["brain"]}
    )["image"]
    assert float(blanked[0][~torch.as_tensor(ras(phantom["brain_array"]))].abs().max()) == 0.0


def test_percentile_scaling_rejects_flat_volumes(phantom):
    volume = load_volume(phantom["image"])
    for flat in (torch.zeros_like(volume), torch.full_like(volume, 7.0)):
        with raises_naming(phantom["image"]):
            ForegroundPercentileScaled("image")({"image": flat})
        with raises_naming(phantom["image"]):
            ForegroundPercentileScaled("image", "brain")({"image": flat, "brain": volume > 0})


def test_hounsfield_window():
    hu = MetaTensor(torch.tensor([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0]).reshape(1, 6, 1, 1))
    windowed = HounsfieldWindowd("ct")({"ct": hu})["ct"]
    torch.testing.assert_close(windowed.flatten(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    brain_window = HounsfieldWindowd("ct", window=80, level=40)({"ct": hu})["ct"]
    torch.testing.assert_close(brain_window.flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 1.0]))


def test_check_finite(phantom):
    volume = load_volume(phantom["image"])
    assert CheckFinited("image")({"image": volume})["image"] is volume
    broken = volume.clone()
    broken[0, 3, 4, 5] = float("inf")
    with raises_naming(phantom["image"], "NaN or infinite"):
        CheckFinited("image")({"image": broken})


# ----------------------------------------------------------------------------- slices


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("quarter_turns", [0, 1, -1, 2])
def test_slices_round_trip(axis, quarter_turns):
    volume = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 5, 6, 7)
    slices = volume_slices(volume, axis, quarter_turns)
    assert len(slices) == volume.shape[axis + 1]
    assert torch.equal(slices[3], torch.rot90(volume.select(axis + 1, 3), quarter_turns, dims=(1, 2)))
    assert torch.equal(stack_slices(slices, axis, quarter_turns), volume)


def test_sampler_draws_foreground_lesion_free_slices(phantom, loaded):
    coverage = slice_coverage(loaded["brain"]).numpy()
    expected = set(np.flatnonzero(coverage >= 0.3)) - set(range(LESION[2].start, LESION[2].stop))
    assert 0 < len(expected) < SHAPE[2] - 3

    def draw(seed: int) -> list[dict]:
        sampler = RandNormalSliced(
            ["image", "lesion"], num_samples=6, foreground_key="brain", min_foreground=0.3, lesion_key="lesion"
        )
        sampler.set_random_state(seed)
        return sampler(loaded) + sampler(loaded)

    samples = draw(seed=3)
    indices = [s["slice_index"] for s in samples]
    assert set(indices) <= expected and len(set(indices[:6])) == 6  # without replacement within one call
    assert indices == [s["slice_index"] for s in draw(seed=3)]
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 32, 32)
        assert float(sample["lesion"].max()) == 0.0
        assert sample["image"].meta["slice_index"] == sample["slice_index"]
        assert torch.equal(sample["image"].as_tensor(), volume_slices(loaded["image"])[sample["slice_index"]])
        assert sample["brain"] is loaded["brain"]  # keys not sliced are shared


def test_sampler_turns_slices_like_volume_slices(loaded):
    sampler = RandNormalSliced("image", axis=1, num_samples=2, quarter_turns=-1, min_foreground=0.0)
    sampler.set_random_state(0)
    for sample in sampler(loaded):
        expected = volume_slices(loaded["image"], axis=1, quarter_turns=-1)[sample["slice_index"]]
        assert torch.equal(sample["image"].as_tensor(), expected)


def test_sampler_without_normal_slices_names_the_file(phantom, loaded):
    with raises_naming(phantom["image"], "no normal slice"):
        RandNormalSliced("image", foreground_key="brain", min_foreground=0.99)(loaded)
    everywhere = {**loaded, "lesion": torch.ones_like(loaded["lesion"])}
    with raises_naming(phantom["image"], "hold lesions"):
        RandNormalSliced("image", lesion_key="lesion")(everywhere)


# ----------------------------------------------------------------------------- inference and outputs


def lesion_mask_ras(phantom) -> np.ndarray:
    return ras(phantom["lesion_array"]) > 0


@pytest.mark.parametrize("axis", [2, 0])
def test_volume_inferer_finds_the_lesion(phantom, loaded, axis):
    network = MedianDeviationNet().train()
    inferer = VolumeAnomalyInferer(network, axis=axis, batch_size=5, image_size=64)
    image = loaded["image"]
    before = image.clone()
    anomaly_map, slice_scores, volume_score = inferer(image, mask=loaded["brain"])

    assert isinstance(anomaly_map, MetaTensor) and anomaly_map.dtype == torch.float32
    assert tuple(anomaly_map.shape) == (1, *SHAPE)
    assert torch.equal(anomaly_map.affine, image.affine)
    assert anomaly_map.meta["filename_or_obj"] == phantom["image"]
    assert torch.equal(image, before) and network.training  # input untouched, mode restored
    peak = np.unravel_index(int(anomaly_map.argmax()), SHAPE)
    assert lesion_mask_ras(phantom)[peak], f"map maximum at {peak} is outside the lesion"
    assert float(anomaly_map[0][~torch.as_tensor(ras(phantom["brain_array"]))].abs().max()) == 0.0
    assert slice_scores.shape == (SHAPE[axis],) and volume_score == slice_scores.max()
    lesion_slices = np.flatnonzero(lesion_mask_ras(phantom).any(axis=tuple(d for d in range(3) if d != axis)))
    assert set(np.argsort(slice_scores)[-len(lesion_slices):]) == set(lesion_slices)
    for i in (0, SHAPE[axis] // 2):
        assert slice_scores[i] == pytest.approx(float(anomaly_map.select(axis + 1, i).max()))

    same, *_ = VolumeAnomalyInferer(network, axis=axis, batch_size=SHAPE[axis], image_size=64)(image, loaded["brain"])
    torch.testing.assert_close(same.as_tensor(), anomaly_map.as_tensor())


def test_volume_inferer_skips_slices_without_foreground(phantom, loaded):
    class CountingNet(MedianDeviationNet):
        slices_seen = 0

        def forward(self, images):
            CountingNet.slices_seen += images.shape[0]
            return super().forward(images)

    network = CountingNet()
    masked, masked_scores, _ = VolumeAnomalyInferer(network, batch_size=3, image_size=64)(loaded["image"], loaded["brain"])
    brain = torch.as_tensor(ras(phantom["brain_array"]))
    slices_with_brain = int(brain.flatten(0, 1).any(dim=0).sum())
    assert 0 < slices_with_brain < SHAPE[2] and CountingNet.slices_seen == slices_with_brain

    whole, *_ = VolumeAnomalyInferer(network, batch_size=3, image_size=64)(loaded["image"])
    expected = whole.as_tensor() * brain
    torch.testing.assert_close(masked.as_tensor(), expected)
    expected_scores = [float(expected[..., i].max()) for i in range(SHAPE[2])]
    np.testing.assert_allclose(masked_scores, expected_scores, rtol=1e-6)


def test_volume_inferer_turns_slices_back(loaded):
    network = MedianDeviationNet()
    plain, *_ = VolumeAnomalyInferer(network, image_size=48)(loaded["image"])
    turned, *_ = VolumeAnomalyInferer(network, image_size=48, quarter_turns=1)(loaded["image"])
    torch.testing.assert_close(turned.as_tensor(), plain.as_tensor(), atol=1e-5, rtol=1e-5)


def test_default_inferer_size_and_bad_mask(phantom, loaded):
    inferer = VolumeAnomalyInferer(MedianDeviationNet())
    anomaly_map, _, _ = inferer(loaded["image"][:, :, :, 6:10])
    assert tuple(anomaly_map.shape) == (1, 32, 32, 4)
    with raises_naming(phantom["image"], "mask"):
        inferer(loaded["image"], mask=loaded["brain"][:, :16])


def test_written_outputs_reload_with_the_affine(loaded, tmp_path):
    network = MedianDeviationNet()
    inferer = VolumeAnomalyInferer(network, image_size=64)
    anomaly_map, slice_scores, volume_score = inferer(loaded["image"], mask=loaded["brain"])
    threshold = float(anomaly_map.max()) / 2
    written = write_volume_outputs(str(tmp_path), "case1", anomaly_map, threshold, slice_scores, volume_score)
    expected_files = ["case1_anomaly_map.nii.gz", "case1_anomaly_mask.nii.gz", "case1_scores.json"]
    assert sorted(os.listdir(tmp_path)) == expected_files

    saved_map, saved_mask = nib.load(written["map"]), nib.load(written["mask"])
    # written on the input file's grid (LAS here), though computed on the RAS-oriented volume
    for saved in (saved_map, saved_mask):
        assert saved.shape == SHAPE
        np.testing.assert_allclose(saved.affine, AFFINE, atol=1e-5)
    assert saved_map.get_data_dtype() == np.float32 and saved_mask.get_data_dtype() == np.uint8
    stored_order = anomaly_map[0].numpy()[::-1]  # RAS -> LAS: the first axis flips back
    np.testing.assert_allclose(saved_map.get_fdata(), stored_order, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(saved_mask.dataobj), stored_order >= threshold)
    reloaded = load_volume(written["map"])
    assert torch.allclose(reloaded.affine, loaded["image"].affine, atol=1e-5)
    torch.testing.assert_close(reloaded[0], anomaly_map[0].float())

    report = json.loads(open(written["scores"]).read())
    assert report["volume_score"] == pytest.approx(volume_score) and report["threshold"] == pytest.approx(threshold)
    assert report["slice_scores"] == pytest.approx(slice_scores.tolist()) and report["anomalous"] is True

    # without a threshold: no mask (the earlier one is removed), a note instead
    written = write_volume_outputs(str(tmp_path), "case1", anomaly_map, float("nan"), slice_scores, volume_score)
    assert "mask" not in written and not os.path.exists(tmp_path / "case1_anomaly_mask.nii.gz")
    report = json.loads(open(written["scores"]).read())
    assert report["threshold"] is None and "no anomaly mask" in report["note"]
    assert sorted(os.listdir(tmp_path)) == ["case1_anomaly_map.nii.gz", "case1_scores.json"]  # no temporary files


# ----------------------------------------------------------------------------- real data (skips when absent)


@pytest.mark.real_data
def test_save_nifti_writes_nibabels_bytes_gzipped(tmp_path):
    image = nib.Nifti1Image(np.random.default_rng(0).random(SHAPE, dtype=np.float32), AFFINE)
    save_nifti_gzip(image, str(tmp_path / "fast.nii.gz"))
    nib.save(image, str(tmp_path / "nibabel.nii.gz"))
    with gzip.open(tmp_path / "fast.nii.gz") as fast, gzip.open(tmp_path / "nibabel.nii.gz") as plain:
        assert fast.read() == plain.read()
    reread = nib.load(str(tmp_path / "fast.nii.gz"))
    np.testing.assert_array_equal(reread.get_fdata(dtype=np.float32), image.get_fdata(dtype=np.float32))
    save_nifti_gzip(image, str(tmp_path / "again.nii.gz"))  # no timestamp: the same image gives the same file
    assert (tmp_path / "again.nii.gz").read_bytes() == (tmp_path / "fast.nii.gz").read_bytes()


def test_sampler_reproduces_the_bmad_brain_slices():
    """The shared BMAD slices were cut from the BraTS volumes; the presets and the sampler give the same set."""
    from PIL import Image

    from conftest import shared_data

    case = shared_data("brats2015", "pat0003")
    slices_root = shared_data("bmad_brain_slices")
    data = {
        "image": load_volume(os.path.join(case, "flair.nii.gz")),
        "brain": load_volume(os.path.join(case, "brainmask.nii.gz")),
        "lesion": load_volume(os.path.join(case, "seg.nii.gz"), allow_empty=True),
    }
    data = ForegroundPercentileScaled("image", foreground_key="brain")(data)
    sampler = RandNormalSliced("image", foreground_key="brain", min_foreground=0.1, lesion_key="lesion")
    normal = sampler.normal_slices(data)
    good_folder = os.path.join(slices_root, "valid", "good", "img")
    good_files = sorted(f for f in os.listdir(good_folder) if f.startswith("pat0003_"))
    assert [f"pat0003_{i:03d}.png" for i in normal] == good_files

    index = int(normal[len(normal) // 2])
    png = np.asarray(Image.open(os.path.join(slices_root, "valid", "good", "img", f"pat0003_{index:03d}.png")))
    ours = volume_slices(data["image"], axis=2, quarter_turns=-1)[index][0].numpy() * 255
    assert np.abs(ours - png).max() <= 1.0
