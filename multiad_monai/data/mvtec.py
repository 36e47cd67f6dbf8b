"""Datalists for folders laid out like MVTec AD.

Expected layout of one category folder ``root``::

    root/train/good/<stem>.png                      normal training images
    root/test/good/<stem>.png                       normal test images
    root/test/<defect_type>/<stem>.png              anomalous test images
    root/ground_truth/<defect_type>/<stem>_mask.png binary masks (``<stem>.png`` also accepted)

Image extensions png/jpg/jpeg/bmp/tif/tiff are accepted in any letter case.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from multiad_monai.atomic import atomic_path
from multiad_monai.data.errors import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "GOOD",
    "mvtec_datalist",
    "split_train_validation",
    "check_datalist",
    "readable_datalist",
    "report_skipped_files",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
_SPLITS = ("train", "test")
# Error reports list this many problems at most; the rest are counted.
_MAX_REPORTED = 20


def _is_image_file(name: str) -> bool:
    # Hidden files include macOS "._x.png" resource forks, which are not images.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_dir(folder: str, want_dirs: bool) -> list[str]:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if want_dirs and entry.is_dir():
                names.append(entry.name)
            elif not want_dirs and entry.is_file() and _is_image_file(entry.name):
                names.append(entry.name)
    return sorted(names)


def _describe_contents(folder: str) -> str:
    if not os.path.isdir(folder):
        return "nothing (folder does not exist)"
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    if not entries:
        return "an empty folder"
    shown = ", ".join(e + ("/" if os.path.isdir(os.path.join(folder, e)) else "") for e in entries[:12])
    more = f", ... ({len(entries) - 12} more)" if len(entries) > 12 else ""
    return shown + more


def _layout_error(root: str, expected: str) -> DatasetError:
    found = _describe_contents(root)
    hint = ""
    # A common mistake is passing the MVTec parent folder instead of one category.
    subdirs = [d for d in (os.listdir(root) if os.path.isdir(root) else []) if not d.startswith(".")]
    categories = [d for d in subdirs if os.path.isdir(os.path.join(root, d, "train"))]
    if categories:
        example = os.path.join(root, sorted(categories)[0])
        hint = f" It looks like a folder of categories; pass one of them, e.g. {example!r}."
    return DatasetError(f"{root!r} is not an MVTec-style category folder: expected {expected}; found {found}.{hint}")


def _images_by_stem(folder: str) -> dict[str, str]:
    """Map file stem -> file name for the images in ``folder``; duplicate stems are an error."""
    by_stem: dict[str, str] = {}
    for name in _list_dir(folder, want_dirs=False):
        stem = os.path.splitext(name)[0]
        if stem in by_stem:
            raise DatasetError(
                f"{os.path.join(folder, name)!r} and {os.path.join(folder, by_stem[stem])!r} share the stem "
                f"{stem!r}; item names must be unique, remove one of them."
            )
        by_stem[stem] = name
    return by_stem


def _find_mask(gt_folder: str, gt_files: dict[str, str], stem: str) -> str | None:
    for candidate in (f"{stem}_mask", stem):
        if candidate in gt_files:
            return os.path.join(gt_folder, gt_files[candidate])
    return None


def mvtec_datalist(root: str, split: str = "train", require_masks: bool | None = True) -> list[dict]:
    """List the images of one split of an MVTec-style category folder.

    Args:
        root: category folder holding ``train/``, ``test/`` and ``ground_truth/``.
        split: ``"train"`` (``train/good`` only) or ``"test"`` (all of ``test/``).
        require_masks: if True, an anomalous test image without a mask in ``ground_truth`` is an error;
            if False such items are listed without a ``"mask"`` key; None: True when ``root`` has a
            ``ground_truth/`` folder, False (an image-level test set: good / defect folders only) when not.

    Returns:
        items sorted by (defect_type, file name), each ``{"image": path, "mask": path (absent for good
        images), "label": 0 | 1, "defect_type": str, "name": "<defect_type>/<stem>"}``.

    Raises:
        DatasetError: root missing, unexpected layout, empty split, or a missing mask.
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DatasetError(f"Dataset root {root!r} does not exist.")
    if not os.path.isdir(root):
        raise DatasetError(f"Dataset root {root!r} is a file, expected a folder.")

    if split == "train":
        good_folder = os.path.join(root, "train", GOOD)
        if not os.path.isdir(good_folder):
            raise _layout_error(root, "a 'train/good/' folder of normal images")
        datalist = [_item(good_folder, GOOD, name, label=0) for name in _images_by_stem(good_folder).values()]
        if not datalist:
            raise DatasetError(
                f"Training split is empty: {good_folder!r} holds no images "
                f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)}); found {_describe_contents(good_folder)}."
            )
        return datalist

    if require_masks is None:
        require_masks = os.path.isdir(os.path.join(root, "ground_truth"))
        if not require_masks:
            logging.getLogger(__name__).info(f"{root} has no ground_truth/ folder: image-level test set, no pixel metrics")
    test_folder = os.path.join(root, "test")
    if not os.path.isdir(test_folder):
        raise _layout_error(root, "a 'test/' folder with one sub-folder per defect type (and 'good/')")
    defect_types = _list_dir(test_folder, want_dirs=True)
    if not defect_types:
        raise _layout_error(test_folder, "one sub-folder per defect type (e.g. 'good/', 'scratch/') in 'test/'")

    datalist: list[dict] = []
    missing: list[str] = []
    for defect_type in defect_types:
        folder = os.path.join(test_folder, defect_type)
        images = _images_by_stem(folder)
        if defect_type == GOOD:
            datalist.extend(_item(folder, GOOD, name, label=0) for name in images.values())
            continue
        gt_folder = os.path.join(root, "ground_truth", defect_type)
        gt_files = _images_by_stem_lenient(gt_folder)
        for stem, name in images.items():
            item = _item(folder, defect_type, name, label=1)
            mask = _find_mask(gt_folder, gt_files, stem)
            if mask is not None:
                item["mask"] = mask
            elif require_masks:
                missing.append(
                    f"{item['image']!r} has no mask (looked for {os.path.join(gt_folder, stem + '_mask.png')!r} "
                    f"or {os.path.join(gt_folder, stem + '.png')!r}, any image extension)"
                )
            datalist.append(item)
    if missing:
        raise DatasetError(_join_problems("Anomalous test images without masks", missing))
    if not datalist:
        raise DatasetError(
            f"Test split is empty: no images in the sub-folders of {test_folder!r} "
            f"(found {_describe_contents(test_folder)})."
        )
    return datalist


