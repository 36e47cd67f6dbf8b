"""Distributed training and evaluation for real: 2 CPU processes on the gloo backend, launched by torchrun."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE_ROOT
from multiad_monai.apps.cli import main
from multiad_monai.data import make_demo_volumes

SMALL = ["--set", "image_size=64", "--set", "num_epochs=2", "--set", "val_interval=1", "--set", "min_epoch_length=2"]


def torchrun(*args: str, cwd: str, module: str = "multiad_monai") -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_two_process_gloo_training_and_gathered_evaluation(tiny_demo_dataset, tmp_path):
    output = str(tmp_path / "ddp")
    common = ["--dataset_dir", tiny_demo_dataset, "--output_dir", output]
    # each rank saves its student's parameters before the process group ends (buffers are rank-local)
    save_student = "$torch.save(dict(@network.student.named_parameters()), os.path.join(@output_dir, f'student_rank{torch.distributed.get_rank()}.pt'))"
    ranks_save = tmp_path / "save_student_per_rank.json"
    ranks_save.write_text(json.dumps({"finalize": [save_student, "$torch.distributed.destroy_process_group()"]}))
    # the documented launch: MONAI's bundle runner with the multi-GPU override last in the config list
    configs = [os.path.join(BUNDLE_ROOT, "configs", name) for name in ("train.json", "multi_gpu_train.json")]
    configs.append(str(ranks_save))
    log = torchrun(
        "run",
        "--meta_file", os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
        "--config_file", json.dumps(configs),
        "--logging_file", os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
        "--bundle_root", BUNDLE_ROOT,
        "--dataset_dir", tiny_demo_dataset, "--output_dir", output,
        "--image_size", "64", "--num_epochs", "2", "--val_interval", "1", "--min_epoch_length", "2",
        cwd=str(tmp_path), module="monai.bundle",
    )
    assert "rank 1 of 2: student and discriminator in DistributedDataParallel" in log
    assert os.path.isfile(os.path.join(output, "model.pt"))
    students = [torch.load(os.path.join(output, f"student_rank{rank}.pt"), weights_only=True) for rank in (0, 1)]
    assert students[0].keys() == students[1].keys() and len(students[0]) > 10
    for name, parameter in students[0].items():  # gradients were averaged: both ranks took the same steps
        assert torch.equal(parameter, students[1][name]), name

    torchrun("evaluate", *common, "--override", "multi_gpu_evaluate.json", "--set", "image_size=64", cwd=str(tmp_path))
    with open(os.path.join(output, "eval", "metrics.json")) as f:
        distributed = json.load(f)["metrics"]
    rows = list(csv.DictReader(open(os.path.join(output, "eval", "scores.csv"))))
    shutil.move(os.path.join(output, "eval"), os.path.join(output, "eval_ddp"))

    assert main(["evaluate", *common, "--set", "image_size=64"]) == 0
    with open(os.path.join(output, "eval", "metrics.json")) as f:
        single = json.load(f)["metrics"]
    single_rows = list(csv.DictReader(open(os.path.join(output, "eval", "scores.csv"))))
    assert set(distributed) == set(single)
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-6), key
    # the gathered table holds every test image once, with the same scores
    assert sorted((r["name"], r["score"]) for r in rows) == sorted((r["name"], r["score"]) for r in single_rows)


def test_two_process_volume_evaluation_equals_single_process(tmp_path):
    """Volume metrics (slice AUROC, pooled voxel AUROC/AUPRO, per-volume Dice) gathered over 2 processes."""
    cases = make_demo_volumes(str(tmp_path / "cases"), num_cases=5, shape=(32, 32, 16))
    output = str(tmp_path / "run")
    common = ["--bundle_root", "multiad_medical", "--dataset_dir", cases, "--output_dir", output, "--set", "image_size=64"]
    split = ["--set", 'test_cases=["case001","case002","case003"]']
    assert main(["train", *common, *split, *SMALL[2:]]) == 0
    torchrun("evaluate", *common, *split, "--override", "multi_gpu_evaluate.json", cwd=str(tmp_path))
    with open(os.path.join(output, "eval", "metrics.json")) as f:
        distributed = json.load(f)["metrics"]
    table = sorted(csv.DictReader(open(os.path.join(output, "eval", "volumes.csv"))), key=lambda r: r["name"])
    shutil.move(os.path.join(output, "eval"), os.path.join(output, "eval_ddp"))
    assert main(["evaluate", *common, *split]) == 0
    with open(os.path.join(output, "eval", "metrics.json")) as f:
        single = json.load(f)["metrics"]
    single_table = sorted(csv.DictReader(open(os.path.join(output, "eval", "volumes.csv"))), key=lambda r: r["name"])
    assert set(distributed) == set(single) and single["num_volumes"] == 3
    for key, value in single.items():
        assert distributed[key] == pytest.approx(value, abs=1e-6), key
    assert [(r["name"], r["volume_score"]) for r in table] == [(r["name"], r["volume_score"]) for r in single_table]
