"""Tests for BMAD-style datalists."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from multiad_monai.data import DatasetError, bmad_datalist
from multiad_monai.transforms import image_transforms_2d


def write_png(path, value: int = 128, size: int = 24) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


@pytest.fixture
def bmad_root(tmp_path) -> str:
    """train/good 3; valid: good 2 (one with a label file), Ungood 2; test: Ungood 1."""
    root = tmp_path / "brain"
    for i in range(3):
        write_png(root / "train" / "good" / f"{i:03d}.png")
    write_png(root / "valid" / "good" / "img" / "g0.png")
    write_png(root / "valid" / "good" / "img" / "g1.png")
    write_png(root / "valid" / "good" / "label" / "g0.png", value=0)
    for stem in ("u0", "u1"):
        write_png(root / "valid" / "Ungood" / "img" / f"{stem}.png")
        write_png(root / "valid" / "Ungood" / "label" / f"{stem}.png", value=255)
    write_png(root / "test" / "Ungood" / "img" / "t0.png")
    write_png(root / "test" / "Ungood" / "label" / "t0.png", value=255)
    return str(root)


def test_bmad_train(bmad_root):
    datalist = bmad_datalist(bmad_root, "train")
    assert [item["name"] for item in datalist] == ["good/000", "good/001", "good/002"]
    assert all(item["label"] == 0 and "mask" not in item and os.path.isfile(item["image"]) for item in datalist)


def test_bmad_valid_items_like_mvtec(bmad_root):
    datalist = bmad_datalist(bmad_root, "valid")
    assert [(item["name"], item["label"], item["defect_type"]) for item in datalist] == [
        ("good/g0", 0, "good"),
        ("good/g1", 0, "good"),
        ("Ungood/u0", 1, "Ungood"),
        ("Ungood/u1", 1, "Ungood"),
    ]
    assert datalist[0]["mask"] == os.path.join(bmad_root, "valid", "good", "label", "g0.png")
    assert "mask" not in datalist[1]
    assert datalist[2]["mask"] == os.path.join(bmad_root, "valid", "Ungood", "label", "u0.png")
    assert [item["name"] for item in bmad_datalist(bmad_root, "test")] == ["Ungood/t0"]

    chain = image_transforms_2d(image_size=32)
    loaded = [chain(item) for item in datalist]
    assert [float(d["mask"].max()) for d in loaded] == [0.0, 0.0, 1.0, 1.0]
    assert tuple(loaded[0]["image"].shape) == (3, 32, 32)


def test_bmad_errors(bmad_root, tmp_path):
    os.remove(os.path.join(bmad_root, "valid", "Ungood", "label", "u1.png"))
    missing = os.path.join(bmad_root, "valid", "Ungood", "img", "u1.png")
    with pytest.raises(DatasetError, match=re.escape(missing)):
        bmad_datalist(bmad_root, "valid")
    lenient = bmad_datalist(bmad_root, "valid", require_masks=False)
    assert "mask" not in lenient[-1] and lenient[-1]["label"] == 1

    with pytest.raises(DatasetError, match="does not exist"):
        bmad_datalist(str(tmp_path / "nowhere"), "valid")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match="train/good"):
        bmad_datalist(str(tmp_path / "flat"), "train")
    with pytest.raises(DatasetError, match="good/img"):
        bmad_datalist(str(tmp_path / "flat"), "valid")
    with pytest.raises(ValueError, match="split"):
        bmad_datalist(bmad_root, "validation")


@pytest.mark.real_data
def test_shared_bmad_brain_slices():
    root = shared_data("bmad_brain_slices")
    train, valid = bmad_datalist(root, "train"), bmad_datalist(root, "valid")
    assert len(train) == 64
    assert sum(item["defect_type"] == "good" for item in valid) == 64
    anomalous = [item for item in valid if item["defect_type"] == "Ungood"]
    assert len(anomalous) == 143 and all(item["label"] == 1 and os.path.isfile(item["mask"]) for item in anomalous)
