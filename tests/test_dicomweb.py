"""A real PACS: Orthanc with its DICOMweb plugin, started on 127.0.0.1 from ``apps/orthanc/orthanc.json``.

A phantom study is uploaded (STOW-RS), ``multiad infer`` reads it by URL (QIDO-RS / WADO-RS), and the anomaly
SEG and parametric map are found in Orthanc afterwards, referencing the study. ``.ci/run`` installs Orthanc
(Debian ``orthanc``, ``orthanc-dicomweb``); elsewhere the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e '.[test]')")
pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install -e '.[test]')")

from multiad_monai.apps.cli import main  # noqa: E402
from multiad_monai.data import DatasetError, make_demo_volumes, volume_inference_datalist  # noqa: E402
from multiad_monai.data.dicom_series import write_dicom_series  # noqa: E402
from multiad_monai.data.dicomweb import parse_dicomweb_url, store_dicomweb_instances  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ORTHANC_CONFIG = os.path.join(REPO, "apps", "orthanc", "orthanc.json")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def orthanc_server(tmp_path):
    """A running Orthanc (repository config, a free port, storage under ``tmp_path``): yields the DICOMweb root."""
    binary = shutil.which("Orthanc")
    if binary is None or not os.path.isfile(DICOMWEB_PLUGIN):
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (Debian orthanc, orthanc-dicomweb; .ci/run installs them)")
    port = _free_port()
    config_dir = tmp_path / "orthanc_config"
    config_dir.mkdir()
    shutil.copy(ORTHANC_CONFIG, config_dir / "orthanc.json")
    (config_dir / "port.json").write_text(json.dumps({"HttpPort": port}))  # Orthanc merges the folder's files
    storage = tmp_path / "orthanc_storage"
    storage.mkdir()
    log_path = tmp_path / "orthanc.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [binary, str(config_dir)], env={**os.environ, "MULTIAD_ORTHANC_STORAGE": str(storage)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/system", timeout=5):
                        break
                except (urllib.error.URLError, ConnectionError):
                    assert server.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                    time.sleep(0.5)
            yield f"{base}/dicom-web"
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


@pytest.fixture(scope="module")
def phantom_study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    cases = make_demo_volumes(str(root / "cases"), num_cases=3, shape=(40, 36, 24))
    image = nib.load(os.path.join(cases, "case002", "flair.nii.gz"))
    folder = str(root / "series")
    files = write_dicom_series(np.asarray(image.dataobj), image.affine, folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return {"files": files, "study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID), "cases": cases}


def _qido(url: str) -> list[dict]:
    request = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else []


def test_multiad_infer_reads_a_dicomweb_study_and_stores_seg_and_map_back(phantom_study, tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    common = ["--bundle_root", "multiad_medical", "--output_dir", str(run)]
    assert main(["train", *common, "--dataset_dir", phantom_study["cases"], *tiny]) == 0
    with orthanc_server(tmp_path) as dicomweb:
        assert len(store_dicomweb_instances(dicomweb, phantom_study["files"])) == 24
        study_url = f"{dicomweb}/studies/{phantom_study['study']}"
        assert main(["infer", *common, "--set", "image_size=64", "--set", f"input_path={study_url}"]) == 0
        output_dir = run / "inference"
        name = phantom_study["series"]  # each downloaded series is named by its SeriesInstanceUID
        report = json.loads((output_dir / f"{name}_dicom.json").read_text())
        assert report["stored_to"]["dicomweb"] == dicomweb and len(report["stored_to"]["sop_instance_uids"]) == 2
        assert report["model_version"] == json.load(open(os.path.join(REPO, "bundles", "multiad_medical", "configs", "metadata.json")))["version"]
        assert (output_dir / f"{name}_anomaly_mask.nii.gz").exists()  # the NIfTI outputs of the same run

        # QIDO: the study now holds the source series, the SEG and the parametric map
        by_uid = {s["0020000E"]["Value"][0]: s for s in _qido(f"{study_url}/series")}
        seg_uid = report["objects"]["seg"]["series_instance_uid"]
        pm_uid = report["objects"]["parametric_map"]["series_instance_uid"]
        assert set(by_uid) == {phantom_study["series"], seg_uid, pm_uid}
        assert by_uid[seg_uid]["00080060"]["Value"] == ["SEG"]
        # WADO: the SEG comes back referencing the source series; the heatmap is retrievable too
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(dicomweb)
        seg = client.retrieve_series(phantom_study["study"], seg_uid)[0]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == phantom_study["series"]
        assert seg.SegmentSequence[0].SegmentLabel == "anomaly"
        heatmap = client.retrieve_series(phantom_study["study"], pm_uid)[0]
        assert heatmap.SOPClassUID == pydicom.uid.ParametricMapStorage and heatmap.pixel_array.shape == (24, 36, 40)
        np.testing.assert_allclose(heatmap.pixel_array, pydicom.dcmread(output_dir / f"{name}_anomaly_map.dcm").pixel_array)

        # the study's SEG and map are not taken as inputs on a second run
        again = volume_inference_datalist(study_url, output_dir=str(tmp_path / "again"))
        assert [item["name"] for item in again] == [phantom_study["series"]]
        one = volume_inference_datalist(f"{study_url}/series/{phantom_study['series']}", output_dir=str(tmp_path / "one"))
        assert len(one) == 1 and sorted(os.listdir(one[0]["image"]))[0] == ".dicomweb.json" and len(os.listdir(one[0]["image"])) == 25
        # a study the server does not hold: one line naming the URL
        missing = f"{dicomweb}/studies/1.2.3.4"
        assert main(["infer", *common, "--set", "image_size=64", "--set", f"input_path={missing}"]) == 2
        assert f"DICOMweb study '{missing}' holds no image series" in capsys.readouterr().err


def test_dicomweb_errors_name_the_url(tmp_path):
    with pytest.raises(DatasetError, match="not a DICOMweb study or series URL"):
        parse_dicomweb_url("http://127.0.0.1:8042/dicom-web/")
    assert parse_dicomweb_url("http://h:1/dicom-web/studies/1.2/series/3.4") == ("http://h:1/dicom-web", "1.2", "3.4")
    port = _free_port()  # nothing listens there
    with pytest.raises(DatasetError, match=f"cannot read DICOMweb 'http://127.0.0.1:{port}"):
        volume_inference_datalist(f"http://127.0.0.1:{port}/dicom-web/studies/1.2.3", output_dir=str(tmp_path))
    assert not (tmp_path / "dicomweb_inputs" / "1.2.3").exists() or not os.listdir(tmp_path / "dicomweb_inputs" / "1.2.3")
