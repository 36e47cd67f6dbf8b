"""Test Dice of a rotation's folds at a threshold chosen on validation, from the maps evaluation wrote.

    python scripts/map_variants.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_topk
    python scripts/dice_at_validation_threshold.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_topk

``map_variants.py --validation lesion_slices`` records, for every fold and variant, the threshold that
maximises the pooled Dice on the fold's validation set (the lesion slices of its training patients and the
held-out lesion-free slices). This script applies the default variant's threshold to the anomaly maps that
``multiad evaluate`` wrote for the fold's test patient (``FOLD/EVAL_NAME/<case>_anomaly_map.nii.gz``) and
prints the test Dice (``map >= threshold`` against the label, per volume) beside the Dice at the threshold
the model saved (from normal slices only). The test patient chooses nothing here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import nibabel as nib
import numpy as np

from multiad_monai.data import read_run_record
from multiad_monai.metrics import dice_score

DEFAULT_VARIANT = "default (mean of 4 levels, sigma 4)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True, help="folder of the rotation's fold folders")
    parser.add_argument("--eval_name", default="eval_baselines")
    parser.add_argument("--variant", default=DEFAULT_VARIANT)
    parser.add_argument("--label_file", default="seg.nii.gz")
    args = parser.parse_args()
    with open(os.path.join(args.output_dir, "map_variants_lesion_slices.json")) as f:
        validation = json.load(f)["results"][args.variant]
    lines = ["| test patient | validation threshold | test Dice at it | test Dice at the saved threshold |", "|---|---|---|---|"]
    chosen, saved = [], []
    for fold, scores in sorted(validation.items()):
        fold_dir = os.path.join(args.output_dir, fold)
        eval_dir = os.path.join(fold_dir, args.eval_name)
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            saved_dice = json.load(f)["metrics"]["dice"]
        dices = []
        for case in read_run_record(fold_dir)["split"]["test"]:
            anomaly_map = np.asarray(nib.load(os.path.join(eval_dir, f"{case}_anomaly_map.nii.gz")).dataobj)
            label = np.asarray(nib.load(os.path.join(args.dataset_dir, case, args.label_file)).dataobj)
            if anomaly_map.shape != label.shape:  # the map is on the scan's own grid, as the label
                raise ValueError(f"{case}: map shape {anomaly_map.shape} differs from the label's {label.shape}.")
            dices.append(dice_score(anomaly_map, label > 0, scores["dice_threshold"]))
        chosen.append(statistics.fmean(dices))
        saved.append(saved_dice)
        lines.append(f"| {fold} | {scores['dice_threshold']:.4f} | {100 * chosen[-1]:.1f} | {100 * saved_dice:.1f} |")
    lines.append(f"| mean | | {100 * statistics.fmean(chosen):.1f} | {100 * statistics.fmean(saved):.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
