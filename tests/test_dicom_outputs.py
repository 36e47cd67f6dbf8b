"""DICOM in, DICOM out: series written from phantoms (and BraTS, when present) and pydicom's small CT series go
through the volume evaluator; the anomaly mask comes out as a DICOM SEG and the heatmap as a Parametric Map
that ``dciodvfy`` (Debian ``dicom3tools``; ``.ci/run`` installs it) accepts, whose pixels equal the NIfTI
outputs of the same run once both are put on the series' grid by SimpleITK, and whose geometry is the series'.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import DataLoader, Dataset

hd = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[test]')")
sitk = pytest.importorskip("SimpleITK")

from conftest import MedianDeviationNet, shared_data  # noqa: E402
from multiad_monai.data import DatasetError, load_volume, make_demo_volumes, volume_folder_datalist  # noqa: E402
from multiad_monai.data.dicom_outputs import frames_on_series, write_dicom_outputs  # noqa: E402
from multiad_monai.data.dicom_series import is_dicom_source, read_dicom_series, write_dicom_series  # noqa: E402
from multiad_monai.engines import VolumeAnomalyEvaluator  # noqa: E402
from multiad_monai.handlers import DicomOutputWriter, VolumeOutputWriter  # noqa: E402
from multiad_monai.transforms import volume_transforms  # noqa: E402

PYDICOM_CT = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "dicomdirtests", "98892001", "CT5N")


def dciodvfy_errors(path: str) -> list[str]:
    """The ``Error`` lines dciodvfy prints for a DICOM file; skips the test when dciodvfy is not installed."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools; .ci/run installs it)")
    result = subprocess.run(["dciodvfy", path], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def frames_in_source_order(derived: pydicom.Dataset, source: list[pydicom.Dataset]) -> np.ndarray:
    """The frames of a multi-frame derived object (SEG, Parametric Map) in the order of the ``source`` slices, matched
    by Image Position (Patient): highdicom may store them in another order."""
    positions = [tuple(np.round(np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, dtype=float), 3))
                 for g in derived.PerFrameFunctionalGroupsSequence]
    order = [positions.index(tuple(np.round(np.asarray(ds.ImagePositionPatient, dtype=float), 3))) for ds in source]
    return derived.pixel_array[order]


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory) -> dict:
    """A phantom case as a NIfTI file and as an MR DICOM series with the same geometry (LPS-stored, 1 mm)."""
    root = tmp_path_factory.mktemp("dicom")
    cases = make_demo_volumes(str(root / "cases"), num_cases=2, shape=(40, 36, 24))
    nifti = os.path.join(cases, "case001", "flair.nii.gz")
    image = nib.load(nifti)
    folder = str(root / "case001_mr")
    write_dicom_series(np.asarray(image.dataobj), image.affine, folder)
    return {"nifti": nifti, "series": folder, "label": os.path.join(cases, "case001", "seg.nii.gz")}


def _run(series: str, output_dir: str, threshold: float = 1.5, preset: str = "mri") -> None:
    network = MedianDeviationNet(threshold=threshold)
    loader = DataLoader(Dataset(volume_folder_datalist(series), volume_transforms(preset)), batch_size=1)
    writers = [VolumeOutputWriter(output_dir, network), DicomOutputWriter(output_dir, network, model_version="9.8.7")]
    VolumeAnomalyEvaluator("cpu", loader, network, image_size=32, val_handlers=writers).run()


