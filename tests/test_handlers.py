import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, Dataset

from multiad_monai.data import mvtec_datalist
from multiad_monai.apps.bundles import BUNDLES_DIR
from multiad_monai.handlers import (NetworkCheckpointLoader, fit_learned_fusion, fit_normal_statistics, log_epoch_metrics,
                                   metrics_log_line, normalized_score, render_overlay)
from multiad_monai.inferers import AnomalyMapGenerator
from multiad_monai.networks import EfficientNetLiteEncoder, IntensityPrior, MultiAD, input_mean, input_std
from multiad_monai.metrics import NormalFitScore
from multiad_monai.transforms import image_transforms_2d, validation_transforms_2d


def test_fit_learned_fusion_changes_the_head_and_lowers_its_loss(tiny_demo_dataset):
    torch.manual_seed(0)
    network = MultiAD(
        EfficientNetLiteEncoder(image_size=64),
        EfficientNetLiteEncoder(pretrained=False, image_size=64),
        map_generator=AnomalyMapGenerator(num_levels=4, fusion="learned", sigma=2.0),
    )
    items = mvtec_datalist(tiny_demo_dataset, "train")[:8]
    transform = validation_transforms_2d(64, input_mean("efficientnet-lite0"), input_std("efficientnet-lite0"), defect_probability=1.0)
    loader = DataLoader(Dataset(items, transform), batch_size=4)
    head = network.map_generator.fusion_head
    before = head.conv.weight.detach().clone()
    short = fit_learned_fusion(network, loader, steps=2)
    longer = fit_learned_fusion(network, loader, steps=100)
    assert longer < short
    assert not torch.allclose(before, head.conv.weight)
    assert not head.training
    with torch.no_grad():
        amap = network(torch.randn(1, 3, 64, 64))
    assert amap.shape == (1, 1, 64, 64) and bool((amap >= 0).all())


def test_render_overlay_outlines_the_thresholded_region():
    image = np.zeros((3, 20, 30), dtype=np.float32)
    amap = np.zeros((20, 30), dtype=np.float32)
    amap[5:10, 10:20] = 1.0
    picture = render_overlay(image, amap, threshold=0.5)
    assert picture.shape == (20, 60, 3) and picture.dtype == np.uint8
    right = picture[:, 30:]
    assert (right[5, 10:20] == 255).all()  # outline drawn in white on the region's edge
    assert (right[0, 0] < 255).all()
    assert render_overlay(image[:1], amap).shape == (20, 60, 3)


def test_normalized_score_is_one_half_at_the_threshold():
    assert normalized_score(0.3, 0.3, 0.1) == 0.5
    assert normalized_score(0.5, 0.3, 0.1) > 0.5 > normalized_score(0.1, 0.3, 0.1)
    assert np.isnan(normalized_score(0.3, float("nan"), 0.1))


def test_report_plots_and_mistake_ranking(tmp_path):
    from ignite.engine import Engine

    from multiad_monai.handlers import EvaluationReportWriter
    from multiad_monai.handlers.report import histogram_svg, roc_svg

    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert "AUROC 0.750" in roc_svg(scores, labels)
    assert roc_svg(scores, np.zeros(4, int)) == ""  # one class: no curve
    assert histogram_svg(scores, labels, threshold=0.5).count("<rect") >= 4

    network = torch.nn.Module()
    network.register_buffer("threshold", torch.tensor(0.5))
    batches = [
        {"image": torch.rand(2, 3, 8, 8), "anomaly_map": torch.rand(2, 1, 8, 8), "score": torch.tensor(s), "label": torch.tensor(l), "name": n}
        for s, l, n in (([0.1, 0.9], [0, 0], ["good_a", "good_b"]), ([0.2, 0.7], [1, 1], ["bad_a", "bad_b"]))
    ]
    engine = Engine(lambda e, batch: batch)
    writer = EvaluationReportWriter(str(tmp_path), network, max_examples=1)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    page = (tmp_path / "report.html").read_text()
    # the worst false positive is the normal image scored 0.9, the worst false negative the anomaly scored 0.2
    assert "good_b" in page and "good_a" not in page and "bad_a" in page and "bad_b" not in page
    assert (tmp_path / "report" / "false_positive_00.png").is_file()


