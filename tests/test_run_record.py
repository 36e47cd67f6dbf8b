"""Trustworthy runs through ``multiad``: a rerun never serves a stale model, evaluation and inference never
swap the data silently, and a patient split is fixed once by training (``run.json``)."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch

from multiad_monai.apps.cli import main
from multiad_monai.data import check_model_settings, make_demo_volumes
from multiad_monai.data.errors import CheckpointError, DatasetError, root_cause

TINY = ["--set", "image_size=64", "--set", "min_epoch_length=2", "--set", "val_interval=1", "--set", "num_epochs=1"]


def last_error(capsys) -> str:
    """The CLI's one error line (loggers of earlier tests may still write to closed capture streams)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("multiad: error:")
    return err[-1]


def test_rerun_with_other_settings_or_data_stops_and_resume_false_replaces(tiny_demo_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_demo_dataset, data)
    output = tmp_path / "run"
    common = ["train", "--dataset_dir", str(data), "--output_dir", str(output), *TINY]
    assert main(common) == 0
    model, record = (output / "model.pt").read_bytes(), (output / "run.json").read_text()
    assert json.loads(record)["dataset_dir"] == str(data)
    capsys.readouterr()

    # another learning rate: one line naming the key and both ways out, nothing touched
    assert main([*common, "--set", "learning_rate=0.01"]) == 2
    error = last_error(capsys)
    assert "learning_rate 0.001 -> 0.01" in error
    assert "--output_dir" in error and "resume=false" in error
    assert (output / "model.pt").read_bytes() == model and (output / "run.json").read_text() == record

    # the same settings on changed training data: the file is named
    changed = sorted((data / "train" / "good").iterdir())[0]
    changed.write_bytes(sorted((data / "train" / "good").iterdir())[1].read_bytes())
    assert main(common) == 2
    error = last_error(capsys)
    assert "1 training file(s) changed" in error and changed.name in error
    assert (output / "model.pt").read_bytes() == model

    # resume=false starts afresh and replaces the run, record included
    assert main([*common, "--set", "learning_rate=0.01", "--set", "resume=false"]) == 0
    assert json.loads((output / "run.json").read_text())["fingerprint"]["settings"]["learning_rate"] == 0.01
    assert (output / "model.pt").read_bytes() != model

    # model.pt carries the fingerprint of its run, so the old model put back beside the new record is refused
    saved = torch.load(output / "model.pt", map_location="cpu", weights_only=True)
    assert saved["run"]["fingerprint"]["hash"] == json.loads((output / "run.json").read_text())["fingerprint"]["hash"]
    (output / "model.pt").write_bytes(model)
    capsys.readouterr()
    assert main(["evaluate", "--output_dir", str(output), *TINY[:2]]) == 2
    error = last_error(capsys)
    assert "model.pt was not trained by the run recorded in run.json" in error and "learning_rate 0.01 -> 0.001" in error
    assert not (output / "eval").exists()


