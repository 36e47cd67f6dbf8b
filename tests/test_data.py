"""Tests for the MVTec-style datalists, their checks and the demo dataset generator."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from multiad_monai.data import demo
from multiad_monai.data.demo import DEMO_DEFECT_TYPES, make_demo_dataset
from multiad_monai.data.errors import DatasetError
from multiad_monai.data.mvtec import check_datalist, mvtec_datalist, split_train_validation

SMALL = dict(num_train=6, num_test_good=2, num_test_defect=8, image_size=64, seed=3)


def snapshot(root: str) -> dict[str, str]:
    """Relative path -> content hash of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    return make_demo_dataset(str(tmp_path_factory.mktemp("demo") / "fabric"), **SMALL)


@pytest.fixture
def dataset(demo_root, tmp_path) -> str:
    """A private, modifiable copy of the demo dataset."""
    root = str(tmp_path / "copy")
    shutil.copytree(demo_root, root)
    return root


# ----------------------------------------------------------------------------- datalists


def test_train_datalist(demo_root):
    datalist = mvtec_datalist(demo_root, "train")
    assert [item["name"] for item in datalist] == [f"good/{i:03d}" for i in range(SMALL["num_train"])]
    for item in datalist:
        assert item["label"] == 0 and item["defect_type"] == "good" and "mask" not in item
        assert os.path.isfile(item["image"])


def test_test_datalist(demo_root):
    datalist = mvtec_datalist(demo_root, "test")
    assert len(datalist) == SMALL["num_test_good"] + SMALL["num_test_defect"]
    assert {item["defect_type"] for item in datalist} == {"good", *DEMO_DEFECT_TYPES}
    assert datalist == sorted(datalist, key=lambda item: (item["defect_type"], item["image"]))
    for item in datalist:
        assert item["label"] == int(item["defect_type"] != "good")
        assert ("mask" in item) == bool(item["label"])
        if item["label"]:
            assert os.path.basename(item["mask"]) == os.path.basename(item["name"]) + "_mask.png"
    assert mvtec_datalist(demo_root, "test") == datalist  # deterministic


def test_extensions_case_insensitive_and_mask_fallback(dataset):
    def path(relative: str) -> str:
        return os.path.join(dataset, relative)

    os.rename(path("test/scratch/000.png"), path("test/scratch/000.PNG"))
    os.rename(path("ground_truth/scratch/000_mask.png"), path("ground_truth/scratch/000.png"))
    Image.open(path("train/good/001.png")).save(path("train/good/001.Jpeg"), format="JPEG")
    os.remove(path("train/good/001.png"))
    open(path("train/good/notes.txt"), "w").close()  # not an image: ignored

    item = next(i for i in mvtec_datalist(dataset, "test") if i["name"] == "scratch/000")
    assert item["image"].endswith("000.PNG") and item["mask"].endswith(os.path.join("scratch", "000.png"))
    train = mvtec_datalist(dataset, "train")
    assert len(train) == SMALL["num_train"] and train[1]["image"].endswith("001.Jpeg")


def test_missing_mask(dataset):
    mask = os.path.join(dataset, "ground_truth/stain/001_mask.png")
    os.remove(mask)
    with pytest.raises(DatasetError, match="stain/001.png") as error:
        mvtec_datalist(dataset, "test")
    assert "no mask" in str(error.value)
    item = next(i for i in mvtec_datalist(dataset, "test", require_masks=False) if i["name"] == "stain/001")
    assert item["label"] == 1 and "mask" not in item


def test_root_missing(tmp_path):
    root = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        mvtec_datalist(root)


def test_wrong_layout_says_expected_and_found(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "img.png")
    with pytest.raises(DatasetError) as error:
        mvtec_datalist(str(root), "train")
    message = str(error.value)
    assert "flat" in message and "train/good" in message and "img.png" in message


def test_parent_of_categories_gets_a_hint(demo_root, tmp_path):
    shutil.copytree(demo_root, tmp_path / "mvtec" / "carpet")
    with pytest.raises(DatasetError, match="carpet"):
        mvtec_datalist(str(tmp_path / "mvtec"), "test")


