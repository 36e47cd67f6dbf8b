"""Brief training on real MVTec AD bottle images (../shared/data); skipped when the folder is absent."""

import json
import os

import pytest

from conftest import shared_data
from multiad_monai.apps.cli import main


@pytest.mark.real_data
@pytest.mark.slow
def test_brief_training_on_mvtec_bottle_separates_defects(tmp_path):
    bottle = shared_data("mvtec_ad", "bottle")
    out = str(tmp_path / "bottle")
    common = ["--output_dir", out, "--dataset_dir", bottle]
    assert main(["train", *common, "--set", "num_epochs=4", "--set", "val_interval=4"]) == 0
    assert main(["evaluate", *common, "--set", "max_overlays=4"]) == 0
    metrics = json.load(open(os.path.join(out, "eval", "metrics.json")))["metrics"]
    # 4 epochs are a fraction of the default 40; the full run is in docs/results.md
    assert metrics["image_auroc"] >= 0.90
    assert metrics["pixel_auroc"] >= 0.85
