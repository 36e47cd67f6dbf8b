"""DICOM results of a DICOM input: the anomaly mask as a Segmentation, the heatmap as a Parametric Map.

Both objects (highdicom) reference the source series, share its Frame of Reference and have one frame per
source slice, so that a PACS viewer (OHIF, 3D Slicer) overlays them on the study. A JSON beside them holds
the scores, the threshold and what the values mean, and the UIDs of the objects written.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from multiad_monai.atomic import atomic_path
from multiad_monai.data.dicom_series import RAS_TO_LPS, read_dicom_series, save_dicom_file
from multiad_monai.data.errors import DatasetError

__all__ = [
    "frames_on_series", "anomaly_segmentation", "anomaly_parametric_map", "heatmap_parametric_map", "write_dicom_outputs",
    "SOFTWARE_NAME",
]

SOFTWARE_NAME = "multiad-monai"
# A voxel centre may be this far (in voxels) from the map's grid before the series counts as another grid.
_GRID_TOLERANCE = 1e-2
_ANOMALY_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
_ANOMALY_TYPE = codes.SCT.Lesion


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SOFTWARE_NAME)
    except PackageNotFoundError:
        return "unknown"


def frames_on_series(
    volume: np.ndarray, affine: np.ndarray, datasets: Sequence[pydicom.Dataset], name: str = "<volume>"
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut ``volume (X, Y, Z)`` (voxel-to-RAS ``affine``) into the frames of single-frame DICOM slices.

    For every dataset, the voxel of each of its pixels is found from Image Position / Orientation (Patient)
    and Pixel Spacing; the voxel grid of the volume must hold every pixel centre (the volume was computed
    on this series, whatever its orientation in memory). No resampling.

    Returns:
        ``(frames (N, Rows, Columns), indices)``: the frames in the order of ``datasets`` and, per frame, the
        ``(3, Rows, Columns)`` integer voxel indices it was taken from.

    Raises:
        DatasetError: naming ``name``, when a dataset lacks geometry or its pixels are off the volume's grid.
        NotImplementedError: a multi-frame (enhanced) source.
    """
    array = np.asarray(volume)
    inverse = np.linalg.inv(RAS_TO_LPS @ np.asarray(affine, dtype=np.float64))
    frames, indices = [], []
    for ds in datasets:
        if not all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")):
            raise DatasetError(f"{name}: DICOM slice {ds.get('SOPInstanceUID', '?')} has no position, orientation or pixel spacing.")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise NotImplementedError(f"{name}: DICOM outputs of a multi-frame (enhanced) DICOM source are not supported yet; single-frame series only.")
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        origin = inverse @ np.append(np.asarray(ds.ImagePositionPatient, dtype=np.float64), 1.0)
        step_column = inverse[:, :3] @ (orientation[:3] * column_spacing)  # one column to the right
        step_row = inverse[:, :3] @ (orientation[3:] * row_spacing)  # one row down
        rows, columns = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        position = origin[:3, None, None] + step_column[:3, None, None] * columns + step_row[:3, None, None] * rows
        index = np.rint(position).astype(np.int64)
        off_grid = float(np.abs(position - index).max())
        if off_grid > _GRID_TOLERANCE:
            raise DatasetError(
                f"{name}: DICOM slice {ds.SOPInstanceUID} does not lie on the map's voxel grid "
                f"(off by up to {off_grid:.3f} voxel); was the map computed on this series?"
            )
        if (index < 0).any() or any((index[d] >= array.shape[d]).any() for d in range(3)):
            raise DatasetError(f"{name}: DICOM slice {ds.SOPInstanceUID} reaches outside the map of shape {array.shape}.")
        frames.append(array[index[0], index[1], index[2]])
        indices.append(index)
    return np.stack(frames), indices


def _algorithm(model_version: str, threshold: float) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=SOFTWARE_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=model_version,
        parameters={"threshold": f"{threshold:.6g}"} if math.isfinite(threshold) else None,
    )


