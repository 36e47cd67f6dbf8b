"""The MONAI Label app for real: ``monailabel start_server`` on 127.0.0.1 with a generated study, the infer
endpoint called over HTTP, the returned label checked against the study's grid, a bad study answered with
an HTTP error while the server stays up.

monailabel needs its own environment (pinned torch, pydicom < 3): ``.ci/run`` builds it in
``.monailabel-env``; elsewhere set ``MULTIAD_MONAILABEL_ENV`` to such an environment.
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
import urllib.parse
import urllib.request

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from multiad_monai.apps.cli import main
from multiad_monai.data import make_demo_volumes

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
ENV = os.environ.get("MULTIAD_MONAILABEL_ENV", os.path.join(REPO, ".monailabel-env"))


def _monailabel_env() -> str:
    if not os.path.isfile(os.path.join(ENV, "bin", "monailabel")):
        pytest.skip(f"monailabel is not installed in {ENV} (.ci/run builds it; or set MULTIAD_MONAILABEL_ENV)")
    return ENV


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, params: dict | None = None) -> tuple[int, bytes]:
    """POST to MONAI Label; ``params`` are the request options (the viewer panel's ``params`` form field)."""
    data = urllib.parse.urlencode({"params": json.dumps(params)}).encode() if params else b""
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@contextlib.contextmanager
def _server(env: str, studies, model, tmp_path, bundle: str = "multiad_medical", runtime: str = "torch"):
    """A running ``monailabel start_server`` for ``studies``: yields (base URL, /info/ JSON); stopped after."""
    port = _free_port()
    command = [
        os.path.join(env, "bin", "monailabel"), "start_server", "--app", os.path.join(REPO, "apps", "monailabel"),
        "--studies", str(studies), "--conf", "model", str(model), "--conf", "bundle", bundle,
        "--conf", "settings", '{"image_size":64}', "--conf", "runtime", runtime,
        "--host", "127.0.0.1", "--port", str(port),
    ]
    environment = {**os.environ, "PATH": os.path.join(env, "bin") + os.pathsep + os.environ["PATH"]}
    environment["MULTIAD_CACHE_DIR"] = str(tmp_path / "multiad_cache")  # ONNX exports stay in the test's folder
    log_path = tmp_path / f"server_{port}.log"
    log = open(log_path, "w")
    server = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/info/", timeout=5) as response:
                    info = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        yield base, info
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def _volume_model_and_study(tmp_path) -> tuple:
    """A tiny medical model trained on generated cases, and a studies folder holding one held-out case as ``study1``."""
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=3, shape=(40, 36, 24))
    model_dir = tmp_path / "run"
    tiny = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    assert main(["train", "--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", str(model_dir), *tiny]) == 0
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(os.path.join(cases, "case002", "flair.nii.gz"), studies / "study1.nii.gz")
    return model_dir, studies


