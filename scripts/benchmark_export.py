"""Latency of the 2D network at batch 1, eager (channels-last, as the evaluators run it) vs TorchScript
(traced as ``python -m monai.bundle ckpt_export ... --use_trace True`` does), on random 256 px inputs.

    python scripts/benchmark_export.py

Weights do not change the cost, so the bundle's network is built with a random student.
"""

from __future__ import annotations

import json
import os
import time

import torch
from monai.bundle import ConfigParser

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "multiad_2d")


def milliseconds_per_image(model, images: torch.Tensor, repeats: int = 40) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(images)
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
    return (time.perf_counter() - start) / repeats / images.shape[0] * 1000.0


def main() -> None:
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "common.json"))
    parser.update({"bundle_root": BUNDLE})
    network = parser.get_parsed_content("network_def").eval()
    size = parser.get_parsed_content("image_size")
    example = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        traced = torch.jit.trace(network, example)
    eager = network.to(memory_format=torch.channels_last)
    report = {
        "threads": torch.get_num_threads(),
        "image_size": size,
        "eager_channels_last_ms": round(milliseconds_per_image(eager, example.to(memory_format=torch.channels_last)), 1),
        "torchscript_ms": round(milliseconds_per_image(traced, example), 1),
        "torchscript_channels_last_input_ms": round(milliseconds_per_image(traced, example.to(memory_format=torch.channels_last)), 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
