"""TorchScript export with MONAI's ``ckpt_export``: the exported model gives the checkpoint's maps and scores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from multiad_monai.apps.cli import bundle_configs, main
from multiad_monai.data import CheckpointError
from multiad_monai.handlers import load_exported_network
from multiad_monai.inferers import VolumeAnomalyInferer, image_score


def test_torchscript_export_gives_the_checkpoint_maps(tiny_demo_dataset, tmp_path):
    output = tmp_path / "run"
    train = ["--dataset_dir", tiny_demo_dataset, "--output_dir", str(output), "--set", "image_size=64"]
    assert main(["train", *train, "--set", "num_epochs=1", "--set", "min_epoch_length=2", "--set", "val_interval=1"]) == 0
    exported = tmp_path / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(exported),
        "--ckpt_file", str(output / "model.pt"),
        "--key_in_ckpt", "network",
        "--meta_file", os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
        "--config_file", os.path.join(BUNDLE_ROOT, "configs", "inference.json"),
        "--bundle_root", BUNDLE_ROOT,
        "--image_size", "64",
        "--use_trace", "True",
        "--input_shape", "[1, 3, 64, 64]",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE_ROOT, "evaluate"))
    parser.update({"bundle_root": BUNDLE_ROOT, "image_size": 64, "dataset_dir": tiny_demo_dataset, "output_dir": str(output)})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(output / "model.pt", map_location="cpu", weights_only=True)["network"])
    network.eval()
    scripted = load_exported_network(str(exported))
    dataset = parser.get_parsed_content("dataset")  # the test images through the bundle's own preprocessing
    images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(len(dataset))])
    with torch.inference_mode():
        eager_maps, scripted_maps = network(images), scripted(images)  # a batch other than the traced 1
    torch.testing.assert_close(scripted_maps, eager_maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_score(scripted_maps), image_score(eager_maps), atol=1e-5, rtol=1e-5)
    assert float(scripted.threshold) == float(network.threshold)  # the saved threshold travels with the model

    # the exported model drops into volumetric inference as is
    volume = torch.rand(1, 40, 40, 5)
    ts_map, ts_scores, _ = VolumeAnomalyInferer(scripted, image_size=64, device="cpu")(volume)
    eager_map, eager_scores, _ = VolumeAnomalyInferer(network, image_size=64, device="cpu")(volume)
    torch.testing.assert_close(ts_map.as_tensor(), eager_map.as_tensor(), atol=1e-5, rtol=1e-5)
    assert abs(ts_scores - eager_scores).max() < 1e-5

    # a damaged export, or a plain checkpoint given as an export: one error naming the file
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(exported.read_bytes()[:2000])
    for bad in (damaged, output / "model.pt"):
        with pytest.raises(CheckpointError, match=bad.name):
            load_exported_network(str(bad))
