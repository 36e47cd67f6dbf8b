"""Where the images come from: a user's folder, the generated demo data, or a plain image folder."""

from __future__ import annotations

import os
from collections.abc import Sequence

from multiad_monai.data.demo import make_demo_dataset
from multiad_monai.data.errors import DatasetError
from multiad_monai.data.mvtec import IMAGE_EXTENSIONS
from multiad_monai.data.run_record import chosen_dataset_dir

__all__ = ["resolve_dataset_dir", "synthetic_validation_datalist", "image_folder_datalist", "DEMO_SUBDIR"]

DEMO_SUBDIR = "demo_data"


def resolve_dataset_dir(dataset_dir: str | None, output_dir: str, from_record: bool = False) -> str:
    """``dataset_dir`` as an absolute path, or the generated demo dataset under ``output_dir/demo_data`` (made on
    the first call, deterministic) when it is ``"demo"`` or empty; with ``from_record`` an empty ``dataset_dir``
    means the source recorded by training (see :func:`~multiad_monai.data.run_record.chosen_dataset_dir`)."""
    dataset_dir = chosen_dataset_dir(dataset_dir, output_dir, from_record)
    if dataset_dir:
        if not os.path.isdir(dataset_dir):
            raise DatasetError(f"dataset folder not found: {dataset_dir}")
        return os.path.abspath(dataset_dir)
    return os.path.abspath(make_demo_dataset(os.path.join(output_dir, DEMO_SUBDIR)))


def synthetic_validation_datalist(normal_items: Sequence[dict], flag_key: str = "synthetic_defect") -> list[dict]:
    """Each held-out normal item twice: as it is (label 0) and flagged to receive a synthetic defect
    (label 1 after :class:`~multiad_monai.transforms.RandSyntheticDefectd`), so the validation set is
    balanced and every normal image also serves the threshold estimate."""
    items = []
    for item in normal_items:
        if item.get("label", 0) != 0:
            raise DatasetError(f"validation items must be normal images, got label {item.get('label')} for {item.get('image')}")
        items.append({**item, flag_key: 0})
        name = item["name"] if "name" in item else os.path.basename(item["image"])
        items.append({**item, flag_key: 1, "name": f"{name}+synthetic"})
    return items


def image_folder_datalist(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[dict]:
    """Every image under ``folder`` (recursively, sorted) as ``{"image": path, "name": relative path}``."""
    if not os.path.isdir(folder):
        raise DatasetError(f"input folder not found: {folder}")
    items = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(tuple(extensions)):
                path = os.path.join(current, name)
                items.append({"image": path, "name": os.path.relpath(path, folder)})
    if not items:
        raise DatasetError(f"no images ({', '.join(extensions)}) found in {folder}")
    return items
