"""Datalists for folders laid out like the BMAD medical anomaly detection benchmark (2D sets).

Expected layout of one data set folder ``root``::

    root/train/good/<stem>.png                   normal training images
    root/<split>/good/img/<stem>.png             normal images of split "valid" or "test"
    root/<split>/good/label/<stem>.png           their (empty) masks, optional
    root/<split>/Ungood/img/<stem>.png           anomalous images
    root/<split>/Ungood/label/<stem>.png         their masks: same file name as the image

Items have the fields of :func:`multiad_monai.data.mvtec.mvtec_datalist`, so the same 2D chains apply.
"""

from __future__ import annotations

import os

from multiad_monai.data.errors import DatasetError
from multiad_monai.data.mvtec import GOOD, IMAGE_EXTENSIONS, _describe_contents, _images_by_stem, _join_problems

__all__ = ["ANOMALOUS", "bmad_datalist"]

ANOMALOUS = "Ungood"
_SPLITS = ("train", "valid", "test")


def _item(image_folder: str, name: str, defect_type: str, label_files: dict[str, str] | None) -> dict:
    stem = os.path.splitext(name)[0]
    item = {
        "image": os.path.join(image_folder, name),
        "label": int(defect_type == ANOMALOUS),
        "defect_type": defect_type,
        "name": f"{defect_type}/{stem}",
    }
    if label_files is not None and stem in label_files:
        item["mask"] = os.path.join(os.path.dirname(image_folder), "label", label_files[stem])
    return item


def bmad_datalist(root: str, split: str = "valid", require_masks: bool = True) -> list[dict]:
    """List the images of one split of a BMAD-style 2D data set folder.

    Args:
        root: folder holding ``train/`` and ``valid/`` and/or ``test/``.
        split: ``"train"`` (``train/good`` only), ``"valid"`` or ``"test"`` (``good`` and ``Ungood``).
        require_masks: if True, an ``Ungood`` image without a label file is an error; if False it is
            listed without a ``"mask"`` key (image-level evaluation only).

    Returns:
        good items, then Ungood items, each by file name; each ``{"image": path, "mask": path (absent for normal
        images without a label file), "label": 0 | 1, "defect_type": "good" | "Ungood",
        "name": "<defect_type>/<stem>"}``.

    Raises:
        DatasetError: root missing, unexpected layout, empty split, or missing masks.
        ValueError: ``split`` is not one of ``"train"``, ``"valid"``, ``"test"``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}.")
    root = os.fspath(root)
    if not os.path.isdir(root):
        problem = "is a file, expected a folder." if os.path.exists(root) else "does not exist."
        raise DatasetError(f"Dataset root {root!r} {problem}")

    if split == "train":
        folder = os.path.join(root, "train", GOOD)
        if not os.path.isdir(folder):
            raise DatasetError(
                f"{root!r} is not a BMAD-style folder: expected 'train/good/' with normal images; "
                f"found {_describe_contents(root)}."
            )
        datalist = [_item(folder, name, GOOD, None) for name in _images_by_stem(folder).values()]
        if not datalist:
            raise DatasetError(
                f"Training split is empty: {folder!r} holds no images (accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}); found {_describe_contents(folder)}."
            )
        return datalist

    split_folder = os.path.join(root, split)
    present = [t for t in (GOOD, ANOMALOUS) if os.path.isdir(os.path.join(split_folder, t, "img"))]
    if not present:
        raise DatasetError(
            f"{split_folder!r} is not a BMAD-style split: expected 'good/img/' and 'Ungood/img/' folders; "
            f"found {_describe_contents(split_folder)}."
        )
    datalist: list[dict] = []
    missing: list[str] = []
    for defect_type in present:
        image_folder = os.path.join(split_folder, defect_type, "img")
        label_folder = os.path.join(split_folder, defect_type, "label")
        label_files = _images_by_stem(label_folder) if os.path.isdir(label_folder) else {}
        for name in _images_by_stem(image_folder).values():
            item = _item(image_folder, name, defect_type, label_files)
            if defect_type == ANOMALOUS and "mask" not in item and require_masks:
                stem = os.path.splitext(name)[0]
                missing.append(f"{item['image']!r} has no mask (looked for {os.path.join(label_folder, stem)}.<ext>)")
            datalist.append(item)
    if missing:
        raise DatasetError(_join_problems("Anomalous images without masks", missing))
    if not datalist:
        raise DatasetError(f"Split {split!r} is empty: no images in {split_folder!r}/{{good,Ungood}}/img.")
    return datalist
