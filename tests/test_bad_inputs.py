"""The bad-input catalogue (docs/bad_inputs.md), end to end through the ``multiad`` command: every bad input
gives exit status 2 and one ``multiad: error:`` line naming the file, and nothing is written half-way."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from multiad_monai.apps.cli import main
from multiad_monai.data import make_demo_volumes

TINY = ["--set", "image_size=64", "--set", "num_epochs=1", "--set", "min_epoch_length=1", "--set", "val_interval=1"]


def run_cli(capsys, *args: str) -> str:
    """Run ``multiad``; expect the one-line error; return it."""
    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("multiad: error:")]
    assert len(lines) == 1
    print("CATALOGUE", lines[0])  # shown with pytest -s: the text of docs/bad_inputs.md
    return lines[0]


@pytest.fixture()
def image_dataset(tiny_demo_dataset, tmp_path) -> str:
    root = tmp_path / "data"
    shutil.copytree(tiny_demo_dataset, root)
    return str(root)


@pytest.fixture(scope="module")
def volume_dataset(tmp_path_factory) -> str:
    return make_demo_volumes(str(tmp_path_factory.mktemp("vol") / "cases"), num_cases=3, shape=(32, 32, 20))


def _no_outputs(folder) -> bool:
    return not os.path.exists(folder) or not any(f.endswith((".pt", ".json", ".csv", ".nii.gz")) for _, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated_png", "image file is truncated"),
        ("corrupt_jpeg", "cannot be read as an image"),
        ("mask_size", "but its image"),
        ("empty_split", "train"),
    ],
)
def test_bad_images_stop_training_before_it_starts(image_dataset, tmp_path, capsys, damage, expected):
    good = os.path.join(image_dataset, "train", "good")
    victim = os.path.join(good, sorted(os.listdir(good))[0])
    if damage == "truncated_png":
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])
    elif damage == "corrupt_jpeg":
        victim = os.path.join(good, "extra.jpg")
        open(victim, "wb").write(b"\xff\xd8\xff\xe0 not really a jpeg")
    elif damage == "mask_size":
        masks = os.path.join(image_dataset, "ground_truth")
        kind = sorted(os.listdir(masks))[0]
        victim = os.path.join(masks, kind, sorted(os.listdir(os.path.join(masks, kind)))[0])
        Image.new("L", (10, 10)).save(victim)
        output = tmp_path / "out"
        line = run_cli(capsys, "evaluate", "--dataset_dir", image_dataset, "--output_dir", str(output), "--set", "image_size=64")
        assert expected in line and os.path.basename(victim) in line and _no_outputs(output)
        return
    elif damage == "empty_split":
        for name in os.listdir(good):
            os.remove(os.path.join(good, name))
        victim = good
    output = tmp_path / "out"
    line = run_cli(capsys, "train", "--dataset_dir", image_dataset, "--output_dir", str(output), *TINY)
    assert expected in line and os.path.basename(victim) in line
    assert _no_outputs(output)


def test_constant_image_is_accepted_with_a_finite_map(image_dataset, tmp_path, capsys):
    """A blank image is a legal input (a dark frame): it gets a finite score, not an error."""
    output = tmp_path / "out"
    assert main(["train", "--dataset_dir", image_dataset, "--output_dir", str(output), *TINY]) == 0
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(folder / "blank.png")
    assert main(["infer", "--output_dir", str(output), "--set", "image_size=64", "--set", f"input_dir={folder}"]) == 0
    row = open(output / "inference" / "scores.csv").read().splitlines()[1].split(",")
    assert row[0] == "blank.png" and np.isfinite(float(row[1]))

    # model files that do not fit: another architecture, a truncated file, no file
    other = ["--set", "student_se_ratio=null"]
    line = run_cli(capsys, "evaluate", "--dataset_dir", image_dataset, "--output_dir", str(output), "--set", "image_size=64", *other)
    assert "another architecture" in line and "model.pt" in line
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((output / "model.pt").read_bytes()[:1000])
    line = run_cli(capsys, "infer", "--output_dir", str(output), "--set", "image_size=64", "--set", f"input_dir={folder}", "--set", f"ckpt_path={truncated}")
    assert "truncated.pt" in line and "cannot be read" in line
    line = run_cli(capsys, "evaluate", "--dataset_dir", image_dataset, "--output_dir", str(tmp_path / "none"), "--set", "image_size=64")
    assert "checkpoint not found" in line and _no_outputs(tmp_path / "none" / "eval")


def test_bad_files_are_skipped_only_when_asked(image_dataset, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["train", "--dataset_dir", image_dataset, "--output_dir", str(output), *TINY]) == 0
    folder = tmp_path / "inputs"
    shutil.copytree(os.path.join(image_dataset, "test", "good"), folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    common = ["infer", "--output_dir", str(output), "--set", "image_size=64", "--set", f"input_dir={folder}"]
    line = run_cli(capsys, *common)
    assert "broken.png" in line and not os.path.exists(output / "inference" / "scores.csv")
    assert main([*common, "--set", "skip_bad_files=true"]) == 0
    assert "not a probability" in open(output / "inference" / "README.md").read()
    skipped = open(output / "inference" / "skipped_files.csv").read()
    assert "broken.png" in skipped
    scored = open(output / "inference" / "scores.csv").read()
    assert "broken.png" not in scored and scored.count("\n") == len(os.listdir(folder))  # header + the good ones


def test_config_mistakes(image_dataset, tmp_path, capsys):
    line = run_cli(capsys, "train", "--dataset_dir", image_dataset, "--output_dir", str(tmp_path), "--set", "num_epoch=3")
    assert "num_epoch" in line and "did you mean 'num_epochs'" in line
    line = run_cli(capsys, "train", "--dataset_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path))
    assert "missing" in line
    line = run_cli(capsys, "train", "--override", "no_such_override.json")
    assert "no_such_override.json" in line
    broken = tmp_path / "broken_override.json"
    broken.write_text('{"teacher#model_name": "efficientnet-b99"}')
    line = run_cli(capsys, "train", "--dataset_dir", image_dataset, "--output_dir", str(tmp_path / "o"), "--override", str(broken), *TINY)
    assert "efficientnet-b99" in line


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated_nifti", "cannot be read"),
        ("nan_voxels", "NaN or infinite"),
        ("constant_volume", "constant"),
        ("label_affine", "different affines"),
        ("label_shape", "spatial shape"),
        ("two_dimensional", "2D image"),
        ("missing_modality", "missing"),
    ],
)
def test_bad_volumes_stop_the_medical_bundle(volume_dataset, tmp_path, capsys, damage, expected):
    root = tmp_path / "cases"
    shutil.copytree(volume_dataset, root)
    case = root / "case000"
    image = nib.load(str(case / "flair.nii.gz"))
    victim = case / "flair.nii.gz"
    if damage == "truncated_nifti":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 3])
    elif damage == "nan_voxels":
        array = np.asarray(image.dataobj).copy()
        array[5, 5, 5] = np.inf
        nib.save(nib.Nifti1Image(array, image.affine), str(victim))
    elif damage == "constant_volume":
        nib.save(nib.Nifti1Image(np.full(image.shape, 7.0, np.float32), image.affine), str(victim))
    elif damage == "label_affine":
        victim = case / "seg.nii.gz"
        label = nib.load(str(victim))
        shifted = label.affine.copy()
        shifted[0, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(victim))
    elif damage == "label_shape":
        victim = case / "seg.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), image.affine), str(victim))
    elif damage == "two_dimensional":
        nib.save(nib.Nifti1Image(np.ones((32, 32), np.float32), np.eye(4)), str(victim))
    elif damage == "missing_modality":
        victim = case / "t1c.nii.gz"
        for other in ("case001", "case002"):
            shutil.copy(root / other / "flair.nii.gz", root / other / "t1c.nii.gz")
    output = tmp_path / "out"
    args = ["train", "--bundle_root", "multiad_medical", "--dataset_dir", str(root), "--output_dir", str(output), *TINY]
    args += ["--set", 'test_cases=["case002"]']
    if damage == "missing_modality":
        args += ["--set", 'image_files=["flair.nii.gz", "t1c.nii.gz"]']
    line = run_cli(capsys, *args)
    assert expected in line and victim.name in line, line
    assert _no_outputs(output)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