def _on_series_grid(nifti_path: str, series: str) -> tuple[np.ndarray, list[str]]:
    """The NIfTI volume resampled (nearest, no transform) onto the series' grid by SimpleITK, ``(N, Rows,
    Columns)`` in SimpleITK's slice order, and the SOP Instance UIDs of those slices."""
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(series)
    reader.SetFileNames(files)
    reference = reader.Execute()
    resampled = sitk.Resample(sitk.ReadImage(nifti_path), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return sitk.GetArrayFromImage(resampled), uids


def _check_outputs(series: str, output_dir: str, name: str) -> dict:
    seg_path, pm_path = os.path.join(output_dir, f"{name}_seg.dcm"), os.path.join(output_dir, f"{name}_anomaly_map.dcm")
    for path in (seg_path, pm_path):
        assert dciodvfy_errors(path) == [], path
    source = read_dicom_series(series)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    seg = hd.seg.segread(seg_path)
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID and seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "anomaly" and len(seg.SegmentSequence) == 1
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "multiad-monai" and algorithm.AlgorithmVersion == "9.8.7"
    # every SEG frame lies where its source slice lies, with the source's spacing
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in source[0].PixelSpacing]
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source[0].ImageOrientationPatient],
        atol=1e-6,
    )
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[referenced].ImagePositionPatient],
            atol=1e-3,
        )
    # the SEG's pixels are the NIfTI mask of the same run, put on the series' grid independently (SimpleITK)
    mask, uids = _on_series_grid(os.path.join(output_dir, f"{name}_anomaly_mask.nii.gz"), series)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    assert mask.any() and (~mask.astype(bool)).any()  # a mask with both values: the comparison means something
    np.testing.assert_array_equal(pixels, mask)
    # the parametric map holds the float NIfTI map on the same grid, with its value mapping
    heatmap, _ = _on_series_grid(os.path.join(output_dir, f"{name}_anomaly_map.nii.gz"), series)
    pm = pydicom.dcmread(pm_path)
    frames = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID: i
        for i, f in enumerate(pm.PerFrameFunctionalGroupsSequence)
    }
    np.testing.assert_allclose(pm.pixel_array[[frames[u] for u in uids]], heatmap, rtol=0, atol=1e-6)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
    assert ">= 1.5 anomalous" in mapping.LUTExplanation and pm.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    report = json.loads(open(os.path.join(output_dir, f"{name}_dicom.json")).read())
    assert report["threshold"] == 1.5 and report["source_series_instance_uid"] == source[0].SeriesInstanceUID
    assert report["objects"]["seg"]["sop_instance_uid"] == seg.SOPInstanceUID and report["normalized_score"] is not None
    return report


def test_phantom_series_has_the_nifti_geometry_and_is_valid_dicom(phantom_series):
    assert is_dicom_source(phantom_series["series"]) and not is_dicom_source(phantom_series["nifti"])
    from_dicom = load_volume(phantom_series["series"])
    from_nifti = load_volume(phantom_series["nifti"])
    np.testing.assert_allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(from_dicom.numpy(), np.rint(from_nifti.numpy()))
    assert dciodvfy_errors(os.path.join(phantom_series["series"], "IM0005.dcm")) == []
    with pytest.raises(ValueError, match="exists already"):
        write_dicom_series(np.zeros((4, 4, 4)), np.eye(4), phantom_series["series"])


def test_phantom_series_gives_valid_seg_and_parametric_map(phantom_series, tmp_path):
    _run(phantom_series["series"], str(tmp_path))
    report = _check_outputs(phantom_series["series"], str(tmp_path), "case001_mr")
    # per-slice scores are tied to the DICOM instances when the series is cut along the scored axis
    assert [s["score"] for s in report["slice_scores_by_instance"]] == report["slice_scores"]


def test_pydicom_ct_series_gives_valid_seg_and_parametric_map(tmp_path):
    if not os.path.isdir(PYDICOM_CT):
        pytest.skip(f"pydicom's test series is not in this pydicom: {PYDICOM_CT}")
    _run(PYDICOM_CT, str(tmp_path), preset="ct")
    _check_outputs(PYDICOM_CT, str(tmp_path), "CT5N")


@pytest.mark.real_data
@pytest.mark.slow
def test_brats_series_gives_valid_seg_and_parametric_map(tmp_path):
    flair = os.path.join(shared_data("brats2015", "pat0003"), "flair.nii.gz")
    image = nib.load(flair)
    series = str(tmp_path / "pat0003_flair")
    write_dicom_series(np.asarray(image.dataobj), image.affine, series, series_description="BraTS FLAIR")
    _run(series, str(tmp_path / "out"))
    report = _check_outputs(series, str(tmp_path / "out"), "pat0003_flair")
    assert len(report["slice_scores"]) == image.shape[2]


def test_no_threshold_writes_the_map_only_and_removes_an_old_seg(phantom_series, tmp_path):
    _run(phantom_series["series"], str(tmp_path))
    assert (tmp_path / "case001_mr_seg.dcm").exists()
    _run(phantom_series["series"], str(tmp_path), threshold=float("nan"))
    assert not (tmp_path / "case001_mr_seg.dcm").exists() and (tmp_path / "case001_mr_anomaly_map.dcm").exists()
    report = json.loads((tmp_path / "case001_mr_dicom.json").read_text())
    assert report["threshold"] is None and "seg" not in report["objects"] and "no SEG" in report["note"]
    assert dciodvfy_errors(str(tmp_path / "case001_mr_anomaly_map.dcm")) == []


