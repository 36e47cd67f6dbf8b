"""The inference workflow kept ready for a server: the network is built once, the outputs are the bundle's own."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from multiad_monai.apps.bundle_session import BundleInferenceSession, _without_checkpoint_loaders
from multiad_monai.apps.cli import main, root_cause
from multiad_monai.data import DatasetError, make_demo_volumes
from multiad_monai.networks import EfficientNetLiteEncoder

TINY = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]


@pytest.fixture(scope="module")
def brain_run(tmp_path_factory):
    """A tiny trained medical model and its cases: (cases folder, run folder)."""
    root = tmp_path_factory.mktemp("session")
    cases = make_demo_volumes(str(root / "cases"), num_cases=3, shape=(40, 36, 24))
    run = root / "run"
    assert main(["train", "--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", str(run), *TINY]) == 0
    return cases, run


def test_checkpoint_loaders_are_left_out_wherever_they_are():
    loader = {"_target_": "multiad_monai.handlers.NetworkCheckpointLoader", "load_path": "@ckpt_path"}
    writer = {"_target_": "multiad_monai.handlers.VolumeOutputWriter", "output_dir": "x"}
    config = {"handlers": [loader, writer], "evaluator": {"val_handlers": [writer, dict(loader)]}, "n": 3}
    assert _without_checkpoint_loaders(config) == {"handlers": [writer], "evaluator": {"val_handlers": [writer]}, "n": 3}


def test_session_builds_the_network_once_and_writes_what_multiad_infer_writes(brain_run, tmp_path, monkeypatch):
    cases, run = brain_run
    encoders = []  # every teacher or student built, wherever the config builds it
    original_init = EfficientNetLiteEncoder.__init__
    monkeypatch.setattr(EfficientNetLiteEncoder, "__init__", lambda self, *a, **k: encoders.append(1) or original_init(self, *a, **k))
    session = BundleInferenceSession(_bundle("multiad_medical"), str(run / "model.pt"), settings={"image_size": 64})
    network = session.network()
    assert session.builds == 1 and session.network() is network and len(encoders) == 2
    assert network.inference_only  # the torch runtime serves the network with its batch norms folded
    for case in ("case001", "case002"):
        out = tmp_path / case
        session.run(input_path=os.path.join(cases, case, "flair.nii.gz"), inference_dir=str(out), output_dir=str(out))
    assert session.builds == 1 and session.network() is network and len(encoders) == 2  # two studies, one build

    # the same files and numbers as the command line, which builds everything anew
    scan = os.path.join(cases, "case002", "flair.nii.gz")
    assert main(["infer", "--bundle_root", "multiad_medical", "--output_dir", str(run), "--set", "image_size=64", "--set", f"input_path={scan}"]) == 0
    for kind in ("map", "mask"):
        served = nib.load(str(tmp_path / "case002" / f"flair_anomaly_{kind}.nii.gz"))
        reference = nib.load(str(run / "inference" / f"flair_anomaly_{kind}.nii.gz"))
        assert np.array_equal(np.asarray(served.dataobj), np.asarray(reference.dataobj))
        assert np.allclose(served.affine, reference.affine)

    # a new checkpoint on disk (retrained) is loaded on the next request, as MONAI Label's BasicInferTask does
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    torch.save(state, run / "model.pt")
    os.utime(run / "model.pt", (1, 1))
    assert session.network() is not network and session.builds == 2


def test_session_input_errors_name_the_file(brain_run, tmp_path):
    _, run = brain_run
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    session = BundleInferenceSession(_bundle("multiad_medical"), str(run / "model.pt"), settings={"image_size": 64})
    with pytest.raises(Exception) as raised:
        session.run(input_path=str(broken), inference_dir=str(tmp_path / "out"), output_dir=str(tmp_path / "out"))
    cause = root_cause(raised.value)
    assert isinstance(cause, DatasetError) and "broken.nii.gz" in str(cause)
    assert session.builds == 1  # the network stays loaded for the next request


def _bundle(name: str) -> str:
    from multiad_monai.apps.cli import BUNDLES_DIR

    return os.path.join(BUNDLES_DIR, name)


def test_onnx_runtime_serves_the_torch_maps_and_its_export_is_cached(brain_run, tmp_path, monkeypatch):
    import multiad_monai.inferers.onnx_model as onnx_model
    from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork

    cases, run = brain_run
    scan = os.path.join(cases, "case002", "flair.nii.gz")
    cache = str(tmp_path / "cache" / "onnx")  # where MULTIAD_CACHE_DIR=tmp_path/cache puts exports

    def session(runtime: str = "auto", model: str = str(run / "model.pt"), **settings) -> BundleInferenceSession:
        return BundleInferenceSession(
            _bundle("multiad_medical"), model, settings={"image_size": 64, **settings}, runtime=runtime, onnx_cache_dir=cache
        )

    maps = {}
    for runtime in ("torch", "onnx"):
        served = session(runtime)
        out = tmp_path / runtime
        served.run(input_path=scan, inference_dir=str(out), output_dir=str(out))
        maps[runtime] = np.asarray(nib.load(str(out / "flair_anomaly_map.nii.gz")).dataobj)
    assert isinstance(served.network(), OnnxAnomalyNetwork) and served.builds == 1
    assert maps["onnx"].shape == maps["torch"].shape and np.abs(maps["onnx"] - maps["torch"]).max() < 1e-4
    assert np.abs(maps["torch"]).max() > 1e-3  # not two empty maps
    with pytest.raises(ValueError, match="CPU"):
        served.device("cuda")
    entry = served.network().path
    assert [p.path for p in os.scandir(cache)] == [entry]  # the export, kept in the cache

    # "auto" is onnxruntime on the CPU (the onnx extra is installed here), PyTorch on a GPU
    auto = session()
    assert auto.runtime_for(torch.device("cpu")) == "onnx" and auto.runtime_for(torch.device("cuda")) == "torch"
    # a second server on the same model reads the cached export instead of exporting again
    exports = []
    real_export = onnx_model.export_onnx
    monkeypatch.setattr(onnx_model, "export_onnx", lambda *a, **k: exports.append(a) or real_export(*a, **k))
    probe = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert auto.network().path == entry and exports == []
    assert np.array_equal(auto.network().predict(probe)[0], served.network().predict(probe)[0])
    # a damaged cache entry is exported again, not served
    with open(entry, "wb") as f:
        f.write(b"not onnx")
    assert np.array_equal(session().network().predict(probe)[0], served.network().predict(probe)[0]) and len(exports) == 1
    # `multiad infer --runtime auto` serves the same export from the cache, with the same maps
    monkeypatch.setenv("MULTIAD_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cli"
    io = ["--set", f"input_path={scan}", "--set", f"inference_dir={out}"]
    assert main(["infer", "--bundle_root", "multiad_medical", "--output_dir", str(run), "--set", "image_size=64", *io, "--runtime", "auto"]) == 0
    cli_map = np.asarray(nib.load(str(out / "flair_anomaly_map.nii.gz")).dataobj)
    assert len(exports) == 1 and np.abs(cli_map - maps["onnx"]).max() < 1e-6
    # other settings, or a retrained model (other checkpoint contents), are other entries
    mode = served.network().metadata["score_mode"]
    retrained = tmp_path / "retrained.pt"
    retrained.write_bytes((run / "model.pt").read_bytes() + b"\0")
    assert served.onnx_cache_path(64, mode) == entry
    assert session(slice_batch_size=2).onnx_cache_path(64, mode) != entry
    assert session(model=str(retrained)).onnx_cache_path(64, mode) != entry


def test_runtime_is_an_option_of_infer_only(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--runtime", "onnx"])
    assert "--runtime is an option of infer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        BundleInferenceSession(_bundle("multiad_medical"), "model.pt", runtime="tensorrt")
