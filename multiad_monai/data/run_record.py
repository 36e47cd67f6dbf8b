"""The record of a training run (``run.json`` in its output folder): what made the model, where its data came
from and, for volumes, which patients it was trained and tested on.

Training checks the record before any work, so a rerun into a folder holding another run stops instead of
serving the old model; evaluation and inference read it, so they use the training's data source and patient
split unless told otherwise. The file and key names live here, below engines and handlers, which both use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from multiad_monai.atomic import atomic_path
from multiad_monai.data.errors import CheckpointError, DatasetError

__all__ = [
    "RUN_RECORD",
    "RESUME_STATE",
    "MODEL_FILE",
    "DEMO_SOURCE",
    "RERUN_WAYS_OUT",
    "item_paths",
    "training_files",
    "training_fingerprint",
    "fingerprint_difference",
    "read_run_record",
    "write_run_record",
    "check_training_run",
    "chosen_dataset_dir",
    "recorded_case_split",
    "ModelFingerprint",
    "check_model_fingerprint",
    "MODEL_SETTINGS",
    "check_model_settings",
]

RUN_RECORD = "run.json"
RESUME_STATE = "resume.pt"
MODEL_FILE = "model.pt"
# ``dataset_dir`` value naming the generated demo data explicitly (a folder called "demo" is "./demo")
DEMO_SOURCE = "demo"

# training settings a model must be used with: what the network sees and how its levels become a map. A model
# used with other values gets other inputs or other statistics than it learned, and its maps are wrong without any
# error. Fusion weights and smoothing are not here: map studies vary them on purpose. The discriminator's settings
# change no map, but the saved weights fit only the discriminator they were trained with.
MODEL_SETTINGS = (
    "image_size", "teacher_name", "image_files", "intensity_preset", "canonical_axcodes", "ct_window", "ct_level",
    "slice_axis", "slice_context", "intensity_channel", "quarter_turns", "crop_to_foreground", "crop_margin",
    "level_normalization", "upsample_features", "discriminator_levels", "discriminator_spectral_norm",
)
# what models saved before a setting existed used (a key missing from their record is otherwise not checked)
_VALUES_BEFORE_RECORDED = {
    "upsample_features": False, "discriminator_levels": [-1], "discriminator_spectral_norm": False,
}
# the two ways out of a folder that holds another run, shared by every error that refuses one
RERUN_WAYS_OUT = "use another --output_dir, or --set resume=false to start afresh and replace it"
_FILE_KEYS = ("image", "label", "mask", "foreground")
logger = logging.getLogger(__name__)


def item_paths(item: Mapping, keys: Sequence[str] = ("image",)) -> list[str]:
    """The file paths under ``keys`` of a datalist item, a key holding one path or a list of them (modalities)."""
    paths = []
    for key in keys:
        value = item.get(key)
        paths += [value] if isinstance(value, str) else [path for path in value or [] if isinstance(path, str)]
    return paths


def training_files(datalist: Sequence[Mapping], root: str) -> dict[str, list[int]]:
    """The files of ``datalist`` (image, label, mask, foreground; several modalities included) as
    ``{path relative to root: [size in bytes, modification time in ns]}``: cheap to take, and a changed,
    replaced, added or removed file changes it."""
    files = {}
    for item in datalist:
        for path in item_paths(item, _FILE_KEYS):
            if os.path.exists(path):
                info = os.stat(path)
                files[os.path.relpath(os.path.abspath(path), root)] = [info.st_size, info.st_mtime_ns]
    return dict(sorted(files.items()))


def training_fingerprint(settings: Mapping[str, Any], files: Mapping[str, list[int]]) -> dict[str, Any]:
    """``{"hash", "settings", "files"}``: the training-relevant config values and the training files, and one
    hash of both (JSON with sorted keys, so it does not depend on order)."""
    settings = json.loads(json.dumps(dict(settings), sort_keys=True, default=str))
    text = json.dumps({"settings": settings, "files": files}, sort_keys=True)
    return {"hash": hashlib.sha256(text.encode()).hexdigest(), "settings": settings, "files": dict(files)}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_difference(saved: Mapping[str, Any], current: Mapping[str, Any], max_files: int = 3) -> str:
    """One line naming the settings (saved -> now) and files (changed, new, gone) that differ."""
    parts = []
    old, new = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            parts.append(f"{key} {_short(old.get(key, '<unset>'))} -> {_short(new.get(key, '<unset>'))}")
    old_files, new_files = saved.get("files", {}), current.get("files", {})
    for label, names in (
        ("changed", [n for n in sorted(set(old_files) & set(new_files)) if list(old_files[n]) != list(new_files[n])]),
        ("new", sorted(set(new_files) - set(old_files))),
        ("gone", sorted(set(old_files) - set(new_files))),
    ):
        if names:
            more = f" and {len(names) - max_files} more" if len(names) > max_files else ""
            parts.append(f"{len(names)} training file(s) {label} ({', '.join(names[:max_files])}{more})")
    return "; ".join(parts) or "the fingerprint differs"


def read_run_record(output_dir: str) -> dict[str, Any] | None:
    """The record in ``output_dir``, or None when there is none."""
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read the run record ({error}); {RERUN_WAYS_OUT}.") from error


def write_run_record(output_dir: str, record: Mapping[str, Any]) -> None:
    """Write ``run.json`` atomically."""
    with atomic_path(os.path.join(output_dir, RUN_RECORD), suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)


def check_training_run(
    output_dir: str,
    dataset_dir: str | None,
    data_root: str,
    settings: Mapping[str, Any],
    datalist: Sequence[Mapping],
    resume: bool = True,
    split: Sequence[Sequence[Mapping]] | None = None,
) -> dict[str, Any]:
    """The record of the training run about to start in ``output_dir``; reads only, before any work.

    Args:
        output_dir: the training output folder.
        dataset_dir: the ``dataset_dir`` setting (empty or :data:`DEMO_SOURCE`: the generated demo data).
        data_root: the resolved dataset folder the datalist's files are under.
        settings: config values that change training (each bundle's ``training_settings``).
        datalist: the training items; their files are fingerprinted.
        resume: False: the run starts afresh and will replace what the folder holds.
        split: for volumes, (training cases, test cases) as case items with ``name``.

    Raises:
        CheckpointError: ``resume`` is True and the folder holds a run of another fingerprint, or a model or
            training state without a record; the one-line message names what differs and the ways out.
    """
    source = DEMO_SOURCE if not dataset_dir or dataset_dir == DEMO_SOURCE else os.path.abspath(dataset_dir)
    fingerprint = training_fingerprint({**settings, "dataset_dir": source}, training_files(datalist, data_root))
    record: dict[str, Any] = {"dataset_dir": source, "fingerprint": fingerprint}
    if split is not None:
        record["split"] = {"train": [item["name"] for item in split[0]], "test": [item["name"] for item in split[1]]}
    if not resume:
        return record
    saved = read_run_record(output_dir)
    if saved is None:
        leftovers = [name for name in (RESUME_STATE, MODEL_FILE) if os.path.isfile(os.path.join(output_dir, name))]
        if leftovers:
            raise CheckpointError(
                f"{output_dir} holds {' and '.join(leftovers)} but no {RUN_RECORD}, so it cannot be told whether "
                f"they come from these settings; {RERUN_WAYS_OUT}."
            )
    elif saved.get("fingerprint", {}).get("hash") != fingerprint["hash"]:
        difference = fingerprint_difference(saved.get("fingerprint", {}), fingerprint)
        raise CheckpointError(f"{output_dir} holds a training run of other settings or data ({difference}); {RERUN_WAYS_OUT}.")
    return record


class ModelFingerprint:
    """What made a model, saved inside ``model.pt`` beside its weights (``{"network": ..., "run": ...}``), so the
    file keeps its provenance when copied out of its folder, and a ``model.pt`` that is not the one of the
    ``run.json`` beside it is refused when loaded.

    Args:
        fingerprint: ``run.json``'s ``fingerprint`` (see :func:`training_fingerprint`); its hash and settings are
            kept (the file list stays in ``run.json``).
    """

    def __init__(self, fingerprint: Mapping[str, Any]) -> None:
        self.fingerprint = {"hash": fingerprint["hash"], "settings": dict(fingerprint.get("settings", {}))}

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fingerprint = dict(state["fingerprint"])


def check_model_fingerprint(checkpoint: Any, path: str) -> None:
    """Check that a loaded ``model.pt`` (``checkpoint``, read from ``path``) belongs to the ``run.json`` in its
    folder; a plain state dict (exported bundles, older runs) and a folder without a record pass.

    Raises:
        CheckpointError: the model was trained with other settings or data than the record beside it says.
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("run"), Mapping):
        return
    saved = checkpoint["run"].get("fingerprint", {})
    record = read_run_record(os.path.dirname(os.path.abspath(path)))
    recorded = (record or {}).get("fingerprint")
    if recorded and recorded.get("hash") != saved.get("hash"):
        settings = {"settings": recorded.get("settings", {})}, {"settings": saved.get("settings", {})}
        difference = fingerprint_difference(*settings) if settings[0] != settings[1] else "same settings, other training files"
        raise CheckpointError(
            f"checkpoint {path} was not trained by the run recorded in {RUN_RECORD} beside it ({RUN_RECORD} -> model.pt: {difference}); "
            "keep each model.pt in the folder of the run that made it."
        )


