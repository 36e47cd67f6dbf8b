"""``multiad export``: a trained run folder becomes a self-contained MONAI bundle that MONAI's own tools run.

The exported folder (model-zoo layout)::

    configs/inference.json   the bundle's inference config with the run's settings; runs on its own
    configs/train.json       the training config with the run's settings (to retrain the same model)
    configs/metadata.json    version, changelog, packages, input/output format, the run's metrics
    configs/logging.conf
    models/model.pt          the network's state dict: weights, saved threshold, normal statistics
    models/model.ts          TorchScript (``--format torchscript``, the default)
    models/model.onnx        ONNX, map and image score (``--format onnx``; the ``onnx`` extra)
    docs/README.md           what the model is, the data it was trained on, its metrics, the commands
    docs/data_license.txt    the training data's terms
    LICENSE                  the code and configs' licence (Apache-2.0)

It is written to a temporary folder beside the target and renamed into place at the end, so a failed export
leaves nothing, and an existing folder is never replaced.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch

from multiad_monai.apps.bundles import resolve_bundle_root
from multiad_monai.data.errors import CheckpointError
from multiad_monai.data.run_record import DEMO_SOURCE, RUN_RECORD, read_run_record

__all__ = ["export_bundle", "MODEL_WRITERS", "write_torchscript", "write_onnx", "bundle_kind"]

logger = logging.getLogger(__name__)

_CKPT = "$os.path.join(@bundle_root, 'models', 'model.pt')"
_MEDICAL_KEYS = ("slice_axis", "intensity_preset")


def write_torchscript(bundle_dir: str, image_size: int) -> str:
    """``models/model.ts`` of an exported bundle, made by MONAI's ``ckpt_export`` from ``configs/inference.json``
    and ``models/model.pt`` (traced on one ``(1, 3, image_size, image_size)`` image)."""
    from monai.bundle import ckpt_export

    filepath = os.path.join(bundle_dir, "models", "model.ts")
    ckpt_export(
        net_id="network_def",
        filepath=filepath,
        ckpt_file=os.path.join(bundle_dir, "models", "model.pt"),
        meta_file=os.path.join(bundle_dir, "configs", "metadata.json"),
        config_file=os.path.join(bundle_dir, "configs", "inference.json"),
        bundle_root=bundle_dir,
        use_trace=True,
        input_shape=[1, 3, image_size, image_size],
    )
    return filepath


def write_onnx(bundle_dir: str, image_size: int) -> str:
    """``models/model.onnx`` of an exported bundle: the network of ``configs/inference.json`` with
    ``models/model.pt`` loaded, and its image score (the config's ``score_mode``), through PyTorch's ONNX exporter
    (:func:`~multiad_monai.inferers.onnx_model.export_onnx`; run it with ``OnnxAnomalyNetwork``)."""
    from monai.bundle import ConfigParser

    from multiad_monai.handlers.checkpoint import load_network_checkpoint
    from multiad_monai.inferers.onnx_model import export_onnx

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.update({"bundle_root": bundle_dir})
    network = parser.get_parsed_content("network_def")
    load_network_checkpoint(os.path.join(bundle_dir, "models", "model.pt"), network)
    score_mode = parser.get_parsed_content("score_mode") if "score_mode" in parser.get() else "max"
    return export_onnx(network.eval(), os.path.join(bundle_dir, "models", "model.onnx"), image_size, score_mode=score_mode)


# --format name -> writer(bundle_dir, image_size) -> path of the exported model under models/
MODEL_WRITERS: dict[str, Callable[[str, int], str]] = {"torchscript": write_torchscript, "onnx": write_onnx}


def bundle_kind(settings: dict) -> str:
    """``multiad_medical`` for a run of the volume bundle (its settings name slice and intensity options),
    ``multiad_2d`` otherwise."""
    return "multiad_medical" if any(key in settings for key in _MEDICAL_KEYS) else "multiad_2d"


def export_bundle(
    run_dir: str,
    bundle_dir: str,
    bundle_root: str | None = None,
    overrides: Sequence[str] = (),
    formats: Sequence[str] = ("torchscript",),
    data_license: str | None = None,
    version: str = "1.0.0",
) -> str:
    """Write the trained run in ``run_dir`` (``model.pt``, ``run.json``, optionally ``eval/metrics.json``) as a
    bundle folder ``bundle_dir``; returns its absolute path.

    Args:
        run_dir: the ``--output_dir`` of a finished training run.
        bundle_dir: the folder to create; it must not exist.
        bundle_root: the bundle the run was trained with; default: from the run's settings.
        overrides: the override config files the run was trained with (``retina_oct.json``, ...): they change
            the network or the preprocessing, so they are merged into the exported configs.
        formats: exported model files, names of :data:`MODEL_WRITERS` (``torchscript``: ``models/model.ts``;
            ``onnx``: ``models/model.onnx``, needs the ``onnx`` extra).
        data_license: the training data's terms: a text file, or the text itself; default: a note saying
            whether the data was the generated demo data or that its licence was not given.
        version: the exported bundle's version (``metadata.json``).

    Raises:
        FileNotFoundError: no ``model.pt`` or no ``run.json`` in ``run_dir``.
        FileExistsError: ``bundle_dir`` exists.
        ValueError: an unknown format.
    """
    run_dir, bundle_dir = os.path.abspath(run_dir), os.path.abspath(bundle_dir)
    unknown = [f for f in formats if f not in MODEL_WRITERS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r}; use one of {sorted(MODEL_WRITERS)}.")
    checkpoint = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no trained model in {run_dir}: {checkpoint} not found (train first).")
    record = read_run_record(run_dir)
    if record is None:
        raise FileNotFoundError(f"no {RUN_RECORD} in {run_dir}: its training settings are unknown, so it cannot be exported.")
    if os.path.exists(bundle_dir):
        raise FileExistsError(f"{bundle_dir} exists; export to a new folder (an existing one is never replaced).")
    settings = dict(record.get("fingerprint", {}).get("settings", {}))
    source = resolve_bundle_root(bundle_root or bundle_kind(settings))
    parent = os.path.dirname(bundle_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(bundle_dir)}.tmp_")
    try:
        _write_bundle(work, run_dir, source, list(overrides), settings, record, formats, data_license, version)
        os.rename(work, bundle_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return bundle_dir


def _write_bundle(work, run_dir, source, overrides, settings, record, formats, data_license, version) -> None:
    for name in ("configs", "models", "docs"):
        os.makedirs(os.path.join(work, name))
    medical = bundle_kind(settings) == "multiad_medical"
    metrics = _run_metrics(run_dir)
    for name in ("train.json", "inference.json"):
        config = _config_with_settings(source, [name, *overrides], settings)
        config.update({"bundle_root": ".", "ckpt_path": _CKPT})
        if name == "inference.json":
            config["output_dir"] = "$os.path.join(@bundle_root, 'eval')"
            config["dataset_dir"] = ""
            if medical:  # --dataset_dir: a folder of case folders; or --input_path: a volume or a folder of them
                config["data_root"] = "@dataset_dir"
            else:  # --dataset_dir: a folder of images (searched recursively)
                config["data_root"] = "@dataset_dir"
                config["input_dir"] = "@dataset_dir"
        else:  # retraining writes beside the bundle's runs/, never over models/
            config["ckpt_path"] = "$os.path.join(@output_dir, 'model.pt')"
        _write_json(os.path.join(work, "configs", name), config)
    shutil.copyfile(os.path.join(source, "configs", "logging.conf"), os.path.join(work, "configs", "logging.conf"))
    shutil.copyfile(os.path.join(source, "LICENSE"), os.path.join(work, "LICENSE"))
    image_size = int(settings.get("image_size", 256))
    _write_json(os.path.join(work, "configs", "metadata.json"), _metadata(source, settings, record, metrics, image_size, version))
    _write_state_dict(os.path.join(run_dir, "model.pt"), os.path.join(work, "models", "model.pt"))
    for fmt in formats:
        MODEL_WRITERS[fmt](work, image_size)
    with open(os.path.join(work, "docs", "data_license.txt"), "w") as f:
        f.write(_data_license_text(data_license, record))
    with open(os.path.join(work, "docs", "README.md"), "w") as f:
        f.write(_readme(settings, record, metrics, medical, version, run_dir))


def _config_with_settings(source: str, names: list[str], settings: dict) -> dict:
    from monai.bundle import ConfigParser

    files = [name if os.path.isfile(name) else os.path.join(source, "configs", name) for name in names]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config not found: {path}")
    config = ConfigParser.load_config_files(files)
    for key, value in settings.items():
        if key in config and key != "dataset_dir":
            config[key] = value
    return config


def _write_json(path: str, content: Any) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=4)
        f.write("\n")


def _write_state_dict(checkpoint: str, target: str) -> None:
    """The network's state dict alone (threshold, score scale and normal statistics are its buffers)."""
    from multiad_monai.handlers.checkpoint import read_network_state

    state = read_network_state(checkpoint)
    if not isinstance(state, dict) or "threshold" not in state:
        raise CheckpointError(f"checkpoint {checkpoint} is not a Multi-AD network's state dict (no saved threshold).")
    torch.save(state, target)


def _run_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "eval", "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _data_source(record: dict) -> str:
    source = record.get("dataset_dir", "")
    return "generated demo data (multiad_monai.data)" if source in ("", DEMO_SOURCE, None) else str(source)


def _metadata(source: str, settings: dict, record: dict, metrics: dict, image_size: int, version: str) -> dict:
    import monai
    import numpy

    import multiad_monai

    with open(os.path.join(source, "configs", "metadata.json")) as f:
        meta = json.load(f)
    today = datetime.date.today().isoformat()
    meta["version"] = version
    meta["changelog"] = {version: f"trained on {_data_source(record)}; exported {today} with multiad-monai {multiad_monai.__version__}"}
    meta["monai_version"] = monai.__version__
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = numpy.__version__
    # MONAI 1.6 reads "optional_packages_version" as the deprecated name of this field (and would replace it)
    meta["required_packages_version"] = dict(meta.get("required_packages_version", {}), **{"multiad-monai": multiad_monai.__version__})
    meta["data_source"] = _data_source(record)
    values = metrics.get("metrics", {})
    if values:
        meta["eval_metrics"] = {key: round(float(value), 4) for key, value in values.items() if isinstance(value, (int, float))}
    else:
        meta.pop("eval_metrics", None)
    for part in ("inputs", "outputs"):
        for item in meta["network_data_format"][part].values():
            item["spatial_shape"] = [image_size, image_size]
    if "teacher_name" in settings:  # images in [0, 1] normalised with the teacher's mean and std
        from multiad_monai.networks import input_mean, input_std

        mean, std = input_mean(settings["teacher_name"]), input_std(settings["teacher_name"])
        low, high = min((0.0 - m) / s for m, s in zip(mean, std)), max((1.0 - m) / s for m, s in zip(mean, std))
        meta["network_data_format"]["inputs"]["image"]["value_range"] = [round(low, 4), round(high, 4)]
    return meta


def _data_license_text(data_license: str | None, record: dict) -> str:
    if data_license:
        if os.path.isfile(data_license):
            with open(data_license) as f:
                return f.read()
        return data_license.rstrip("\n") + "\n"
    if record.get("dataset_dir") in ("", DEMO_SOURCE, None):
        return "Trained on generated synthetic data (multiad_monai.data demo data): no third-party data, no licence restrictions.\n"
    return (
        f"The licence of the training data ({record.get('dataset_dir')}) was not given at export "
        "(multiad export --data_license FILE_OR_TEXT).\nCheck the data set's terms before sharing this model: many "
        "anomaly detection data sets (MVTec AD, BraTS, ...) allow non-commercial use only.\n"
    )


def _readme(settings: dict, record: dict, metrics: dict, medical: bool, version: str, run_dir: str) -> str:
    size = int(settings.get("image_size", 256))
    lines = [
        "# Multi-AD trained model" + (" (medical volumes)" if medical else " (2D images)"),
        "",
        f"Version {version}. A Multi-AD teacher-student anomaly detector trained on normal data only "
        f"({_data_source(record)}), exported from the run `{run_dir}` by `multiad export`. "
        "The anomaly threshold and any normal statistics are buffers of the network, inside `models/model.pt`.",
        "",
        "Needs `pip install multiad-monai` (the configs build the network and transforms from it).",
        "",
        "## Run it",
        "",
        "From this folder:",
        "",
        "```bash",
    ]
    if medical:
        lines.append("python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/cases   # or --input_path scan.nii.gz")
    else:
        lines.append("python -m monai.bundle run --config_file configs/inference.json --dataset_dir /data/images")
    lines += [
        "python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json",
        "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\",
        f"    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True --input_shape \"[1, 3, {size}, {size}]\"",
        "```",
        "",
        "Outputs go to `eval/inference/`: "
        + ("a float NIfTI anomaly map and a binary mask per volume on its own grid, and per-slice and per-volume scores."
           if medical else "`scores.csv` (score, normalised score, decision at the saved threshold) and `maps/` (overlays and raw maps)."),
        "",
        "## Evaluation of this run",
        "",
    ]
    values = metrics.get("metrics", {})
    if values:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {float(value):.4f} |" for key, value in values.items() if isinstance(value, (int, float))]
        lines += ["", f"Measured by `multiad evaluate` on {metrics.get('dataset_dir', _data_source(record))}."]
    else:
        lines.append("Not evaluated before export (run `multiad evaluate` on the run folder, then export again).")
    lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | `{json.dumps(value)}` |" for key, value in sorted(settings.items()) if key != "dataset_dir"]
    lines += ["", "## Data and licence", "", "See `docs/data_license.txt` for the training data's terms; the code and "
              "configs are Apache-2.0 (`LICENSE`). Research use only; not for clinical or safety-critical decisions.", ""]
    return "\n".join(lines)
