"""Writing a volume as a DICOM MR/CT image series, and reading a series back as sorted datasets.

Used to turn the generated phantoms (and NIfTI test volumes) into the DICOM series a PACS would hold, with
the volume's real geometry (position, orientation, spacing), so that DICOM inputs and outputs are tested
without any download; and to read the source series that DICOM outputs reference.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from multiad_monai.data.errors import DatasetError

__all__ = ["write_dicom_series", "read_dicom_series", "is_dicom_source", "save_dicom_file", "RAS_TO_LPS"]

# MONAI and NIfTI affines map voxels to RAS millimetres; DICOM patient coordinates are LPS.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

_STORAGE = {"MR": pydicom.uid.MRImageStorage, "CT": pydicom.uid.CTImageStorage}


def save_dicom_file(dataset: pydicom.Dataset, path: str) -> None:
    """Write ``dataset`` as a DICOM file with preamble and file meta, under pydicom 3 (the main environment) and
    pydicom 2 (MONAI Label's environment pins ``pydicom<3``, where ``save_as`` has no ``enforce_file_format``)."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.save_as(path, write_like_original=False)


def _shared_attributes(
    modality: str, patient_id: str, patient_name: str, study_uid: str, series_uid: str, frame_of_reference_uid: str,
    series_description: str,
) -> pydicom.Dataset:
    """The attributes every slice of a generated series shares (patient, study, series, equipment, pixels)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = _STORAGE[modality]
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "multiad-monai test study"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.Laterality = ""
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "multiad-monai"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = None
        ds.EchoTrainLength = None
        ds.RepetitionTime = None
    else:
        ds.KVP = None
        ds.AcquisitionNumber = None
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    return ds


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: str,
    modality: str = "MR",
    patient_id: str = "MULTIAD-TEST",
    patient_name: str = "Phantom^Test",
    series_description: str = "generated volume",
    study_uid: str | None = None,
) -> list[str]:
    """Write ``volume (X, Y, Z)`` with its voxel-to-RAS ``affine`` as one DICOM file per slice ``k`` in ``folder``.

    Voxel ``(i, j, k)`` becomes column ``i``, row ``j`` of slice ``k`` (``IM0000.dcm``, ...); Image Position /
    Orientation (Patient), Pixel Spacing and Slice Thickness come from the affine (converted to DICOM's LPS),
    so that a DICOM reader puts every voxel where the NIfTI puts it. Values are rounded to 16-bit integers
    (unsigned when none is negative). The folder must not exist: it is written under a temporary name and
    renamed, so a failed write leaves nothing.

    Returns:
        the written file paths, in slice order.

    Raises:
        ValueError: not a 3D volume, a sheared affine (slice axis not normal to the slices), values out of
            16-bit range, an unknown modality, or an existing ``folder``.
    """
    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"volume must be (X, Y, Z), got shape {array.shape}.")
    if modality not in _STORAGE:
        raise ValueError(f"modality must be one of {sorted(_STORAGE)}, got {modality!r}.")
    if os.path.exists(folder):
        raise ValueError(f"{folder!r} exists already; the series is written to a new folder.")
    lps = RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cosine, column_cosine = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    normal = np.cross(row_cosine, column_cosine)
    if abs(abs(float(np.dot(normal, lps[:3, 2] / spacing[2]))) - 1.0) > 1e-4 or abs(float(np.dot(row_cosine, column_cosine))) > 1e-4:
        raise ValueError("the affine is sheared: its slice axis is not normal to its slices; DICOM slices cannot hold it.")
    rounded = np.rint(array)
    signed = bool(rounded.min() < 0)
    low, high = (-32768, 32767) if signed else (0, 65535)
    if rounded.min() < low or rounded.max() > high:
        raise ValueError(f"volume values {rounded.min()}..{rounded.max()} do not fit 16-bit integers.")
    pixels = rounded.astype(np.int16 if signed else np.uint16)
    study_uid = study_uid or generate_uid()
    shared = _shared_attributes(
        modality, patient_id, patient_name, study_uid, generate_uid(), generate_uid(), series_description
    )
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".series-", dir=parent)
    try:
        paths = []
        for k in range(array.shape[2]):
            ds = pydicom.Dataset()
            ds.update(shared)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [round(float(v), 6) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
            ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_cosine, *column_cosine)]
            ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # row, column spacing
            ds.SliceThickness = round(float(spacing[2]), 6)
            ds.Rows, ds.Columns = array.shape[1], array.shape[0]
            ds.PixelRepresentation = int(signed)
            ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.file_meta = meta
            name = f"IM{k:04d}.dcm"
            save_dicom_file(ds, os.path.join(staging, name))
            paths.append(os.path.join(folder, name))
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return paths


def read_dicom_series(path: str, stop_before_pixels: bool = True) -> list[pydicom.Dataset]:
    """The image datasets of one DICOM series (a folder, or one file), sorted along the slice normal.

    Files that are not DICOM images (READMEs, DICOMDIR, reports) and segmentations or parametric maps are
    left out; several series in one folder are refused.

    Raises:
        DatasetError: naming ``path``, when it holds no DICOM image, several series, or slices without
            position and orientation.
    """
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in sorted(os.listdir(path))]
    datasets = []
    for file in files:
        if os.path.basename(file).startswith(".") or not os.path.isfile(file):
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=stop_before_pixels)
        except Exception:  # pydicom raises many types for non-DICOM files
            continue
        derived = str(ds.get("SOPClassUID", "")) in (pydicom.uid.SegmentationStorage, pydicom.uid.ParametricMapStorage)
        if "Rows" in ds and "SeriesInstanceUID" in ds and not derived:
            datasets.append(ds)
    if not datasets:
        raise DatasetError(f"{path!r} holds no DICOM image files.")
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) > 1:
        raise DatasetError(f"{path!r} holds {len(series)} DICOM series ({', '.join(sorted(series))}), expected one.")
    if len(datasets) == 1:
        return datasets
    if not all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        raise DatasetError(f"DICOM series {path!r}: slices without ImagePositionPatient/ImageOrientationPatient.")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))))


def _is_dicom_file(path: str) -> bool:
    """DICOM part-10 files carry "DICM" after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_source(path: str) -> bool:
    """Whether ``path`` is a DICOM file or a folder holding DICOM files (a series)."""
    if os.path.isfile(path):
        return _is_dicom_file(path)
    if os.path.isdir(path):
        return any(_is_dicom_file(os.path.join(path, n)) for n in sorted(os.listdir(path)) if not n.startswith("."))
    return False
