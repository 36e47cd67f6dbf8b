"""A bundle's inference workflow kept ready for many requests: the network is built and loaded once per device.

``multiad infer`` (``run_bundle``) builds teacher and student and reads the checkpoint on every call, which a
server answering one study at a time (MONAI Label) pays on every request. :class:`BundleInferenceSession`
keeps one loaded network per device, as MONAI Label's ``BasicInferTask`` does, and for each input runs the
bundle's own inference workflow (MONAI's ``ConfigWorkflow``: the same preprocessing, evaluator and
writers as ``multiad infer``) with that network put in the config's ``network`` and the config's checkpoint
loaders left out. The bundle stays the single source of truth; only the network is reused. With
``runtime="onnx"`` the loaded network is exported to ONNX and run by onnxruntime (CPU); the export is kept in a
cache keyed by the checkpoint's and configs' contents and the code, so a server restarted on the same model skips it.
``runtime="auto"`` takes onnxruntime on the CPU where the ``onnx`` extra is installed, PyTorch elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from multiad_monai.apps.bundles import INFERENCE_RUNTIMES, bundle_configs
from multiad_monai.data.errors import CheckpointError
from multiad_monai.handlers.checkpoint import load_network_checkpoint

__all__ = ["BundleInferenceSession", "onnx_runtime_available", "default_onnx_cache_dir"]

# config keys that say where inputs and outputs are: they change no exported graph, so no cache key holds them
_LOCATION_KEYS = frozenset({"input_path", "input_dir", "inference_dir", "output_dir", "dataset_dir", "eval_dir", "ckpt_path"})

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


def onnx_runtime_available() -> bool:
    """Whether the ``onnx`` extra (the exporter's onnx and onnxscript, and onnxruntime) can be imported."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def default_onnx_cache_dir() -> str:
    """``$MULTIAD_CACHE_DIR/onnx``, default ``~/.cache/multiad-monai/onnx``: where exported networks are kept."""
    root = os.environ.get("MULTIAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "multiad-monai")
    return os.path.join(root, "onnx")


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _exporter_digest() -> str:
    """A digest of this package's Python sources and the exporter's versions: code that builds the network, or
    another exporter, makes another graph from the same checkpoint (an editable install keeps its version number)."""
    from importlib.metadata import PackageNotFoundError, version

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, subfolders, names in sorted(os.walk(package)):
        subfolders.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            digest.update(name.encode() + bytes.fromhex(_file_digest(os.path.join(folder, name))))
    for name in ("torch", "onnx", "onnxscript"):
        try:
            digest.update(f"{name}={version(name)}".encode())
        except PackageNotFoundError:
            digest.update(f"{name}=none".encode())
    return digest.hexdigest()


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
        runtime: ``"torch"`` (the network as built), ``"onnx"``: exported after loading
            (:func:`~multiad_monai.inferers.onnx_model.export_onnx`, tens of seconds on a CPU) and run by
            onnxruntime on the CPU (:class:`~multiad_monai.inferers.onnx_model.OnnxAnomalyNetwork`; needs the
            ``onnx`` extra), or ``"auto"``: ``"onnx"`` for the CPU when the extra is installed, else ``"torch"``.
        onnx_cache_dir: where exports are kept, one file per checkpoint, configs, settings, package code and
            exporter versions (default :func:`default_onnx_cache_dir`); a server restarted on the same model loads
            it instead of exporting again.

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
        onnx_cache_dir: str | None = None,
    ) -> None:
        if runtime not in INFERENCE_RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; use one of {', '.join(INFERENCE_RUNTIMES)}.")
        self.runtime = runtime
        self.onnx_cache_dir = onnx_cache_dir or default_onnx_cache_dir()
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

    def runtime_for(self, device: torch.device) -> str:
        """``"onnx"`` or ``"torch"``: what serves ``device`` (``"auto"`` resolved)."""
        if self.runtime == "auto":
            return "onnx" if device.type == "cpu" and onnx_runtime_available() else "torch"
        return self.runtime

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
            runtime = self.runtime_for(device)
            if runtime == "onnx":
                network = self._onnx(network, workflow.parser)
            elif hasattr(network, "prepare_for_inference"):
                network.prepare_for_inference()
            self._networks[str(device)] = (network, version)
            self.builds += 1
            logger.info(f"Multi-AD network built and {self.ckpt_path} loaded on {device}, {runtime} (build {self.builds})")
            return network

    def onnx_cache_path(self, image_size: int, score_mode: str) -> str:
        """The cache file of this session's export: named by a digest of everything the exported graph depends on."""
        key = {
            "checkpoint": _file_digest(self.ckpt_path),
            "configs": [_file_digest(path) for path in self.config_files],
            "settings": {key: value for key, value in self.settings.items() if key not in _LOCATION_KEYS},
            "image_size": int(image_size),
            "score_mode": score_mode,
            "code": _exporter_digest(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        return os.path.join(self.onnx_cache_dir, f"{digest}.onnx")

    def _onnx(self, network: torch.nn.Module, parser) -> torch.nn.Module:
        from multiad_monai.inferers.onnx_model import OnnxAnomalyNetwork, export_onnx

        size, mode = int(parser.get_parsed_content("image_size")), parser.get_parsed_content("score_mode")
        path = self.onnx_cache_path(size, mode)
        if os.path.isfile(path):
            try:
                loaded = OnnxAnomalyNetwork(path)
                logger.info(f"ONNX export of {self.ckpt_path} read from the cache: {path}")
                return loaded
            except CheckpointError as error:  # a damaged cache entry is exported again, not served
                logger.warning(f"{error}: exporting again")
                os.remove(path)
        os.makedirs(self.onnx_cache_dir, exist_ok=True)
        try:
            export_onnx(network, path, size, score_mode=mode)
        except FileExistsError:  # another server exported the same model meanwhile
            pass
        return OnnxAnomalyNetwork(path)

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