def test_monailabel_server_returns_the_anomaly_mask_on_the_study_grid(tmp_path):
    env = _monailabel_env()
    model_dir, studies = _volume_model_and_study(tmp_path)
    (studies / "broken.nii.gz").write_bytes(b"not a volume")

    with _server(env, studies, model_dir / "model.pt", tmp_path) as (base, info):
        assert "multiad" in info["models"]

        status, body = _post(f"{base}/infer/multiad?image=study1&output=image")
        assert status == 200, body[:500]
        (tmp_path / "label.nii.gz").write_bytes(body)
        label = nib.load(str(tmp_path / "label.nii.gz"))
        study = nib.load(str(studies / "study1.nii.gz"))  # the label comes back on the study's own grid
        assert label.shape == study.shape and np.allclose(label.affine, study.affine, atol=1e-4)
        assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1}

        status, body = _post(f"{base}/infer/multiad?image=study1&output=json")
        result = json.loads(body)
        assert status == 200 and len(result["slice_scores"]) == study.shape[2] and os.path.isfile(result["heatmap"])
        heatmap = nib.load(result["heatmap"])
        assert heatmap.shape == study.shape and heatmap.get_data_dtype() == np.float32
        # the reader fetches the float heatmap over HTTP from the datastore
        stored = result["heatmap_label"]
        with urllib.request.urlopen(f"{base}/datastore/label?label={stored['label']}&tag={stored['tag']}", timeout=60) as response:
            (tmp_path / "heatmap.nii.gz").write_bytes(response.read())
        fetched = nib.load(str(tmp_path / "heatmap.nii.gz"))
        assert fetched.shape == study.shape and np.allclose(np.asarray(fetched.dataobj), np.asarray(heatmap.dataobj))

        # the network was built and loaded once, at the server's start, not for each of these requests
        assert result["network_builds"] == 1
        # the threshold is an option of the viewer's panel, the saved one by default; the reader's value sets the mask
        assert info["models"]["multiad"]["config"]["threshold"] == result["saved_threshold"] == result["threshold"]
        values = np.asarray(heatmap.dataobj)
        threshold = float(np.quantile(values[values > 0], 0.5))
        status, body = _post(f"{base}/infer/multiad?image=study1&output=image", {"threshold": threshold})
        assert status == 200, body[:500]
        (tmp_path / "label_reader.nii.gz").write_bytes(body)
        relabelled = np.asarray(nib.load(str(tmp_path / "label_reader.nii.gz")).dataobj)
        assert np.array_equal(relabelled, (values >= threshold).astype(np.uint8))
        assert not np.array_equal(relabelled, np.asarray(label.dataobj))
        status, body = _post(f"{base}/infer/multiad?image=study1&output=json", {"threshold": threshold, "device": "cpu"})
        result = json.loads(body)
        assert status == 200 and result["threshold"] == threshold and result["anomalous"] == (result["volume_score"] >= threshold)
        assert result["network_builds"] == (2 if torch.cuda.is_available() else 1)  # a second device, a second network
        for bad in ({"threshold": "high"}, {"device": "abacus"}):
            status, body = _post(f"{base}/infer/multiad?image=study1&output=json", bad)
            assert status == 422 and list(bad)[0] in json.loads(body)["detail"]
        builds = (tmp_path / f"server_{base.rsplit(':', 1)[1]}.log").read_text().count("Multi-AD network built")
        assert builds == result["network_builds"]  # the server's log says so too, after all these requests

        status, body = _post(f"{base}/infer/multiad?image=broken&output=json")
        assert status == 422 and "broken.nii.gz" in json.loads(body)["detail"]
        with urllib.request.urlopen(f"{base}/info/", timeout=5) as response:  # the server stays up
            assert response.status == 200


def test_monailabel_server_with_the_onnx_runtime_gives_the_torch_maps(tmp_path):
    """``--conf runtime onnx`` (the benchmarked fast path): onnxruntime serves the maps and scores the torch runtime
    serves; ``auto``, the default, takes it on the CPU and reuses the export cached by the first start."""
    env = _monailabel_env()
    if subprocess.run([os.path.join(env, "bin", "python"), "-c", "import onnxruntime, onnxscript"]).returncode != 0:
        pytest.skip(f"onnxruntime / onnxscript are not installed in {env} (.ci/run installs the onnx extra there)")
    model_dir, studies = _volume_model_and_study(tmp_path)
    results, logs = {}, {}
    # "auto" on a CPU with the onnx extra is onnxruntime; its second start reads the export the first one cached
    for run, runtime in (("torch", "torch"), ("onnx", "onnx"), ("auto", "auto")):
        with _server(env, studies, model_dir / "model.pt", tmp_path, runtime=runtime) as (base, info):
            status, body = _post(f"{base}/infer/multiad?image=study1&output=json")
            assert status == 200, body[:500]
            results[run] = json.loads(body)
            results[run]["map"] = np.asarray(nib.load(results[run]["heatmap"]).dataobj).copy()
            logs[run] = (tmp_path / f"server_{base.rsplit(':', 1)[1]}.log").read_text()
    torch_map, onnx_map = results["torch"]["map"], results["onnx"]["map"]
    assert onnx_map.shape == torch_map.shape and np.abs(onnx_map - torch_map).max() < 1e-4
    assert np.allclose(results["onnx"]["slice_scores"], results["torch"]["slice_scores"], atol=1e-4)
    assert results["onnx"]["threshold"] == results["torch"]["threshold"]
    assert "loaded on cpu, onnx" in logs["onnx"] and "read from the cache" not in logs["onnx"]
    assert "loaded on cpu, onnx" in logs["auto"] and "read from the cache" in logs["auto"]
    assert np.array_equal(results["auto"]["map"], onnx_map)


