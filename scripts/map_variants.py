"""Choose map settings on validation data only: score map variants of trained medical folds on data of
their training patients that training never saw, never on the test patients.

    python scripts/map_variants.py --dataset_dir ../shared/data/brats2015 --output_dir runs/rot_default

Two validation sets (``--validation``):

- ``lesion_slices`` (default, needs labels of the training patients): every slice of a training patient
  that holds a lesion (training keeps only lesion-free slices, so none of these was trained on) against
  the held-out lesion-free validation slices. Real lesions, so it ranks settings the way tumours do.
- ``synthetic``: the held-out lesion-free validation slices, half of them with a lesion-like synthetic
  anomaly inside the organ (what the trainer validates on; works without any label).

For every fold folder of ``scripts/rotation_study.py`` (``OUTPUT_DIR/<test case>`` with ``model.pt`` and
``run.json``), the fold's own validation slices are rebuilt from its training config, and each variant
(settings that change the map of a trained model, not the training: level weights, smoothing, test-time
flip, the slice score, the intensity prior) is scored by pixel AUROC inside the organ and slice AUROC. These are threshold-free: the saved
threshold belongs to the default map, so a variant's Dice needs its threshold refitted. Prints one Markdown row per variant
(mean over folds, and per fold) and writes ``OUTPUT_DIR/map_variants_VALIDATION.json``; the variant with the best
mean validation pixel AUROC is named, to be measured on the test patients afterwards with
``multiad evaluate --set ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.networks.layers import GaussianFilter

from multiad_monai.apps.cli import bundle_configs
from multiad_monai.data import read_run_record
from multiad_monai.handlers import fit_intensity_prior, lesion_validation_set, load_network_state, read_network_state
from multiad_monai.inferers.anomaly_map import image_score
from multiad_monai.metrics import f1_max, image_auroc, pixel_auroc

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "multiad_medical")
VARIANTS = {
    "default (mean of 4 levels, sigma 4)": {},
    "level weights 2:2:1:1 (finer)": {"level_weights": [2, 2, 1, 1]},
    "level weights 1:1:0:0 (stride 4-8 only)": {"level_weights": [1, 1, 0, 0]},
    "level weights 0:0:1:1 (stride 16-32 only)": {"level_weights": [0, 0, 1, 1]},
    "sigma 2": {"map_sigma": 2.0},
    "sigma 8": {"map_sigma": 8.0},
    "test-time flip": {"test_time_flip": True},
    "slice score: mean of the top 1% (not the maximum)": {"score_mode": "topk"},
}
# beyond the method: the brightness of normal tissue mixed into the map (IntensityPrior), fitted here on the
# fold's training slices when its model was trained without it
for _combination in ("sum", "product"):
    for _weight, _tail in ((0.25, "upper"), (0.5, "upper"), (0.75, "upper"), (0.5, "both")):
        VARIANTS[f"intensity prior {_combination} {_weight} {_tail}"] = {
            "intensity_prior_weight": _weight, "intensity_prior_tail": _tail, "intensity_prior_combination": _combination
        }

PRIOR_KEYS = {"intensity_prior_weight", "intensity_prior_tail", "intensity_prior_combination"}


def fold_parser(fold_dir: str, dataset_dir: str, record: dict, overrides: list[str]) -> ConfigParser:
    """The fold's training config: the bundle's, with the settings its run recorded (e.g. ``slice_context``)."""
    parser = ConfigParser()
    parser.read_config(bundle_configs(BUNDLE, "train", overrides))
    parser.read_meta(os.path.join(BUNDLE, "configs", "metadata.json"))
    recorded = {key: value for key, value in record["fingerprint"]["settings"].items() if key in parser.get()}
    recorded.setdefault("intensity_prior_weight", 0.0)  # runs from before the prior existed had none
    parser.update(recorded)
    parser.update(
        {"bundle_root": BUNDLE, "dataset_dir": dataset_dir, "output_dir": fold_dir, "test_cases": record["split"]["test"]}
    )
    return parser


def lesion_slice_dataset(config: ConfigParser) -> list[dict]:
    """Every slice of the fold's training patients that holds a lesion (label 1, its mask) and the held-out
    lesion-free validation slices (label 0), through the fold's slice chain: the set ``threshold_source:
    lesion_dice`` fits its threshold on."""
    slicing = {
        key: config[name]
        for key, name in (
            ("axis", "slice_axis"), ("quarter_turns", "quarter_turns"), ("min_foreground", "min_foreground"),
            ("lesions_in_foreground_only", "lesions_in_foreground_only"),
            ("crop_to_foreground", "crop_to_foreground"), ("crop_margin", "crop_margin"),
        )
    }
    return lesion_validation_set(
        config.get_parsed_content("case_split")[0],
        config.get_parsed_content("volume_preprocessing"),
        config.get_parsed_content("datalist_split")[1],
        config.get_parsed_content("normal_statistics#dataset#transform"),
        **slicing,
    )


def load_with_prior(network: torch.nn.Module, checkpoint: str, config: ConfigParser) -> None:
    """Load ``checkpoint``; an enabled intensity prior that the checkpoint does not hold is fitted afterwards on
    the fold's normal training slices (what training would have done), never on validation slices."""
    prior, state = network.intensity_prior, read_network_state(checkpoint)
    if not network.has_intensity_prior or any(key.startswith("intensity_prior.") for key in state):
        load_network_state(state, network, checkpoint)
        return
    network.intensity_prior = None
    load_network_state(state, network, checkpoint)
    network.intensity_prior = prior
    fit_intensity_prior(network, config.get_parsed_content("normal_statistics#dataloader", lazy=False))


