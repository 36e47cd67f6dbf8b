"""The trained network as an ONNX model: export (map and image score in one graph) and inference with onnxruntime.

Needs the ``onnx`` extra (``pip install "multiad-monai[onnx]"``: onnx, onnxscript for PyTorch's exporter,
onnxruntime). The saved ``threshold`` and ``score_scale`` travel in the model's metadata.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

from multiad_monai.atomic import atomic_path
from multiad_monai.data.errors import CheckpointError, first_line
from multiad_monai.inferers.anomaly_map import image_score

__all__ = ["MapAndScore", "OnnxAnomalyNetwork", "export_onnx", "ONNX_INPUT", "ONNX_OUTPUTS"]

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("anomaly_map", "score")
_META_KEYS = ("threshold", "score_scale", "score_mode", "topk_ratio", "image_size")


class MapAndScore(nn.Module):
    """A Multi-AD network and its image score as one module, the graph that is exported.

    Args:
        network: maps ``(B, C, H, W)`` images to ``(B, 1, H, W)`` anomaly maps (``MultiAD``).
        score_mode, topk_ratio: the image score from the map, as :func:`image_score`.

    ``forward(images)`` returns ``(maps (B, 1, H, W), scores (B,))``.
    """

    def __init__(self, network: nn.Module, score_mode: str = "max", topk_ratio: float = 0.01) -> None:
        super().__init__()
        self.network = network
        self.score_mode = score_mode
        self.topk_ratio = topk_ratio

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.network(images)
        return maps, image_score(maps, self.score_mode, self.topk_ratio)


def export_onnx(
    network: nn.Module,
    path: str,
    image_size: int,
    in_channels: int = 3,
    score_mode: str = "max",
    topk_ratio: float = 0.01,
) -> str:
    """Write ``network`` (a loaded ``MultiAD``) as an ONNX model with PyTorch's exporter (``torch.export``).

    The model takes ``image`` ``(B, in_channels, image_size, image_size)``, preprocessed as in training (any
    batch size), and returns ``anomaly_map`` ``(B, 1, image_size, image_size)`` and ``score`` ``(B,)``; its
    metadata holds ``threshold``, ``score_scale``, ``score_mode``, ``topk_ratio`` and ``image_size``. The file
    is self-contained (weights inside) and written atomically.

    Raises:
        FileExistsError: ``path`` exists (an earlier export is never replaced).
    """
    import onnx

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; export to a new file (an earlier export is never replaced).")
    module = MapAndScore(network, score_mode, topk_ratio).eval()
    example = torch.randn(2, in_channels, image_size, image_size)  # 2: a batch of 1 would fix the batch size
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and torchvision notes
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[ONNX_INPUT],
            output_names=list(ONNX_OUTPUTS),
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    model = program.model_proto
    metadata = {
        "threshold": float(getattr(network, "threshold", float("nan"))),
        "score_scale": float(getattr(network, "score_scale", float("nan"))),
        "score_mode": score_mode,
        "topk_ratio": topk_ratio,
        "image_size": int(image_size),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    model.producer_name = "multiad-monai"
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save_model(model, tmp, save_as_external_data=False)
    return path


class OnnxAnomalyNetwork(nn.Module):
    """An exported Multi-AD model run by onnxruntime, used like the network (e.g. in ``VolumeAnomalyInferer`` or
    a bundle's evaluator, which call it on CPU tensors).

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx`.
        providers: onnxruntime execution providers (default: the CPU).
        threads: intra-op threads (default: onnxruntime's choice).

    ``forward(images)`` with ``(B, C, H, W)`` float images returns the maps ``(B, 1, H, W)`` as a torch
    tensor (on the images' device); ``predict(images)`` returns ``(maps, scores (B,))``. ``threshold`` and
    ``score_scale`` are buffers holding the saved values, as in the network; there are no parameters.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: naming ``path``, when it is not a readable ONNX model or not a Multi-AD export.
    """

    def __init__(self, path: str, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as error:
            raise CheckpointError(f"ONNX model {path} cannot be loaded ({first_line(error)}); export it again.") from error
        meta = self.session.get_modelmeta().custom_metadata_map
        names = [o.name for o in self.session.get_outputs()]
        if any(key not in meta for key in _META_KEYS) or tuple(names) != ONNX_OUTPUTS:
            raise CheckpointError(f"ONNX model {path} is not a Multi-AD export (no saved threshold, or other outputs).")
        self.path = path
        self.metadata = {key: json.loads(meta[key]) for key in _META_KEYS}
        self.register_buffer("threshold", torch.tensor(float(self.metadata["threshold"])))
        self.register_buffer("score_scale", torch.tensor(float(self.metadata["score_scale"])))

    def predict(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps ``(B, 1, H, W)`` and scores ``(B,)`` of ``(B, C, H, W)`` images, on the images' device."""
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        maps, scores = self.session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: np.ascontiguousarray(array, dtype=np.float32)})
        return torch.from_numpy(maps).to(device), torch.from_numpy(scores).to(device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)[0]