def _normal_statistics_setup(dataset_dir: str, level_normalization: str) -> tuple:
    """A small teacher-student network normalising its levels, six normal training items, their transform and a
    loader of them (batch 4)."""
    torch.manual_seed(0)
    network = MultiAD(
        EfficientNetLiteEncoder(image_size=64),
        EfficientNetLiteEncoder(pretrained=False, image_size=64),
        map_generator=AnomalyMapGenerator(num_levels=4, sigma=0, level_normalization=level_normalization),
    ).eval()
    items = mvtec_datalist(dataset_dir, "train")[:6]
    transform = image_transforms_2d(64, input_mean("efficientnet-lite0"), input_std("efficientnet-lite0"), with_mask=False)
    return network, items, transform, DataLoader(Dataset(items, transform), batch_size=4)


def test_fit_normal_statistics_matches_the_maps_of_the_loader(tiny_demo_dataset):
    network, items, transform, loader = _normal_statistics_setup(tiny_demo_dataset, "pixel")
    assert fit_normal_statistics(network, loader, max_images=5) == 5
    images = torch.stack([transform(item)["image"] for item in items[:5]])
    with torch.no_grad():
        raw = network.map_generator.raw_level_maps(*network.features(images), (64, 64))
        assert torch.allclose(network.map_generator.normal_mean, raw.mean(0), atol=1e-5)
        assert torch.allclose(network.map_generator.normal_std, raw.std(0), atol=1e-4)
        # the fitting images, normalised, average to zero at every pixel
        assert torch.allclose(network.map_generator.level_maps(*network.features(images), (64, 64)).mean(0), torch.zeros(4, 64, 64), atol=1e-3)


def test_normal_fit_score_uses_raw_maps_under_pixel_normalization():
    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.map_generator = AnomalyMapGenerator(num_levels=1, sigma=0, level_normalization="pixel")

        def features(self, images):
            return [images], [images * self.scale + torch.flip(images, dims=[-1])]

    network = Network()
    network.map_generator.set_normal_statistics(torch.full((1, 4, 4), 5.0), torch.ones(1, 4, 4))
    images = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        raw = network.map_generator.raw_level_maps(*network.features(images), (4, 4))
    output = {"image": images, "anomaly_map": torch.full((2, 1, 4, 4), -5.0), "label": torch.tensor([0, 0])}
    metric = NormalFitScore(network=network)
    metric.update(output)
    assert metric.compute() == pytest.approx(-float(raw.mean()), rel=1e-5)
    plain = NormalFitScore()
    plain.update(output)
    assert plain.compute() == pytest.approx(5.0)


def test_normal_fit_score_ignores_the_intensity_prior():
    class Network(torch.nn.Module):
        has_intensity_prior = True

        def __init__(self):
            super().__init__()
            self.map_generator = AnomalyMapGenerator(num_levels=1, sigma=0)
            self.intensity_prior = IntensityPrior(weight=0.5, tail="upper", channel=0)
            self.intensity_prior.set_statistics(map_reference=0.3, median=0.5, low=0.1, high=0.9)

    network = Network()
    images, distillation = torch.rand(3, 3, 4, 4), torch.rand(3, 1, 4, 4)
    # the evaluator's map holds the prior; the checkpoint score must be the one of the map without it
    mixed = network.intensity_prior(images, distillation)
    output = {"image": images, "anomaly_map": mixed, "label": torch.tensor([0, 1, 0])}
    metric = NormalFitScore(network=network)
    metric.update(output)
    assert metric.compute() == pytest.approx(-float(distillation[[0, 2]].mean()), rel=1e-5)
    assert metric.compute() != pytest.approx(-float(mixed[[0, 2]].mean()), rel=1e-3)


def test_periodic_refit_handlers_attach_only_for_their_part_and_refit_every_interval(caplog):
    from ignite.engine import Engine, Events

    from multiad_monai.handlers import FusionFitHandler, IntensityPriorHandler, NormalStatisticsHandler, PeriodicRefitHandler

    plain = MultiAD(EfficientNetLiteEncoder(pretrained=False), EfficientNetLiteEncoder(pretrained=False))
    for handler_type in (FusionFitHandler, IntensityPriorHandler, NormalStatisticsHandler):
        engine = Engine(lambda engine, batch: None)
        handler_type(plain, data_loader=[], interval=2).attach(engine)
        assert not engine.has_event_handler(Events.EPOCH_COMPLETED), handler_type.__name__
        with pytest.raises(ValueError, match="interval must be at least 1"):
            handler_type(plain, data_loader=[], interval=0)

    class Counting(PeriodicRefitHandler):
        def applies(self):
            return True

        def refit(self, device):
            self.epochs.append(engine.state.epoch)
            return f"refitted on {device}"

    engine = Engine(lambda engine, batch: None)
    engine.state.device = "cpu"
    counting = Counting(plain, data_loader=[], interval=2)
    counting.epochs = []
    counting.attach(engine)
    with caplog.at_level("INFO"):
        engine.run([0], max_epochs=5)
    assert counting.epochs == [2, 4] and "refitted on cpu" in caplog.text