def test_a_map_off_the_series_grid_is_refused_and_nothing_written(phantom_series, tmp_path):
    volume = load_volume(phantom_series["series"])
    shifted = volume.affine.numpy().copy()
    shifted[:3, 3] += 0.5  # half a voxel: another grid
    with pytest.raises(DatasetError, match="does not lie on the map's voxel grid") as info:
        write_dicom_outputs(str(tmp_path), "x", phantom_series["series"], volume, shifted, 1.0, np.zeros(24), 1.0)
    assert phantom_series["series"] in str(info.value) and os.listdir(tmp_path) == []
    source = read_dicom_series(phantom_series["series"])
    with pytest.raises(DatasetError, match="reaches outside"):
        frames_on_series(volume.numpy()[0, :, :, :10], volume.affine.numpy(), source, name="cut")
    with pytest.raises(DatasetError, match="holds no DICOM image"):
        read_dicom_series(str(tmp_path))
    source[0].NumberOfFrames = 2  # enhanced multi-frame sources: not supported (the handler warns, NIfTI still written)
    with pytest.raises(NotImplementedError, match="multi-frame"):
        frames_on_series(volume.numpy()[0], volume.affine.numpy(), source, name="enhanced")


def test_nifti_inputs_get_no_dicom_outputs(phantom_series, tmp_path):
    _run(phantom_series["nifti"], str(tmp_path))
    written = sorted(os.listdir(tmp_path))
    assert "flair_anomaly_mask.nii.gz" in written and not [n for n in written if n.endswith((".dcm", "_dicom.json"))]


def test_a_heatmap_file_becomes_a_parametric_map_of_its_series(phantom_series, tmp_path):
    """The MONAI Label app's path: a float NIfTI heatmap computed on a conversion of the series, as a Parametric
    Map of the series (what the app stores in a DICOMweb PACS)."""
    from multiad_monai.data.dicom_outputs import heatmap_parametric_map
    from multiad_monai.data.dicom_series import save_dicom_file

    image = nib.load(phantom_series["nifti"])
    heatmap = np.random.default_rng(0).random(image.shape).astype(np.float32)
    path = str(tmp_path / "heatmap.nii.gz")
    nib.save(nib.Nifti1Image(heatmap, image.affine), path)
    parametric_map = heatmap_parametric_map(phantom_series["series"], path, 0.5, "1.2.3")
    source = read_dicom_series(phantom_series["series"])
    expected, _ = frames_on_series(heatmap, image.affine, source)
    assert np.array_equal(frames_in_source_order(parametric_map, source), expected)
    assert parametric_map.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    save_dicom_file(parametric_map, str(tmp_path / "map.dcm"))
    assert dciodvfy_errors(str(tmp_path / "map.dcm")) == []
    shifted = image.affine.copy()
    shifted[:3, 3] += 0.5
    nib.save(nib.Nifti1Image(heatmap, shifted), str(tmp_path / "elsewhere.nii.gz"))
    with pytest.raises(DatasetError, match="elsewhere.nii.gz.*voxel grid"):
        heatmap_parametric_map(phantom_series["series"], str(tmp_path / "elsewhere.nii.gz"), 0.5, "1.2.3")


def test_an_old_highdicom_with_numpy_2_refuses_the_seg_in_one_line(phantom_series, monkeypatch):
    """MONAI Label's environment (pydicom 2) has highdicom 0.22, whose Segmentation code fails under NumPy 2 with an
    AttributeError deep inside; the SEG is refused with the reason instead (the handler then warns and keeps NIfTI)."""
    from multiad_monai.data.dicom_outputs import anomaly_segmentation

    source = read_dicom_series(phantom_series["series"])
    mask = np.zeros((len(source), int(source[0].Rows), int(source[0].Columns)), dtype=np.uint8)
    monkeypatch.setattr(hd, "__version__", "0.22.0")
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(NotImplementedError, match="highdicom 0.22.0 cannot write a DICOM Segmentation with NumPy 2.1.0"):
        anomaly_segmentation(source, mask, 0.5, "1")