def _derived_series(series_number: int, model_version: str) -> dict:
    """The new series' and instance's identity and this software as its maker, shared by SEG and map."""
    return dict(
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=SOFTWARE_NAME,
        manufacturer_model_name="Multi-AD teacher-student anomaly detector",
        software_versions=_software_version(),
        device_serial_number=model_version,
    )


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def anomaly_segmentation(
    source: Sequence[pydicom.Dataset], mask: np.ndarray, threshold: float, model_version: str, series_number: int = 901
) -> hd.seg.Segmentation:
    """A binary DICOM Segmentation, one segment ``anomaly``, of ``mask (N, Rows, Columns)`` on the ``source``
    slices (frame ``n`` on ``source[n]``), naming multiad-monai and ``model_version`` as its algorithm.

    Raises:
        NotImplementedError: highdicom before 0.23 (the last for pydicom 2) with NumPy 2, whose Segmentation
            code uses a NumPy name NumPy 2 removed (Parametric Maps are not affected).
    """
    if _major_minor(hd.__version__) < (0, 23) and _major_minor(np.__version__) >= (2, 0):
        raise NotImplementedError(
            f"highdicom {hd.__version__} cannot write a DICOM Segmentation with NumPy {np.__version__}: use highdicom "
            ">= 0.23 (with pydicom 3), or NumPy < 2."
        )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="anomaly",
        segmented_property_category=_ANOMALY_CATEGORY,
        segmented_property_type=_ANOMALY_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(model_version, threshold),
    )
    return hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=np.asarray(mask, dtype=np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        **_derived_series(series_number, model_version),
        content_description="anomaly mask",
        content_label="ANOMALY",
        series_description="multiad anomaly mask",
        omit_empty_frames=False,
    )