@torch.inference_mode()
def validation_scores(network: torch.nn.Module, loader, score_mode: str, distillation_maps: list | None = None) -> dict[str, float]:
    """Pixel AUROC inside the organ and slice AUROC of ``network`` on the validation loader. ``distillation_maps``:
    the network's maps without its intensity prior, per batch, when already computed (the prior is then applied
    to them, which gives the same maps as a forward pass)."""
    network.eval()
    inside_maps, inside_masks, scores, labels = [], [], [], []
    for index, batch in enumerate(loader):
        if distillation_maps is None:
            maps = network(batch["image"])
        else:
            maps = network.intensity_prior(batch["image"], distillation_maps[index]) if network.has_intensity_prior else distillation_maps[index]
        scores.append(image_score(maps, score_mode).reshape(-1))
        labels.append(torch.as_tensor(batch["label"]).reshape(-1))
        foreground = batch["foreground"] > 0 if "foreground" in batch else torch.ones_like(maps, dtype=torch.bool)
        inside_maps.append(maps[foreground].numpy())
        inside_masks.append(batch["mask"][foreground].numpy() > 0)
    inside_maps, inside_masks = np.concatenate(inside_maps), np.concatenate(inside_masks)
    best_dice, dice_threshold = f1_max(inside_maps, inside_masks)  # pooled Dice is the pixel F1
    return {
        "pixel_auroc_in_organ": pixel_auroc(inside_maps, inside_masks),
        "slice_auroc": image_auroc(torch.cat(scores).numpy(), torch.cat(labels).numpy()),
        "best_dice": best_dice,
        "dice_threshold": dice_threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--output_dir", required=True, help="folder of the rotation's fold folders")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--validation", choices=["lesion_slices", "synthetic"], default="lesion_slices")
    parser.add_argument("--variants", nargs="*", default=None, help="variant names to score (default: all)")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in (args.variants or VARIANTS)}
    dataset_dir = os.path.abspath(args.dataset_dir)
    folds = sorted(
        name for name in os.listdir(args.output_dir) if os.path.isfile(os.path.join(args.output_dir, name, "model.pt"))
    )
    results: dict[str, dict[str, dict[str, float]]] = {variant: {} for variant in variants}
    for fold in folds:
        fold_dir = os.path.abspath(os.path.join(args.output_dir, fold))
        record = read_run_record(fold_dir)
        config = fold_parser(fold_dir, dataset_dir, record, args.override)
        if args.validation == "synthetic":
            dataset = config.get_parsed_content("validate#dataset")
        else:
            dataset = lesion_slice_dataset(config)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16)
        print(f"{fold}: {len(loader.dataset)} validation slices", flush=True)
        defaults = {key: config[key] for settings in variants.values() for key in settings}
        distillation_maps = None
        for variant, settings in variants.items():
            config.update({**defaults, **settings})
            network = config.get_parsed_content("network_def", lazy=False)
            load_with_prior(network, os.path.join(fold_dir, "model.pt"), config)
            if "map_sigma" in settings:  # the checkpoint's sigma was loaded with the weights
                network.map_generator.smooth = GaussianFilter(2, settings["map_sigma"])
            # a prior changes only what follows the student's map: its variants reuse the default's maps
            if not settings and not network.has_intensity_prior:
                with torch.inference_mode():
                    distillation_maps = [network.eval().distillation_map(batch["image"]) for batch in loader]
            reuse = distillation_maps if set(settings) <= PRIOR_KEYS else None
            results[variant][fold] = validation_scores(network, loader, config["score_mode"], reuse)
            print(f"  {variant}: {results[variant][fold]}", flush=True)

    lines = ["| variant | validation pixel AUROC in organ (mean) | validation slice AUROC (mean) | per fold (pixel / slice) |", "|---|---|---|---|"]
    means = {}
    for variant, per_fold in results.items():
        means[variant] = statistics.fmean(v["pixel_auroc_in_organ"] for v in per_fold.values())
        slice_mean = statistics.fmean(v["slice_auroc"] for v in per_fold.values())
        cells = ", ".join(f"{fold} {100 * v['pixel_auroc_in_organ']:.1f} / {100 * v['slice_auroc']:.1f}" for fold, v in per_fold.items())
        lines.append(f"| {variant} | {100 * means[variant]:.1f} | {100 * slice_mean:.1f} | {cells} |")
    best = max(means, key=means.get)
    print("\n".join(lines))
    print(f"best on validation: {best} {variants[best]}")
    with open(os.path.join(args.output_dir, f"map_variants_{args.validation}.json"), "w") as f:
        json.dump({"variants": variants, "results": results, "best": best}, f, indent=1)


if __name__ == "__main__":
    main()
