"""Give the trained folds of a rotation the intensity prior without retraining their students.

    python scripts/add_intensity_prior.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_default \
        --name prior --set intensity_prior_weight=0.5 --set intensity_prior_tail=upper
    python scripts/rotation_study.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_default --no_train \
        --eval_name eval_prior --set intensity_prior_weight=0.5 --set intensity_prior_tail=upper \
        --set 'ckpt_path=$os.path.join(@output_dir, "model_prior.pt")'

For every fold folder (``OUTPUT_DIR/<fold>`` with ``model.pt`` and ``run.json``) the fold's training config
is rebuilt with the run's settings and the ``--set`` ones; the trained network gets the prior, fitted on the
fold's normal training slices (``fit_intensity_prior``, as training's ``IntensityPriorHandler``), and its
threshold is set again on the fold's validation slices (``NormalThresholdHandler``, as training's validation).
The result is written as ``FOLD/model_NAME.pt`` beside the run's ``model.pt`` (which is not touched), with
the run's fingerprint, since its student is that run's.

This is what training with the prior gives: training's checkpoint choice and early stopping use the normal
fit of the raw map (``NormalFitScore``), which the prior does not change, and the prior takes no random
numbers, so the same seed trains the same student
(``tests/test_medical.py::test_a_prior_added_after_training_equals_one_trained_with_it``).
"""

from __future__ import annotations

import argparse
import os

import torch
from map_variants import fold_parser, load_with_prior

from multiad_monai.apps.cli import parse_settings
from multiad_monai.atomic import atomic_path
from multiad_monai.data import read_run_record
from multiad_monai.engines import AnomalyEvaluator
from multiad_monai.handlers import NormalThresholdHandler


def add_prior(fold_dir: str, dataset_dir: str, settings: dict, overrides: list[str], name: str) -> str:
    """Writes ``fold_dir/model_NAME.pt``: the fold's network with the fitted prior and its new threshold."""
    record = read_run_record(fold_dir)
    config = fold_parser(fold_dir, dataset_dir, record, overrides)
    if config["threshold_source"] != "normal_quantile":
        raise ValueError(f"{fold_dir}: only runs with threshold_source normal_quantile can be given the prior afterwards.")
    config.update(settings)
    network = config.get_parsed_content("network_def", lazy=False)
    if not network.has_intensity_prior:
        raise ValueError("set intensity_prior_weight above 0.")
    load_with_prior(network, os.path.join(fold_dir, "model.pt"), config)
    threshold = NormalThresholdHandler(network, quantile=config["threshold_quantile"])
    AnomalyEvaluator(
        device="cpu",
        val_data_loader=config.get_parsed_content("validate#dataloader", lazy=False),
        network=network,
        score_mode=config["score_mode"],
        val_handlers=[threshold],
    ).run()
    path = os.path.join(fold_dir, f"model_{name}.pt")
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"network": network.state_dict(), "run": {"fingerprint": record["fingerprint"]}}, tmp)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True, help="folder of the rotation's fold folders")
    parser.add_argument("--name", required=True, help="the models are written as FOLD/model_NAME.pt")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    settings = parse_settings(args.set)
    folds = sorted(
        name for name in os.listdir(args.output_dir) if os.path.isfile(os.path.join(args.output_dir, name, "model.pt"))
    )
    for fold in folds:
        path = add_prior(os.path.abspath(os.path.join(args.output_dir, fold)), os.path.abspath(args.dataset_dir), settings, args.override, args.name)
        print(f"{fold}: {path}", flush=True)


if __name__ == "__main__":
    main()
