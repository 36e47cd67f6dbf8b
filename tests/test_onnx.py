"""ONNX export (``multiad export --format onnx``) and onnxruntime inference: the checkpoint's maps and scores."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT, shared_data
from multiad_monai.apps.cli import bundle_configs, main
from multiad_monai.data import CheckpointError
from multiad_monai.handlers.checkpoint import load_network_checkpoint
from multiad_monai.inferers import image_score
from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork, export_onnx
from multiad_monai.transforms import image_transforms_2d


def _network(image_size: int, **values):
    """The 2D bundle's network and its config, at ``image_size``."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE_ROOT, "evaluate"))
    parser.update({"bundle_root": BUNDLE_ROOT, "image_size": image_size, **values})
    return parser.get_parsed_content("network_def"), parser


def test_onnx_export_gives_the_checkpoint_maps_and_scores(tiny_demo_dataset, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    train = ["--dataset_dir", tiny_demo_dataset, "--output_dir", str(run), "--set", "image_size=64"]
    assert main(["train", *train, "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]) == 0
    assert main(["export", "--output_dir", str(run), "--bundle_dir", str(bundle), "--format", "onnx"]) == 0
    exported = bundle / "models" / "model.onnx"
    model = OnnxAnomalyNetwork(str(exported))

    network, parser = _network(64, dataset_dir=tiny_demo_dataset, output_dir=str(run))
    load_network_checkpoint(str(run / "model.pt"), network)
    network.eval()
    dataset = parser.get_parsed_content("dataset")  # the test images through the bundle's own preprocessing
    images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(len(dataset))])
    with torch.inference_mode():
        eager_maps = network(images)
    maps, scores = model.predict(images)  # a batch other than the exported example's
    assert maps.shape == eager_maps.shape == (len(dataset), 1, 64, 64)
    torch.testing.assert_close(maps, eager_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, image_score(eager_maps, parser.get_parsed_content("score_mode")), atol=1e-4, rtol=0)
    assert float(model.threshold) == pytest.approx(float(network.threshold))  # the saved threshold travels with it
    assert model.metadata["image_size"] == 64

    # an earlier export is never replaced; a damaged export or a plain checkpoint: one error naming the file
    with pytest.raises(FileExistsError, match="model.onnx"):
        export_onnx(network, str(exported), 64)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(exported.read_bytes()[:5000])
    for bad in (damaged, run / "model.pt"):
        with pytest.raises(CheckpointError, match=bad.name):
            OnnxAnomalyNetwork(str(bad))


@pytest.mark.slow
def test_onnx_export_of_the_demo_map_with_test_time_flips(tmp_path):
    """The demo's map (``demo.json``: upsampled features, per-pixel statistics, flips, top-1% score) exports as it runs."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE_ROOT, "evaluate", ["demo.json"]))
    parser.update({"bundle_root": BUNDLE_ROOT, "image_size": 64})
    network = parser.get_parsed_content("network_def").eval()
    assert network.test_time_flip and parser.get_parsed_content("score_mode") == "topk"
    model = OnnxAnomalyNetwork(export_onnx(network, str(tmp_path / "demo.onnx"), 64, score_mode="topk"))
    images = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        eager_maps = network(images)
    maps, scores = model.predict(images)
    torch.testing.assert_close(maps, eager_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, image_score(eager_maps, "topk"), atol=1e-4, rtol=0)
    with torch.inference_mode():  # the flips matter: the image's own map alone is another one
        assert not torch.allclose(network.single_map(images), eager_maps, atol=1e-4)


@pytest.mark.real_data
def test_onnx_maps_equal_the_checkpoint_on_real_bottle_images(tmp_path):
    """MVTec AD bottle test images at the real 256 px; top-k image score. The weights are a seeded, untrained
    student saved and reloaded as a checkpoint: the export's fidelity does not depend on training."""
    bottle = shared_data("mvtec_ad", "bottle")
    torch.manual_seed(0)
    network, parser = _network(256)
    network.threshold.fill_(0.25)
    network.score_scale.fill_(0.02)
    torch.save(network.state_dict(), tmp_path / "model.pt")
    loaded, _ = _network(256)
    load_network_checkpoint(str(tmp_path / "model.pt"), loaded)
    loaded.eval()
    model = OnnxAnomalyNetwork(export_onnx(loaded, str(tmp_path / "model.onnx"), 256, score_mode="topk"))

    files = [sorted(glob.glob(os.path.join(bottle, "test", kind, "*.png")))[0] for kind in ("good", "broken_large", "contamination")]
    chain = image_transforms_2d(256, parser.get_parsed_content("image_mean"), parser.get_parsed_content("image_std"), with_mask=False)
    images = torch.stack([torch.as_tensor(chain({"image": f})["image"]) for f in files])
    with torch.inference_mode():
        eager_maps = loaded(images)
    maps, scores = model.predict(images)
    torch.testing.assert_close(maps, eager_maps, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, image_score(eager_maps, "topk"), atol=1e-4, rtol=0)
    assert model.metadata["score_mode"] == "topk" and float(model.threshold) == pytest.approx(0.25)
