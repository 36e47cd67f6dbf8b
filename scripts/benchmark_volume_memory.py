"""Peak memory of evaluating many large volumes: the medical bundle's evaluation over N generated
240x240x155 phantom cases with a trained checkpoint, in a fresh process per run (``multiad evaluate``).

    python scripts/benchmark_volume_memory.py --checkpoint runs/bench_brain/model.pt --output_dir runs/bench_memory

Runs the evaluation with 2 and with 10 test volumes and prints the peak RSS of each, so the growth per
volume shows (evaluation keeps per-voxel scores inside the foreground for the pooled AUROC/AUPRO, not
the maps or the volumes). Writes OUTPUT_DIR/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _measure import run_measured

from multiad_monai.data import make_demo_volumes


def evaluate(checkpoint: str, cases_dir: str, test_cases: list[str], output_dir: str) -> dict:
    seconds, peak = run_measured(
        ["evaluate", "--bundle_root", "multiad_medical", "--dataset_dir", cases_dir, "--output_dir", output_dir,
         "--set", f"ckpt_path={os.path.abspath(checkpoint)}", "--set", f"test_cases={json.dumps(test_cases)}"]
    )
    return {"num_volumes": len(test_cases), "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="model.pt of a medical-bundle training run")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--counts", default="2,10")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    cases_dir = make_demo_volumes(os.path.join(args.output_dir, "cases"), num_cases=max(counts) + 1, shape=(240, 240, 155))
    names = sorted(n for n in os.listdir(cases_dir) if n.startswith("case"))
    runs = [evaluate(args.checkpoint, cases_dir, names[1 : 1 + count], os.path.join(args.output_dir, f"run{count}")) for count in counts]
    report = {"checkpoint": os.path.abspath(args.checkpoint), "volume_shape": [240, 240, 155], "runs": runs}
    text = json.dumps(report, indent=2)
    print(text)
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
