"""A MONAI Label infer task that runs a Multi-AD bundle's ``inference.json`` on one study.

Needs ``monailabel`` (its own environment, see the app in ``apps/monailabel``). The bundle stays the single
source of truth: the task reads the bundle's configs as MONAI Label's ``monaibundle`` app does, sets
``input_path`` to the requested image and ``inference_dir`` to a temporary folder, and runs the
``inferring`` workflow. The label returned is the thresholded anomaly mask (NIfTI, on the study's grid
in RAS); the result JSON holds the volume and per-slice scores, the threshold, the normalised score,
and the path of the float anomaly map (heatmap) written beside the mask.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from fastapi import HTTPException
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from multiad_monai.apps.cli import _defines, bundle_configs, root_cause, run_bundle
from multiad_monai.data.errors import DatasetError

__all__ = ["MultiADInferTask"]


class MultiADInferTask(InferTask):
    """Anomaly map and mask of one volume (or 2D image) through a bundle's inference workflow.

    Args:
        bundle_root: the bundle folder (``bundles/multiad_medical`` for volumes).
        ckpt_path: the trained ``model.pt``.
        overrides: extra config files of the bundle (e.g. ``["liver_ct.json"]``).
        settings: more config keys (e.g. ``{"image_size": 256}``), as on the ``multiad`` command line.
        heatmap_dir: where the float anomaly maps are kept for the reader; default a folder beside the model.
    """

    def __init__(
        self,
        bundle_root: str,
        ckpt_path: str,
        overrides: list[str] | None = None,
        settings: dict[str, Any] | None = None,
        heatmap_dir: str | None = None,
    ) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels={"anomaly": 1},
            dimension=3,
            description="Multi-AD unsupervised anomaly map; label = region at or above the saved threshold",
        )
        self.bundle_root = os.path.abspath(bundle_root)
        self.ckpt_path = os.path.abspath(ckpt_path)
        self.overrides = list(overrides or [])
        self.settings = dict(settings or {})
        self.heatmap_dir = heatmap_dir or os.path.join(os.path.dirname(self.ckpt_path), "monailabel_heatmaps")
        parser = ConfigParser()
        parser.read_config(bundle_configs(self.bundle_root, "inferring", self.overrides))
        if not _defines(parser, "input_path"):
            raise ValueError(
                f"{self.bundle_root} has no volumetric inference (no 'input_path' in its inference config): the app "
                "serves volume bundles such as multiad_medical; run 2D images with `multiad infer`."
            )

    def is_valid(self) -> bool:
        return os.path.isfile(self.ckpt_path)

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        image = request.get("image")
        if not isinstance(image, str) or not os.path.exists(image):
            raise HTTPException(status_code=404, detail=f"study image not found: {image!r}")
        work_dir = tempfile.mkdtemp(prefix="multiad_")
        try:
            run_bundle(
                self.bundle_root,
                "inferring",
                self.overrides,
                **self.settings,
                ckpt_path=self.ckpt_path,
                input_path=image,
                inference_dir=work_dir,
                output_dir=work_dir,
            )
        except Exception as error:  # one clear message back to the client; the server stays up
            shutil.rmtree(work_dir, ignore_errors=True)
            cause = root_cause(error)
            status = 422 if isinstance(cause, DatasetError) else 500  # 422: the study cannot be used as given
            raise HTTPException(status_code=status, detail=f"{type(cause).__name__}: {cause}") from error
        scores_files = [f for f in os.listdir(work_dir) if f.endswith("_scores.json")]
        if len(scores_files) != 1:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise HTTPException(status_code=500, detail=f"inference of {image!r} wrote {len(scores_files)} results")
        with open(os.path.join(work_dir, scores_files[0])) as f:
            result = json.load(f)
        mask = os.path.join(work_dir, result["files"].get("mask", "")) if "mask" in result["files"] else None
        os.makedirs(self.heatmap_dir, exist_ok=True)
        heatmap = os.path.join(self.heatmap_dir, result["files"]["map"])
        shutil.move(os.path.join(work_dir, result["files"]["map"]), heatmap)
        result["heatmap"] = heatmap
        if mask is None:
            return None, result
        # MONAI Label deletes the returned label file once it is sent
        label = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        shutil.move(mask, label)
        shutil.rmtree(work_dir, ignore_errors=True)
        return label, result
