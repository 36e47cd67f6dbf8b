"""Slice-by-slice anomaly maps of volumes from a 2D model, and writing them as NIfTI plus scores JSON."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.transforms import Resize
from monai.utils import convert_to_tensor

from multiad_monai.atomic import atomic_path
from multiad_monai.data.errors import DatasetError
from multiad_monai.data.nifti_io import save_nifti
from multiad_monai.inferers.anomaly_map import image_score
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD
from multiad_monai.transforms.channels import source_name
from multiad_monai.transforms.slices import foreground_box, plane_region

__all__ = ["VolumeAnomalyInferer", "write_volume_outputs"]


class VolumeAnomalyInferer:
    """Apply a 2D anomaly network (trained on ``image_size`` slices) to every slice of a volume.

    Each batch of slices along ``axis`` is turned by ``quarter_turns`` (see
    :mod:`multiad_monai.transforms.slices`), resized to ``image_size`` (MONAI ``Resize``, bilinear with
    anti-aliasing as in the 2D chain), repeated from 1 to 3 channels, normalised with ``mean``/``std`` and
    passed through ``network``; the maps are resized back, turned back and written into the volume map.
    Only one batch of slices is held at a time besides the output map. SliceInferer is not used as it
    would add a volume-sized count map and windows for what is one window per slice.

    Args:
        network: 2D module, ``(B, 3, image_size, image_size) -> (B, 1, image_size, image_size)``, e.g. ``MultiAD``.
        axis: spatial axis of ``(C, X, Y, Z)`` to slice along (2: axial for RAS volumes).
        batch_size: slices per forward pass.
        image_size: height and width the network was trained on.
        mean, std: channel normalisation the network was trained with, in [0, 1] units.
        score_mode: per-slice score from the slice map, ``"max"`` or ``"topk"`` (see ``image_score``).
        quarter_turns: in-plane 90-degree turns that make the slices look like the training images.
        device: where the network runs; None: the device of its first parameter (CPU if it has none).
        mask_to_foreground: zero the map outside ``mask``; slices without foreground then skip the network.
        crop_to_foreground: run the network on the in-plane foreground box of ``mask`` only
            (:func:`~multiad_monai.transforms.foreground_box`), as the training slices were cut with the same
            setting; the map is zero outside the box.
        crop_margin: margin of that box, voxels.

    ``__call__(volume (C, X, Y, Z) in [0, 1], mask (1, X, Y, Z) | None)`` returns
    ``(anomaly_map, slice_scores, volume_score)``: a float32 MetaTensor ``(1, X, Y, Z)`` with the input's
    affine and metadata (zero outside ``mask`` when given and ``mask_to_foreground``), a float64 array
    ``(N,)`` of per-slice scores, and the volume score, their maximum.
    """

    def __init__(
        self,
        network: nn.Module,
        axis: int = 2,
        batch_size: int = 16,
        image_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        score_mode: str = "max",
        quarter_turns: int = 0,
        device: str | torch.device | None = None,
        mask_to_foreground: bool = True,
        crop_to_foreground: bool = False,
        crop_margin: int = 8,
    ) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be a spatial axis 0, 1 or 2 of a (C, X, Y, Z) volume, got {axis}.")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}.")
        if score_mode not in ("max", "topk"):
            raise ValueError(f"unknown score_mode {score_mode!r}; use 'max' or 'topk'.")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}.")
        self.network = network
        self.axis = axis
        self.batch_size = batch_size
        self.image_size = image_size
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.score_mode = score_mode
        self.quarter_turns = quarter_turns
        self.mask_to_foreground = mask_to_foreground
        self.crop_to_foreground = crop_to_foreground
        self.crop_margin = crop_margin
        if device is None:
            parameter = next(network.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
        self.device = torch.device(device)
        self.to_network_size = Resize((image_size, image_size), mode="bilinear", anti_aliasing=True)

    @property
    def threshold(self) -> float:
        """The network's saved pixel/score threshold (NaN when it has none)."""
        return float(getattr(self.network, "threshold", float("nan")))

    def _slice_maps(self, slices: torch.Tensor) -> torch.Tensor:
        """Maps ``(n, 1, H, W)`` of plain slices ``(n, C, H, W)``."""
        n, channels, height, width = slices.shape
        if channels == 1:
            slices = slices.expand(n, 3, height, width)
        elif channels != 3:
            raise ValueError(f"slices need 1 or 3 channels for an RGB network, got {channels}.")
        # Resize treats its first dim as channels, so the batch is folded into it.
        resized = convert_to_tensor(self.to_network_size(slices.reshape(n * 3, height, width)), track_meta=False)
        resized = resized.reshape(n, 3, self.image_size, self.image_size)
        images = (resized - self.mean.to(resized.device)) / self.std.to(resized.device)
        maps = self.network(images)
        expected = (n, 1, self.image_size, self.image_size)
        if tuple(maps.shape) != expected:
            raise ValueError(f"network returned maps of shape {tuple(maps.shape)}, expected {expected}.")
        back = Resize((height, width), mode="bilinear", anti_aliasing=False)(maps[:, 0].float())
        return convert_to_tensor(back, track_meta=False).unsqueeze(1)

    def __call__(
        self, volume: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[MetaTensor, np.ndarray, float]:
        name = source_name(volume)
        if volume.ndim != 4:
            raise DatasetError(
                f"{name}: expected a channel-first volume (C, X, Y, Z), got shape {tuple(volume.shape)}."
            )
        if mask is not None and tuple(mask.shape[1:]) != tuple(volume.shape[1:]):
            raise DatasetError(
                f"{name}: mask {source_name(mask)} has spatial shape {tuple(mask.shape[1:])}, "
                f"the volume {tuple(volume.shape[1:])}."
            )
        data = convert_to_tensor(volume, track_meta=False)
        dim = self.axis + 1
        num_slices = data.shape[dim]
        anomaly_map = torch.zeros((1, *data.shape[1:]), dtype=torch.float32)
        slice_scores = np.zeros(num_slices, dtype=np.float64)
        region = (slice(None),) * 4  # the part of the volume the network sees
        if mask is not None and self.crop_to_foreground:
            region = (slice(None), *plane_region(self.axis, foreground_box(mask, self.axis, self.crop_margin)))
        data, map_region = data[region], anomaly_map[region]  # views: maps are written into anomaly_map
        inside = None
        if mask is not None and self.mask_to_foreground:
            inside = (convert_to_tensor(mask, track_meta=False) > 0).any(dim=0, keepdim=True).cpu()[region]
        # Slices without foreground keep a zero map and score, which is what masking their maps would give.
        slices = torch.arange(num_slices)
        if inside is not None:
            slices = slices[inside.movedim(dim, 0).flatten(1).any(dim=1)]
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.inference_mode():
                for batch in slices.split(self.batch_size):
                    block = data.index_select(dim, batch).movedim(dim, 0)  # (n, C, H, W)
                    block = torch.rot90(block, self.quarter_turns, dims=(2, 3)).to(self.device, torch.float32)
                    maps = torch.rot90(self._slice_maps(block), -self.quarter_turns, dims=(2, 3)).cpu()
                    if inside is not None:
                        maps = maps * inside.index_select(dim, batch).movedim(dim, 0)
                    slice_scores[batch.numpy()] = image_score(maps, self.score_mode).double().numpy()
                    map_region.index_copy_(dim, batch, maps.movedim(0, dim))
        finally:
            self.network.train(was_training)
        if isinstance(volume, MetaTensor):  # its meta holds the affine
            meta, applied = copy.deepcopy(volume.meta), copy.deepcopy(volume.applied_operations)
            result = MetaTensor(anomaly_map, meta=meta, applied_operations=applied)
        else:
            result = MetaTensor(anomaly_map)
        return result, slice_scores, float(slice_scores.max())


def _atomic_save_nifti(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        save_nifti(image, tmp)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(float(value)) else None


def write_volume_outputs(
    output_dir: str,
    name: str,
    anomaly_map: torch.Tensor,
    threshold: float,
    slice_scores: Sequence[float] | np.ndarray,
    volume_score: float,
    extra: dict | None = None,
) -> dict[str, str]:
    """Write one volume's results, each file atomically (temporary file, then rename).

    Files: ``<name>_anomaly_map.nii.gz`` (float32), ``<name>_anomaly_mask.nii.gz`` (uint8, 1 where the map
    is at or above ``threshold``; not written when ``threshold`` is NaN, and a stale one from an earlier run
    is removed) and ``<name>_scores.json`` (volume score, per-slice scores, threshold, files). Both NIfTI
    files carry the input file's affine; the JSON is written last, so its presence means the set is complete.

    Args:
        output_dir: folder for the files (created if needed).
        name: case name, the file prefix.
        anomaly_map: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` map; a MetaTensor is written in the voxel order and
            with the affine of the file it was computed from (:func:`restore_stored_orientation`), a plain
            array with the identity affine.
        threshold: pixel threshold of the network; NaN when not estimated.
        slice_scores: per-slice scores ``(N,)``.
        volume_score: the volume score.
        extra: more entries for the JSON (e.g. the model file, the slice axis).

    Returns:
        kind (``"map"``, ``"mask"``, ``"scores"``) -> path of each file written.
    """
    # handlers import the engines, which import the networks, which import this package: import late.
    from multiad_monai.data.volumes import restore_stored_orientation
    from multiad_monai.handlers.writers import atomic_write_text

    if not name or name != os.path.basename(name):
        raise ValueError(f"name must be a plain file name prefix, got {name!r}.")
    if isinstance(anomaly_map, MetaTensor) and anomaly_map.ndim == 4:
        anomaly_map = restore_stored_orientation(anomaly_map)
    array = np.asarray(anomaly_map.detach().cpu() if isinstance(anomaly_map, torch.Tensor) else anomaly_map)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"anomaly_map must be (1, X, Y, Z) or (X, Y, Z), got shape {tuple(np.shape(anomaly_map))}.")
    affine = np.asarray(anomaly_map.affine, dtype=np.float64) if isinstance(anomaly_map, MetaTensor) else np.eye(4)
    paths = {
        "map": os.path.join(output_dir, f"{name}_anomaly_map.nii.gz"),
        "mask": os.path.join(output_dir, f"{name}_anomaly_mask.nii.gz"),
        "scores": os.path.join(output_dir, f"{name}_scores.json"),
    }
    written = {"map": paths["map"]}
    _atomic_save_nifti(paths["map"], array.astype(np.float32), affine)
    threshold = float(threshold)
    report = {
        "name": name,
        "volume_score": _finite_or_none(volume_score),
        "threshold": _finite_or_none(threshold),
        "anomalous": None if math.isnan(threshold) else bool(volume_score >= threshold),
    }
    if math.isnan(threshold):
        if os.path.exists(paths["mask"]):
            os.remove(paths["mask"])  # a mask from an earlier threshold would contradict this run
        report["note"] = "no anomaly mask: the network has no threshold (estimate it on normal validation data)."
    else:
        _atomic_save_nifti(paths["mask"], (array >= threshold).astype(np.uint8), affine)
        written["mask"] = paths["mask"]
    report.update(extra or {})
    report["slice_scores"] = [_finite_or_none(s) for s in np.asarray(slice_scores, dtype=np.float64).ravel()]
    report["files"] = {kind: os.path.basename(path) for kind, path in written.items()}
    atomic_write_text(paths["scores"], json.dumps(report, indent=2) + "\n")
    written["scores"] = paths["scores"]
    return written
