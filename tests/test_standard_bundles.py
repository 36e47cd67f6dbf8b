"""The bundles in the model-zoo form: each of train.json and inference.json parses on its own with MONAI's standard
keys, MONAI's own tools run on the single file, the metadata has the schema's fields; a trained run exports to a
bundle folder that, copied elsewhere, MONAI's tools verify, run and export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from multiad_monai.apps.bundles import BUNDLES_DIR, bundle_configs, resolve_bundle_root
from multiad_monai.apps.cli import main
from multiad_monai.data import make_demo_volumes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = [os.path.join(BUNDLES_DIR, name) for name in ("multiad_2d", "multiad_medical")]
STANDARD_KEYS = ("network_def", "network", "preprocessing", "inferer", "postprocessing", "dataset", "evaluator",
                 "initialize", "run", "finalize")
# the keys the network and its input depend on: the two files must agree on them (they are copies, model-zoo style)
SHARED_KEYS = ("image_size", "teacher_name", "image_mean", "image_std", "student_se_ratio", "fusion", "level_normalization",
               "map_sigma", "level_weights", "upsample_features", "slice_context", "intensity_channel", "test_time_flip",
               "score_mode", "teacher", "student", "discriminator",
               "map_generator", "network_def", "network", "ckpt_path", "device", "data_root")


def _monai_bundle(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` in ``cwd``; the package is found through PYTHONPATH (the source tree), as an
    installed package would be."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("bundle", BUNDLES, ids=os.path.basename)
def test_train_and_inference_configs_stand_alone(bundle):
    configs = os.path.join(bundle, "configs")
    assert not os.path.exists(os.path.join(configs, "common.json"))
    inference = ConfigParser.load_config_file(os.path.join(configs, "inference.json"))
    train = ConfigParser.load_config_file(os.path.join(configs, "train.json"))
    missing = [key for key in STANDARD_KEYS if key not in inference]
    assert not missing, missing
    for key in ("network_def", "network", "train", "validate", "initialize", "run", "finalize"):
        assert key in train, key
    for key in SHARED_KEYS:
        if key in train and key != "data_root":
            assert train[key] == inference[key], key
    # evaluate.json is merged over train.json and replaces its run
    evaluate = ConfigParser()
    evaluate.read_config(bundle_configs(bundle, "evaluate"))
    assert "evaluator" in evaluate["run"][0] and evaluate["initialize"] != train["initialize"]
    # no config names the old run ids
    for name in ("train.json", "evaluate.json", "inference.json"):
        content = ConfigParser.load_config_file(os.path.join(configs, name))
        assert not {"training", "evaluating", "inferring"} & set(content), name


@pytest.mark.parametrize("bundle", BUNDLES, ids=os.path.basename)
def test_metadata_has_the_current_schema_fields(bundle):
    meta = json.load(open(os.path.join(bundle, "configs", "metadata.json")))
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    # MONAI 1.6 reads "optional_packages_version" as the deprecated name of "required_packages_version" and
    # replaces the latter with it on load: one field only
    assert "optional_packages_version" not in meta
    for part in ("inputs", "outputs"):
        for tensor in meta["network_data_format"][part].values():
            for key in ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range"):
                assert key in tensor, (part, key)
            assert tensor["value_range"] and all(isinstance(v, (int, float)) for v in tensor["value_range"])
    for value in meta.get("eval_metrics", {}).values():
        assert isinstance(value, (int, float))


@pytest.mark.parametrize("bundle", BUNDLES, ids=os.path.basename)
def test_verify_net_in_out_on_inference_json_alone(bundle):
    result = _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", "--device", "cpu", cwd=bundle)
    assert "verified with no error" in result.stdout + result.stderr


def test_test_masks_are_required_only_with_a_ground_truth_folder(tiny_demo_dataset, tmp_path):
    from multiad_monai.data import DatasetError, mvtec_datalist

    root = tmp_path / "set"
    shutil.copytree(tiny_demo_dataset, root)
    assert any("mask" in item for item in mvtec_datalist(str(root), "test", require_masks=None))
    defect = next(item for item in mvtec_datalist(str(root), "test") if item["label"] == 1)
    os.remove(defect["mask"])
    with pytest.raises(DatasetError, match="without masks"):  # a ground_truth/ folder missing a mask: a mistake
        mvtec_datalist(str(root), "test", require_masks=None)
    shutil.rmtree(root / "ground_truth")
    items = mvtec_datalist(str(root), "test", require_masks=None)  # none at all: an image-level set
    assert not any("mask" in item for item in items) and {item["label"] for item in items} == {0, 1}


def test_demo_on_generated_data_uses_the_demo_schedule(monkeypatch, tmp_path, capsys):
    import multiad_monai.apps.cli as cli

    seen = []

    def fake_run(bundle_root, workflow, overrides, tracking=None, **values):
        seen.append((workflow, list(overrides)))
        os.makedirs(os.path.join(values["output_dir"], "eval"), exist_ok=True)
        with open(os.path.join(values["output_dir"], "eval", "metrics.json"), "w") as f:
            json.dump({"metrics": {"image_auroc": 0.5}}, f)

    monkeypatch.setattr(cli, "run_bundle", fake_run)
    assert main(["demo", "--output_dir", str(tmp_path / "a")]) == 0
    assert seen == [("train", ["demo.json"]), ("evaluate", ["demo.json"])]
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("[multiad] metrics: ")  # no report.html here
    seen.clear()
    assert main(["demo", "--output_dir", str(tmp_path / "b"), "--dataset_dir", str(tmp_path), "--override", "mvtec.json"]) == 0
    assert seen == [("train", ["mvtec.json"]), ("evaluate", ["mvtec.json"])]  # own data: the bundle's own schedule
    demo = json.load(open(os.path.join(BUNDLE_ROOT, "configs", "demo.json")))
    assert demo["num_epochs"] < ConfigParser.load_config_file(os.path.join(BUNDLE_ROOT, "configs", "train.json"))["num_epochs"]


def test_shipped_bundles_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle_root("multiad_medical") == os.path.join(BUNDLES_DIR, "multiad_medical")
    assert os.path.realpath(resolve_bundle_root("multiad_2d")) == os.path.realpath(BUNDLE_ROOT)


@pytest.mark.slow
def test_a_trained_run_exports_to_a_bundle_monai_runs(tiny_demo_dataset, tmp_path):
    run = str(tmp_path / "run")
    common = ["--output_dir", run, "--dataset_dir", tiny_demo_dataset, "--set", "image_size=64"]
    training = ["--set", "num_epochs=1", "--set", "val_interval=1", "--set", "min_epoch_length=2"]
    assert main(["demo", *common, *training]) == 0
    metrics = json.load(open(os.path.join(run, "eval", "metrics.json")))["metrics"]
    exported = str(tmp_path / "exported")
    assert main(["export", "--output_dir", run, "--bundle_dir", exported]) == 0
    # an existing folder is never replaced; nothing half-written is left
    assert main(["export", "--output_dir", run, "--bundle_dir", exported]) == 2
    assert main(["export", "--output_dir", str(tmp_path / "untrained"), "--bundle_dir", str(tmp_path / "other")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["exported", "run"]

    # an image-level test set (good / defect folders, no ground_truth/) evaluates as it is, saying what it skipped
    image_level = tmp_path / "image_level"
    shutil.copytree(os.path.join(tiny_demo_dataset, "test"), image_level / "test")
    shutil.copytree(os.path.join(tiny_demo_dataset, "train"), image_level / "train")
    eval_dir = str(tmp_path / "image_level_eval")
    assert main(["evaluate", "--output_dir", run, "--dataset_dir", str(image_level), "--set", "image_size=64",
                 "--set", f"eval_dir={eval_dir}", "--set", "baselines=[]"]) == 0
    written = json.load(open(os.path.join(eval_dir, "metrics.json")))
    assert written["metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert "pixel_auroc" not in written["metrics"] and "pixel metrics skipped" in written["notes"][0]
    shutil.rmtree(image_level)
    shutil.rmtree(eval_dir)

    shared = tmp_path / "elsewhere" / "anomaly_bundle"  # the folder as someone else receives it
    shutil.copytree(exported, shared)
    shutil.rmtree(exported)
    for name in ("configs/inference.json", "configs/train.json", "configs/metadata.json", "configs/logging.conf",
                 "models/model.pt", "models/model.ts", "docs/README.md", "docs/data_license.txt", "LICENSE"):
        assert (shared / name).is_file(), name
    meta = json.load(open(shared / "configs" / "metadata.json"))
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert "optional_packages_version" not in meta and "multiad-monai" in meta["required_packages_version"]
    assert meta["version"] in meta["changelog"] and all(isinstance(v, (int, float)) for v in meta["network_data_format"]["inputs"]["image"]["value_range"])
    assert meta["eval_metrics"]["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-4)
    readme = (shared / "docs" / "README.md").read_text()
    assert f"{metrics['image_auroc']:.4f}" in readme and "python -m monai.bundle run --config_file configs/inference.json" in readme
    licence = (shared / "docs" / "data_license.txt").read_text()  # a folder of unknown terms: said so, named
    assert "was not given" in licence and tiny_demo_dataset in licence
    state = torch.load(shared / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert torch.isfinite(state["threshold"]) and torch.isfinite(state["score_scale"])  # threshold travels in model.pt

    # MONAI's tools on the single inference.json of the copied folder
    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", "--device", "cpu", cwd=str(shared))
    images = os.path.join(tiny_demo_dataset, "test")
    _monai_bundle("run", "--config_file", "configs/inference.json", "--dataset_dir", images, cwd=str(shared))
    rows = (shared / "eval" / "inference" / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 10 and rows[0].startswith("name,score")
    os.remove(shared / "models" / "model.ts")
    _monai_bundle("ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
                  "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
                  "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]", cwd=str(shared))
    scripted = torch.jit.load(str(shared / "models" / "model.ts"), map_location="cpu")
    parser = ConfigParser()
    parser.read_config(str(shared / "configs" / "inference.json"))
    parser.update({"bundle_root": str(shared)})
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(state)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(scripted(images), network(images), atol=1e-5, rtol=1e-5)
    assert float(scripted.threshold) == float(state["threshold"])


def test_a_trained_volume_run_exports_to_a_bundle_that_maps_the_same(tmp_path):
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=3, shape=(32, 32, 16))
    run = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--output_dir", str(run), "--set", "image_size=64"]
    training = ["--set", "num_epochs=1", "--set", "val_interval=1", "--set", "min_epoch_length=2", "--set", 'test_cases=["case002"]']
    assert main(["train", *common, "--dataset_dir", cases, *training]) == 0
    scan = os.path.join(cases, "case002", "flair.nii.gz")
    assert main(["infer", *common, "--set", f"input_path={scan}"]) == 0
    exported = tmp_path / "elsewhere" / "volume_bundle"
    assert main(["export", "--output_dir", str(run), "--bundle_dir", str(exported)]) == 0
    assert json.loads((exported / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]

    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", "--device", "cpu", cwd=str(exported))
    _monai_bundle("run", "--config_file", "configs/inference.json", "--input_path", scan, cwd=str(exported))
    for kind in ("map", "mask"):
        shared = nib.load(str(exported / "eval" / "inference" / f"flair_anomaly_{kind}.nii.gz"))
        reference = nib.load(str(run / "inference" / f"flair_anomaly_{kind}.nii.gz"))
        assert np.allclose(np.asarray(shared.dataobj), np.asarray(reference.dataobj), atol=1e-5)
        assert np.allclose(shared.affine, reference.affine)
