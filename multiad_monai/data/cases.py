"""Datalists of medical cases: one folder per patient, patient-level splits, normal training slices."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from multiad_monai.data.demo_volumes import make_demo_volumes
from multiad_monai.data.dicomweb import is_dicomweb_url, parse_dicomweb_url, retrieve_dicomweb_series
from multiad_monai.data.errors import DatasetError, first_line, root_cause
from multiad_monai.data.mvtec import report_skipped_files
from multiad_monai.data.run_record import chosen_dataset_dir, item_paths

__all__ = [
    "case_folder_datalist",
    "split_cases",
    "volume_folder_datalist",
    "normal_slice_datalist",
    "lesion_slice_datalist",
    "volume_inference_datalist",
    "readable_volume_datalist",
    "resolve_volume_dataset_dir",
    "VOLUME_EXTENSIONS",
    "volume_stem",
]

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
DEMO_VOLUMES_SUBDIR = "demo_volumes"


def resolve_volume_dataset_dir(dataset_dir: str | None, output_dir: str, from_record: bool = False) -> str:
    """``dataset_dir`` as an absolute path or, when empty or ``"demo"``, the generated phantom cases under
    ``output_dir``; with ``from_record`` an empty ``dataset_dir`` means the source recorded by training."""
    dataset_dir = chosen_dataset_dir(dataset_dir, output_dir, from_record)
    if dataset_dir:
        if not os.path.isdir(dataset_dir):
            raise DatasetError(f"dataset folder not found: {dataset_dir}")
        return os.path.abspath(dataset_dir)
    return make_demo_volumes(os.path.join(output_dir, DEMO_VOLUMES_SUBDIR))


def case_folder_datalist(
    root: str,
    image: str | Sequence[str] = "flair.nii.gz",
    label: str | None = "seg.nii.gz",
    foreground: str | None = "brainmask.nii.gz",
    cases: Sequence[str] | None = None,
) -> list[dict]:
    """Items ``{"image", "label", "foreground", "name"}`` of the case folders under ``root``.

    Args:
        root: folder holding one sub-folder per case (patient).
        image: image file name inside a case folder, or several (modalities stacked as channels in order).
        label: lesion label file name; None: no labels. A case without it gets no ``label`` (inference).
        foreground: brain/organ mask file name; None: none. A case without it gets no ``foreground``.
        cases: case folder names to take, in this order; None: every sub-folder holding the image file(s).

    Raises:
        DatasetError: missing root, a named case or one of its modality files missing, or no case found.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder not found: {root}")
    image_files = [image] if isinstance(image, str) else list(image)
    if not image_files:
        raise ValueError("image must name at least one file.")
    if cases is None:
        cases = sorted(
            name
            for name in os.listdir(root)
            if not name.startswith(".")
            and os.path.isdir(os.path.join(root, name))
            and any(os.path.exists(os.path.join(root, name, f)) for f in image_files)
        )
        if not cases:
            raise DatasetError(f"{root}: no case folder holds {image_files}.")
    items = []
    for case in cases:
        folder = os.path.join(root, case)
        if not os.path.isdir(folder):
            raise DatasetError(f"case folder not found: {folder}")
        paths = [os.path.join(folder, f) for f in image_files]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DatasetError(f"case {case!r}: image file(s) missing: {', '.join(missing)}")
        item = {"image": paths[0] if isinstance(image, str) else paths, "name": case}
        for key, file_name in (("label", label), ("foreground", foreground)):
            if file_name and os.path.exists(os.path.join(folder, file_name)):
                item[key] = os.path.join(folder, file_name)
        items.append(item)
    return items