def test_empty_split(tmp_path):
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty.*train/good"):
        mvtec_datalist(str(tmp_path / "cat"), "train")
    (tmp_path / "cat" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty.*test"):
        mvtec_datalist(str(tmp_path / "cat"), "test")


def test_duplicate_stems(dataset):
    shutil.copy(os.path.join(dataset, "train/good/002.png"), os.path.join(dataset, "train/good/002.bmp"))
    with pytest.raises(DatasetError, match="002.bmp"):
        mvtec_datalist(dataset, "train")


def test_bad_split_argument(demo_root):
    with pytest.raises(ValueError, match="split"):
        mvtec_datalist(demo_root, "validation")


# ----------------------------------------------------------------------------- file checks


def test_check_datalist_passes_and_modifies_nothing(dataset):
    before = snapshot(dataset)
    check_datalist(mvtec_datalist(dataset, "train") + mvtec_datalist(dataset, "test"))
    assert snapshot(dataset) == before


def test_mask_size_mismatch(dataset):
    mask = os.path.join(dataset, "ground_truth/missing/001_mask.png")
    Image.new("L", (32, 64)).save(mask)
    with pytest.raises(DatasetError, match="missing/001_mask.png.*32x64"):
        check_datalist(mvtec_datalist(dataset, "test"))


def test_truncated_image(dataset):
    path = os.path.join(dataset, "train/good/004.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="004.png"):
        check_datalist(mvtec_datalist(dataset, "train"))


def test_unreadable_image_and_mask(dataset):
    with open(os.path.join(dataset, "train/good/005.png"), "wb") as f:
        f.write(b"not a png at all")
    with open(os.path.join(dataset, "ground_truth/color/000_mask.png"), "wb") as f:
        f.write(b"")
    with pytest.raises(DatasetError) as error:
        check_datalist(mvtec_datalist(dataset, "train") + mvtec_datalist(dataset, "test"))
    assert "005.png" in str(error.value) and "000_mask.png" in str(error.value)


def test_missing_file_in_datalist(tmp_path):
    with pytest.raises(DatasetError, match="ghost.png.*does not exist"):
        check_datalist([{"image": str(tmp_path / "ghost.png")}])


# ----------------------------------------------------------------------------- splitting


def test_split_train_validation_deterministic(demo_root):
    datalist = mvtec_datalist(demo_root, "train")
    train, validation = split_train_validation(datalist, 0.34, seed=1)
    assert (train, validation) == split_train_validation(datalist, 0.34, seed=1)
    assert len(validation) == 2 and len(train) == 4
    assert sorted(i["name"] for i in train + validation) == [i["name"] for i in datalist]


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 40), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 2**31))
def test_split_sizes(n, fraction, seed):
    items = [{"name": str(i)} for i in range(n)]
    train, validation = split_train_validation(items, fraction, seed)
    assert len(train) + len(validation) == n
    assert not {i["name"] for i in train} & {i["name"] for i in validation}
    if n >= 2:
        assert len(train) >= 1 and len(validation) >= 1


# ----------------------------------------------------------------------------- demo generator


def test_demo_is_bit_identical(tmp_path, demo_root):
    again = make_demo_dataset(str(tmp_path / "again"), **SMALL)
    assert snapshot(again) == snapshot(demo_root)
    other = make_demo_dataset(str(tmp_path / "other"), **{**SMALL, "seed": 4})
    assert snapshot(other)["train/good/000.png"] != snapshot(demo_root)["train/good/000.png"]


def test_demo_images_and_masks(demo_root):
    image = np.asarray(Image.open(os.path.join(demo_root, "train/good/000.png")))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    areas = []
    for item in mvtec_datalist(demo_root, "test"):
        if item["label"]:
            mask = np.asarray(Image.open(item["mask"]))
            assert set(np.unique(mask)) <= {0, 255} and mask.any()
            areas.append((mask > 0).sum())
    assert max(areas) >= 4 * min(areas)  # several defect sizes
    normals = [np.asarray(Image.open(i["image"]), dtype=float) for i in mvtec_datalist(demo_root, "train")]
    assert 0.0 < np.std([n.mean() for n in normals]) < 10.0  # normals vary, a little


@pytest.mark.parametrize("defect_type", DEMO_DEFECT_TYPES)
@pytest.mark.parametrize("size_class", [0, 1, 2])
def test_demo_defects_are_visible_and_local(defect_type, size_class):
    rng = np.random.default_rng(size_class)
    normal = demo._normal_image(rng, 64)
    defective, mask = demo._DEFECTS[defect_type](rng, normal.copy(), size_class)
    change = np.abs(np.clip(defective, 0, 1) - normal).max(-1)
    assert mask.any()
    assert change[mask].mean() > 0.04  # about 10 grey levels or more on average
    # Blur tails beyond the mask stay below half an 8-bit grey level, so they vanish when saved.
    assert change[~ndimage.binary_dilation(mask, iterations=3)].max() < 0.5 / 255


def test_demo_reuses_complete_dataset(tmp_path):
    root = make_demo_dataset(str(tmp_path / "d"), **SMALL)
    stamp = os.stat(os.path.join(root, "train/good/000.png")).st_mtime_ns
    inode = os.stat(root).st_ino
    assert make_demo_dataset(root, **SMALL) == root
    assert os.stat(root).st_ino == inode
    assert os.stat(os.path.join(root, "train/good/000.png")).st_mtime_ns == stamp

    make_demo_dataset(root, **{**SMALL, "num_train": 2})  # other parameters: rebuilt
    assert len(mvtec_datalist(root, "train")) == 2
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no staging or old folders left


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="mine"):
        make_demo_dataset(str(tmp_path / "mine"), **SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_demo_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def fail_half_way(folder, params):
        os.makedirs(os.path.join(folder, "train", "good"))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_dataset", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(str(tmp_path / "d"), **SMALL)
    assert os.listdir(tmp_path) == []