def test_monailabel_server_with_a_2d_model(tiny_demo_dataset, tmp_path):
    """The 2D bundle served: an image study gets a PNG mask of its size; a volume is refused with 422."""
    env = _monailabel_env()
    model_dir = tmp_path / "run"
    tiny = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]
    assert main(["train", "--dataset_dir", tiny_demo_dataset, "--output_dir", str(model_dir), *tiny]) == 0
    studies = tmp_path / "studies"
    studies.mkdir()
    image = Image.open(os.path.join(tiny_demo_dataset, "test", "scratch", "000.png")).resize((80, 70))
    image.save(studies / "part1.png")
    volume = make_demo_volumes(str(tmp_path / "cases"), num_cases=2, shape=(24, 24, 16))
    shutil.copy(os.path.join(volume, "case000", "flair.nii.gz"), studies / "scan1.nii.gz")

    with _server(env, studies, model_dir / "model.pt", tmp_path, bundle="multiad_2d") as (base, info):
        assert info["models"]["multiad"]["dimension"] == 2
        status, body = _post(f"{base}/infer/multiad?image=part1&output=image")
        assert status == 200, body[:500]
        (tmp_path / "label.png").write_bytes(body)
        label = np.asarray(Image.open(tmp_path / "label.png"))
        assert label.shape == (70, 80) and set(np.unique(label)) <= {0, 1}
        for threshold, expected in ((1e9, 0), (-1e9, 1)):  # the reader's threshold sets the mask
            status, body = _post(f"{base}/infer/multiad?image=part1&output=image", {"threshold": threshold})
            (tmp_path / "label_reader.png").write_bytes(body)
            assert status == 200 and np.all(np.asarray(Image.open(tmp_path / "label_reader.png")) == expected)
        status, body = _post(f"{base}/infer/multiad?image=part1&output=json")
        result = json.loads(body)
        assert status == 200 and {"score", "normalized_score", "anomalous", "heatmap"} <= set(result)
        status, body = _post(f"{base}/infer/multiad?image=scan1&output=json")
        assert status == 422 and "not a 2D image" in json.loads(body)["detail"]


def test_model_without_threshold_or_file_is_refused_at_start(tmp_path):
    env = _monailabel_env()
    checkpoint = tmp_path / "no_threshold.pt"
    torch.save({"threshold": torch.tensor(float("nan")), "score_scale": torch.tensor(1.0)}, checkpoint)
    script = (
        "import sys; from multiad_monai.apps.monailabel_task import MultiADInferTask\n"
        "try:\n    MultiADInferTask(sys.argv[1], sys.argv[2])\nexcept (ValueError, FileNotFoundError) as e:\n    print(e)"
    )
    bundle = os.path.join(REPO, "bundles", "multiad_medical")
    for model, expected in ((checkpoint, "no saved anomaly threshold"), (tmp_path / "missing.pt", "model not found")):
        result = subprocess.run([os.path.join(env, "bin", "python"), "-c", script, bundle, str(model)], capture_output=True, text=True)
        assert expected in result.stdout and str(model) in result.stdout, result.stdout + result.stderr[-2000:]
