"""Tests for the 2D transforms and preprocessing chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from multiad_monai.data.demo import make_demo_dataset
from multiad_monai.data.mvtec import mvtec_datalist
from multiad_monai.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SYNTHETIC_DEFECT_TYPES,
    EmptyMaskd,
    EnsureRGB,
    EnsureRGBd,
    RandSyntheticDefectd,
    SliceContextChannelsd,
    TwoModalitiesToRGB,
    denormalize,
    image_transforms_2d,
    validation_transforms_2d,
)

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> str:
    return make_demo_dataset(
        str(tmp_path_factory.mktemp("demo") / "fabric"), num_train=4, num_test_good=1, num_test_defect=4, image_size=64
    )


def textured_image(seed: int = 0, size: int = 32) -> torch.Tensor:
    """A (3, size, size) float image in [0.2, 0.8] with some texture."""
    generator = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand((3, size, size), generator=generator)


# ----------------------------------------------------------------------------- EnsureRGB


@pytest.mark.parametrize("as_numpy", [False, True])
@pytest.mark.parametrize("channels, expected_first", [(1, 0), (3, 0), (4, 0)])
def test_ensure_rgb_channel_counts(as_numpy, channels, expected_first):
    image = torch.arange(channels * 4, dtype=torch.float32).reshape(channels, 2, 2)
    image = image.numpy() if as_numpy else image
    out = EnsureRGB()(image)
    assert tuple(out.shape) == (3, 2, 2) and type(out) is type(image)
    for c in range(3):
        source = 0 if channels == 1 else c
        np.testing.assert_array_equal(np.asarray(out[c]), np.asarray(image[source]))


def test_ensure_rgb_rejects_other_counts_naming_the_file():
    image = MetaTensor(torch.zeros(2, 4, 4), meta={"filename_or_obj": "/data/two_channels.png"})
    with pytest.raises(ValueError, match="two_channels.png"):
        EnsureRGBd(keys="image")({"image": image})
    with pytest.raises(ValueError, match="5, 4, 4"):
        EnsureRGB()(np.zeros((5, 4, 4)))


def test_ensure_rgb_keeps_metadata():
    image = MetaTensor(torch.ones(1, 4, 4), meta={"filename_or_obj": "gray.png"})
    out = EnsureRGBd(keys="image")({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "gray.png"


# ----------------------------------------------------------------------------- volume channels


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_context_channels_are_the_neighbouring_slices_with_edges_repeated(axis):
    volume = MetaTensor(torch.rand(1, 5, 6, 7), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    out = SliceContextChannelsd("image", axis=axis, offset=2)({"image": volume})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (3, 5, 6, 7) and torch.equal(out.affine, volume.affine)
    size = volume.shape[axis + 1]
    for index in range(size):
        expected = [max(index - 2, 0), index, min(index + 2, size - 1)]
        for channel, source in enumerate(expected):
            got = out[channel].select(axis, index)
            assert torch.equal(got, volume[0].select(axis, source)), (axis, index, channel)
    assert SliceContextChannelsd("image", offset=0)({"image": volume})["image"] is volume


def test_slice_context_refuses_several_modalities_naming_the_file():
    volume = MetaTensor(torch.zeros(2, 4, 4, 4), meta={"filename_or_obj": "/data/p1/flair.nii.gz"})
    with pytest.raises(ValueError, match="flair.nii.gz.*one-channel"):
        SliceContextChannelsd("image")({"image": volume})


@pytest.mark.parametrize("as_numpy", [False, True])
def test_two_modalities_get_their_mean_as_third_channel(as_numpy):
    image = torch.rand(2, 3, 4)
    image = image.numpy() if as_numpy else image
    out = TwoModalitiesToRGB()(image)
    assert tuple(out.shape) == (3, 3, 4) and type(out) is type(image)
    np.testing.assert_allclose(np.asarray(out[2]), (np.asarray(image[0]) + np.asarray(image[1])) / 2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[:2]), np.asarray(image))
    one = torch.rand(1, 3, 4)
    assert TwoModalitiesToRGB()(one) is one


# ----------------------------------------------------------------------------- EmptyMaskd


def test_empty_mask_added_for_good_images():
    image = MetaTensor(torch.rand(3, 5, 7), meta={"filename_or_obj": "good.png"})
    out = EmptyMaskd()({"image": image, "label": 0})
    mask = out["mask"]
    assert isinstance(mask, MetaTensor) and tuple(mask.shape) == (1, 5, 7)
    assert mask.dtype == torch.float32 and not mask.any()
    assert mask.meta["filename_or_obj"] == "good.png"


def test_present_mask_binarised():
    mask = MetaTensor(torch.tensor([[[0.0, 255.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 9.0]]]))
    out = EmptyMaskd()({"image": torch.zeros(3, 2, 2), "mask": mask})["mask"]
    assert tuple(out.shape) == (1, 2, 2) and out.dtype == torch.float32
    assert out.tolist() == [[[0.0, 1.0], [1.0, 1.0]]]


# ----------------------------------------------------------------------------- RandSyntheticDefectd


def run_defect(seed: int, image: torch.Tensor | None = None, **kwargs) -> dict:
    transform = RandSyntheticDefectd(**kwargs)
    transform.set_random_state(seed)
    return transform({"image": textured_image() if image is None else image, "label": 0})


def test_synthetic_defect_deterministic_with_seed():
    first, again, other = run_defect(7), run_defect(7), run_defect(8)
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["mask"], other["mask"])


@pytest.mark.parametrize("defect_type", SYNTHETIC_DEFECT_TYPES)
@pytest.mark.parametrize("seed", range(4))
def test_synthetic_defect_types(defect_type, seed):
    image = textured_image(seed)
    out = run_defect(seed, image, defect_types=[defect_type])
    mask = out["mask"]
    assert tuple(mask.shape) == (1, 32, 32) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0} and out["label"] == 1
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    changed = (out["image"] - image).abs().amax(0) > 1e-6
    assert changed[mask[0] > 0].float().mean() > 0.5  # the defect is where the mask says
    if defect_type not in ("blob", "lesion"):  # blobs and lesions fade out softly just beyond their mask
        assert not changed[mask[0] == 0].any()


def test_lesion_defects_stay_inside_the_foreground_with_both_signs():
    image = torch.full((3, 64, 64), 0.5) + 0.05 * textured_image(0, size=64)
    foreground = torch.zeros(1, 64, 64)
    foreground[:, 16:48, 20:44] = 1.0
    signs = set()
    for seed in range(12):
        transform = RandSyntheticDefectd(defect_types=["lesion"], seed_key="name", seed=seed, foreground_key="foreground")
        out = transform({"image": image.clone(), "foreground": foreground, "name": "slice", "synthetic_defect": 1})
        inside = foreground[0] > 0
        assert out["mask"][0][~inside].sum() == 0 and out["mask"].sum() > 0
        change = (out["image"] - image).mean(0)
        assert change[~inside].abs().max() == 0  # no pixel of the organ's surroundings moves
        signs.add(int(torch.sign(change[out["mask"][0] > 0].mean())))
    assert signs == {-1, 1}  # bright and dark lesions


def test_synthetic_defect_keeps_existing_mask_and_meta():
    existing = MetaTensor(torch.zeros(1, 32, 32), meta={"filename_or_obj": "m.png"})
    existing[0, :2, :2] = 1.0
    image = MetaTensor(textured_image(), meta={"filename_or_obj": "x.png"})
    transform = RandSyntheticDefectd()
    transform.set_random_state(0)
    out = transform({"image": image, "mask": existing, "label": 1})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "x.png"
    assert isinstance(out["mask"], MetaTensor) and out["mask"][0, :2, :2].eq(1).all()
    assert out["mask"].sum() > 4


def test_synthetic_defect_probability_zero_is_identity():
    data = {"image": textured_image(), "label": 0}
    out = RandSyntheticDefectd(prob=0.0)(dict(data))
    assert out["image"] is data["image"] and "mask" not in out and out["label"] == 0


def test_synthetic_defect_per_item_seed_ignores_order_and_state():
    items = [
        {"image": MetaTensor(textured_image(i), meta={"filename_or_obj": f"/a/{i}.png"}), "label": 0} for i in range(6)
    ]
    first = RandSyntheticDefectd(prob=0.5, seed_key="image", seed=1)
    second = RandSyntheticDefectd(prob=0.5, seed_key="image", seed=1)
    second.set_random_state(123)
    forward = [first(dict(item)) for item in items]
    backward = [second(dict(item)) for item in reversed(items)][::-1]
    for a, b in zip(forward, backward):
        assert a["label"] == b["label"] and torch.equal(a["image"], b["image"])
    assert {out["label"] for out in forward} == {0, 1}


def test_synthetic_defect_from_bundle_config():
    config = {"_target_": "multiad_monai.transforms.RandSyntheticDefectd", "prob": 0.5, "defect_types": ["scratch"]}
    transform = ConfigParser({"t": config}).get_parsed_content("t")
    assert isinstance(transform, RandSyntheticDefectd) and transform.defect_types == ("scratch",)


# ----------------------------------------------------------------------------- chains


def test_chain_shapes_on_demo_dataset(demo_root):
    transform = image_transforms_2d(image_size=256)
    for item in mvtec_datalist(demo_root, "test"):
        out = transform(item)
        image, mask = out["image"], out["mask"]
        assert tuple(image.shape) == (3, 256, 256) and image.dtype == torch.float32
        assert tuple(mask.shape) == (1, 256, 256) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert bool(mask.any()) == bool(item["label"])
        assert image.meta["filename_or_obj"] == item["image"]
        assert out["label"] == item["label"] and out["name"] == item["name"]


def test_chain_without_mask(demo_root):
    out = image_transforms_2d(image_size=32, with_mask=False)(mvtec_datalist(demo_root, "train")[0])
    assert tuple(out["image"].shape) == (3, 32, 32) and "mask" not in out


def test_chain_from_bundle_config():
    config = {"_target_": "multiad_monai.transforms.image_transforms_2d", "image_size": 32, "with_mask": False}
    assert isinstance(ConfigParser({"t": config}).get_parsed_content("t"), Compose)


@pytest.mark.parametrize(
    "name, pixels, expected",
    [
        ("gray.png", np.full((8, 8), 255, np.uint8), 1.0),
        ("gray.tif", np.full((8, 8), 51, np.uint8), 0.2),
        ("rgba.png", np.full((8, 8, 4), 102, np.uint8), 0.4),
        ("deep.png", np.full((8, 8), 65535, np.uint16), 1.0),
        ("deep_half.png", np.full((8, 8), 32768, np.uint16), 32768 / 65535),
    ],
)
def test_chain_scales_8_and_16_bit_to_unit_range_rgb(tmp_path, name, pixels, expected):
    path = str(tmp_path / name)
    Image.fromarray(pixels).save(path)
    image = image_transforms_2d(image_size=8, with_mask=False, **IDENTITY)({"image": path})["image"]
    assert tuple(image.shape) == (3, 8, 8) and image.dtype == torch.float32
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)


def test_chain_normalises_and_denormalize_inverts(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    path = str(tmp_path / "rgb.png")
    Image.fromarray(pixels).save(path)
    image = image_transforms_2d(image_size=16, with_mask=False)({"image": path})["image"]
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    expected = (pixels.transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-4)
    restored = denormalize(image[None])[0]
    np.testing.assert_allclose(restored.numpy(), pixels.transpose(2, 0, 1) / 255.0, atol=1e-5)
    np.testing.assert_allclose(denormalize(image.numpy()), restored.numpy(), atol=1e-6)


def test_chain_rows_first_convention(tmp_path):
    """Tensors are (C, H, W) as numpy/PIL see the file: no transpose."""
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    path = str(tmp_path / "asymmetric.png")
    Image.fromarray(pixels).save(path)
    image = image_transforms_2d(image_size=24, with_mask=False, **IDENTITY)({"image": path})["image"]
    np.testing.assert_allclose(image.numpy(), pixels.transpose(2, 0, 1) / 255.0, atol=1e-5)


@pytest.mark.parametrize("image_size", [64, 96])
def test_chain_keeps_image_and_mask_aligned(tmp_path, image_size):
    # A non-square file with an off-centre, non-square bright rectangle, marked in the mask.
    height, width, rows, cols = 40, 64, slice(4, 12), slice(36, 60)
    pixels = np.full((height, width, 3), 40, np.uint8)
    pixels[rows, cols] = 220
    mask = np.zeros((height, width), np.uint8)
    mask[rows, cols] = 255
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "img_mask.png")

    out = image_transforms_2d(image_size=image_size, **IDENTITY)(
        {"image": str(tmp_path / "img.png"), "mask": str(tmp_path / "img_mask.png")}
    )
    bright = out["image"][0] > 0.5
    marked = out["mask"][0] > 0
    assert (bright & marked).sum() / (bright | marked).sum() > 0.9
    ys, xs = np.nonzero(marked.numpy())
    scale_y, scale_x = image_size / height, image_size / width
    assert abs(ys.min() - rows.start * scale_y) <= 1 and abs(ys.max() + 1 - rows.stop * scale_y) <= 1
    assert abs(xs.min() - cols.start * scale_x) <= 1 and abs(xs.max() + 1 - cols.stop * scale_x) <= 1


def test_validation_chain_is_reproducible(demo_root):
    datalist = mvtec_datalist(demo_root, "train")
    first = [validation_transforms_2d(image_size=32, seed=5)(item) for item in datalist]
    second_transform = validation_transforms_2d(image_size=32, seed=5)
    second = [second_transform(item) for item in reversed(datalist)][::-1]
    for a, b in zip(first, second):
        assert a["label"] == b["label"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["image"].dtype == torch.float32 and tuple(a["mask"].shape) == (1, 32, 32)
        assert bool(a["mask"].any()) == (a["label"] == 1)
    assert any(out["label"] == 1 for out in first)
    always = [validation_transforms_2d(image_size=32, defect_probability=1.0)(item) for item in datalist]
    assert all(out["label"] == 1 and out["mask"].any() for out in always)