def _images_by_stem_lenient(folder: str) -> dict[str, str]:
    # A missing ground_truth folder is reported per image as a missing mask, which names the files.
    return _images_by_stem(folder) if os.path.isdir(folder) else {}


def _item(folder: str, defect_type: str, name: str, label: int) -> dict:
    stem = os.path.splitext(name)[0]
    return {
        "image": os.path.join(folder, name),
        "label": label,
        "defect_type": defect_type,
        "name": f"{defect_type}/{stem}",
    }


def split_train_validation(
    datalist: Sequence[dict], validation_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Randomly split a datalist into training and validation parts.

    The split depends only on the datalist order, ``validation_fraction`` and ``seed``. With two or more
    items, each part gets at least one; both parts keep the input order.

    Returns:
        (train, validation) lists of the original items.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    items = list(datalist)
    if len(items) < 2:
        return items, []
    num_validation = int(min(max(round(len(items) * validation_fraction), 1), len(items) - 1))
    order = np.random.default_rng(seed).permutation(len(items))
    validation_indices = set(order[:num_validation].tolist())
    train = [item for i, item in enumerate(items) if i not in validation_indices]
    validation = [item for i, item in enumerate(items) if i in validation_indices]
    return train, validation


def _read_size(path: str) -> tuple[tuple[int, int] | None, str | None]:
    """Fully decode ``path``; return ((width, height), None) or (None, problem)."""
    try:
        with Image.open(path) as image:
            size = image.size
            # The header alone does not reveal truncated or corrupt pixel data; decoding does.
            image.load()
        return size, None
    except FileNotFoundError:
        return None, f"{path!r} does not exist"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files.
        return None, f"{path!r} cannot be read as an image ({type(e).__name__}: {e})"


def _check_item(item: dict) -> list[str]:
    if "image" not in item:
        return [f"datalist item {item!r} has no 'image' key"]
    image_size, problem = _read_size(item["image"])
    problems = [problem] if problem else []
    if item.get("mask") is not None:
        mask_size, mask_problem = _read_size(item["mask"])
        if mask_problem:
            problems.append(mask_problem)
        elif image_size is not None and mask_size != image_size:
            problems.append(
                f"mask {item['mask']!r} is {mask_size[0]}x{mask_size[1]} but its image {item['image']!r} "
                f"is {image_size[0]}x{image_size[1]} (width x height)"
            )
    return problems


def _problems_per_item(items: list[dict], num_workers: int = 4) -> list[list[str]]:
    """The problems of each item (see :func:`_check_item`), files decoded in threads; an empty datalist is an error."""
    if not items:
        raise DatasetError("The datalist is empty.")
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        return list(pool.map(_check_item, items))


def check_datalist(datalist: Sequence[dict], num_workers: int = 4) -> None:
    """Check that every image and mask of a datalist decodes and that masks match their image size.

    Call before training starts so that a bad file fails fast with a clear message instead of
    crashing a data loader worker mid-epoch. Files are only read.

    Args:
        datalist: items with an ``"image"`` path and an optional ``"mask"`` path.
        num_workers: threads used to decode files (PIL releases the GIL while decoding).

    Raises:
        DatasetError: listing every unreadable, truncated or missing file and every size mismatch.
    """
    problems = [p for item_problems in _problems_per_item(list(datalist), num_workers) for p in item_problems]
    if problems:
        raise DatasetError(_join_problems(f"{len(problems)} problem(s) in the datalist", problems))


def readable_datalist(datalist: Sequence[dict], skip_bad_files: bool = False, report_path: str | None = None) -> list[dict]:
    """The datalist after :func:`check_datalist`: unchanged when every file is usable; otherwise an error or,
    with ``skip_bad_files``, the usable items only, the skipped ones listed in ``report_path`` (CSV ``image,
    problem``, written atomically) and in a logged warning.

    Raises:
        DatasetError: as :func:`check_datalist` without ``skip_bad_files``; with it, when no item is usable.
    """
    items = list(datalist)
    if not skip_bad_files:
        check_datalist(items)
        return items
    problems = _problems_per_item(items)
    usable = [item for item, item_problems in zip(items, problems) if not item_problems]
    skipped = [(item.get("image", ""), "; ".join(p)) for item, p in zip(items, problems) if p]
    report_skipped_files(skipped, len(items), report_path)
    return usable


def report_skipped_files(skipped: Sequence[tuple[str, str]], num_items: int, report_path: str | None = None) -> None:
    """List the skipped ``(file, problem)`` pairs in ``report_path`` (CSV ``image,problem``, written atomically,
    also when empty) and in a logged warning.

    Raises:
        DatasetError: every one of the ``num_items`` items was skipped.
    """
    if report_path is not None:
        with atomic_path(report_path, suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("image", "problem"))
            writer.writerows(skipped)
    if skipped:
        logging.getLogger(__name__).warning(
            f"skipped {len(skipped)} unusable file(s) of {num_items}" + (f", listed in {report_path}" if report_path else "")
        )
    if len(skipped) == num_items:
        raise DatasetError(_join_problems(f"no usable item: {len(skipped)} problem(s) in the datalist", [p for _, p in skipped]))


def _join_problems(title: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{title}: {problems[0]}"
    shown = problems[:_MAX_REPORTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{title}:\n  " + "\n  ".join(shown) + more
