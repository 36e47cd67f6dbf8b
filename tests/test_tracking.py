"""``multiad train --tracking mlflow``: MONAI's bundle tracking records the run's parameters, per-epoch losses,
validation metrics and artefacts; read back with the MLflow client."""

from __future__ import annotations

import os

import pytest

from multiad_monai.apps.cli import main


def test_tracking_without_mlflow_is_one_clear_error(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    assert main(["train", "--output_dir", str(tmp_path / "run"), "--tracking", "mlflow"]) == 2
    assert "pip install 'multiad-monai[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_mlflow_records_parameters_losses_metrics_and_artefacts(tiny_demo_dataset, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = str(tmp_path / "run")
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    assert main(["train", "--output_dir", run, "--dataset_dir", tiny_demo_dataset, "--tracking", "mlflow", "--tracking_uri", uri,
                 "--set", "image_size=64", "--set", "num_epochs=2", "--set", "val_interval=1", "--set", "min_epoch_length=2"]) == 0
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("multiad")
    (recorded,) = client.search_runs([experiment.experiment_id])
    assert recorded.data.params["num_epochs"] == "2" and recorded.data.params["image_size"] == "64"
    losses = client.get_metric_history(recorded.info.run_id, "mean_loss")  # the per-epoch mean of the loss
    assert [m.step for m in losses] == [1, 2] and all(m.value > 0 for m in losses)
    assert len(client.get_metric_history(recorded.info.run_id, "val_normal_fit")) == 2
    artefacts = {os.path.basename(a.path) for a in client.list_artifacts(recorded.info.run_id)}
    assert {"model.pt", "run.json"} <= artefacts