def test_evaluation_uses_the_recorded_data_and_never_generated_images(tiny_demo_dataset, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", "--dataset_dir", tiny_demo_dataset, "--output_dir", str(output), *TINY]) == 0
    assert main(["evaluate", "--output_dir", str(output), "--set", "image_size=64"]) == 0  # no --dataset_dir
    rows = list(csv.DictReader(open(output / "eval" / "scores.csv")))
    test_images = [name for _, _, names in os.walk(os.path.join(tiny_demo_dataset, "test")) for name in names]
    assert len(rows) == len(test_images) == 10 and not (output / "demo_data").exists()

    # a folder with a model but no record: the data source is unknown, so nothing is guessed
    os.remove(output / "run.json")
    shutil.rmtree(output / "eval")
    capsys.readouterr()
    assert main(["evaluate", "--output_dir", str(output), "--set", "image_size=64"]) == 2
    error = last_error(capsys)
    assert "run.json" in error and "--dataset_dir" in error
    assert not (output / "eval").exists() and not (output / "demo_data").exists()
    # nor is a model of unknown origin resumed or served by a rerun of training
    model = (output / "model.pt").read_bytes()
    assert main(["train", "--dataset_dir", tiny_demo_dataset, "--output_dir", str(output), *TINY]) == 2
    assert "but no run.json" in last_error(capsys) and (output / "model.pt").read_bytes() == model


def test_volume_evaluation_keeps_the_training_split(tmp_path, capsys):
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=4, shape=(32, 32, 16))
    output = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", str(output), "--set", "image_size=64"]
    assert main(["train", *common, *TINY[2:], "--set", "test_fraction=0.5", "--set", "seed=0"]) == 0
    split = json.loads((output / "run.json").read_text())["split"]
    assert len(split["test"]) == 2 and set(split["train"]).isdisjoint(split["test"])

    # other split arguments at evaluation do not move training patients into the test set
    assert main(["evaluate", *common, "--set", "test_fraction=0.75", "--set", "seed=7"]) == 0
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert metrics["test_cases"] == split["test"] and metrics["training_cases"] == split["train"]

    # naming a training patient as a test case is refused, and the earlier evaluation stays
    before = (output / "eval" / "metrics.json").read_text()
    capsys.readouterr()
    trained = split["train"][0]
    assert main(["evaluate", *common, "--set", f'test_cases=["{trained}"]']) == 2
    error = last_error(capsys)
    assert trained in error and "used to train" in error
    assert (output / "eval" / "metrics.json").read_text() == before

    # the model is used only on images prepared as in its training (2.5D by default): the 2D input is refused
    # with the --set that fixes it, before anything is written
    scan = os.path.join(cases, split["test"][0], "flair.nii.gz")
    for command in (["evaluate", *common], ["infer", *common, "--set", f"input_path={scan}"]):
        capsys.readouterr()
        assert main([*command, "--override", "brain_2d.json"]) == 2
        error = last_error(capsys)
        assert "slice_context=2, intensity_channel=1" in error and "slice_context=0, intensity_channel=null" in error
        assert "--set slice_context=2 --set intensity_channel=1" in error
    assert (output / "eval" / "metrics.json").read_text() == before
    assert not (output / "inference").exists()

    # without the record the split is unknown: refused, not recomputed
    os.remove(output / "run.json")
    assert main(["evaluate", *common]) == 2
    assert "no patient split recorded" in last_error(capsys)
    assert (output / "eval" / "metrics.json").read_text() == before


def test_one_bad_volume_does_not_lose_the_others(tmp_path, capsys):
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=4, shape=(32, 32, 16))
    output = tmp_path / "run"
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", str(output), "--set", "image_size=64"]
    assert main(["train", *common, *TINY[2:], "--set", 'test_cases=["case002","case003"]']) == 0
    broken = os.path.join(cases, "case003", "flair.nii.gz")
    with open(broken, "r+b") as f:
        f.truncate(200)  # a cut-off download
    capsys.readouterr()
    assert main(["evaluate", *common]) == 2
    assert "case003" in last_error(capsys)
    assert not (output / "eval").exists()
    assert main(["evaluate", *common, "--set", "skip_bad_files=true"]) == 0
    metrics = json.loads((output / "eval" / "metrics.json").read_text())
    assert metrics["test_cases"] == ["case002"]
    skipped = list(csv.DictReader(open(output / "eval" / "skipped_files.csv")))
    assert [row["image"] for row in skipped] == [broken] and skipped[0]["problem"]

    # inference on a folder of scans: the readable ones get their maps
    folder = tmp_path / "scans"
    folder.mkdir()
    for case in ("case002", "case003"):
        shutil.copy(os.path.join(cases, case, "flair.nii.gz"), folder / f"{case}.nii.gz")
    infer = ["infer", *common, "--set", f"input_path={folder}"]
    assert main(infer) == 2 and "case003.nii.gz" in last_error(capsys)
    # every volume is read before any map is written, so the good one before the bad one gets nothing half-way
    assert not (output / "inference").exists() or not any((output / "inference").iterdir())
    assert main([*infer, "--set", "skip_bad_files=true"]) == 0
    assert (output / "inference" / "case002_anomaly_map.nii.gz").is_file()
    assert not (output / "inference" / "case003_anomaly_map.nii.gz").exists()
    assert "case003.nii.gz" in (output / "inference" / "skipped_files.csv").read_text()


