"""Loading medical volumes (NIfTI, DICOM series, MHA/NRRD) as checked, oriented MetaTensors.

Every volume comes back channel-first ``(C, X, Y, Z)`` as float32 with its affine (voxel index to RAS
world millimetres, MONAI's convention for all readers). Problems a training run would only reveal later,
or never (a 2D image, a DICOM folder mixing series, missing slices, NaN), raise :class:`DatasetError`
naming the file.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data import ImageReader, MetaTensor
from monai.transforms import LoadImage, Orientation

from multiad_monai.data.errors import DatasetError, first_line
from multiad_monai.transforms.channels import source_name

__all__ = ["load_volume", "restore_stored_orientation", "check_dicom_series", "check_image_label_pair", "multimodal_volume"]

# Slice spacings may differ by this fraction (scanner rounding) before a slice counts as missing.
_SPACING_TOLERANCE = 0.1
_AFFINE_TOLERANCE = 1e-3


def _dicom_headers(folder: str) -> list[tuple[str, pydicom.Dataset]]:
    headers = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # pydicom raises many types for non-DICOM files
            # README files and the like sit beside series; a corrupt slice left out here shows up as a gap.
            continue
        # DICOMDIR indexes, structure sets and reports carry no image rows.
        if "Rows" in header and "SeriesInstanceUID" in header:
            headers.append((name, header))
    return headers


def _slice_gap_problem(headers: list[tuple[str, pydicom.Dataset]]) -> str | None:
    """Why the slices do not form one evenly spaced stack, or None."""
    if all("ImageOrientationPatient" in h and "ImagePositionPatient" in h for _, h in headers):
        orientations = np.array([np.asarray(h.ImageOrientationPatient, dtype=float) for _, h in headers])
        if not np.allclose(orientations, orientations[0], atol=1e-3):
            return (
                "its slices are not parallel (ImageOrientationPatient differs between files, as in localizer "
                "or radial series), so they do not form a volume"
            )
        normal = np.cross(orientations[0][:3], orientations[0][3:])
        positions = sorted(
            (float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)), name) for name, h in headers
        )
        gaps = np.diff([p for p, _ in positions])
        if np.any(gaps < 1e-3):
            i = int(np.argmin(gaps))
            return (
                f"files {positions[i][1]!r} and {positions[i + 1][1]!r} lie at the same slice position "
                f"({positions[i][0]:.3f} mm)"
            )
        usual = float(np.median(gaps))
        if not np.allclose(gaps, usual, rtol=_SPACING_TOLERANCE, atol=1e-3):
            i = int(np.argmax(np.abs(gaps - usual)))
            return (
                f"slice spacing is not uniform: {gaps[i]:.3f} mm between files {positions[i][1]!r} and "
                f"{positions[i + 1][1]!r} where {usual:.3f} mm is usual (missing slices?)"
            )
    if all("InstanceNumber" in h and h.InstanceNumber is not None for _, h in headers):
        numbers = sorted((int(h.InstanceNumber), name) for name, h in headers)
        steps = np.diff([n for n, _ in numbers])
        if np.any(steps == 0):
            i = int(np.argmin(steps))
            return f"files {numbers[i][1]!r} and {numbers[i + 1][1]!r} share InstanceNumber {numbers[i][0]}"
        if np.any(steps != steps.min()):
            i = int(np.argmax(steps))
            return f"InstanceNumber jumps from {numbers[i][0]} to {numbers[i + 1][0]} (missing slices?)"
    return None


def check_dicom_series(folder: str) -> None:
    """Check that a DICOM folder holds exactly one series of parallel, evenly spaced, complete slices.

    Reads headers only (pydicom). A single file (e.g. one multi-frame volume) passes.

    Raises:
        DatasetError: naming the folder, when it holds no DICOM image, several series, non-parallel slices,
            slices at the same position, or gaps in slice position or InstanceNumber.
    """
    headers = _dicom_headers(folder)
    if not headers:
        raise DatasetError(f"{folder!r} holds no DICOM image files.")
    series: dict[str, list[str]] = {}
    for name, header in headers:
        series.setdefault(str(header.SeriesInstanceUID), []).append(name)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(names)} files, e.g. {names[0]!r})" for uid, names in sorted(series.items())
        )
        raise DatasetError(
            f"{folder!r} holds {len(series)} DICOM series, expected one per folder: {listing}. "
            "Move each series to its own folder."
        )
    if len(headers) > 1:
        problem = _slice_gap_problem(headers)
        if problem is not None:
            raise DatasetError(f"DICOM series {folder!r}: {problem}.")


def load_volume(
    path: str,
    reader: ImageReader | str | None = None,
    canonical_axcodes: str | None = "RAS",
    allow_empty: bool = False,
) -> MetaTensor:
    """Load a NIfTI/MHA/NRRD file, a single (multi-frame) DICOM file or a DICOM series folder as a volume.

    Uses MONAI ``LoadImage(image_only=True, ensure_channel_first=True)`` (NIfTI via nibabel, DICOM and
    MHA/NRRD via ITK unless ``reader`` says otherwise) and, when ``canonical_axcodes`` is given,
    ``Orientation(axcodes=canonical_axcodes)``, so that the same axis means the same direction in every volume.

    Args:
        path: file, or folder of one DICOM series.
        reader: MONAI reader (instance or name such as ``"PydicomReader"``); None: MONAI's choice.
        canonical_axcodes: target orientation, e.g. ``"RAS"``; None keeps the stored voxel order.
        allow_empty: accept an all-zero volume (label maps and masks may be empty).

    Returns:
        float32 MetaTensor ``(C, X, Y, Z)`` with its ``affine`` and ``filename_or_obj`` metadata.

    Raises:
        DatasetError: missing path, unreadable file, a 2D image, a DICOM folder with several series or
            missing slices, NaN/Inf voxels, or (unless ``allow_empty``) an all-zero volume.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f"{path!r} does not exist.")
    if os.path.isdir(path):
        check_dicom_series(path)
    try:
        volume = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as e:  # readers raise RuntimeError, OSError, ValueError, ... for bad files
        raise DatasetError(f"{path!r} cannot be read as an image volume ({type(e).__name__}: {first_line(e)}).") from e
    spatial = tuple(volume.shape[1:])
    if len(spatial) != 3 or min(spatial) < 2:
        raise DatasetError(
            f"{path!r} is a 2D image (spatial shape {spatial}), expected a volume with three spatial "
            "dimensions and several slices."
        )
    if not bool(torch.isfinite(volume).all()):
        raise DatasetError(f"{path!r} holds {int((~torch.isfinite(volume)).sum())} NaN or infinite voxel(s).")
    if not allow_empty and not bool(volume.any()):
        raise DatasetError(f"{path!r} is all zero: no image content.")
    if canonical_axcodes is not None:
        # labels=None reads the axis letters from the MetaTensor's "space" (RAS for MONAI's readers).
        volume = Orientation(axcodes=canonical_axcodes, labels=None)(volume)
    return volume