def split_cases(
    datalist: Sequence[dict],
    test_cases: Sequence[str] | None = None,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Patient-level split into (train, test): no case is in both.

    Args:
        datalist: items with a unique ``name`` per case.
        test_cases: names of the test cases; None: a seeded random ``test_fraction`` of the cases (at least one
            each side).

    Raises:
        DatasetError: duplicate case names, unknown test cases, or an empty side.
    """
    names = [item["name"] for item in datalist]
    if len(set(names)) != len(names):
        raise DatasetError(f"case names must be unique for a patient-level split, got {names}.")
    if test_cases is None:
        if len(names) < 2:
            raise DatasetError(f"a patient-level split needs at least 2 cases, got {names}.")
        count = min(max(1, round(test_fraction * len(names))), len(names) - 1)
        order = np.random.default_rng(seed).permutation(len(names))
        test_cases = [names[i] for i in sorted(order[:count])]
    unknown = sorted(set(test_cases) - set(names))
    if unknown:
        raise DatasetError(f"test cases {unknown} are not among the cases {names}.")
    test = [item for item in datalist if item["name"] in set(test_cases)]
    train = [item for item in datalist if item["name"] not in set(test_cases)]
    if not train or not test:
        raise DatasetError(f"patient-level split left no {'training' if not train else 'test'} case ({names}).")
    return train, test


def volume_stem(path: str) -> str:
    """The name of a volume file or DICOM folder without folders and without its volume file ending."""
    name = os.path.basename(os.path.normpath(path))
    for ending in (*VOLUME_EXTENSIONS, ".dcm"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def _is_dicom_file(path: str) -> bool:
    """DICOM part-10 files carry "DICM" after a 128-byte preamble, whatever their name."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: str) -> bool:
    return any(
        _is_dicom_file(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    )


def volume_folder_datalist(path: str) -> list[dict]:
    """Items ``{"image", "name"}`` for inference: one volume file, a DICOM series folder, or a folder of
    volume files and DICOM series sub-folders (sorted)."""
    if os.path.isfile(path):
        return [{"image": path, "name": volume_stem(path)}]
    if not os.path.isdir(path):
        raise DatasetError(f"input not found: {path}")
    entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
    if _holds_dicom(path):
        return [{"image": path, "name": volume_stem(path)}]
    items = []
    for entry in entries:
        full = os.path.join(path, entry)
        if os.path.isfile(full) and entry.lower().endswith(VOLUME_EXTENSIONS):
            items.append({"image": full, "name": volume_stem(full)})
        elif os.path.isdir(full) and _holds_dicom(full):
            items.append({"image": full, "name": entry})
    if not items:
        raise DatasetError(f"no volumes ({', '.join(VOLUME_EXTENSIONS)} or DICOM series folders) found in {path}")
    return items


def normal_slice_datalist(datalist: Sequence[dict], volume_transform: Callable, sampler: Callable) -> list[dict]:
    """The normal 2D training slices of every case, in memory: ``{"image" (C, H, W), "name", "case", "label": 0}``,
    plus ``"foreground"`` ``(1, H, W)`` when the sampler slices the foreground mask too (validation places its
    synthetic lesions inside it).

    Args:
        datalist: case items (see :func:`case_folder_datalist`).
        volume_transform: loads a case and scales its image to [0, 1] (see
            :func:`multiad_monai.transforms.volume_transforms`).
        sampler: returns the list of slice dicts of a loaded case, e.g.
            :class:`~multiad_monai.transforms.RandNormalSliced` with ``num_samples=None`` (all normal slices).

    Volumes are loaded one at a time; only the selected slices are kept.
    """
    slices = []
    for item in datalist:
        case = item.get("name", os.path.basename(str(item["image"])))
        for sample in sampler(volume_transform(item)):
            index = int(sample["slice_index"])
            item = {"name": f"{case}_slice{index:04d}", "case": case, "slice_index": index, "label": 0}
            for key in ("image", "foreground"):
                value = sample.get(key)
                # an unsliced foreground (the sampler did not take it) is the whole volume: not kept
                if isinstance(value, torch.Tensor) and value.shape[1:] == sample["image"].shape[1:]:
                    item[key] = value.as_tensor().clone() if hasattr(value, "as_tensor") else value
            slices.append(item)
    if not slices:
        raise DatasetError("no normal training slice in any case.")
    return slices


def lesion_slice_datalist(
    datalist: Sequence[dict],
    volume_transform: Callable,
    axis: int = 2,
    quarter_turns: int = 0,
    min_foreground: float = 0.1,
    lesions_in_foreground_only: bool = False,
    crop_to_foreground: bool = False,
    crop_margin: int = 8,
) -> list[dict]:
    """The slices of labelled cases that hold a lesion, cut like the training slices (turns, crop, foreground
    coverage): ``{"image" (C, H, W), "mask" (1, H, W), "foreground" (1, H, W), "label": 1, "name", "case",
    "slice_index"}``. Training keeps only lesion-free slices, so these are never trained on: with the held-out
    normal slices they are a validation set of real lesions. Cases without a label give none.

    Args:
        datalist: case items (see :func:`case_folder_datalist`), usually the training cases.
        volume_transform: loads a case (see :func:`multiad_monai.transforms.volume_transforms`).
        axis, quarter_turns, min_foreground, lesions_in_foreground_only, crop_to_foreground, crop_margin: as
            :class:`~multiad_monai.transforms.RandNormalSliced` for the training slices.
    """
    from multiad_monai.transforms.slices import crop_plane, foreground_box, slice_coverage, volume_slices

    slices = []
    for item in datalist:
        if item.get("label") is None:
            continue
        case = item.get("name", os.path.basename(str(item["image"])))
        data = volume_transform(item)
        image, lesion = data["image"], data["label"] > 0
        foreground = data.get("foreground")
        if foreground is None:
            foreground = (image != image.min()).any(dim=0, keepdim=True)
        foreground = foreground > 0
        if lesions_in_foreground_only:
            lesion = lesion & foreground
        volumes = {"image": image, "mask": lesion.float(), "foreground": foreground.float()}
        if crop_to_foreground:
            box = foreground_box(foreground, axis, crop_margin)
            volumes = {key: crop_plane(volume, axis, box) for key, volume in volumes.items()}
        coverage = slice_coverage(volumes["foreground"], axis)
        planes = {key: volume_slices(volume, axis, quarter_turns) for key, volume in volumes.items()}
        for index in range(len(coverage)):
            if float(coverage[index]) >= min_foreground and bool(planes["mask"][index].any()):
                sample = {key: planes[key][index].clone() for key in planes}
                slices.append({**sample, "label": 1, "name": f"{case}_slice{index:04d}", "case": case, "slice_index": index})
    return slices


def volume_inference_datalist(
    input_path: str | None,
    dataset_dir: str | None = None,
    output_dir: str = ".",
    image: str | Sequence[str] = "flair.nii.gz",
    foreground: str | None = "brainmask.nii.gz",
) -> list[dict]:
    """What to run inference on: the volumes at ``input_path`` (see :func:`volume_folder_datalist`) or, when it
    is empty, every case folder of the dataset (``dataset_dir``, by default the one training recorded), without labels; their
    foreground masks are kept to confine the maps. The dataset is not touched when ``input_path`` is given.

    A DICOMweb study or series URL as ``input_path`` is downloaded first, one folder per image series under
    ``<output_dir>/dicomweb_inputs/<StudyUID>/`` (see :func:`~multiad_monai.data.dicomweb.retrieve_dicomweb_series`),
    each series one item named by its SeriesInstanceUID."""
    if is_dicomweb_url(input_path):
        study = parse_dicomweb_url(input_path)[1]
        folders = retrieve_dicomweb_series(input_path, os.path.join(output_dir, "dicomweb_inputs", study))
        return [{"image": folder, "name": os.path.basename(folder)} for folder in folders]
    if input_path:
        return volume_folder_datalist(input_path)
    root = resolve_volume_dataset_dir(dataset_dir, output_dir, from_record=True)
    return case_folder_datalist(root, image=image, label=None, foreground=foreground)


def readable_volume_datalist(
    datalist: Sequence[dict],
    volume_transform: Callable[[dict], dict],
    skip_bad_files: bool = False,
    report_path: str | None = None,
) -> list[dict]:
    """The volume datalist, each of its volumes loaded once through ``volume_transform`` (the bundle's loading
    and preprocessing) before any result is written. Without ``skip_bad_files`` the first bad volume stops the
    run there, with its one-line error, so no map of the volumes before it is written; with it the unusable
    items are left out, listed in ``report_path`` (CSV ``image,problem``) and a logged warning, so one corrupt
    volume among many does not lose the rest.

    A single volume is not read ahead: it would fail the same way, before anything is written, at twice the
    reading time (MONAI Label sends one volume per request).

    Raises:
        DatasetError: without ``skip_bad_files``, naming the first unusable volume; with it, when no item is
            usable.
    """
    items = list(datalist)
    if len(items) < 2 and not skip_bad_files:
        return items
    usable, skipped = [], []
    for item in items:
        try:
            volume_transform(dict(item))
        except Exception as error:  # any reader, orientation or intensity error makes the volume unusable
            cause = root_cause(error)
            if skip_bad_files:
                skipped.append((";".join(item_paths(item)), first_line(cause)))
            elif isinstance(cause, DatasetError):
                raise cause
            else:
                raise DatasetError(f"{';'.join(item_paths(item))}: {first_line(cause)}") from error
        else:
            usable.append(item)
    report_skipped_files(skipped, len(items), report_path)
    return usable
