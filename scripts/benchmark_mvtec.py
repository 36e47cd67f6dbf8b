"""Benchmark of the 2D bundle on an MVTec-layout folder: training time, peak memory, test metrics,
inference latency, and fusion/smoothing variants scored on validation (chosen there) and on test, each with the
image AUROC of both image scores (map maximum and mean of the top 1%); with ``--flip_variants``, each mean-fusion
variant also with test-time flips (the mean of the image's and its mirror image's maps).

    python scripts/benchmark_mvtec.py --dataset_dir ../shared/data/mvtec_ad/bottle --output_dir runs/bench_bottle

Prints one JSON document and writes it to OUTPUT_DIR/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.layers import GaussianFilter

from multiad_monai.apps.cli import DEFAULT_BUNDLE, bundle_configs, parse_settings, run_bundle
from multiad_monai.engines.utils import to_device
from multiad_monai.handlers import load_network_checkpoint
from multiad_monai.inferers import image_score
from multiad_monai.metrics import aupro, image_auroc, pixel_auroc


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parser_for(bundle_root: str, workflow: str, overrides: list[str], values: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle_root, workflow, overrides))
    parser.update({"bundle_root": bundle_root, **values})
    return parser


def load_network(bundle_root, overrides, values):
    parser = parser_for(bundle_root, "evaluate", overrides, values)
    network = parser.get_parsed_content("network")
    load_network_checkpoint(parser.get_parsed_content("ckpt_path"), network)
    network.prepare_for_inference()  # as the evaluation and inference workflows run it
    return network.to(memory_format=torch.channels_last), parser


def level_maps_of(network, dataset, flip: bool = False) -> tuple[dict[bool, torch.Tensor], np.ndarray, np.ndarray]:
    """Level maps ``(N, L, H, W)`` of ``dataset`` keyed by ``False``, labels and masks; with ``flip`` also, keyed by
    ``True``, the mean of each image's level maps and its mirror image's, mirrored back (the network's
    ``test_time_flip`` for a linear fusion and smoothing). One pass over the data gives both."""
    maps, labels, masks = {False: []} | ({True: []} if flip else {}), [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), 16):
            items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            images = to_device(torch.stack([torch.as_tensor(it["image"]) for it in items]), torch.device("cpu"), False, True)
            level_maps = network.map_generator.level_maps(*network.features(images), images.shape[2:])
            maps[False].append(level_maps.half())
            if flip:
                mirrored = network.map_generator.level_maps(*network.features(images.flip(-1)), images.shape[2:])
                maps[True].append((0.5 * (level_maps + mirrored.flip(-1))).half())
            labels += [int(it["label"]) for it in items]
            masks.append(np.stack([np.asarray(it["mask"]) > 0.5 for it in items]))
    return {key: torch.cat(value) for key, value in maps.items()}, np.asarray(labels), np.concatenate(masks)


def score_variant(level_maps, labels, masks, fusion: str, sigma: float) -> dict:
    fused = level_maps.float()
    fused = fused.mean(1, keepdim=True) if fusion == "mean" else fused.prod(1, keepdim=True)
    if sigma > 0:
        fused = GaussianFilter(2, sigma)(fused)
    maps = fused.numpy()
    return {
        "image_auroc": image_auroc(image_score(fused, "max").numpy(), labels),
        # not in the validation score, which chooses fusion and sigma: the image score's own choice, max or top 1%
        "image_auroc_topk": image_auroc(image_score(fused, "topk").numpy(), labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro": aupro(maps, masks),
    }


def latency(network, image_size: int, batch_size: int, repeats: int) -> float:
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            image_score(network(x))
        start = time.perf_counter()
        for _ in range(repeats):
            image_score(network(x))
    return (time.perf_counter() - start) / (repeats * batch_size) * 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--bundle_root", default=DEFAULT_BUNDLE)
    ap.add_argument("--override", action="append", default=[])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--skip_train", action="store_true", help="reuse OUTPUT_DIR/model.pt")
    ap.add_argument("--skip_variants", action="store_true", help="no fusion/sigma variants (needed without pixel masks)")
    ap.add_argument("--flip_variants", action="store_true", help="also score each variant with test-time flips")
    args = ap.parse_args()
    values = {"dataset_dir": os.path.abspath(args.dataset_dir), "output_dir": os.path.abspath(args.output_dir)}
    values.update(parse_settings(args.set))
    report: dict = {"dataset_dir": values["dataset_dir"], "overrides": args.override, "set": args.set, "threads": torch.get_num_threads()}

    if not args.skip_train:
        start = time.perf_counter()
        run_bundle(args.bundle_root, "train", args.override, **values)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        report["train_peak_rss_mb"] = round(peak_rss_mb(), 1)
    start = time.perf_counter()
    run_bundle(args.bundle_root, "evaluate", args.override, **values)
    report["evaluate_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(values["output_dir"], "eval", "metrics.json")) as f:
        report["test_metrics"] = json.load(f)["metrics"]

    network, eval_parser = load_network(args.bundle_root, args.override, values)
    image_size = eval_parser.get_parsed_content("image_size")
    report["latency_ms_per_image_batch1"] = round(latency(network, image_size, 1, 40), 1)
    report["latency_ms_per_image_batch16"] = round(latency(network, image_size, 16, 10), 1)

    if args.skip_variants:
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        _write_report(report, values["output_dir"])
        return
    # fusion/smoothing variants: chosen on the validation set (held-out normals + synthetic defects)
    train_parser = parser_for(args.bundle_root, "train", args.override, values)
    variants = []
    # z-scored levels (level_normalization "level" or "pixel") are signed: a product of them means nothing
    fusions = ("mean",) if getattr(network.map_generator, "level_normalization", "none") != "none" else ("mean", "product")
    val_maps, *validation = level_maps_of(network, train_parser.get_parsed_content("validate#dataset"), args.flip_variants)
    test_maps, *test = level_maps_of(network, eval_parser.get_parsed_content("dataset"), args.flip_variants)
    for flip in val_maps:
        # the product of mirrored-mean levels is not the mirrored mean of the product map: flips only with the mean
        for fusion in ("mean",) if flip else fusions:
            for sigma in (2.0, 4.0, 8.0):
                val = score_variant(val_maps[flip], *validation, fusion, sigma)
                tst = score_variant(test_maps[flip], *test, fusion, sigma)
                score = float(np.mean([val[key] for key in ("image_auroc", "pixel_auroc", "aupro")]))
                variant = {"fusion": fusion, "sigma": sigma, "validation_score": score, "validation": val, "test": tst}
                variants.append({**variant, "test_time_flip": True} if flip else variant)
    report["variants"] = variants
    report["variant_chosen_on_validation"] = max(variants, key=lambda v: v["validation_score"])
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    _write_report(report, values["output_dir"])


def _write_report(report: dict, output_dir: str) -> None:
    text = json.dumps(report, indent=2)
    with open(os.path.join(output_dir, "benchmark.json"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
