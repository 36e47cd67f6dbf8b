"""Trains and evaluates the 2D bundle under several settings on one MVTec-layout folder and prints a
table: where the accuracy (and the cost) comes from.

    python scripts/ablation_study.py --dataset_dir ../shared/data/mvtec_ad/bottle --output_dir runs/ablation

Each setting runs scripts/benchmark_mvtec.py in its own process (fresh memory peak, fresh threads)
and writes OUTPUT_DIR/<setting>/benchmark.json; the table goes to OUTPUT_DIR/ablation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default (Lite0 teacher, Lite0+SE student, adversarial 0.01, mean fusion)": [],
    "no adversarial term": ["--set", "adversarial_weight=0"],
    "student without SE": ["--set", "student_se_ratio=null"],
    "lighter student (half width + 1x1 projections)": ["--override", "light_student.json"],
    "learned fusion (1x1 conv + BN + ReLU, fitted on synthetic defects of training images)": ["--set", "fusion=learned"],
    "SE-ResNet50 teacher, random weights (offline), 8 epochs": ["--override", "seresnet50.json", "--set", "seresnet_weights=null", "--set", "num_epochs=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--only", action="append", default=None, help="run only settings whose name starts with this")
    ap.add_argument("--reuse", action="store_true", help="skip settings whose benchmark.json exists")
    args = ap.parse_args()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_mvtec.py")
    rows = []
    for index, (name, extra) in enumerate(SETTINGS.items()):
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        out = os.path.join(os.path.abspath(args.output_dir), f"setting{index}")
        result_path = os.path.join(out, "benchmark.json")
        if not (args.reuse and os.path.isfile(result_path)):
            command = [sys.executable, script, "--dataset_dir", args.dataset_dir, "--output_dir", out, "--override", "mvtec.json", *extra]
            print("+", " ".join(command), flush=True)
            with open(os.path.join(os.path.abspath(args.output_dir), f"setting{index}.log"), "w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        with open(result_path) as f:
            result = json.load(f)
        m = result["test_metrics"]
        rows.append(
            f"| {name} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | {100 * m['aupro']:.1f} "
            f"| {result.get('train_seconds', float('nan')):.0f} | {result['latency_ms_per_image_batch16']:.1f} |"
        )
    table = "\n".join(
        ["| setting | image AUROC | pixel AUROC | AUPRO | train s | ms/image (batch 16) |", "|---|---|---|---|---|---|", *rows]
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "ablation.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
