import csv
import json
import os

import pytest
import torch
from monai.bundle import ConfigParser
from sklearn.metrics import roc_auc_score

from conftest import BUNDLE_ROOT
from multiad_monai.apps.cli import bundle_configs, main, root_cause
from multiad_monai.data import DatasetError

CONFIGS = os.path.join(BUNDLE_ROOT, "configs")


def _parser(workflow, **overrides):
    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE_ROOT, workflow))
    parser.read_meta(os.path.join(CONFIGS, "metadata.json"))
    parser.update({"bundle_root": BUNDLE_ROOT, **overrides})
    return parser


def test_bundle_layout_and_metadata():
    for name in ("metadata.json", "train.json", "evaluate.json", "inference.json", "logging.conf", "mvtec.json"):
        assert os.path.isfile(os.path.join(CONFIGS, name)), name
    for name in ("docs/README.md", "LICENSE"):
        assert os.path.isfile(os.path.join(BUNDLE_ROOT, name)), name
    meta = json.load(open(os.path.join(CONFIGS, "metadata.json")))
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 3


def test_configs_instantiate_the_network(tiny_demo_dataset, tmp_path):
    parser = _parser("train", dataset_dir=tiny_demo_dataset, output_dir=str(tmp_path), image_size=64)
    network = parser.get_parsed_content("network")
    assert type(network).__name__ == "MultiAD"
    assert network.student.out_channels == network.teacher.out_channels
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.adversarial_weight == parser["adversarial_weight"]
    split = parser.get_parsed_content("datalist_split")
    assert len(split[0]) + len(split[1]) == 20


def test_wrong_dataset_dir_is_one_clear_error(tmp_path, capsys):
    parser = _parser("train", dataset_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("data_root")
    assert isinstance(root_cause(raised.value), DatasetError) and "nowhere" in str(root_cause(raised.value))
    # the CLI prints only the root cause, names the folder, and writes nothing
    assert main(["train", "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and err[0].startswith("multiad: error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_evaluate_infer_end_to_end(tiny_demo_dataset, tmp_path):
    out = str(tmp_path / "run")
    common = ["--output_dir", out, "--dataset_dir", tiny_demo_dataset, "--set", "image_size=64"]
    training = ["--set", "num_epochs=2", "--set", "val_interval=1", "--set", "batch_size=4", "--set", "min_epoch_length=2"]
    assert main(["demo", *common, *training]) == 0  # train, then evaluate on test/
    checkpoint = torch.load(os.path.join(out, "model.pt"), map_location="cpu", weights_only=True)["network"]
    assert torch.isfinite(checkpoint["threshold"]) and checkpoint["threshold"] > 0
    written = json.load(open(os.path.join(out, "eval", "metrics.json")))
    metrics = written["metrics"]
    assert {"image_auroc", "pixel_auroc", "aupro", "image_ap", "pixel_ap", "dice"} <= set(metrics)
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(written["baselines"]["feature_knn"])
    rows = list(csv.DictReader(open(os.path.join(out, "eval", "scores.csv"))))
    assert len(rows) == 10 and {r["label"] for r in rows} == {"0", "1"}
    assert all(0.0 <= float(r["normalized_score"]) <= 1.0 for r in rows)
    assert all((float(r["score"]) >= float(checkpoint["threshold"])) == (r["prediction"] == "1") for r in rows)
    assert len(os.listdir(os.path.join(out, "eval", "overlays"))) >= 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image_tags = set()
    for name in os.listdir(out):
        if name.startswith("events.out.tfevents"):
            events = EventAccumulator(os.path.join(out, name), size_guidance={"images": 0})
            events.Reload()
            image_tags |= set(events.Tags()["images"])
    assert any(tag.startswith("validation_overlays") for tag in image_tags)  # heatmaps in TensorBoard at validation
    report = open(os.path.join(out, "eval", "report.html")).read()
    assert report.count("<svg") == 2 and "AUROC" in report and "Model vs baselines" in report
    for kind in ("false_positive", "false_negative"):  # the worst mistakes, with their overlays, beside it
        assert os.path.isfile(os.path.join(out, "eval", "report", f"{kind}_00.png")) and f"report/{kind}_00.png" in report
    assert main(["infer", *common, "--set", f"input_dir={os.path.join(tiny_demo_dataset, 'test')}"]) == 0
    inferred = list(csv.DictReader(open(os.path.join(out, "inference", "scores.csv"))))
    assert len(inferred) == 10 and inferred[0]["label"] == ""
    assert any(name.endswith("_map.npy") for _, _, files in os.walk(os.path.join(out, "inference", "maps")) for name in files)


def test_cli_passes_null_overrides_as_none(monkeypatch):
    import monai.bundle

    seen = {}
    monkeypatch.setattr(monai.bundle, "run", lambda run_id, **kwargs: seen.update(kwargs, run_id=run_id))
    assert main(["train", "--set", "student_se_ratio=null", "--set", "num_epochs=3", "--set", "fusion=product"]) == 0
    assert seen["run_id"] == "run" and seen["config_file"][-1].endswith("train.json") and seen["num_epochs"] == 3 and seen["fusion"] == "product"
    # monai.bundle.run drops None overrides: they must arrive as an expression evaluating to None
    assert seen["student_se_ratio"] == "$None"
    parser = ConfigParser({"student_se_ratio": seen["student_se_ratio"]})
    assert parser.get_parsed_content("student_se_ratio") is None


@pytest.mark.slow
def test_retina_oct_override_trains_with_pixel_normalization(tiny_demo_dataset, tmp_path):
    out = str(tmp_path / "run")
    common = ["--output_dir", out, "--dataset_dir", tiny_demo_dataset, "--set", "image_size=64", "--override", "retina_oct.json"]
    training = ["--set", "num_epochs=2", "--set", "val_interval=1", "--set", "batch_size=4", "--set", "min_epoch_length=2"]
    assert main(["demo", *common, *training]) == 0
    checkpoint = torch.load(os.path.join(out, "model.pt"), map_location="cpu", weights_only=True)["network"]
    mean, std = checkpoint["map_generator.normal_mean"], checkpoint["map_generator.normal_std"]
    assert mean.shape == std.shape == (4, 64, 64)
    assert float(mean.min()) > 0 and float(std.max()) > 0  # fitted on training images, not the unfitted 0 / 1
    metrics = json.load(open(os.path.join(out, "eval", "metrics.json")))["metrics"]
    rows = list(csv.DictReader(open(os.path.join(out, "eval", "scores.csv"))))
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # the scores the table shows
    assert main(["infer", *common, "--set", f"input_dir={os.path.join(tiny_demo_dataset, 'test')}"]) == 0
