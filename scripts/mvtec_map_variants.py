"""Map variants of trained 2D runs, without retraining: where the cosine is taken (on the feature grid and the
map upsampled, as the method does, or on features upsampled to the stride-4 grid), how levels are normalised
before fusion (raw, per-level z-score against training normals, per-pixel z-score), level weights and smoothing.
Each variant is scored on the run's validation set (held-out normals + synthetic defects) and on its test set.

    python scripts/mvtec_map_variants.py --dataset_dir ../shared/data/mvtec_ad/bottle \
        --run runs/mv3/bottle_seed0:0 --run runs/mv3/bottle_seed1:1 --output runs/mv3/bottle_map_variants.json

Each ``--run`` is ``OUTPUT_DIR:SEED`` of a run trained with ``--override mvtec.json --set seed=SEED`` (the seed
draws the held-out validation normals); ``--override`` adds config files to ``mvtec.json`` so that the network
loads the run's weights (``level_map.json`` for runs trained with the map of bundles 0.3.0-0.3.2; ``demo.json`` for
the demo's). Only the trained teacher and student are used: every variant's statistics are fitted here, on the run's
training normals. Prints and writes one JSON document: per run and variant the validation and test image AUROC,
pixel AUROC and AUPRO, and the validation score (their mean) that chooses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np
import torch
from monai.networks.layers import GaussianFilter

from multiad_monai.apps.cli import DEFAULT_BUNDLE, parse_settings
from multiad_monai.engines.utils import to_device
from multiad_monai.handlers import load_network_checkpoint
from multiad_monai.inferers import cosine_distance_maps, image_score
from multiad_monai.metrics import aupro, image_auroc, pixel_auroc

from benchmark_mvtec import parser_for  # the script beside this one

UPSAMPLING = ("map", "features")
NORMALIZATIONS = ("none", "level", "pixel")
LEVEL_WEIGHTS = ((1, 1, 1, 1), (2, 2, 1, 1))
SIGMAS = (2.0, 4.0)


def maps_of(network, dataset, with_labels: bool = True) -> dict:
    out = {u: [] for u in UPSAMPLING}
    labels, masks = [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), 16):
            items = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            images = to_device(torch.stack([torch.as_tensor(it["image"]) for it in items]), torch.device("cpu"), False, True)
            teacher, student = network.features(images)
            for upsampling in UPSAMPLING:
                maps = cosine_distance_maps(teacher, student, images.shape[2:], upsample_features=upsampling == "features")
                out[upsampling].append(maps.half())
            if with_labels:
                labels += [int(it["label"]) for it in items]
                masks.append(np.stack([np.asarray(it["mask"]) > 0.5 for it in items]))
    result = {u: torch.cat(v) for u, v in out.items()}
    if with_labels:
        result["labels"], result["masks"] = np.asarray(labels), np.concatenate(masks)
    return result


def normal_statistics(normal_maps: torch.Tensor, normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    maps = normal_maps.double()
    if normalization == "level":
        flat = maps.transpose(0, 1).flatten(1)
        return flat.mean(1).reshape(1, -1, 1, 1).float(), flat.std(1).reshape(1, -1, 1, 1).float()
    return maps.mean(0, keepdim=True).float(), maps.std(0, keepdim=True).clamp_min(1e-3).float()


def score(level_maps, labels, masks, stats, weights, sigma) -> dict:
    maps = level_maps.float()
    if stats is not None:
        maps = (maps - stats[0]) / stats[1]
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    fused = (maps * w.reshape(1, -1, 1, 1)).sum(1, keepdim=True)
    fused = GaussianFilter(2, sigma)(fused)
    as_numpy = fused.numpy()
    return {
        "image_auroc": image_auroc(image_score(fused, "max").numpy(), labels),
        "pixel_auroc": pixel_auroc(as_numpy, masks),
        "aupro": aupro(as_numpy, masks),
        # reported, not in the validation score: the other image score (mean of the top 1% of the map)
        "image_auroc_topk": image_auroc(image_score(fused, "topk").numpy(), labels),
    }


def study_run(bundle_root, overrides, dataset_dir, run_dir, seed) -> list[dict]:
    values = {"dataset_dir": dataset_dir, "output_dir": os.path.abspath(run_dir), **parse_settings([f"seed={seed}"])}
    eval_parser = parser_for(bundle_root, "evaluate", overrides, values)
    network = eval_parser.get_parsed_content("network")
    load_network_checkpoint(eval_parser.get_parsed_content("ckpt_path"), network)
    network = network.eval().to(memory_format=torch.channels_last)
    train_parser = parser_for(bundle_root, "train", overrides, values)
    normals = maps_of(network, train_parser.get_parsed_content("normal_statistics#dataset"), with_labels=False)
    validation = maps_of(network, train_parser.get_parsed_content("validate#dataset"))
    test = maps_of(network, eval_parser.get_parsed_content("dataset"))
    rows = []
    for upsampling, normalization, weights, sigma in itertools.product(UPSAMPLING, NORMALIZATIONS, LEVEL_WEIGHTS, SIGMAS):
        stats = None if normalization == "none" else normal_statistics(normals[upsampling], normalization)
        val = score(validation[upsampling], validation["labels"], validation["masks"], stats, weights, sigma)
        tst = score(test[upsampling], test["labels"], test["masks"], stats, weights, sigma)
        rows.append({
            "upsampling": upsampling, "normalization": normalization, "level_weights": list(weights), "sigma": sigma,
            "validation_score": float(np.mean([val[key] for key in ("image_auroc", "pixel_auroc", "aupro")])),
            "validation": val, "test": tst,
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--run", action="append", required=True, metavar="OUTPUT_DIR:SEED")
    ap.add_argument("--output", required=True, help="JSON file to write")
    ap.add_argument("--bundle_root", default=DEFAULT_BUNDLE)
    ap.add_argument("--override", action="append", default=["mvtec.json"])
    args = ap.parse_args()
    report = {"dataset_dir": os.path.abspath(args.dataset_dir), "overrides": args.override, "runs": {}}
    for run in args.run:
        run_dir, seed = run.rsplit(":", 1)
        report["runs"][run] = study_run(args.bundle_root, args.override, report["dataset_dir"], run_dir, int(seed))
    text = json.dumps(report, indent=1)
    with open(args.output, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
