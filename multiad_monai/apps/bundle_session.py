"""A bundle's inference workflow kept ready for many requests: the network is built and loaded once per device.

``multiad infer`` (``run_bundle``) builds teacher and student and reads the checkpoint on every call, which a
server answering one study at a time (MONAI Label) pays on every request. :class:`BundleInferenceSession`
keeps one loaded network per device, as MONAI Label's ``BasicInferTask`` does, and for each input runs the
bundle's own inference workflow (MONAI's ``ConfigWorkflow``: the same preprocessing, evaluator and
writers as ``multiad infer``) with that network put in the config's ``network`` and the config's checkpoint
loaders left out. The bundle stays the single source of truth; only the network is reused. With
``runtime="onnx"`` the loaded network is exported once to ONNX and run by onnxruntime (CPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from multiad_monai.apps.bundles import bundle_configs
from multiad_monai.handlers.checkpoint import load_network_checkpoint

__all__ = ["BundleInferenceSession"]

_LOADER = "NetworkCheckpointLoader"
_WORKFLOW_LOGGER = "monai.bundle.workflows"
logger = logging.getLogger(__name__)


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` inside the block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _without_checkpoint_loaders(config: Any) -> Any:
    """``config`` with every ``NetworkCheckpointLoader`` component removed from the lists it is in."""
    if isinstance(config, dict):
        return {key: _without_checkpoint_loaders(value) for key, value in config.items()}
    if isinstance(config, list):
        return [
            _without_checkpoint_loaders(item)
            for item in config
            if not (isinstance(item, dict) and str(item.get("_target_", "")).rsplit(".", 1)[-1] == _LOADER)
        ]
    return config


class BundleInferenceSession:
    """Runs a bundle's inference workflow (``configs/inference.json``) on one input at a time with a network built and loaded once.

    Args:
        bundle_root: the bundle folder.
        ckpt_path: the trained ``model.pt``.
        overrides: extra config files of the bundle (e.g. ``["liver_ct.json"]``).
        settings: more config keys (e.g. ``{"image_size": 256}``), as ``--set`` on the ``multiad`` command line.
        runtime: ``"torch"`` (the network as built) or ``"onnx"``: exported once after loading
            (:func:`~multiad_monai.inferers.onnx_model.export_onnx`, tens of seconds) and run by onnxruntime on
            the CPU (:class:`~multiad_monai.inferers.onnx_model.OnnxAnomalyNetwork`); needs the ``onnx`` extra.

    ``network(device)`` returns the loaded network for a device (built on the first call for that device, and
    again only when ``ckpt_path`` changed on disk); ``builds`` counts the builds. ``run(device, **values)``
    runs the workflow with config keys ``values`` (e.g. ``input_path=..., inference_dir=...``); runs are
    serialised. Errors of a run propagate as the workflow raises them (``root_cause`` gives the one to show).
    """

    def __init__(
        self,
        bundle_root: str,
        ckpt_path: str,
        overrides: list[str] | None = None,
        settings: dict[str, Any] | None = None,
        runtime: str = "torch",
    ) -> None:
        if runtime not in ("torch", "onnx"):
            raise ValueError(f"unknown runtime {runtime!r}; use 'torch' or 'onnx'.")
        self.runtime = runtime
        self.bundle_root = os.path.abspath(bundle_root)
        self.ckpt_path = os.path.abspath(ckpt_path)
        self.overrides = list(overrides or [])
        self.settings = dict(settings or {})
        self.config_files = bundle_configs(self.bundle_root, "infer", self.overrides)
        self.builds = 0
        self._networks: dict[str, tuple[torch.nn.Module, tuple[float, int]]] = {}
        self._lock = threading.RLock()

    def _workflow(self, **values: Any) -> ConfigWorkflow:
        # monai.bundle.run drops None values; "$None" makes the config see a real None (as run_bundle does)
        values = {key: "$None" if value is None else value for key, value in {**self.settings, **values}.items()}
        with _quiet(_WORKFLOW_LOGGER):  # it warns on every workflow that it leaves logging alone
            return ConfigWorkflow(
                config_file=self.config_files,
                meta_file=os.path.join(self.bundle_root, "configs", "metadata.json"),
                logging_file=False,  # the server's logging stays as it is
                run_id="run",
                workflow_type="infer",
                bundle_root=self.bundle_root,
                ckpt_path=self.ckpt_path,
                **values,
            )

    def device(self, device: str | torch.device | None = None) -> torch.device:
        """``device`` as a torch device; None: the config's ``device`` (the CPU with ``runtime="onnx"``)."""
        if device is None:
            return torch.device("cpu") if self.runtime == "onnx" else self._workflow().parser.get_parsed_content("device")
        device = torch.device(device)
        if self.runtime == "onnx" and device.type != "cpu":
            raise ValueError(f"runtime 'onnx' runs on the CPU (onnxruntime's CPU provider), not on {device}.")
        return device

    def network(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """The bundle's network on ``device`` (default: :meth:`device`) with the checkpoint loaded."""
        with self._lock:
            device = self.device(device)
            stat = os.stat(self.ckpt_path) if os.path.isfile(self.ckpt_path) else None
            version = (stat.st_mtime, stat.st_size) if stat else (0.0, 0)
            cached = self._networks.get(str(device))
            if cached is not None and cached[1] == version:
                return cached[0]
            workflow = self._workflow(device=device)
            network = workflow.parser.get_parsed_content("network")
            # the bundle's image and map settings must be the training's (exported bundles' models carry none to check)
            settings = workflow.parser.get_parsed_content("model_settings") if "model_settings" in workflow.parser else None
            load_network_checkpoint(self.ckpt_path, network, device, settings)
            network.eval()
            if self.runtime == "onnx":
                network = self._onnx(network, workflow.parser)
            self._networks[str(device)] = (network, version)
            self.builds += 1
            logger.info(f"Multi-AD network built and {self.ckpt_path} loaded on {device}, {self.runtime} (build {self.builds})")
            return network

    @staticmethod
    def _onnx(network: torch.nn.Module, parser) -> torch.nn.Module:
        from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork, export_onnx

        folder = tempfile.mkdtemp(prefix="multiad_onnx_")
        try:  # onnxruntime holds the model in memory: the file is not needed after loading
            path = os.path.join(folder, "model.onnx")
            size, mode = parser.get_parsed_content("image_size"), parser.get_parsed_content("score_mode")
            return OnnxAnomalyNetwork(export_onnx(network, path, int(size), score_mode=mode))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def run(self, device: str | torch.device | None = None, **values: Any) -> None:
        """Runs the inference workflow with the loaded network of ``device`` and config keys ``values``."""
        with self._lock:
            device = self.device(device)
            network = self.network(device)
            workflow = self._workflow(**values, device=device)
            workflow.parser.set(_without_checkpoint_loaders(workflow.parser.get()))
            workflow.parser["network"] = network
            workflow.initialize()
            try:
                workflow.run()
            finally:
                workflow.finalize()
