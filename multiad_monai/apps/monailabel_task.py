"""A MONAI Label infer task that runs a Multi-AD bundle's ``inference.json`` on one study.

Needs ``monailabel`` (its own environment, see the app in ``apps/monailabel``). The bundle stays the single
source of truth: the task reads the bundle's configs as MONAI Label's ``monaibundle`` app does, sets
``input_path`` to the requested image and ``inference_dir`` to a temporary folder, and runs the
inference workflow. The network is built and its checkpoint read once per server and device
(:class:`~multiad_monai.apps.bundle_session.BundleInferenceSession`), not per request; the request's
``device`` is honoured and its ``threshold`` (an option in the viewer's panel, default the saved one)
sets the mask. The label returned is the thresholded anomaly mask (NIfTI on the study's own voxel
grid for volumes, PNG of the image's size for 2D images); the result JSON holds the scores, the threshold,
the normalised score and the path of the heatmap (the float NIfTI map of a volume, the overlay PNG of an
image), kept for the reader.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from typing import Any

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from PIL import Image

from multiad_monai.apps.bundle_session import BundleInferenceSession
from multiad_monai.apps.cli import bundle_configs, defines_key, root_cause
from multiad_monai.data.errors import DatasetError
from multiad_monai.data.mvtec import IMAGE_EXTENSIONS
from multiad_monai.data.nifti_io import save_nifti

__all__ = ["MultiADInferTask", "store_heatmap_in_dicomweb"]


def _saved_threshold(ckpt_path: str) -> float:
    """The anomaly threshold saved in a training checkpoint; an error naming the file when there is none."""
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Multi-AD model {ckpt_path!r} cannot be read ({error})") from error
    state = state.get("network", state) if isinstance(state, dict) else state
    threshold = float(state["threshold"]) if isinstance(state, dict) and "threshold" in state else float("nan")
    if not np.isfinite(threshold):
        raise ValueError(
            f"Multi-AD model {ckpt_path!r} has no saved anomaly threshold (no validation ran in training), so no "
            "mask can be made: train with validation (val_interval <= num_epochs)."
        )
    return threshold


def _request_device(request: dict) -> str | None:
    """The request's ``device`` as MONAI Label names it (``cuda`` falls back to the CPU when there is no GPU);
    None when the request gives none (the bundle's default device)."""
    from monailabel.utils.others.generic import name_to_device

    device = request.get("device")
    return name_to_device(device) if device else None


def _request_threshold(request: dict, saved: float) -> float:
    """The request's ``threshold`` option as a float, ``saved`` when it gives none; HTTP 422 when not a number."""
    value = request.get("threshold")
    if value is None or value == "":
        return saved
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not np.isfinite(threshold):
        raise HTTPException(status_code=422, detail=f"threshold must be a finite number, got {value!r}")
    return threshold


def _threshold_volume_map(map_path: str, threshold: float, label_path: str) -> None:
    """Writes the mask ``map >= threshold`` (uint8) of a float NIfTI map to ``label_path``, on the map's grid."""
    heatmap = nib.load(map_path)
    mask = (np.asarray(heatmap.dataobj, dtype=np.float32) >= threshold).astype(np.uint8)
    image = nib.Nifti1Image(mask, heatmap.affine, heatmap.header)
    image.set_data_dtype(np.uint8)
    save_nifti(image, label_path)


def _cached_series_folder(datastore: Any, series_uid: str) -> str:
    """The folder of DICOM files MONAI Label's DICOMweb datastore downloaded for ``series_uid``: its image URI when
    it serves DICOM folders, else the folder beside the NIfTI it converted them to (MONAI Label's cache layout)."""
    uri = datastore.get_image_uri(series_uid)
    return uri if os.path.isdir(uri) else os.path.join(os.path.dirname(uri), series_uid)


def store_heatmap_in_dicomweb(
    datastore: Any, series_uid: str, heatmap_path: str, threshold: float, model_version: str
) -> dict[str, str]:
    """Store the float heatmap of a study served by MONAI Label's ``DICOMWebDatastore`` in that DICOMweb server,
    as a DICOM Parametric Map of the series ``series_uid``
    (:func:`~multiad_monai.data.dicom_outputs.heatmap_parametric_map`), so a PACS viewer shows it beside the study.

    Needs highdicom (in MONAI Label's environment, pydicom 2: highdicom 0.22). Returns the stored object's
    ``study_instance_uid``, ``series_instance_uid`` and ``sop_instance_uid``.
    """
    from monailabel.datastore.utils.dicom import dicom_web_upload_dcm

    from multiad_monai.data.dicom_outputs import heatmap_parametric_map
    from multiad_monai.data.dicom_series import save_dicom_file

    parametric_map = heatmap_parametric_map(_cached_series_folder(datastore, series_uid), heatmap_path, threshold, model_version)
    with tempfile.TemporaryDirectory(prefix="multiad_pm_") as folder:
        path = os.path.join(folder, "anomaly_map.dcm")
        save_dicom_file(parametric_map, path)
        # the datastore's own client: it carries the server's address and credentials
        dicom_web_upload_dcm(path, datastore._client)
    return {
        "study_instance_uid": str(parametric_map.StudyInstanceUID),
        "series_instance_uid": str(parametric_map.SeriesInstanceUID),
        "sop_instance_uid": str(parametric_map.SOPInstanceUID),
    }


class MultiADInferTask(InferTask):
    """Anomaly map and mask of one study through a bundle's inference workflow.

    A volumetric bundle (its inference config has ``input_path``, e.g. ``multiad_medical``) takes volumes and
    returns a NIfTI mask on the study's own voxel grid. A 2D bundle (``multiad_2d``) takes a 2D image and returns a
    PNG mask (0/1) of the image's size; a volume sent to it is refused with HTTP 422 (slicing needs a
    volumetric bundle).

    The network is built and loaded when the task is made (the server's start) and reused by every request
    (one per device). Request options: ``device`` (``cpu``, ``cuda``, ``cuda:1``; default the bundle's) and
    ``threshold`` (the mask is the map at or above it; default the model's saved threshold, which
    :meth:`config` offers to the viewer's panel). The result JSON gives the ``threshold`` used, the
    ``saved_threshold`` and ``network_builds`` (how many times this server built the network).

    Args:
        bundle_root: the bundle folder.
        ckpt_path: the trained ``model.pt``.
        overrides: extra config files of the bundle (e.g. ``["liver_ct.json"]``).
        settings: more config keys (e.g. ``{"image_size": 256}``), as on the ``multiad`` command line.
        heatmap_dir: where the float anomaly maps are kept for the reader; default a folder beside the model.
        runtime: ``"auto"`` (onnxruntime on the CPU where the ``onnx`` extra is installed, else PyTorch),
            ``"torch"`` or ``"onnx"``; an ONNX export is made once per model and kept in a cache
            (:class:`~multiad_monai.apps.bundle_session.BundleInferenceSession`).
    """

    def __init__(
        self,
        bundle_root: str,
        ckpt_path: str,
        overrides: list[str] | None = None,
        settings: dict[str, Any] | None = None,
        heatmap_dir: str | None = None,
        runtime: str = "auto",
    ) -> None:
        self.bundle_root = os.path.abspath(bundle_root)
        parser = ConfigParser()
        parser.read_config(bundle_configs(self.bundle_root, "inferring", overrides))
        self.volumetric = defines_key(parser, "input_path")
        metadata = ConfigParser.load_config_file(os.path.join(self.bundle_root, "configs", "metadata.json"))
        self.model_version = str(metadata["version"])  # the algorithm version of the DICOM objects written
        self.ckpt_path = os.path.abspath(ckpt_path)
        if not os.path.isfile(self.ckpt_path):
            raise FileNotFoundError(f"Multi-AD model not found: {self.ckpt_path!r} (--conf model PATH/model.pt)")
        self.threshold = _saved_threshold(self.ckpt_path)
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            dimension=3 if self.volumetric else 2,
            description="Multi-AD unsupervised anomaly map; label = region at or above the threshold (default: the saved one)",
            config={"threshold": self.threshold},
        )
        self.overrides = list(overrides or [])
        self.settings = dict(settings or {})
        self.heatmap_dir = heatmap_dir or os.path.join(os.path.dirname(self.ckpt_path), "monailabel_heatmaps")
        self.session = BundleInferenceSession(self.bundle_root, self.ckpt_path, self.overrides, self.settings, runtime)
        self.session.network()  # built and loaded once, at the server's start

    def is_valid(self) -> bool:
        return os.path.isfile(self.ckpt_path)

    def config(self) -> dict[str, Any]:
        """The options of the viewer's panel: ``threshold``, the loaded model's saved one."""
        return {**super().config(), "threshold": float(self.session.network().threshold)}

    def _run(self, work_dir: str, device: str | None, **inputs: str) -> None:
        try:
            self.session.run(device, **inputs, inference_dir=work_dir, output_dir=work_dir)
        except Exception as error:  # one clear message back to the client; the server stays up
            cause = root_cause(error)
            status = 422 if isinstance(cause, DatasetError) else 500  # 422: the study cannot be used as given
            raise HTTPException(status_code=status, detail=f"{type(cause).__name__}: {cause}") from error

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        image = request.get("image")
        if not isinstance(image, str) or not os.path.exists(image):
            raise HTTPException(status_code=404, detail=f"study image not found: {image!r}")
        device = _request_device(request)
        try:
            self.session.device(device)
        except (RuntimeError, TypeError, ValueError) as error:
            raise HTTPException(status_code=422, detail=f"device {request.get('device')!r} cannot be used: {error}") from error
        # the saved threshold of the model loaded now (a model.pt replaced on disk is reloaded)
        saved = float(self.session.network(device).threshold)
        threshold = _request_threshold(request, saved)
        work_dir = tempfile.mkdtemp(prefix="multiad_")
        try:
            if self.volumetric:
                label, result = self._volume(image, work_dir, device, threshold, saved)
            else:
                label, result = self._image(image, work_dir, device, threshold, saved)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        result.update(threshold=threshold, saved_threshold=saved, network_builds=self.session.builds)
        return label, result

    def _volume(
        self, image: str, work_dir: str, device: str | None, threshold: float, saved: float
    ) -> tuple[str | None, dict]:
        self._run(work_dir, device, input_path=image)
        scores_files = [f for f in os.listdir(work_dir) if f.endswith("_scores.json")]
        if len(scores_files) != 1:
            raise HTTPException(status_code=500, detail=f"inference of {image!r} wrote {len(scores_files)} results")
        with open(os.path.join(work_dir, scores_files[0])) as f:
            result = json.load(f)
        result["heatmap"] = self._keep_heatmap(os.path.join(work_dir, result["files"]["map"]))
        if "mask" not in result["files"]:
            return None, result
        # MONAI Label deletes the returned label file once it is sent
        label = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        if threshold == saved:  # the bundle's mask is at the saved threshold
            shutil.move(os.path.join(work_dir, result["files"]["mask"]), label)
        else:
            _threshold_volume_map(result["heatmap"], threshold, label)
            if result.get("volume_score") is not None:
                result["anomalous"] = bool(result["volume_score"] >= threshold)
        return label, result

    def _image(
        self, image: str, work_dir: str, device: str | None, threshold: float, saved: float
    ) -> tuple[str | None, dict]:
        if os.path.isdir(image) or not image.lower().endswith(IMAGE_EXTENSIONS):
            raise HTTPException(
                status_code=422,
                detail=f"{image!r} is not a 2D image: this model takes images; volumes need a volumetric bundle "
                "(multiad_medical), which cuts them into slices",
            )
        input_dir = os.path.join(work_dir, "input")
        os.makedirs(input_dir)
        shutil.copy(image, input_dir)
        self._run(work_dir, device, input_dir=input_dir)
        with open(os.path.join(work_dir, "scores.csv")) as f:
            row = next(csv.DictReader(f))
        name = os.path.splitext(os.path.basename(image))[0]
        anomaly_map = np.load(os.path.join(work_dir, "maps", f"{name}_map.npy"))
        with Image.open(image) as original:
            size = original.size
        # the map is at the network's size: back to the image's, so the label overlays the study
        full_map = np.asarray(Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
        heatmap = self._keep_heatmap(os.path.join(work_dir, "maps", f"{name}.png"))
        result = {
            "name": name,
            "score": float(row["score"]),
            "normalized_score": float(row["normalized_score"]),
            "anomalous": row["prediction"] == "1" if threshold == saved else float(row["score"]) >= threshold,
            "heatmap": heatmap,
        }
        label = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        Image.fromarray((full_map >= threshold).astype(np.uint8)).save(label)
        return label, result

    def _keep_heatmap(self, path: str) -> str:
        os.makedirs(self.heatmap_dir, exist_ok=True)
        kept = os.path.join(self.heatmap_dir, os.path.basename(path))
        shutil.move(path, kept)
        return kept