def test_normal_statistics_cache_gives_the_same_fit_without_the_loader(tiny_demo_dataset):
    network, _, _, loader = _normal_statistics_setup(tiny_demo_dataset, "level")
    assert fit_normal_statistics(network, loader, max_images=5) == 5
    plain = network.map_generator.normal_mean.clone(), network.map_generator.normal_std.clone()
    cache: list = []
    assert fit_normal_statistics(network, loader, max_images=5, cache=cache) == 5
    assert sum(images.shape[0] for images, _ in cache) == 5
    assert torch.equal(network.map_generator.normal_std, plain[1])
    with torch.no_grad():  # the student moves between fits; the next fit must see it, not the loader
        next(network.student.parameters()).mul_(1.1)
    assert fit_normal_statistics(network, [], max_images=5, cache=cache) == 5  # no loader needed
    cached = network.map_generator.normal_mean.clone(), network.map_generator.normal_std.clone()
    assert not torch.equal(cached[1], plain[1])
    assert fit_normal_statistics(network, loader, max_images=5) == 5
    assert torch.allclose(network.map_generator.normal_mean, cached[0], atol=1e-6)
    assert torch.allclose(network.map_generator.normal_std, cached[1], atol=1e-6)
    small: list = []
    fit_normal_statistics(network, loader, max_images=5, cache=small, cache_bytes=1000)
    assert small == []  # more than cache_bytes: nothing kept, the next fit reads the loader again


def test_epoch_metrics_line_keeps_the_baselines_apart_from_the_model(caplog):
    """MONAI's StatsHandler flattens nested metrics, printing a baseline's image_auroc as the model's: the bundles'
    evaluations log through log_epoch_metrics, which names each baseline."""
    metrics = {"image_auroc": np.float32(0.95), "dice": 0.18, "baselines": {"feature_knn": {"image_auroc": 0.78}},
               "per_case": {"case0": {"model": 0.9}}}
    line = metrics_log_line(1, metrics)
    assert line == "Epoch[1] Metrics -- dice: 0.1800 image_auroc: 0.9500 | baseline feature_knn -- image_auroc: 0.7800"
    with caplog.at_level(logging.INFO, logger="StatsHandler"):
        log_epoch_metrics(SimpleNamespace(state=SimpleNamespace(epoch=1, metrics=metrics)))
    assert line in caplog.text
    for bundle in ("multiad_2d", "multiad_medical"):
        with open(os.path.join(BUNDLES_DIR, bundle, "configs", "evaluate.json")) as f:
            stats = [h for h in json.load(f)["handlers"] if isinstance(h, dict) and h.get("_target_") == "StatsHandler"]
        assert [h.get("epoch_print_logger") for h in stats] == ["$multiad_monai.handlers.log_epoch_metrics"], bundle


def test_checkpoint_loader_prepares_the_network_for_inference(tmp_path):
    def network():
        return MultiAD(EfficientNetLiteEncoder(image_size=64), EfficientNetLiteEncoder(pretrained=False, image_size=64))

    torch.manual_seed(0)
    trained = network().eval()
    torch.save({"network": trained.state_dict()}, tmp_path / "model.pt")
    images = torch.rand(2, 3, 64, 64)
    for prepare in (True, False):
        loaded = network()
        NetworkCheckpointLoader(str(tmp_path / "model.pt"), loaded, prepare_for_inference=prepare).attach(Engine(lambda engine, batch: None))
        assert loaded.inference_only is prepare
        with torch.no_grad():
            assert torch.allclose(loaded.eval()(images), trained(images), atol=1e-5)
    for bundle in ("multiad_2d", "multiad_medical"):  # evaluation and inference of both bundles run the folded network
        for workflow in ("evaluate", "inference"):
            with open(os.path.join(BUNDLES_DIR, bundle, "configs", f"{workflow}.json")) as f:
                handlers = json.load(f)["handlers"]
            loader = next(h for h in handlers if h["_target_"].endswith("NetworkCheckpointLoader"))
            assert loader["prepare_for_inference"] is True, (bundle, workflow)
