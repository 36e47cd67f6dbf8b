"""``multiad``: train, evaluate and run inference with a Multi-AD bundle, or the whole demo in one go.

Each command runs the bundle's MONAI config through ``monai.bundle.run``, so ``multiad train`` and
``python -m monai.bundle run --config_file configs/train.json`` are the same job (``evaluate``: ``evaluate.json``
merged over ``train.json``; ``infer``: ``inference.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from multiad_monai.apps.bundles import BUNDLES_DIR, DEFAULT_BUNDLE, INFERENCE_RUNTIMES, bundle_configs, resolve_bundle_root
from multiad_monai.apps.tracking import TRACKERS, mlflow_settings
from multiad_monai.data.errors import root_cause

__all__ = [
    "main", "bundle_configs", "check_override_keys", "defines_key", "parse_settings", "run_bundle", "root_cause",
    "BUNDLES_DIR", "DEFAULT_BUNDLE",
]

DEMO_OVERRIDE = "demo.json"


def run_bundle(bundle_root: str, workflow: str, overrides: list[str] | None = None, tracking: dict | None = None, **values) -> None:
    """Runs ``workflow`` ("train", "evaluate", "infer") of a bundle, MONAI's run id ``run``, with key overrides ``values``;
    ``tracking``: MONAI's experiment-tracking settings (:func:`multiad_monai.apps.tracking.mlflow_settings`)."""
    from monai.bundle import run

    # monai.bundle.run drops overrides whose value is None; "$None" makes the config see a real None
    values = {key: "$None" if value is None else value for key, value in values.items()}
    if tracking is not None:
        values["tracking"] = tracking
    run(
        "run",
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
    parser.add_argument("command", choices=["demo", "train", "evaluate", "infer", "export"])
    parser.add_argument(
        "--bundle_root",
        default=None,
        help="bundle folder, or the name of a bundle shipped with the package (multiad_2d: images, the default; "
        "multiad_medical: volumes)",
    )
    parser.add_argument("--output_dir", default=None, help="where checkpoints, metrics and maps go (default: ./runs)")
    parser.add_argument(
        "--dataset_dir", default=None, help="MVTec-layout folder or folder of case folders; empty: generated demo data"
    )
    parser.add_argument("--override", action="append", default=[], help="extra config file merged last (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config key override (repeatable)")
    parser.add_argument("--bundle_dir", default=None, help="export: the bundle folder to create from the trained --output_dir")
    parser.add_argument(
        "--format", action="append", default=None, help="export: model file(s) to write (torchscript: models/model.ts, the default; onnx: models/model.onnx)"
    )
    parser.add_argument("--data_license", default=None, help="export: the training data's licence, a file or the text")
    parser.add_argument("--tracking", choices=TRACKERS, default=None, help="train/evaluate: record the run with MLflow "
                        "(needs the mlflow extra: pip install 'multiad-monai[mlflow]')")
    parser.add_argument("--tracking_uri", default=None, help="MLflow tracking URI (default: a local store, OUTPUT_DIR/mlruns.db)")
    parser.add_argument(
        "--runtime", choices=INFERENCE_RUNTIMES, default="torch", help="infer: torch (default); onnx: the network exported to ONNX "
        "(once per model, then cached) and run by onnxruntime on the CPU, needs the onnx extra; auto: onnx on a CPU with the extra"
    )
    args = parser.parse_args(argv)
    if args.runtime != "torch" and args.command != "infer":
        parser.error("--runtime is an option of infer")
    if args.command == "export":
        return _export(args, parser)

    try:
        values = parse_settings(args.set)
    except ValueError as error:
        parser.error(str(error))
    user_keys = list(values)
    # outputs never go inside the bundle (an installed one lives in site-packages)
    values["output_dir"] = os.path.abspath(args.output_dir or values.get("output_dir", "runs"))
    if args.dataset_dir is not None:
        values["dataset_dir"] = args.dataset_dir
    bundle_root = resolve_bundle_root(args.bundle_root or DEFAULT_BUNDLE)

    workflows = {"demo": ["train", "evaluate"], "train": ["train"], "evaluate": ["evaluate"], "infer": ["infer"]}
    overrides = list(args.override)
    if args.command == "demo" and args.dataset_dir is None and os.path.isfile(os.path.join(bundle_root, "configs", DEMO_OVERRIDE)):
        overrides.insert(0, DEMO_OVERRIDE)  # the generated demo data: the bundle's short demo schedule
        print(f"[multiad] demo on generated data with {os.path.join(bundle_root, 'configs', DEMO_OVERRIDE)}", flush=True)
    try:
        check_override_keys(bundle_root, workflows[args.command], overrides, user_keys)
    except (ValueError, FileNotFoundError) as error:
        print(f"multiad: error: {error}", file=sys.stderr)
        return 2
    tracking = None
    if args.tracking == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            print("multiad: error: --tracking mlflow needs MLflow: pip install 'multiad-monai[mlflow]'", file=sys.stderr)
            return 2
        tracking = mlflow_settings(args.tracking_uri)
    for workflow in workflows[args.command]:
        start = time.perf_counter()
        try:
            if workflow == "infer" and args.runtime != "torch":
                _infer_with_session(bundle_root, overrides, values, args.runtime)
            else:
                run_bundle(bundle_root, workflow, overrides, tracking=tracking if workflow != "infer" else None, **values)
        except Exception as error:  # one clear line for the user; the full chain only with MULTIAD_DEBUG=1
            if os.environ.get("MULTIAD_DEBUG"):
                raise
            _close_progress_bars()
            cause = root_cause(error)
            print(f"multiad: error: {type(cause).__name__}: {cause}", file=sys.stderr)
            return 2
        print(f"[multiad] {workflow} finished in {time.perf_counter() - start:.1f} s", flush=True)
    output_dir = values["output_dir"]
    if args.command == "demo":
        metrics_path = os.path.join(output_dir, "eval", "metrics.json")
        with open(metrics_path) as f:
            written = json.load(f)
        print(f"[multiad] test metrics ({metrics_path}):")
        for key, value in written["metrics"].items():
            print(f"  {key:22s} {value:.4f}")
        for note in written.get("notes", []):
            print(f"  ({note})")
    print(f"[multiad] {_main_output(args.command, bundle_root, overrides, values)}", flush=True)
    return 0


def _resolved_configs(bundle_root: str, workflow: str, overrides: list[str], values: dict):
    """A ``ConfigParser`` of ``workflow``'s configs with the command's values set, to read keys such as ``ckpt_path``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle_root, workflow, overrides))
    parser.update({"bundle_root": bundle_root, **values})
    return parser


def _infer_with_session(bundle_root: str, overrides: list[str], values: dict, runtime: str) -> None:
    """``infer`` through :class:`~multiad_monai.apps.bundle_session.BundleInferenceSession`: the same workflow as
    :func:`run_bundle`, with the network served by ``runtime`` (its ONNX export cached per model)."""
    import logging.config

    from multiad_monai.apps.bundle_session import BundleInferenceSession

    parser = _resolved_configs(bundle_root, "infer", overrides, values)
    logging.config.fileConfig(os.path.join(bundle_root, "configs", "logging.conf"), disable_existing_loggers=False)
    BundleInferenceSession(bundle_root, parser.get_parsed_content("ckpt_path"), overrides, values, runtime).run()


def _close_progress_bars() -> None:
    """Closes the progress bars a failed run left open, so that the error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _main_output(command: str, bundle_root: str, overrides: list[str], values: dict) -> str:
    """The line that ends a command: where its main output is."""
    workflow = {"demo": "evaluate", "train": "train", "evaluate": "evaluate", "infer": "infer"}[command]
    parser = _resolved_configs(bundle_root, workflow, overrides, values)
    if workflow == "train":
        checkpoint = parser.get_parsed_content("ckpt_path")
        if os.path.isfile(checkpoint):
            return f"model: {checkpoint}"
        # models are kept by validation rounds; a run shorter than val_interval has none
        return f"no model written to {checkpoint}: no validation round ran (set val_interval to at most num_epochs)"
    if workflow == "evaluate":
        eval_dir = parser.get_parsed_content("eval_dir")
        report = os.path.join(eval_dir, "report.html")
        return f"report: {report}" if os.path.isfile(report) else f"metrics: {os.path.join(eval_dir, 'metrics.json')}"
    return f"maps and scores: {parser.get_parsed_content('inference_dir')}"


def _export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from multiad_monai.apps.export import export_bundle

    if not args.output_dir or not args.bundle_dir:
        parser.error("export needs --output_dir (the trained run) and --bundle_dir (the bundle folder to create)")
    start = time.perf_counter()
    try:
        path = export_bundle(
            args.output_dir,
            args.bundle_dir,
            bundle_root=args.bundle_root,
            overrides=args.override,
            formats=args.format or ["torchscript"],
            data_license=args.data_license,
        )
    except Exception as error:
        if os.environ.get("MULTIAD_DEBUG"):
            raise
        cause = root_cause(error)
        print(f"multiad: error: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 2
    print(f"[multiad] export finished in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"[multiad] bundle: {path} (run it: cd {path} && python -m monai.bundle run --config_file configs/inference.json --dataset_dir DIR)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
