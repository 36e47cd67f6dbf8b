"""Benchmark of the medical-volume bundle: training on normal slices of the training cases, patient-level
evaluation on the test cases, and the time and peak memory of one volume -> NIfTI map.

    python scripts/benchmark_volumes.py --dataset_dir ../shared/data/brats2015 --output_dir runs/bench_brain \
        --set 'test_cases=["pat0003","pat0004"]'
    python scripts/benchmark_volumes.py --dataset_dir ../shared/data/ircadb --output_dir runs/bench_liver \
        --override liver_ct.json --set 'test_cases=["3Dircadb1.1"]'

Each step runs the bundle's own config (``multiad train`` / ``multiad evaluate`` are the same jobs). The
per-volume timing runs ``multiad infer`` on the first test case's scan in a fresh process (start-up and
model loading included), from the file on disk to the NIfTI map, mask and scores JSON written, and
reports that process's peak memory. Prints
one JSON document and writes it to OUTPUT_DIR/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from _measure import run_measured

from monai.bundle import ConfigParser

from multiad_monai.apps.cli import bundle_configs, defines_key, parse_settings, run_bundle

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "multiad_medical")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def inference_settings(items: list[str], overrides: list[str]) -> list[str]:
    """The ``--set`` items the inference workflow defines; training-only keys (e.g. ``augment``) are left out,
    as ``multiad infer`` refuses keys it does not know."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE, "infer", overrides))
    return [item for item in items if defines_key(parser, item.split("=", 1)[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip_train", action="store_true", help="reuse OUTPUT_DIR/model.pt")
    args = parser.parse_args()
    values = {"dataset_dir": os.path.abspath(args.dataset_dir), "output_dir": os.path.abspath(args.output_dir)}
    values.update(parse_settings(args.set))

    report: dict = {"dataset_dir": values["dataset_dir"], "overrides": args.override, "settings": values}
    if not args.skip_train:
        start = time.perf_counter()
        run_bundle(BUNDLE, "train", args.override, **values)
        report["train_seconds"] = round(time.perf_counter() - start, 1)
        report["train_peak_rss_mb"] = round(peak_rss_mb(), 1)

    start = time.perf_counter()
    run_bundle(BUNDLE, "evaluate", args.override, **values)
    report["evaluate_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(values["output_dir"], "eval", "metrics.json")) as f:
        evaluation = json.load(f)
    report["test_cases"] = evaluation["test_cases"]
    report["training_cases"] = evaluation["training_cases"]
    report["test_metrics"] = evaluation["metrics"]
    report["peak_rss_mb_after_evaluation"] = round(peak_rss_mb(), 1)

    # One scan -> NIfTI map, mask and scores, in a fresh process (start-up, model and file I/O included),
    # so that its time and peak memory are those a user sees.
    first_case = os.path.join(values["dataset_dir"], evaluation["test_cases"][0])
    image_file = values.get("image_files", "ct.nii.gz" if "liver_ct.json" in args.override else "flair.nii.gz")
    single = os.path.join(first_case, image_file)
    command = ["infer", "--bundle_root", BUNDLE, "--output_dir", values["output_dir"]]
    for override in args.override:
        command += ["--override", override]
    for item in inference_settings(args.set, args.override):
        command += ["--set", item]
    command += ["--set", f"input_path={single}", "--set", f"inference_dir={os.path.join(values['output_dir'], 'timing')}"]
    seconds, peak = run_measured(command)
    report["one_volume_to_nifti_seconds"] = round(seconds, 2)
    report["one_volume_peak_rss_mb"] = round(peak, 1)
    report["one_volume_file"] = single

    text = json.dumps(report, indent=2)
    print(text)
    with open(os.path.join(values["output_dir"], "benchmark.json"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
