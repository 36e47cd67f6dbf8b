"""Leave-one-patient-out rotation of the medical bundle, with the baselines beside the model.

    python scripts/rotation_study.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_default

For every case folder of the dataset (or those given with ``--cases``): train on all the other cases
(``multiad train``, their lesion-free slices), evaluate on the held-out one (``multiad evaluate``, writing
``FOLD/eval_baselines/metrics.json`` with the baselines), then print one row per fold and the mean and
standard deviation over folds, as Markdown, and write them to ``OUTPUT_DIR/rotation_eval_baselines.json``.
``--no_train --eval_name NAME --set KEY=VALUE`` evaluates the same models with other map settings. Folds whose
model or metrics already exist are not redone (``--seeds`` adds seeds as ``FOLD_seedN`` folders).
Settings are the bundle's defaults plus ``--override`` / ``--set``; nothing here is chosen on the folds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from multiad_monai.apps.cli import parse_settings, run_bundle
from multiad_monai.data import case_folder_datalist

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "multiad_medical")
COLUMNS = ("slice_auroc", "voxel_auroc", "aupro", "dice")
BASELINE_COLUMNS = ("intensity_bright", "intensity_dark", "intensity_histogram", "feature_knn")


def fold_metrics(
    fold_dir: str, dataset_dir: str, test_case: str, overrides: list[str], values: dict, train: bool, eval_name: str
) -> dict:
    """Train (unless ``model.pt`` exists) and evaluate one fold into ``fold_dir/eval_name``; its ``metrics.json``."""
    eval_dir = os.path.join(fold_dir, eval_name)
    metrics_path = os.path.join(eval_dir, "metrics.json")
    settings = {**values, "dataset_dir": dataset_dir, "output_dir": fold_dir, "test_cases": [test_case]}
    if train and not os.path.isfile(os.path.join(fold_dir, "model.pt")):
        start = time.perf_counter()
        run_bundle(BUNDLE, "train", overrides, **settings)
        with open(os.path.join(fold_dir, "train_seconds.txt"), "w") as f:
            f.write(f"{time.perf_counter() - start:.0f}\n")
    if not os.path.isfile(metrics_path):
        run_bundle(BUNDLE, "evaluate", overrides, **settings, eval_dir=eval_dir)
    with open(metrics_path) as f:
        return json.load(f)


def row(name: str, document: dict) -> dict:
    metrics, baselines = document["metrics"], document.get("baselines", {})
    values = {key: metrics.get(key) for key in COLUMNS}
    for baseline in BASELINE_COLUMNS:
        values[f"{baseline}_voxel_auroc"] = baselines.get(baseline, {}).get("voxel_auroc")
        values[f"{baseline}_slice_auroc"] = baselines.get(baseline, {}).get("slice_auroc")
    return {"fold": name, **values}


def summary(rows: list[dict]) -> tuple[dict, dict]:
    keys = [key for key in rows[0] if key != "fold"]
    present = {key: [r[key] for r in rows if r[key] is not None] for key in keys}
    mean = {key: statistics.fmean(v) if v else None for key, v in present.items()}
    spread = {key: statistics.stdev(v) if len(v) > 1 else None for key, v in present.items()}
    return mean, spread


def markdown(rows: list[dict], mean: dict, spread: dict) -> str:
    keys = [key for key in rows[0] if key != "fold"]
    cell = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| fold (test case) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['fold']} | " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    lines.append("| mean | " + " | ".join(cell(mean[k]) for k in keys) + " |")
    lines.append("| std | " + " | ".join(cell(spread[k]) for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--cases", nargs="*", default=None, help="test cases to rotate over (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no_train", action="store_true", help="only evaluate folds that have a model")
    parser.add_argument(
        "--eval_name", default="eval_baselines", help="evaluation folder in each fold (another one for map settings of --set)"
    )
    args = parser.parse_args()
    dataset_dir = os.path.abspath(args.dataset_dir)
    values = parse_settings(args.set)
    cases = args.cases or [item["name"] for item in case_folder_datalist(dataset_dir, "flair.nii.gz", None, None)]
    rows = []
    for seed in args.seeds:
        for case in cases:
            name = case if seed == 0 else f"{case}_seed{seed}"
            fold_dir = os.path.abspath(os.path.join(args.output_dir, name))
            settings = {**values, "seed": seed}
            document = fold_metrics(fold_dir, dataset_dir, case, args.override, settings, not args.no_train, args.eval_name)
            rows.append(row(name, document))
    mean, spread = summary(rows)
    table = markdown(rows, mean, spread)
    print(table)
    with open(os.path.join(args.output_dir, f"rotation_{args.eval_name}.json"), "w") as f:
        json.dump({"rows": rows, "mean": mean, "std": spread, "settings": values, "overrides": args.override}, f, indent=1)


if __name__ == "__main__":
    main()
