"""The MONAI bundles shipped inside the package, and the config files each workflow of a bundle reads.

The bundles are package data (``multiad_monai/bundles/<name>``), found with :mod:`importlib.resources`, so an
installed wheel carries them; in a source checkout ``bundles/`` at the top of the repository points there.
Each bundle follows the model-zoo layout: ``configs/train.json`` and ``configs/inference.json`` parse on their
own, ``configs/evaluate.json`` is merged over ``train.json``, and every config runs with MONAI's default ids
``initialize`` / ``run`` / ``finalize``.
"""

from __future__ import annotations

import os
from importlib.resources import files

__all__ = ["BUNDLES_DIR", "DEFAULT_BUNDLE", "WORKFLOW_CONFIGS", "INFERENCE_RUNTIMES", "bundle_configs", "resolve_bundle_root"]

BUNDLES_DIR = str(files("multiad_monai") / "bundles")
DEFAULT_BUNDLE = os.path.join(BUNDLES_DIR, "multiad_2d")

# workflow -> config files, in merge order (later ones override earlier keys); MONAI's run id is "run" in each
WORKFLOW_CONFIGS = {
    "train": ["train.json"],
    "evaluate": ["train.json", "evaluate.json"],
    "infer": ["inference.json"],
}
# what serves the network at inference: "auto" (onnxruntime on a CPU where the onnx extra is installed, else
# PyTorch), "torch", "onnx" (BundleInferenceSession; the CLI's and the MONAI Label app's --runtime)
INFERENCE_RUNTIMES = ("auto", "torch", "onnx")
# the names used before the bundles took the model-zoo form
_ALIASES = {"training": "train", "evaluating": "evaluate", "inferring": "infer"}


def bundle_configs(bundle_root: str, workflow: str, overrides: list[str] | None = None) -> list[str]:
    """The config files of ``workflow`` (``"train"``, ``"evaluate"``, ``"infer"``) in a bundle, then any override
    files (paths, or names in the bundle's ``configs/``).

    Raises:
        FileNotFoundError: naming the missing config file.
        ValueError: an unknown workflow.
    """
    workflow = _ALIASES.get(workflow, workflow)
    if workflow not in WORKFLOW_CONFIGS:
        raise ValueError(f"unknown workflow {workflow!r}; use one of {sorted(WORKFLOW_CONFIGS)}.")
    files_ = [os.path.join(bundle_root, "configs", name) for name in WORKFLOW_CONFIGS[workflow]]
    for name in overrides or []:
        files_.append(name if os.path.isfile(name) else os.path.join(bundle_root, "configs", name))
    for path in files_:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config not found: {path}")
    return files_


def resolve_bundle_root(bundle: str) -> str:
    """A bundle folder given as a path, or as the name of a bundle shipped with the package
    (``multiad_2d``, ``multiad_medical``); returned absolute."""
    if not os.path.isdir(bundle) and os.path.isdir(os.path.join(BUNDLES_DIR, bundle)):
        bundle = os.path.join(BUNDLES_DIR, bundle)
    return os.path.abspath(bundle)
