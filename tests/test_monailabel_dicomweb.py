"""MONAI Label on a real PACS: the app runs with ``--studies http://127.0.0.1:PORT/dicom-web`` (Orthanc from
``apps/orthanc/orthanc.json``); a study uploaded to Orthanc is inferred over HTTP, the reader's accepted label
(``tag=final``) lands in Orthanc as a DICOM SEG of the study (QIDO/WADO), and the float heatmap is
retrievable from the datastore.

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

from test_dicomweb import _qido, orthanc_server  # noqa: E402
from test_monailabel import _monailabel_env, _server  # noqa: E402

from multiad_monai.apps.cli import main  # noqa: E402
from multiad_monai.data import make_demo_volumes  # noqa: E402
from multiad_monai.data.dicom_series import write_dicom_series  # noqa: E402
from multiad_monai.data.dicomweb import store_dicomweb_instances  # noqa: E402


def test_monailabel_serves_a_dicomweb_study_and_stores_the_seg_in_orthanc(tmp_path, monkeypatch):
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
            # the reader asks for inference on the study's series (MONAI Label's image id is the series UID)
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

        seg = DICOMwebClient(dicomweb).retrieve_series(study, segs[0])[0]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
