"""Loading a trained network for evaluation and inference, with errors that say what is wrong with the file."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine

from multiad_monai.data.errors import CheckpointError, first_line
from multiad_monai.data.run_record import check_model_fingerprint, check_model_settings

__all__ = ["NetworkCheckpointLoader", "load_network_checkpoint", "load_network_state", "load_exported_network", "read_network_state"]


def read_network_state(
    path: str, map_location: str | torch.device = "cpu", settings: Mapping[str, Any] | None = None
) -> Any:
    """The network's state dict in a ``model.pt`` (``{"network": ..., "run": ...}`` or a plain state dict), after
    checking its fingerprint against the ``run.json`` beside it and, given the config values ``settings``, that
    they prepare images and maps as the training did (:func:`~multiad_monai.data.run_record.check_model_settings`);
    whatever else the file holds is returned as it is.

    Raises:
        CheckpointError: naming ``path``, when the file is not a readable PyTorch file, belongs to another run or
            was trained with other image or map settings.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({first_line(error)}); it is truncated or not a PyTorch file.") from error
    check_model_fingerprint(state, path)
    check_model_settings(state, path, settings)
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = state["network"]
    return state


def load_network_checkpoint(
    path: str,
    network: torch.nn.Module,
    map_location: str | torch.device = "cpu",
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Load the weights saved by training (``model.pt``: ``{"network": state dict, "run": fingerprint}``, or a
    plain state dict as in exported bundles) into ``network``; ``settings``: the config values to check against
    the training's image and map settings (see :func:`read_network_state`).

    Raises:
        FileNotFoundError: no file at ``path``.
        RuntimeError: naming ``path``, when the file is not a readable checkpoint, or when it holds another
            architecture (missing, unexpected or differently shaped weights), or when its fingerprint is not the
            one of the ``run.json`` beside it, or when ``settings`` prepare images or maps otherwise than the training.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (train a model first, or set ckpt_path).")
    load_network_state(read_network_state(path, map_location, settings), network, path)


def load_network_state(state: Any, network: torch.nn.Module, path: str) -> None:
    """Load ``state``, already read from ``path`` by :func:`read_network_state`, into ``network``, with the checks
    and errors of :func:`load_network_checkpoint` (for callers that looked into the state first)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of weights.")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape) and not _map_sized(k, expected[k], state[k])
    )
    if missing or unexpected or reshaped:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(
            f"checkpoint {path} was saved from another architecture or settings: weights {', '.join(details)}; "
            "use the configuration it was trained with."
        )
    network.load_state_dict(state)
    threshold = getattr(network, "threshold", None)
    if threshold is not None and not torch.isfinite(torch.as_tensor(threshold)).all():
        logging.getLogger(__name__).warning(
            f"checkpoint {path} has no anomaly threshold (training ran no validation): no masks or decisions."
        )


def _map_sized(key: str, expected: torch.Tensor, saved: torch.Tensor) -> bool:
    """Normal statistics take the map's size when fitted; the map generator adopts the saved shape."""
    return key.rsplit(".", 1)[-1] in ("normal_mean", "normal_std") and expected.dim() == saved.dim() and expected.shape[0] == saved.shape[0]


class NetworkCheckpointLoader:
    """Loads a checkpoint into ``network`` when attached to an evaluator, i.e. before it runs, so a missing,
    corrupt or mismatched file stops the run with one error naming it (see :func:`load_network_checkpoint`).

    Args:
        load_path: the checkpoint written by training (``model.pt``).
        network: the network to load into.
        map_location: device for the loaded tensors.
        settings: the config's values of the settings that prepare images and maps (``model_settings``),
            checked against the training's; None skips the check.
        prepare_for_inference: then call the network's ``prepare_for_inference`` (Multi-AD: batch norms and
            paddings folded into the convolutions), since evaluation and inference never train it.
    """

    def __init__(
        self,
        load_path: str,
        network: torch.nn.Module,
        map_location: str | torch.device = "cpu",
        settings: Mapping[str, Any] | None = None,
        prepare_for_inference: bool = True,
    ) -> None:
        self.load_path = load_path
        self.network = network
        self.map_location = map_location
        self.settings = settings
        self.prepare_for_inference = prepare_for_inference

    def attach(self, engine: Engine) -> None:
        load_network_checkpoint(self.load_path, self.network, self.map_location, self.settings)
        if self.prepare_for_inference and hasattr(self.network, "prepare_for_inference"):
            self.network.prepare_for_inference()


def load_exported_network(path: str, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript export (``python -m monai.bundle ckpt_export ...``) for inference.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: naming ``path``, when it is not a readable TorchScript file (truncated, corrupt, a plain
            checkpoint) or lacks the saved ``threshold``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model not found: {path}")
    try:
        module = torch.jit.load(path, map_location=map_location)
    except Exception as error:
        raise CheckpointError(f"exported model {path} cannot be loaded ({first_line(error)}); export it again.") from error
    if not hasattr(module, "threshold"):
        raise CheckpointError(f"exported model {path} has no saved threshold: it is not a Multi-AD export.")
    return module.eval()
