"""MONAI Label app: Multi-AD anomaly maps for the studies of a datastore.

    monailabel start_server --app apps/monailabel --studies /data/studies \
        --conf model runs/brain/model.pt [--conf bundle multiad_medical] [--conf overrides liver_ct.json] \
        [--conf settings '{"image_size":256}'] [--conf runtime onnx]

(``settings`` without spaces: the ``monailabel`` launcher splits its arguments on them.)

The infer task ``multiad`` runs the bundle's ``inference.json`` (the bundle is the single source of
truth) and returns the thresholded anomaly mask as the label, with the scores in the result JSON (see
``multiad_monai.apps.monailabel_task``); ``--conf bundle multiad_2d`` serves 2D images instead of volumes. The float
heatmap is saved in the datastore as a label of the study with tag ``anomaly_heatmap``:
``GET /datastore/label?label=<study>&tag=anomaly_heatmap``. With a DICOMweb datastore (``--studies
http://.../dicom-web``) it is also stored in the PACS as a DICOM Parametric Map of the study's series (its UIDs in
the result's ``heatmap_dicom``).

``--conf runtime``: ``auto`` (default; onnxruntime on the CPU when the ``onnx`` extra is installed, PyTorch
otherwise and on a GPU), ``torch`` or ``onnx``. The ONNX export is made at the first start on a model and cached.
"""

from __future__ import annotations

import json
import os

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.app import MONAILabelApp

from multiad_monai.apps.cli import BUNDLES_DIR
from multiad_monai.apps.monailabel_task import MultiADInferTask, store_heatmap_in_dicomweb
from multiad_monai.data.errors import root_cause


HEATMAP_TAG = "anomaly_heatmap"


class MultiADApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        bundle = conf.get("bundle", "multiad_medical")
        self.bundle_root = bundle if os.path.isdir(bundle) else os.path.join(BUNDLES_DIR, bundle)
        self.ckpt_path = conf.get("model", "")
        self.overrides = [o for o in conf.get("overrides", "").split(",") if o]
        self.settings = json.loads(conf.get("settings", "{}"))
        self.runtime = conf.get("runtime", "auto")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Multi-AD",
            description="Unsupervised anomaly maps (Multi-AD) for reader review",
            labels={"anomaly": 1},
        )

    def init_infers(self):
        # a missing model, or one without a saved threshold, stops the server at start with one message
        task = MultiADInferTask(self.bundle_root, self.ckpt_path, self.overrides, self.settings, runtime=self.runtime)
        return {"multiad": task}

    def infer(self, request, datastore=None):
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        heatmap = params.get("heatmap")
        image_id = request.get("image")
        store = datastore if datastore else self.datastore()
        # studies of the datastore get their heatmap stored beside them, so a reader can fetch it over HTTP
        volume_map = isinstance(heatmap, str) and heatmap.endswith(".nii.gz")  # 2D heatmaps are overlays, not labels
        if volume_map and os.path.isfile(heatmap) and isinstance(image_id, str) and not os.path.exists(image_id):
            label_id = store.save_label(image_id, heatmap, HEATMAP_TAG, {"model": request.get("model")})
            params["heatmap_label"] = {"label": label_id, "tag": HEATMAP_TAG}
            if isinstance(store, DICOMWebDatastore):  # the PACS gets it too, as a Parametric Map of the series
                task = self._infers[request.get("model")]
                try:
                    params["heatmap_dicom"] = store_heatmap_in_dicomweb(
                        store, image_id, heatmap, float(params["threshold"]), task.model_version
                    )
                except Exception as error:  # the mask is already on its way to the reader: say why, do not fail
                    cause = root_cause(error)
                    params["heatmap_dicom"] = {"error": f"{type(cause).__name__}: {cause}"}
        return result
