"""MONAI Label on a real PACS: the app runs with ``--studies http://127.0.0.1:PORT/dicom-web`` (Orthanc from
``apps/orthanc/orthanc.json``); a study uploaded to Orthanc is inferred over HTTP, the float heatmap lands in
Orthanc as a DICOM Parametric Map of the series (and stays retrievable from the datastore), and the reader's
accepted label (``tag=final``) lands there as a DICOM SEG of the study (QIDO/WADO).

Needs the MONAI Label environment (``.monailabel-env``) with dcmqi's ``itkimage2segimage``, which MONAI
Label's DICOMweb datastore uses to write the SEG (without it MONAI Label downloads dcmqi at start); ``.ci/run``
installs both, and Orthanc. Skips, saying so, otherwise.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install -e '.[test]')")

from test_dicom_outputs import dciodvfy_errors, frames_in_source_order  # noqa: E402
from test_dicomweb import _qido, orthanc_server  # noqa: E402
from test_monailabel import _monailabel_env, _server  # noqa: E402

from multiad_monai.apps.cli import main  # noqa: E402
from multiad_monai.data import make_demo_volumes  # noqa: E402
from multiad_monai.data.dicom_outputs import frames_on_series  # noqa: E402
from multiad_monai.data.dicom_series import read_dicom_series, save_dicom_file, write_dicom_series  # noqa: E402
from multiad_monai.data.dicomweb import store_dicomweb_instances  # noqa: E402


def dciodvfy_errors_of(dataset: pydicom.Dataset, tmp_path) -> list[str]:
    path = str(tmp_path / "retrieved.dcm")
    save_dicom_file(dataset, path)
    return dciodvfy_errors(path)


def test_monailabel_serves_a_dicomweb_study_and_stores_heatmap_and_seg_in_orthanc(tmp_path, monkeypatch):
    env = _monailabel_env()
    if not os.path.isfile(os.path.join(env, "bin", "itkimage2segimage")):
        pytest.skip(f"dcmqi (itkimage2segimage) is not installed in {env}; .ci/run installs it (pip install dcmqi)")
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=3, shape=(40, 36, 24))
    model_dir = tmp_path / "run"
    tiny = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    assert main(["train", "--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", str(model_dir), *tiny]) == 0
    image = nib.load(os.path.join(cases, "case002", "flair.nii.gz"))
    files = write_dicom_series(np.asarray(image.dataobj), image.affine, str(tmp_path / "series"))
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
    monkeypatch.setenv("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "monailabel_cache"))

    with orthanc_server(tmp_path) as dicomweb:
        store_dicomweb_instances(dicomweb, files)
        with _server(env, dicomweb, model_dir / "model.pt", tmp_path) as (base, info):
            assert "multiad" in info["models"]
            # the reader asks for inference on the study's series (MONAI Label's image id is the series UID);
            # the heatmap goes to the PACS as a Parametric Map of that series
            response = requests.post(f"{base}/infer/multiad", params={"image": series, "output": "json"}, timeout=300)
            assert response.status_code == 200, response.text[:500]
            result = response.json()
            stored_map = result["heatmap_dicom"]
            assert "error" not in stored_map, stored_map
            kept = nib.load(result["heatmap"])  # read now: the next request keeps its heatmap under the same name
            heatmap_values, heatmap_affine = np.asarray(kept.dataobj, dtype=np.float32).copy(), kept.affine
            response = requests.post(f"{base}/infer/multiad", params={"image": series, "output": "image"}, timeout=300)
            assert response.status_code == 200, response.text[:500]
            (tmp_path / "label.nii.gz").write_bytes(response.content)
            label = nib.load(str(tmp_path / "label.nii.gz"))
            assert label.shape == image.shape and set(np.unique(np.asarray(label.dataobj))) <= {0, 1}
            # ... accepts it: MONAI Label writes it as a DICOM SEG and stores it in Orthanc (STOW-RS)
            with open(tmp_path / "label.nii.gz", "rb") as f:
                saved = requests.put(
                    f"{base}/datastore/label", params={"image": series, "tag": "final"},
                    files={"label": ("label.nii.gz", f)}, data={"params": json.dumps({"label_info": [{"name": "anomaly"}]})},
                    timeout=300,
                )
            assert saved.status_code == 200, saved.text[:500]
            # the float heatmap of the same request is retrievable over HTTP from the datastore
            heatmap = requests.get(f"{base}/datastore/label", params={"label": series, "tag": "anomaly_heatmap"}, timeout=60)
            assert heatmap.status_code == 200
            (tmp_path / "heatmap.nii.gz").write_bytes(heatmap.content)
            assert nib.load(str(tmp_path / "heatmap.nii.gz")).shape == image.shape

        # QIDO: the study now holds a SEG series; WADO: it references the source series
        found = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in _qido(f"{dicomweb}/studies/{study}/series")}
        segs = [uid for uid, modality in found.items() if modality == "SEG"]
        assert series in found and len(segs) == 1
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(dicomweb)
        seg = client.retrieve_series(study, segs[0])[0]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        # WADO: the Parametric Map of the first request, on the source slices, holds the heatmap's values
        parametric_map = client.retrieve_instance(study, stored_map["series_instance_uid"], stored_map["sop_instance_uid"])
        assert parametric_map.SOPClassUID == pydicom.uid.ParametricMapStorage and stored_map["study_instance_uid"] == study
        assert parametric_map.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert parametric_map.FrameOfReferenceUID == source.FrameOfReferenceUID
        source_slices = read_dicom_series(str(tmp_path / "series"))
        expected, _ = frames_on_series(heatmap_values, heatmap_affine, source_slices)
        assert np.allclose(frames_in_source_order(parametric_map, source_slices), expected, atol=1e-6)
        assert dciodvfy_errors_of(parametric_map, tmp_path) == []