def test_root_cause_ends_on_an_error_chain_that_loops():
    inner = DatasetError("case003/flair.nii.gz: cannot be read")
    outer = RuntimeError("applying transform")
    outer.__cause__ = inner
    inner.__cause__ = outer  # what `raise inner from outer` inside `except outer` leaves behind
    assert root_cause(outer) is inner


def test_model_settings_check_passes_what_it_cannot_know_and_names_what_differs():
    # exported bundles hold a plain state dict: their configs carry the run's settings instead
    check_model_settings({"threshold": torch.tensor(1.0)}, "bundle/models/model.pt", {"slice_context": 2})
    saved = {"network": {}, "run": {"fingerprint": {"settings": {"image_size": 256, "ct_window": 400.0}}}}
    # a key recorded only by later versions passes; equal numbers of another type are equal
    check_model_settings(saved, "old/model.pt", {"image_size": 256, "ct_window": 400, "slice_context": 2})
    check_model_settings(saved, "old/model.pt", None)
    with pytest.raises(CheckpointError, match=r"old/model.pt was trained with image_size=256, but this configuration has image_size=128.*--set image_size=256"):
        check_model_settings(saved, "old/model.pt", {"image_size": 128, "learning_rate": 0.5})
    # a setting that did not exist when the model was trained: it was trained without it
    with pytest.raises(CheckpointError, match="upsample_features=false"):
        check_model_settings(saved, "old/model.pt", {"upsample_features": True})
    with pytest.raises(CheckpointError, match=r"discriminator_levels=\[-1\]"):
        check_model_settings(saved, "old/model.pt", {"discriminator_levels": [0, 1, 2, 3]})


def test_a_stronger_discriminator_trains_and_is_required_to_load_its_model(tiny_demo_dataset, tmp_path, capsys):
    """The adversarial options (all levels judged, spectral norm, warm-up) through the bundle; the model's weights
    hold that discriminator, so a configuration with the paper's is refused with the --set that fixes it."""
    output = tmp_path / "run"
    stronger = ["--set", "discriminator_levels=[0,1,2,3]", "--set", "discriminator_spectral_norm=true",
                "--set", "adversarial_warmup_epochs=1"]
    common = ["--dataset_dir", str(tiny_demo_dataset), "--output_dir", str(output)]
    assert main(["train", *common, *TINY, *stronger]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--output_dir", str(output), *TINY[:2]]) == 2
    error = last_error(capsys)
    assert "discriminator_levels=[0, 1, 2, 3], discriminator_spectral_norm=true" in error
    assert "--set discriminator_levels=[0,1,2,3] --set discriminator_spectral_norm=true" in error
    assert main(["evaluate", "--output_dir", str(output), *TINY[:2], *stronger[:4]]) == 0
    assert (output / "eval" / "metrics.json").is_file()


def test_training_without_a_validation_round_says_that_no_model_was_written(tiny_demo_dataset, tmp_path, capsys):
    output = tmp_path / "run"
    short = ["--set", "image_size=64", "--set", "min_epoch_length=2", "--set", "num_epochs=1",
             "--set", "val_interval=2"]
    assert main(["train", "--dataset_dir", str(tiny_demo_dataset), "--output_dir", str(output), *short]) == 0
    assert not (output / "model.pt").exists()
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == (f"[multiad] no model written to {output / 'model.pt'}: no validation round ran "
                    "(set val_interval to at most num_epochs)")