def check_model_settings(checkpoint: Any, path: str, settings: Mapping[str, Any] | None) -> None:
    """Check that the configuration about to use a loaded ``model.pt`` (``checkpoint``, read from ``path``) prepares
    images and level maps as its training did: the :data:`MODEL_SETTINGS` in ``settings`` (config values) and in the
    settings saved with the model. A plain state dict (exported bundles carry their run's settings in their
    configs), a key that a model's record lacks (unless it did not exist then), and ``settings`` None pass.

    Raises:
        CheckpointError: naming the file, every differing key with both values, and the ``--set`` that fixes it.
    """
    if settings is None or not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("run"), Mapping):
        return
    saved = {**_VALUES_BEFORE_RECORDED, **checkpoint["run"].get("fingerprint", {}).get("settings", {})}
    current = json.loads(json.dumps({k: settings[k] for k in MODEL_SETTINGS if k in settings}, default=str))
    differing = [k for k in MODEL_SETTINGS if k in saved and k in current and saved[k] != current[k]]
    if differing:
        trained = ", ".join(f"{k}={json.dumps(saved[k])}" for k in differing)
        configured = ", ".join(f"{k}={json.dumps(current[k])}" for k in differing)
        fix = " ".join(f"--set {k}={json.dumps(saved[k], separators=(',', ':'))}" for k in differing)
        raise CheckpointError(
            f"checkpoint {path} was trained with {trained}, but this configuration has {configured}: the network "
            f"would see its images, make its map or hold its weights otherwise than in training. Run with the "
            f"training's values ({fix}), or the preset it was trained with."
        )


