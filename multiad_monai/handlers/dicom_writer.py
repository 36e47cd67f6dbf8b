"""For each volume read from a DICOM series: the anomaly mask as DICOM SEG and the heatmap as a Parametric Map."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from multiad_monai.data.cases import volume_stem
from multiad_monai.data.dicom_series import is_dicom_source
from multiad_monai.data.dicomweb import dicomweb_origin, store_dicomweb_instances
from multiad_monai.handlers.writers import atomic_write_text, normalized_score

__all__ = ["DicomOutputWriter"]

logger = logging.getLogger(__name__)


class DicomOutputWriter:
    """Per volume of a ``VolumeAnomalyEvaluator`` whose source is a DICOM series (a folder of slices or a
    ``.dcm`` file): ``<name>_seg.dcm`` (binary Segmentation, segment ``anomaly``, at the saved threshold),
    ``<name>_anomaly_map.dcm`` (float Parametric Map) and ``<name>_dicom.json`` (scores, threshold,
    normalised score, UIDs) via :func:`~multiad_monai.data.dicom_outputs.write_dicom_outputs`. Volumes read
    from NIfTI/MHA/NRRD files are left to :class:`VolumeOutputWriter`.

    Args:
        output_dir: folder of the outputs.
        network: the network, for its ``threshold`` and ``score_scale`` buffers.
        model_version: recorded as the algorithm version in both objects (the bundle's ``version``).
        axis: the slice axis of the per-slice scores (as the evaluator's).
        store_to_origin: store the SEG and the map back (STOW-RS) on the DICOMweb server a series was
            downloaded from (:func:`~multiad_monai.data.dicomweb.retrieve_dicomweb_series`); the JSON then
            records the server and the stored UIDs.
    """

    def __init__(
        self,
        output_dir: str,
        network: torch.nn.Module,
        model_version: str = "unknown",
        axis: int = 2,
        store_to_origin: bool = True,
    ) -> None:
        self.store_to_origin = store_to_origin
        self.output_dir = output_dir
        self.network = network
        self.model_version = str(model_version)
        self.axis = axis

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_volume)

    def _write_volume(self, engine: Engine) -> None:
        output = engine.state.output
        source = str(output.get("source", ""))
        if not source or not is_dicom_source(source):
            return
        try:
            from multiad_monai.data.dicom_outputs import write_dicom_outputs  # needs highdicom: only for DICOM inputs
        except ImportError as error:
            raise ImportError(
                f"{source} is a DICOM series; writing its SEG and parametric map needs highdicom "
                f"(pip install 'multiad-monai[dicom]'): {error}"
            ) from error
        anomaly_map = output["anomaly_map"]
        if not isinstance(anomaly_map, MetaTensor):
            raise ValueError(f"{source}: the anomaly map carries no affine; DICOM outputs need the series geometry.")
        threshold = float(output["threshold"])
        score = float(output["score"].reshape(-1)[0])
        normalized = normalized_score(score, threshold, float(getattr(self.network, "score_scale", float("nan"))))
        try:
            written = write_dicom_outputs(
                self.output_dir,
                volume_stem(str(output["name"])),
                source,
                anomaly_map,
                np.asarray(anomaly_map.affine, dtype=np.float64),
                threshold,
                output["slice_scores"].numpy(),
                score,
                model_version=self.model_version,
                slice_axis=self.axis,
                extra={
                    "normalized_score": normalized if math.isfinite(normalized) else None,
                    "normalized_score_meaning": "sigmoid((volume_score - threshold) / score_scale): 0.5 at the threshold",
                },
            )
        except NotImplementedError as error:  # e.g. an enhanced multi-frame source: the NIfTI outputs still serve
            logger.warning("no DICOM outputs: %s", error)
            return
        origin = dicomweb_origin(source) if self.store_to_origin else None
        if origin is not None:  # downloaded from a DICOMweb server: the results go back to it
            objects = [written[kind] for kind in ("seg", "parametric_map") if kind in written]
            stored = store_dicomweb_instances(origin["base_url"], objects)
            with open(written["json"]) as f:
                report = json.load(f)
            report["stored_to"] = {"dicomweb": origin["base_url"], "sop_instance_uids": stored}
            atomic_write_text(written["json"], json.dumps(report, indent=2) + "\n")
