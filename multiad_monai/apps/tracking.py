"""Experiment tracking with MONAI's own bundle tracking (``monai.bundle.run(..., tracking=...)``): MLflow.

MONAI adds an ``MLFlowHandler`` to the trainer (``train#handlers``), the validator (``validate#handlers``) and the
evaluator (``handlers``) of a bundle in the model-zoo layout. The settings here are MONAI's defaults
(:data:`monai.bundle.DEFAULT_MLFLOW_SETTINGS`: a local SQLite store ``<output_dir>/mlruns.db`` with the artefacts
in ``<output_dir>/mlruns``) plus what a Multi-AD run should record: its training settings as parameters, the
per-epoch mean losses (:class:`~multiad_monai.handlers.EpochLossSummary` puts them in the trainer's metrics), and
the trained model and run record as artefacts.
"""

from __future__ import annotations

import copy

__all__ = ["TRACKERS", "mlflow_settings"]

TRACKERS = ("mlflow",)


def mlflow_settings(tracking_uri: str | None = None, experiment_name: str = "multiad", run_name: str | None = None) -> dict:
    """MONAI's MLflow tracking settings for a Multi-AD bundle.

    Args:
        tracking_uri: where MLflow records (``sqlite:///path.db``, ``http://host:5000``, ...); default MONAI's
            local ``<output_dir>/mlruns.db``.
        experiment_name: the MLflow experiment.
        run_name: the MLflow run; default one MLflow names.
    """
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    settings = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    configs = settings["configs"]
    if tracking_uri:
        configs["tracking_uri"] = tracking_uri
    configs["experiment_name"] = experiment_name
    configs["run_name"] = run_name
    trainer = configs["trainer"]
    # parameters: the settings that define the run (the same ones its run.json fingerprints)
    trainer["experiment_param"] = "@training_settings"
    # each iteration's loss terms (MONAI's default reads a decollated list; the Multi-AD trainer's output is a dict)
    trainer["output_transform"] = "$multiad_monai.engines.loss_terms"
    trainer["artifacts"] = ["@save_execute_config", "$os.path.join(@output_dir, 'model.pt')", "$os.path.join(@output_dir, 'run.json')"]
    configs["evaluator"]["artifacts"] = ["@save_execute_config", "$os.path.join(@eval_dir, 'metrics.json')",
                                         "$os.path.join(@eval_dir, 'report.html')"]
    return settings
