"""Tests of multiad_monai.metrics: hand-computed values, brute-force references, ignite integration."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from multiad_monai.metrics import (
    AnomalyDetectionMetrics,
    aupro,
    dice_per_sample,
    dice_score,
    estimate_threshold,
    f1_max,
    image_auroc,
    image_average_precision,
    normalize_scores,
    pixel_auroc,
    pixel_average_precision,
)

# Two 2x2 images. Image 0: one anomalous pixel (0.9). Image 1: one region of two pixels (0.6, 0.2).
# Normal pixels: 0.1, 0.2, 0.3 (image 0) and 0.4, 0.5 (image 1), so N_normal = 5, 2 regions.
TOY_MAPS = np.array([[[0.9, 0.1], [0.2, 0.3]], [[0.4, 0.5], [0.6, 0.2]]], dtype=np.float32)
TOY_MASKS = np.array([[[1, 0], [0, 0]], [[0, 0], [1, 1]]], dtype=np.uint8)


def brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Definition-level AUPRO: every distinct score is a threshold, regions via scipy (not skimage)."""
    maps, masks = maps.reshape(-1, *maps.shape[-masks.ndim + 1 :]), masks.astype(bool)
    regions = []
    for sample_index, sample_mask in enumerate(masks):
        labelled, count = ndimage.label(sample_mask, structure=np.ones((3,) * sample_mask.ndim))
        regions += [(sample_index, labelled == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = np.count_nonzero(predicted & ~masks) / np.count_nonzero(~masks)
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def random_maps_and_masks(seed: int, shape=(3, 1, 8, 9), levels: int | None = 10):
    """Blobby masks and scores correlated with them; ``levels`` quantises scores to force ties."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random(shape) > 0.93, iterations=1).astype(np.uint8)
    maps = rng.random(shape) + 0.6 * masks
    if levels:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------- image level


def test_image_auroc_and_ap_known_values():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # Positive-negative pairs ranked correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3 of 4.
    assert image_auroc(scores, labels) == pytest.approx(0.75)
    # Recall 1/2 at precision 1 (t=0.8), recall 1 at precision 2/3 (t=0.35): 0.5*1 + 0.5*2/3.
    assert image_average_precision(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(5 / 6)


def test_image_auroc_single_class_raises():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_auroc([0.1, 0.2], [1, 1])


def test_f1_max_known_case():
    # t=0.8: tp=1, fp=0 -> F1 = 2/3; t=0.35: tp=2, fp=1 -> F1 = 4/5 (best).
    best_f1, threshold = f1_max(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert best_f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + 0.3 * labels, 2)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best_f1, threshold = f1_max(scores, labels)
    assert best_f1 == pytest.approx(f1.max(), abs=1e-12)
    assert f1[np.flatnonzero(thresholds == threshold)[0]] == pytest.approx(best_f1, abs=1e-12)


# ----------------------------------------------------------------------------- pixel level


def test_pixel_auroc_and_ap_on_toy():
    # Anomalous 0.9 and 0.6 beat all 5 normals; 0.2 beats 0.1 and ties 0.2: (5 + 5 + 1.5) / 15.
    assert pixel_auroc(TOY_MAPS, TOY_MASKS) == pytest.approx(11.5 / 15)
    # Recall steps of 1/3 at precision 1 (t=.9), 1 (t=.6), 3/7 (t=.2: 3 anomalous of 7 pixels >= .2).
    assert pixel_average_precision(TOY_MAPS, TOY_MASKS) == pytest.approx((1 + 1 + 3 / 7) / 3)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_ap_match_sklearn_with_ties(seed):
    maps, masks = random_maps_and_masks(seed)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_average_precision(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )


def test_aupro_hand_computed_toy():
    # Curve (FPR, PRO): (0,0) -> t=.9 (0, 1/2) -> t=.6 (0, 3/4) -> t=.5,.4,.3 (.2,.4,.6; 3/4)
    # -> t=.2 (.8, 1): a normal and an anomalous pixel tie, a diagonal -> t=.1 (1, 1).
    # limit .3: 3/4 flat -> .75.  limit .7: .6*.75 + .1*(.75 + .875)/2 = .53125 -> /.7.
    # limit 1: .45 + .2*(.75 + 1)/2 + .2*1 = .825.
    assert aupro(TOY_MAPS, TOY_MASKS, fpr_limit=0.3) == pytest.approx(0.75)
    assert aupro(TOY_MAPS, TOY_MASKS, fpr_limit=0.7) == pytest.approx(0.53125 / 0.7)
    assert aupro(TOY_MAPS[:, None], TOY_MASKS[:, None], fpr_limit=1.0) == pytest.approx(0.825)


def test_aupro_regions_are_per_image_and_equally_weighted():
    # Region A has 1 pixel, region B 3 pixels; detecting only A gives PRO 1/2 (not 1/4) for any
    # FPR < 1, because B scores below every normal pixel.
    maps = np.zeros((2, 3, 3), np.float32)
    masks = np.zeros((2, 3, 3), np.uint8)
    masks[0, 0, 0] = 1
    masks[1, 2, :] = 1
    maps[0, 0, 0] = 1.0
    maps[1, 2, :] = -1.0
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.5)


def test_perfect_and_inverted_maps():
    maps, masks = random_maps_and_masks(0, levels=None)
    perfect = masks.astype(np.float32) + 0.01 * maps  # all anomalous pixels above all normal ones
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(perfect, masks) == pytest.approx(1.0)
    assert aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(-perfect, masks) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 0.77, 1.0])
def test_aupro_matches_brute_force(seed, fpr_limit):
    maps, masks = random_maps_and_masks(seed, levels=10 if seed % 2 else None)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
        brute_force_aupro(maps[:, 0], masks[:, 0], fpr_limit), abs=1e-6
    )


def test_aupro_3d_labels_regions_in_3d():
    maps, masks = random_maps_and_masks(3, shape=(2, 1, 5, 5, 4), levels=8)
    assert aupro(maps, masks, fpr_limit=0.4) == pytest.approx(
        brute_force_aupro(maps[:, 0], masks[:, 0], 0.4), abs=1e-6
    )


def test_aupro_errors():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(maps, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="normal pixels"):
        aupro(maps, np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, TOY_MASKS.repeat(2, 1).repeat(2, 2), fpr_limit=0.0)
    with pytest.raises(ValueError, match="binary"):
        aupro(maps, np.full((2, 4, 4), 0.5))


def test_dice_at_threshold():
    # Predicted (>= .5): 0.9 (hit), 0.5 (false), 0.6 (hit); mask has 3 pixels: 2*2 / (3 + 3).
    assert dice_score(TOY_MAPS, TOY_MASKS, 0.5) == pytest.approx(4 / 6)
    # Image 0: {0.9} vs {0.9} -> 1. Image 1: {0.5, 0.6} vs {0.6, 0.2} -> 2*1/4.
    assert dice_per_sample(TOY_MAPS, TOY_MASKS, 0.5) == pytest.approx([1.0, 0.5])
    assert dice_score(np.zeros((2, 2)), np.zeros((2, 2)), 0.5) == 1.0
    assert dice_score(np.zeros((2, 2)), np.zeros((2, 2)), 0.5, empty_score=0.0) == 0.0


def test_estimate_threshold_uses_higher_observed_score():
    scores = np.arange(1, 101, dtype=float)
    assert estimate_threshold(scores, quantile=0.99) == 100.0  # index ceil(.99 * 99) = 99
    assert estimate_threshold(torch.tensor(scores), quantile=0.9) == 91.0  # index ceil(89.1) = 90
    assert estimate_threshold([1.0, 2.0, 3.0, 4.0], quantile=0.5) == 3.0  # not the interpolated 2.5
    with pytest.raises(ValueError, match="at least one"):
        estimate_threshold([])


def test_normalize_scores():
    out = normalize_scores(np.array([1.0, 2.0, 3.0]), threshold=2.0, scale=1.0)
    np.testing.assert_allclose(out, [1 / (1 + np.e), 0.5, 1 / (1 + np.exp(-1))])
    assert torch.is_tensor(normalize_scores(torch.tensor([2.0]), threshold=2.0, scale=0.5))
    assert normalize_scores(2.0, threshold=2.0, scale=3.0) == 0.5
    with pytest.raises(ValueError):
        normalize_scores([1.0], threshold=0.0, scale=0.0)


# ----------------------------------------------------------------------------- property tests


@settings(max_examples=60, deadline=None)
@given(
    samples=st.lists(st.tuples(st.integers(-20, 20), st.booleans()), min_size=2, max_size=40),
    transform=st.sampled_from([lambda s: np.exp(s / 7.0), lambda s: s**3, lambda s: 2.5 * s - 4.0]),
)
def test_auroc_invariant_to_monotone_transform(samples, transform):
    scores = np.array([s for s, _ in samples], dtype=np.float64)
    labels = np.array([lab for _, lab in samples], dtype=np.int64)
    assume(0 < labels.sum() < labels.size)
    assert image_auroc(transform(scores), labels) == pytest.approx(image_auroc(scores, labels), abs=1e-12)
    assert pixel_auroc(transform(scores), labels) == pytest.approx(image_auroc(scores, labels), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    maps=hnp.arrays(np.float32, (2, 5, 6), elements=st.integers(0, 6).map(float)),
    masks=hnp.arrays(np.bool_, (2, 5, 6)),
    fpr_limit=st.floats(0.01, 1.0),
)
def test_aupro_in_unit_interval_and_equals_brute_force(maps, masks, fpr_limit):
    assume(masks.any() and not masks.all())
    value = aupro(maps, masks, fpr_limit=fpr_limit)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(brute_force_aupro(maps, masks, fpr_limit), abs=1e-6)


# ----------------------------------------------------------------------------- ignite metric


SAVED_THRESHOLD = 0.6  # the network's saved threshold, which the evaluator passes with each batch


def make_batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    maps, masks = random_maps_and_masks(seed, shape=(6, 1, 8, 8), levels=None)
    masks[:2] = 0  # two normal images
    labels = (masks.reshape(6, -1).max(1) > 0).astype(np.int64)
    scores = maps.reshape(6, -1).max(1) + 0.2 * rng.random(6)
    batches = [
        {
            "score": torch.from_numpy(scores[s]),
            "label": torch.from_numpy(labels[s]),
            "anomaly_map": torch.from_numpy(maps[s]),
            "mask": torch.from_numpy(masks[s]),
            "threshold": SAVED_THRESHOLD,
        }
        for s in (slice(0, 4), slice(4, 6))
    ]
    return batches, scores, labels, maps, masks


def expected_results(scores, labels, maps, masks, fpr_limit=0.3):
    pixel_f1, pixel_threshold = f1_max(maps, masks)
    image_f1, image_threshold = f1_max(scores, labels)
    return {
        "image_auroc": image_auroc(scores, labels),
        "image_ap": image_average_precision(scores, labels),
        "image_f1_max": image_f1,
        "image_f1_threshold": image_threshold,
        "pixel_auroc": pixel_auroc(maps, masks),
        "pixel_ap": pixel_average_precision(maps, masks),
        "aupro": aupro(maps, masks, fpr_limit=fpr_limit),
        "pixel_f1_max": pixel_f1,
        "pixel_f1_threshold": pixel_threshold,
        "dice": dice_score(maps, masks, SAVED_THRESHOLD),
    }


def run_engine(metric, batches, *, max_epochs=1):
    engine = Engine(lambda engine, batch: batch)
    metric.attach(engine, "anomaly")
    engine.run(batches, max_epochs=max_epochs)
    return engine.state.metrics


def test_ignite_metric_matches_functional_on_batched_dicts():
    batches, scores, labels, maps, masks = make_batches()
    metrics = run_engine(AnomalyDetectionMetrics(), batches, max_epochs=2)  # also checks the per-epoch reset
    expected = expected_results(scores, labels, maps, masks)
    assert metrics["anomaly"] == pytest.approx(expected, abs=1e-12)
    assert all(isinstance(v, float) for v in metrics["anomaly"].values())
    # ignite's Metric.completed also stores each entry as its own key (what StatsHandler prints).
    assert metrics["aupro"] == metrics["anomaly"]["aupro"]
    # Dice is the user's mask at the saved threshold; F1 at the test-optimal threshold is only an upper bound
    assert metrics["dice"] < metrics["pixel_f1_max"]


def test_ignite_metric_without_a_saved_threshold_reports_no_dice(caplog):
    batches = [{key: value for key, value in batch.items() if key != "threshold"} for batch in make_batches()[0]]
    with caplog.at_level(logging.WARNING):
        metrics = run_engine(AnomalyDetectionMetrics(), batches)
    assert "dice" not in metrics["anomaly"] and "pixel_f1_max" in metrics["anomaly"]
    assert "no saved threshold" in caplog.text


def test_ignite_metric_on_decollated_output_with_missing_normal_masks():
    batches, scores, labels, maps, masks = make_batches(1)
    decollated = []
    for batch in batches:
        samples = decollate_batch(batch)
        for sample in samples:
            sample["anomaly_map"] = MetaTensor(sample["anomaly_map"])
            if int(sample["label"]) == 0:
                del sample["mask"]  # MVTec "good" images have no mask file
        decollated.append(samples)
    metrics = run_engine(AnomalyDetectionMetrics(fpr_limit=0.2, map_dtype="float16"), decollated)
    maps16 = maps.astype(np.float16)
    assert metrics["anomaly"] == pytest.approx(expected_results(scores, labels, maps16, masks, 0.2), abs=1e-9)


def test_ignite_metric_image_level_only(caplog):
    batches, scores, labels, _, _ = make_batches()
    image_only = [{**batch, "mask": None} for batch in batches]
    with caplog.at_level(logging.WARNING):
        metrics = run_engine(AnomalyDetectionMetrics(), image_only)
    assert set(metrics["anomaly"]) == {"image_auroc", "image_ap", "image_f1_max", "image_f1_threshold"}
    assert metrics["anomaly"]["image_auroc"] == pytest.approx(image_auroc(scores, labels))
    assert "pixel metrics skipped" in caplog.text


def test_ignite_metric_skips_single_class_and_selected_metrics(caplog):
    batches = make_batches()[0]
    normal_only = [{**b, "label": torch.zeros_like(b["label"])} for b in batches]
    metric = AnomalyDetectionMetrics(metrics=("image_auroc", "aupro"))
    with caplog.at_level(logging.WARNING):
        metrics = run_engine(metric, normal_only)
    assert set(metrics["anomaly"]) == {"aupro"}  # no fake image AUROC for one class
    assert "image_auroc" in caplog.text


def test_ignite_metric_tuple_output_and_prefix():
    batches, scores, labels, maps, masks = make_batches()
    as_tuple = lambda b: (b["score"], b["label"], b["anomaly_map"], b["mask"])  # noqa: E731
    metric = AnomalyDetectionMetrics(as_tuple, result_prefix="x/")
    metrics = run_engine(metric, batches)
    assert metrics["x/aupro"] == pytest.approx(aupro(maps, masks))
    with pytest.raises(ValueError, match="unknown metrics"):
        AnomalyDetectionMetrics(metrics=("auroc",))


class ThreadCollectives:
    """Two 'ranks' as threads: all_gather / all_reduce meet at a barrier, like real collectives."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.slots: list = [None] * world_size
        self.local = threading.local()

    def _exchange(self, value):
        self.slots[self.local.rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return values

    def all_gather(self, tensor, group=None):
        return torch.cat([t.reshape(-1) for t in self._exchange(tensor)])

    def all_reduce(self, value, op="SUM", group=None):
        assert op == "SUM"
        return sum(self._exchange(value))


def test_ignite_metric_gathers_uneven_ranks(monkeypatch):
    import ignite.distributed as idist

    batches, scores, labels, maps, masks = make_batches(2)
    collectives = ThreadCollectives(world_size=3)
    monkeypatch.setattr(idist, "get_world_size", lambda: 3)
    monkeypatch.setattr(idist, "all_gather", collectives.all_gather)
    monkeypatch.setattr(idist, "all_reduce", collectives.all_reduce)
    results, errors = [None] * 3, []

    def rank_main(rank):
        collectives.local.rank = rank
        try:
            metric = AnomalyDetectionMetrics(map_dtype="float16")
            for batch in batches[rank : rank + 1]:  # 4, 2 and 0 samples: uneven, one rank empty
                metric.update(batch)
            results[rank] = metric.compute()
        except Exception as error:  # surfaced in the main thread below
            errors.append(error)
            collectives.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    expected = expected_results(scores, labels, maps.astype(np.float16), masks)
    for result in results:
        assert result == pytest.approx(expected, abs=1e-9)
