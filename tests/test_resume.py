"""Resuming a killed training run with the same command, and reproducibility with the same seed."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from multiad_monai.apps.cli import main

TINY = ["--set", "image_size=64", "--set", "min_epoch_length=2", "--set", "val_interval=1"]


def saved_epoch(path: str) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["trainer"]["epoch"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0


def test_killed_training_resumes_with_the_same_command(tiny_demo_dataset, tmp_path, capfd):
    output = tmp_path / "run"
    args = ["train", "--dataset_dir", tiny_demo_dataset, "--output_dir", str(output), *TINY, "--set", "num_epochs=6"]
    resume_file = str(output / "resume.pt")
    process = subprocess.Popen([sys.executable, "-m", "multiad_monai", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while saved_epoch(resume_file) < 2:
            assert process.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no epoch saved in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    killed_at = saved_epoch(resume_file)
    assert 2 <= killed_at < 6

    capfd.readouterr()
    assert main(args) == 0  # logging.conf sends the log to the console: read it from the file descriptors
    assert f"after epoch {killed_at}" in "".join(capfd.readouterr())
    state = torch.load(resume_file, map_location="cpu", weights_only=False)
    assert state["completed"] and state["trainer"]["epoch"] in range(killed_at + 1, 7)
    assert os.path.isfile(output / "model.pt")

    # the same command once more: nothing left to do, the selected model is untouched
    before = os.path.getmtime(output / "model.pt")
    assert main(args) == 0
    assert "already complete" in "".join(capfd.readouterr()) and os.path.getmtime(output / "model.pt") == before


def test_resume_with_other_settings_is_one_clear_error(tiny_demo_dataset, tmp_path, capsys):
    common = ["train", "--dataset_dir", tiny_demo_dataset, "--output_dir", str(tmp_path / "run"), *TINY]
    assert main([*common, "--set", "num_epochs=1"]) == 0
    capsys.readouterr()
    before = os.path.getmtime(tmp_path / "run" / "model.pt")
    assert main([*common, "--set", "num_epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "num_epochs 1 -> 2" in err[-1] and "resume=false" in err[-1] and err[-1].startswith("multiad: error:")
    assert not any("Traceback" in line for line in err)  # stopped before training started
    assert os.path.getmtime(tmp_path / "run" / "model.pt") == before


def test_same_seed_same_scores(tiny_demo_dataset, tmp_path):
    tables = []
    for run in ("a", "b"):
        common = ["--dataset_dir", tiny_demo_dataset, "--output_dir", str(tmp_path / run), "--set", "image_size=64"]
        assert main(["demo", *common, *TINY[2:], "--set", "min_epoch_length=2", "--set", "num_epochs=2"]) == 0
        with open(tmp_path / run / "eval" / "scores.csv") as f:
            tables.append({row["name"]: float(row["score"]) for row in csv.DictReader(f)})
    assert tables[0].keys() == tables[1].keys()
    for name, score in tables[0].items():
        assert tables[1][name] == pytest.approx(score, rel=1e-5, abs=1e-6), name