def chosen_dataset_dir(dataset_dir: str | None, output_dir: str, from_record: bool = False) -> str | None:
    """The dataset folder to read, or None for the generated demo data.

    ``dataset_dir`` given: that folder (:data:`DEMO_SOURCE`: the demo data). Empty: the demo data for training
    (``from_record`` False); for evaluation and inference (``from_record`` True) the source the training run
    recorded in ``output_dir``, so a model trained on a folder is never scored on generated images unless asked.

    Raises:
        DatasetError: empty ``dataset_dir`` with ``from_record`` and no record in ``output_dir``.
    """
    if dataset_dir == DEMO_SOURCE:
        return None
    if dataset_dir:
        return dataset_dir
    if not from_record:
        return None
    record = read_run_record(output_dir)
    if record is None:
        raise DatasetError(
            f"no {RUN_RECORD} in {output_dir}, so the training data is unknown; give --dataset_dir FOLDER "
            f"(or --dataset_dir {DEMO_SOURCE} for the generated demo data)."
        )
    source = record["dataset_dir"]
    if source != DEMO_SOURCE:
        logger.info(f"dataset: {source} (recorded by training in {os.path.join(output_dir, RUN_RECORD)})")
    return None if source == DEMO_SOURCE else source


def recorded_case_split(
    cases: Sequence[dict], test_cases: Sequence[str] | None, output_dir: str
) -> tuple[list[dict], list[dict]]:
    """(training cases, test cases) for evaluating the model in ``output_dir``: the split its training recorded
    or, with ``test_cases`` given, those cases after checking that none was used in training.

    Raises:
        DatasetError: no recorded split, a named test case that the model was trained on, or a recorded case
            missing from ``cases``.
    """
    record = read_run_record(output_dir) or {}
    split = record.get("split")
    if split is None:
        raise DatasetError(
            f"no patient split recorded in {os.path.join(output_dir, RUN_RECORD)}: evaluate in the output folder "
            "of a training run, so the model is not tested on the patients it was trained on."
        )
    trained_cases = set(split["train"])
    trained = [name for name in (test_cases or []) if name in trained_cases]
    if trained:
        raise DatasetError(
            f"test case(s) {trained} were used to train the model in {output_dir} (see {RUN_RECORD}); "
            f"choose among its test cases {split['test']}."
        )
    names = {item["name"] for item in cases}
    wanted = set(test_cases) if test_cases is not None else set(split["test"])
    missing = sorted(wanted - names)
    if missing:
        raise DatasetError(f"test case(s) {missing} not found among the cases of the dataset ({sorted(names)}).")
    return [item for item in cases if item["name"] in trained_cases], [item for item in cases if item["name"] in wanted]
