"""Reading studies from a DICOMweb server (QIDO-RS, WADO-RS) and storing results back (STOW-RS).

A study or series URL (``http://host:8042/dicom-web/studies/<StudyUID>[/series/<SeriesUID>]``) is
downloaded as one folder per image series; each folder records where it came from in ``.dicomweb.json``
(a dot file, which the DICOM readers skip), so that the DICOM outputs made from it can be stored back to
the same server (:class:`~multiad_monai.handlers.DicomOutputWriter`). Uses ``dicomweb-client``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence

import pydicom

from multiad_monai.data.dicom_series import save_dicom_file
from multiad_monai.data.errors import DatasetError, first_line

__all__ = ["is_dicomweb_url", "parse_dicomweb_url", "retrieve_dicomweb_series", "store_dicomweb_instances", "dicomweb_origin", "ORIGIN_FILE"]

ORIGIN_FILE = ".dicomweb.json"
_URL = re.compile(r"^(?P<base>https?://.+?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$")
# Derived objects that are not images to run on: SEG, parametric maps, SR / key objects, presentation
# states, RT structures, raw data.
_NOT_IMAGES = (
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.",
)


def is_dicomweb_url(path: str | None) -> bool:
    """Whether ``path`` is an http(s) URL rather than a local path."""
    return bool(path) and str(path).lower().startswith(("http://", "https://"))


def parse_dicomweb_url(url: str) -> tuple[str, str, str | None]:
    """``(service base URL, StudyInstanceUID, SeriesInstanceUID or None)`` of a study or series URL.

    Raises:
        DatasetError: a URL without ``/studies/<uid>``.
    """
    match = _URL.match(str(url).strip())
    if match is None:
        raise DatasetError(
            f"{url!r} is not a DICOMweb study or series URL; expected "
            "http://HOST:PORT/dicom-web/studies/<StudyInstanceUID>[/series/<SeriesInstanceUID>]."
        )
    return match["base"], match["study"], match["series"]


def _client(base_url: str):
    from dicomweb_client.api import DICOMwebClient  # optional dependency: only for DICOMweb inputs

    client = DICOMwebClient(base_url)
    # a few quick retries for a busy server; the default backs off for 30 s before reporting a wrong URL
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return client


def _value(entry: dict, tag: str):
    values = entry.get(tag, {}).get("Value", [None])
    return values[0] if values else None


def retrieve_dicomweb_series(url: str, folder: str) -> list[str]:
    """Download the image series of a study (or the one series) at ``url`` into ``folder/<SeriesUID>/``.

    Segmentations, parametric maps, reports and other non-image series of the study are left out. Each
    series is written to a temporary folder and renamed into place, replacing an earlier download of it.

    Returns:
        the series folders, in the server's order.

    Raises:
        DatasetError: naming the URL, when the server cannot be reached or answers with an error, or the
            study holds no image series.
    """
    base, study, only_series = parse_dicomweb_url(url)
    client = _client(base)
    try:
        if only_series:
            series_uids = [only_series]
        else:
            series_uids = []
            for entry in client.search_for_series(study_instance_uid=study):
                uid = _value(entry, "0020000E")
                first = client.search_for_instances(study_instance_uid=study, series_instance_uid=uid, limit=1)
                sop_class = str(_value(first[0], "00080016") or "") if first else ""
                if sop_class and not sop_class.startswith(_NOT_IMAGES):
                    series_uids.append(uid)
        if not series_uids:
            raise DatasetError(f"DICOMweb study {url!r} holds no image series.")
        os.makedirs(folder, exist_ok=True)
        folders = []
        for uid in series_uids:
            datasets = client.retrieve_series(study, uid)
            if not datasets:
                raise DatasetError(f"DICOMweb series {uid} of {url!r} has no instances.")
            target = os.path.join(folder, uid)
            staging = tempfile.mkdtemp(prefix=".series-", dir=folder)
            try:
                for ds in datasets:
                    save_dicom_file(ds, os.path.join(staging, f"{ds.SOPInstanceUID}.dcm"))
                with open(os.path.join(staging, ORIGIN_FILE), "w") as f:
                    json.dump({"base_url": base, "study_instance_uid": study, "series_instance_uid": uid}, f, indent=2)
                if os.path.isdir(target):
                    shutil.rmtree(target)  # an earlier download of the same series: inputs, not results
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            folders.append(target)
    except DatasetError:
        raise
    except Exception as error:  # requests' connection and HTTP errors, malformed answers
        raise DatasetError(f"cannot read DICOMweb {url!r}: {type(error).__name__}: {first_line(error)}") from error
    return folders


def dicomweb_origin(series_folder: str) -> dict | None:
    """Where a series folder was downloaded from (``base_url``, study and series UIDs), or None."""
    path = os.path.join(series_folder, ORIGIN_FILE) if os.path.isdir(series_folder) else ""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def store_dicomweb_instances(base_url: str, paths: Sequence[str]) -> list[str]:
    """Store DICOM files on a DICOMweb server (STOW-RS); return the SOP Instance UIDs it accepted.

    Raises:
        DatasetError: naming the server, when it cannot be reached or refuses any instance.
    """
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = _client(base_url).store_instances(datasets)
    except Exception as error:
        raise DatasetError(f"cannot store {len(paths)} DICOM object(s) on {base_url!r}: {type(error).__name__}: {first_line(error)}") from error
    failed = response.get("FailedSOPSequence", [])
    if failed:
        reasons = "; ".join(f"{item.ReferencedSOPInstanceUID}: failure reason {item.get('FailureReason')}" for item in failed)
        raise DatasetError(f"{base_url!r} refused {len(failed)} of {len(paths)} DICOM object(s): {reasons}")
    return [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
