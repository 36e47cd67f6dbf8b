"""Latency of the 2D network at batch 1, eager (channels-last, as the evaluators run it) vs TorchScript
(traced as ``python -m monai.bundle ckpt_export ... --use_trace True`` does) vs ONNX through onnxruntime
(``multiad export --format onnx``: map and image score), on random 256 px inputs, with the same number of
threads for each (``--threads``, default torch's).

    python scripts/benchmark_export.py [--threads 2] [--repeats 40]

Weights do not change the cost, so the bundle's network is built with a random student. The ONNX model is
written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
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
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--threads", type=int, default=torch.get_num_threads())
    arguments.add_argument("--repeats", type=int, default=40)
    args = arguments.parse_args()
    torch.set_num_threads(args.threads)
    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE, "configs", "inference.json"))
    parser.update({"bundle_root": BUNDLE})
    network = parser.get_parsed_content("network_def").eval()
    size = parser.get_parsed_content("image_size")
    example = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        traced = torch.jit.trace(network, example)
    from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork, export_onnx

    with tempfile.TemporaryDirectory() as folder:
        onnx_model = OnnxAnomalyNetwork(export_onnx(network, os.path.join(folder, "model.onnx"), size), threads=args.threads)
    eager = network.to(memory_format=torch.channels_last)
    channels_last = example.to(memory_format=torch.channels_last)
    runs = {
        "eager_channels_last_ms": (eager, channels_last),
        "torchscript_ms": (traced, example),
        "torchscript_channels_last_input_ms": (traced, channels_last),
        "onnxruntime_ms": (onnx_model.predict, example),
    }
    # rounds that take turns, so that a load from other jobs falls on every variant alike; the median round counts
    rounds = 5
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, images) in runs.items():
            times[name].append(milliseconds_per_image(model, images, max(1, args.repeats // rounds)))
    report = {"threads": torch.get_num_threads(), "image_size": size, "rounds": rounds}
    report.update({name: round(sorted(values)[rounds // 2], 1) for name, values in times.items()})
    report["rounds_ms"] = {name: [round(v, 1) for v in values] for name, values in times.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