def restore_stored_orientation(volume: torch.Tensor) -> torch.Tensor:
    """Undo ``load_volume``'s reorientation: the voxel order and affine of the file the volume came from.

    Maps computed on a canonically oriented volume are written this way, so that their voxel grid is the
    input's own (``original_affine`` metadata, set by MONAI's readers), not only aligned in world space:
    tools that compare arrays voxel by voxel, or do not resample on display, then overlay them too.
    ``(C, X, Y, Z)`` in and out; a plain tensor, or one without ``original_affine``, is returned as it is.
    """
    if not isinstance(volume, MetaTensor) or volume.meta.get("original_affine") is None:
        return volume
    original = np.asarray(volume.meta["original_affine"], dtype=np.float64)
    if np.allclose(np.asarray(volume.affine, dtype=np.float64), original, atol=_AFFINE_TOLERANCE):
        return volume
    axcodes = "".join(nib.orientations.aff2axcodes(original))
    return Orientation(axcodes=axcodes, labels=None)(volume)


def _check_same_grid(reference: torch.Tensor, other: torch.Tensor, reference_role: str, other_role: str) -> None:
    reference_name, other_name = source_name(reference), source_name(other)
    if tuple(reference.shape[1:]) != tuple(other.shape[1:]):
        raise DatasetError(
            f"{other_role} {other_name} has spatial shape {tuple(other.shape[1:])} but {reference_role} "
            f"{reference_name} has {tuple(reference.shape[1:])}."
        )
    if isinstance(reference, MetaTensor) and isinstance(other, MetaTensor):
        reference_affine = np.asarray(reference.affine, dtype=np.float64)
        other_affine = np.asarray(other.affine, dtype=np.float64)
        if not np.allclose(reference_affine, other_affine, rtol=0.0, atol=_AFFINE_TOLERANCE):
            raise DatasetError(
                f"{other_role} {other_name} and {reference_role} {reference_name} have different affines "
                f"(largest difference {np.abs(reference_affine - other_affine).max():.4g}):\n"
                f"{reference_role}\n{np.round(reference_affine, 4)}\n{other_role}\n{np.round(other_affine, 4)}"
            )