def anomaly_parametric_map(
    source: Sequence[pydicom.Dataset], anomaly_map: np.ndarray, threshold: float, model_version: str, series_number: int = 902
) -> hd.pm.ParametricMap:
    """A float DICOM Parametric Map of ``anomaly_map (N, Rows, Columns)`` on the ``source`` slices.

    Its Real World Value Mapping is the identity (stored value = anomaly score, unitless) and says what the
    values mean: 0 where the student reproduces the teacher's features (normal), flagged at or above the
    threshold. The display window spans 0 to twice the threshold (the map's range without one).
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if math.isfinite(threshold):
        explanation = f"anomaly score: 0 normal, >= {threshold:.4g} anomalous"
        center, width = float(threshold), max(2.0 * float(threshold), 1e-6)
    else:
        explanation = "anomaly score: 0 normal, higher more anomalous"
        center, width = (low + high) / 2.0, max(high - low, 1e-6)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation=explanation,
        unit=codes.UCUM.NoUnits,
        value_range=(min(low, 0.0), max(high, 0.0)),
        slope=1.0,
        intercept=0.0,
    )
    if "voi_lut_transformations" in inspect.signature(hd.pm.ParametricMap).parameters:
        explained = "0 to twice the threshold" if math.isfinite(threshold) else "value range"
        window = {"voi_lut_transformations": [hd.VOILUTTransformation(window_center=center, window_width=width, window_explanation=explained)]}
    else:  # highdicom < 0.23 (pydicom 2, MONAI Label's environment): a window without its explanation
        window = {"window_center": center, "window_width": width}
    parametric_map = hd.pm.ParametricMap(
        source_images=list(source),
        pixel_array=values,
        **_derived_series(series_number, model_version),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        **window,
        content_description="anomaly heatmap",
        content_label="ANOMALY_MAP",
        series_description="multiad anomaly heatmap",
    )
    # General Series' Laterality (type 2C) is not copied by highdicom; dciodvfy wants it present.
    parametric_map.Laterality = source[0].get("Laterality", "")
    return parametric_map


def heatmap_parametric_map(
    series: str, heatmap_path: str, threshold: float, model_version: str, series_number: int = 902
) -> hd.pm.ParametricMap:
    """The float heatmap file ``heatmap_path`` (NIfTI, computed on the DICOM series ``series``, e.g. from a
    conversion of it) as a Parametric Map of that series (:func:`anomaly_parametric_map`).

    Raises:
        DatasetError: naming the heatmap, when the series cannot be read or the map is not on its grid.
    """
    image = nib.load(heatmap_path)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    datasets = read_dicom_series(series)
    frames, _ = frames_on_series(volume, np.asarray(image.affine, dtype=np.float64), datasets, name=repr(heatmap_path))
    return anomaly_parametric_map(datasets, frames, threshold, model_version, series_number)


def _save(dataset: pydicom.Dataset, path: str) -> None:
    with atomic_path(path, suffix=".dcm") as tmp:
        save_dicom_file(dataset, tmp)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def write_dicom_outputs(
    output_dir: str,
    name: str,
    source: str,
    anomaly_map: torch.Tensor | np.ndarray,
    affine: np.ndarray,
    threshold: float,
    slice_scores: Sequence[float] | np.ndarray,
    volume_score: float,
    model_version: str = "unknown",
    slice_axis: int = 2,
    extra: dict | None = None,
) -> dict[str, str]:
    """Write ``<name>_seg.dcm``, ``<name>_anomaly_map.dcm`` and ``<name>_dicom.json`` for one DICOM series.

    Args:
        output_dir: folder of the files (created if needed).
        name: case name, the file prefix.
        source: the DICOM series folder (or file) the map was computed on.
        anomaly_map: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` float map, on the series' voxel grid in any axis order.
        affine: the map's voxel-to-RAS affine (``MetaTensor.affine``).
        threshold: the network's pixel threshold; NaN: no SEG (nothing to threshold), the map only.
        slice_scores: per-slice scores ``(N,)`` along ``slice_axis`` of the map; volume_score: their maximum.
        model_version: the model's version, recorded as the algorithm version.
        extra: more JSON entries (e.g. the normalised score).

    Every file is written atomically and the JSON last, so its presence means the set is complete; a SEG
    left from an earlier run with a threshold is removed when this run has none.

    Returns:
        kind (``"seg"``, ``"parametric_map"``, ``"json"``) -> path of each file written.

    Raises:
        DatasetError: naming the series, when it cannot be read or the map is not on its grid.
        NotImplementedError: a multi-frame (enhanced) DICOM source.
    """
    if not name or name != os.path.basename(name):
        raise ValueError(f"name must be a plain file name prefix, got {name!r}.")
    array = np.asarray(anomaly_map.detach().cpu() if isinstance(anomaly_map, torch.Tensor) else anomaly_map, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"anomaly_map must be (1, X, Y, Z) or (X, Y, Z), got shape {array.shape}.")
    datasets = read_dicom_series(source)
    frames, indices = frames_on_series(array, np.asarray(affine, dtype=np.float64), datasets, name=repr(source))
    threshold = float(threshold)
    paths = {
        "seg": os.path.join(output_dir, f"{name}_seg.dcm"),
        "parametric_map": os.path.join(output_dir, f"{name}_anomaly_map.dcm"),
        "json": os.path.join(output_dir, f"{name}_dicom.json"),
    }
    os.makedirs(output_dir, exist_ok=True)
    written = {}
    parametric_map = anomaly_parametric_map(datasets, frames, threshold, model_version)
    segmentation = None
    if math.isfinite(threshold):
        segmentation = anomaly_segmentation(datasets, frames >= threshold, threshold, model_version)
    # build both before writing either, so that a failure leaves no half set
    _save(parametric_map, paths["parametric_map"])
    written["parametric_map"] = paths["parametric_map"]
    if segmentation is not None:
        _save(segmentation, paths["seg"])
        written["seg"] = paths["seg"]
    elif os.path.exists(paths["seg"]):
        os.remove(paths["seg"])  # a SEG from an earlier threshold would contradict this run
    scores = np.asarray(slice_scores, dtype=np.float64).ravel()
    by_instance = []
    for ds, index in zip(datasets, indices):
        along = np.unique(index[slice_axis])
        if along.size != 1 or along[0] >= scores.size:  # the DICOM slices cut across the scored slices
            by_instance = None
            break
        by_instance.append({"sop_instance_uid": str(ds.SOPInstanceUID), "instance_number": ds.get("InstanceNumber"), "score": _finite_or_none(scores[along[0]])})
    report = {
        "name": name,
        "source_series": str(source),
        "study_instance_uid": str(datasets[0].StudyInstanceUID),
        "source_series_instance_uid": str(datasets[0].SeriesInstanceUID),
        "frame_of_reference_uid": str(datasets[0].get("FrameOfReferenceUID", "")),
        "volume_score": _finite_or_none(volume_score),
        "threshold": _finite_or_none(threshold),
        "anomalous": None if math.isnan(threshold) else bool(volume_score >= threshold),
        "model_version": model_version,
        "value_meaning": (
            "parametric map values are the anomaly score (unitless, 1 - cosine similarity of teacher and student "
            "features, fused over scales and smoothed): 0 where the student reproduces the teacher (normal), "
            "larger is more anomalous; voxels at or above the threshold form the SEG's 'anomaly' segment"
        ),
        **(extra or {}),
        "slice_scores": [_finite_or_none(s) for s in scores],
        "slice_scores_by_instance": by_instance,
        "objects": {
            kind: {
                "file": os.path.basename(paths[kind]),
                "sop_instance_uid": str(obj.SOPInstanceUID),
                "series_instance_uid": str(obj.SeriesInstanceUID),
                "sop_class_uid": str(obj.SOPClassUID),
            }
            for kind, obj in (("seg", segmentation), ("parametric_map", parametric_map))
            if obj is not None
        },
    }
    if segmentation is None:
        report["note"] = "no SEG: the network has no threshold (estimate it on normal validation data)."
    from multiad_monai.handlers.writers import atomic_write_text  # handlers import the engines: import late

    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    written["json"] = paths["json"]
    return written
