"""``multiad``: train, evaluate and run inference with a Multi-AD bundle, or the whole demo in one go.

Each command runs the bundle's MONAI config through ``monai.bundle.run``, so ``multiad train`` and
``python -m monai.bundle run training --config_file "[...]"`` are the same job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["main", "bundle_configs", "run_bundle", "root_cause", "DEFAULT_BUNDLE"]

DEFAULT_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundles", "multiad_2d")

# run id in the config -> config files, in merge order (later ones override earlier keys)
_WORKFLOWS = {
    "training": ["common.json", "train.json"],
    "evaluating": ["common.json", "evaluate.json"],
    "inferring": ["common.json", "inference.json"],
}


def bundle_configs(bundle_root: str, workflow: str, overrides: list[str] | None = None) -> list[str]:
    """The config files of ``workflow`` in a bundle, then any override files (paths or names in ``configs/``)."""
    files = [os.path.join(bundle_root, "configs", name) for name in _WORKFLOWS[workflow]]
    for name in overrides or []:
        files.append(name if os.path.isfile(name) else os.path.join(bundle_root, "configs", name))
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config not found: {path}")
    return files


def run_bundle(bundle_root: str, workflow: str, overrides: list[str] | None = None, **values) -> None:
    """Runs ``workflow`` ("training", "evaluating", "inferring") of a bundle with key overrides ``values``."""
    from monai.bundle import run

    # monai.bundle.run drops overrides whose value is None; "$None" makes the config see a real None
    values = {key: "$None" if value is None else value for key, value in values.items()}
    run(
        workflow,
        meta_file=os.path.join(bundle_root, "configs", "metadata.json"),
        config_file=bundle_configs(bundle_root, workflow, overrides),
        logging_file=os.path.join(bundle_root, "configs", "logging.conf"),
        bundle_root=bundle_root,
        **values,
    )


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception: MONAI's config parser wraps errors of ``$`` expressions and ``_target_`` calls."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multiad", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["demo", "train", "evaluate", "infer"])
    parser.add_argument("--bundle_root", default=DEFAULT_BUNDLE, help="bundle folder (default: bundles/multiad_2d)")
    parser.add_argument("--output_dir", default=None, help="where checkpoints, metrics and maps go")
    parser.add_argument("--dataset_dir", default=None, help="MVTec-layout folder; empty: generated demo data")
    parser.add_argument("--override", action="append", default=[], help="extra config file merged last (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key override (repeatable)")
    args = parser.parse_args(argv)

    values = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set needs KEY=VALUE, got {item!r}")
        values[key] = _parse_value(value)
    if args.output_dir:
        values["output_dir"] = os.path.abspath(args.output_dir)
    if args.dataset_dir is not None:
        values["dataset_dir"] = args.dataset_dir
    bundle_root = os.path.abspath(args.bundle_root)

    workflows = {"demo": ["training", "evaluating"], "train": ["training"], "evaluate": ["evaluating"], "infer": ["inferring"]}
    for workflow in workflows[args.command]:
        start = time.perf_counter()
        try:
            run_bundle(bundle_root, workflow, args.override, **values)
        except Exception as error:  # one clear line for the user; the full chain only with MULTIAD_DEBUG=1
            if os.environ.get("MULTIAD_DEBUG"):
                raise
            cause = root_cause(error)
            print(f"multiad: error: {type(cause).__name__}: {cause}", file=sys.stderr)
            return 2
        print(f"[multiad] {workflow} finished in {time.perf_counter() - start:.1f} s", flush=True)
    if args.command == "demo":
        output_dir = values.get("output_dir", os.path.join(bundle_root, "runs"))
        metrics_path = os.path.join(output_dir, "eval", "metrics.json")
        with open(metrics_path) as f:
            metrics = json.load(f)["metrics"]
        print(f"[multiad] test metrics ({metrics_path}):")
        for key, value in metrics.items():
            print(f"  {key:22s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
