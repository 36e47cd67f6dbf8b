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

from multiad_monai.data.errors import root_cause

__all__ = ["main", "bundle_configs", "check_override_keys", "defines_key", "parse_settings", "run_bundle", "root_cause", "DEFAULT_BUNDLE"]

BUNDLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bundles")
DEFAULT_BUNDLE = os.path.join(BUNDLES_DIR, "multiad_2d")

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


def check_override_keys(bundle_root: str, workflows: list[str], overrides: list[str], keys: list[str]) -> None:
    """Fail on a ``--set`` key that none of the workflows' configs defines (a typo would otherwise be
    ignored silently)."""
    import difflib

    from monai.bundle import ConfigParser

    parsers = []
    for workflow in workflows:
        parser = ConfigParser()
        parser.read_config(bundle_configs(bundle_root, workflow, overrides))
        parsers.append(parser)
    for key in keys:
        if any(defines_key(parser, key) for parser in parsers):
            continue
        known = sorted({k for parser in parsers for k in parser.get() if isinstance(k, str)})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown config key {key!r} for {' and '.join(workflows)} in {bundle_root}{hint}")


def defines_key(parser, key: str) -> bool:
    """Whether a ``ConfigParser`` holds ``key`` (an ``a#b`` path included), without parsing its value."""
    try:
        parser[key]
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    return True


def parse_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as a dict; values are JSON when they parse as JSON, text otherwise.

    Raises:
        ValueError: an item without ``=``.
    """
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
        values[key] = _parse_value(value)
    return values


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="multiad", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["demo", "train", "evaluate", "infer"])
    parser.add_argument(
        "--bundle_root",
        default=DEFAULT_BUNDLE,
        help="bundle folder, or the name of a bundle shipped in bundles/ (multiad_2d: images, the default; "
        "multiad_medical: volumes)",
    )
    parser.add_argument("--output_dir", default=None, help="where checkpoints, metrics and maps go")
    parser.add_argument(
        "--dataset_dir", default=None, help="MVTec-layout folder or folder of case folders; empty: generated demo data"
    )
    parser.add_argument("--override", action="append", default=[], help="extra config file merged last (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key override (repeatable)")
    args = parser.parse_args(argv)

    try:
        values = parse_settings(args.set)
    except ValueError as error:
        parser.error(str(error))
    user_keys = list(values)
    if args.output_dir:
        values["output_dir"] = os.path.abspath(args.output_dir)
    if args.dataset_dir is not None:
        values["dataset_dir"] = args.dataset_dir
    bundle_root = args.bundle_root
    if not os.path.isdir(bundle_root) and os.path.isdir(os.path.join(BUNDLES_DIR, bundle_root)):
        bundle_root = os.path.join(BUNDLES_DIR, bundle_root)
    bundle_root = os.path.abspath(bundle_root)

    workflows = {"demo": ["training", "evaluating"], "train": ["training"], "evaluate": ["evaluating"], "infer": ["inferring"]}
    try:
        check_override_keys(bundle_root, workflows[args.command], args.override, user_keys)
    except (ValueError, FileNotFoundError) as error:
        print(f"multiad: error: {error}", file=sys.stderr)
        return 2
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