def check_image_label_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    """Check that ``label (C', X, Y, Z)`` lies on the voxel grid of ``image (C, X, Y, Z)``.

    Spatial shapes must be equal and, for MetaTensors, affines equal within 1e-3 (mm), so that a label
    voxel marks the image voxel at the same index.

    Raises:
        DatasetError: naming both files and the differing shapes or affines.
    """
    _check_same_grid(image, label, "its image", "label")


def multimodal_volume(
    paths: Mapping[str, str],
    modalities: Sequence[str],
    case: str | None = None,
    reader: ImageReader | str | None = None,
    canonical_axcodes: str | None = "RAS",
) -> MetaTensor:
    """Load the modality files of one case (e.g. FLAIR, T1c) as the channels of one volume.

    Args:
        paths: modality name -> file or DICOM folder.
        modalities: the modalities to load, in channel order.
        case: case name for messages; None: the folder the files share.
        reader, canonical_axcodes: as :func:`load_volume`.

    Returns:
        MetaTensor ``(len(modalities), X, Y, Z)`` with the first modality's affine and metadata, plus
        ``modalities`` and ``modality_files`` metadata.

    Raises:
        DatasetError: a modality missing from ``paths``, a file that :func:`load_volume` rejects, a file with
            several channels, or files on different voxel grids.
    """
    if not modalities:
        raise ValueError("modalities must name at least one modality.")
    if case is None:
        folders = [os.path.dirname(os.path.abspath(os.fspath(p))) for p in paths.values() if p]
        case = os.path.basename(os.path.commonpath(folders)) if folders else "<case>"
    for modality in modalities:
        if not paths.get(modality):
            given = sorted(k for k, v in paths.items() if v)
            raise DatasetError(f"case {case!r} has no {modality!r} image (modalities given: {given}).")
    channels = []
    for modality in modalities:
        path = os.fspath(paths[modality])
        if not os.path.exists(path):
            raise DatasetError(f"case {case!r}: the {modality!r} image {path!r} does not exist.")
        volume = load_volume(path, reader=reader, canonical_axcodes=canonical_axcodes)
        if volume.shape[0] != 1:
            raise DatasetError(
                f"case {case!r}: the {modality!r} image {path!r} has {volume.shape[0]} channels, expected one."
            )
        if channels:
            _check_same_grid(
                channels[0], volume, f"the {modalities[0]!r} image", f"case {case!r}: the {modality!r} image"
            )
        channels.append(volume)
    first = channels[0]
    meta = copy.deepcopy(first.meta)
    meta["modalities"] = list(modalities)
    meta["modality_files"] = [os.fspath(paths[m]) for m in modalities]
    return MetaTensor(torch.cat([c.as_tensor() for c in channels]), meta=meta)  # meta holds the affine
