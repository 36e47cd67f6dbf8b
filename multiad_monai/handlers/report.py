"""Visual reports: a self-contained evaluation page (ROC curve, score histograms, the worst mistakes with their
overlays) and heatmap overlays of validation images in TensorBoard."""

from __future__ import annotations

import heapq
import html
import math
import os
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import roc_auc_score, roc_curve

from multiad_monai.engines.evaluator import MAP_KEY, SCORE_KEY
from multiad_monai.handlers.overlay import NetworkOverlays, save_png
from multiad_monai.handlers.writers import _sample_names, atomic_write_text, gather_rows
from multiad_monai.metrics import BASELINES_KEY, PER_CASE_KEY
from multiad_monai.networks.seresnet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["EvaluationReportWriter", "VolumeEvaluationReportWriter", "TensorBoardOverlayHandler", "roc_svg", "histogram_svg"]

_WIDTH, _HEIGHT, _PAD = 360, 260, 36


def _polyline(points: Sequence[tuple[float, float]], colour: str) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'


def _axes(x_label: str, y_label: str) -> str:
    left, bottom, right, top = _PAD, _HEIGHT - _PAD, _WIDTH - 10, 10
    return (
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>'
        f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="black"/>'
        f'<text x="{(left + right) / 2}" y="{_HEIGHT - 6}" font-size="12" text-anchor="middle">{x_label}</text>'
        f'<text x="12" y="{(top + bottom) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {(top + bottom) / 2})">{y_label}</text>'
    )


def _to_plot(x: float, y: float) -> tuple[float, float]:
    return _PAD + x * (_WIDTH - 10 - _PAD), _HEIGHT - _PAD - y * (_HEIGHT - _PAD - 10)


def roc_svg(scores: np.ndarray, labels: np.ndarray) -> str:
    """ROC curve of image scores as an inline SVG (empty text when a class is missing)."""
    if len(np.unique(labels)) < 2:
        return ""
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc_score(labels, scores)
    curve = _polyline([_to_plot(x, y) for x, y in zip(fpr, tpr)], "#c0392b")
    diagonal = _polyline([_to_plot(0, 0), _to_plot(1, 1)], "#bbbbbb")
    legend = f'<text x="{_WIDTH - 20}" y="{_HEIGHT - _PAD - 10}" font-size="12" text-anchor="end">AUROC {auc:.3f}</text>'
    return f'<svg width="{_WIDTH}" height="{_HEIGHT}">{_axes("false-positive rate", "true-positive rate")}{diagonal}{curve}{legend}</svg>'


def histogram_svg(scores: np.ndarray, labels: np.ndarray, threshold: float, bins: int = 30) -> str:
    """Histograms of the scores of normal (blue) and anomalous (red) samples, threshold as a dashed line."""
    low, high = float(scores.min()), float(scores.max())
    if math.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    high = high if high > low else low + 1.0
    edges = np.linspace(low, high, bins + 1)
    parts = [_axes("score", "share of samples")]
    counts = [np.histogram(scores[labels == value], edges)[0] for value in (0, 1)]
    shares = [c / max(c.sum(), 1) for c in counts]
    top = max(float(max(s.max() for s in shares)), 1e-9)
    width = (_WIDTH - 10 - _PAD) / bins
    for share, colour in zip(shares, ("#2e86c1", "#c0392b")):
        for i, value in enumerate(share):
            if value > 0:
                x, y = _to_plot(i / bins, value / top)
                _, base = _to_plot(0, 0)
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{base - y:.1f}" fill="{colour}" fill-opacity="0.45"/>')
    if math.isfinite(threshold):
        x, _ = _to_plot((threshold - low) / (high - low), 0)
        parts.append(f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{_HEIGHT - _PAD}" stroke="black" stroke-dasharray="4,3"/>')
    return f'<svg width="{_WIDTH}" height="{_HEIGHT}">{"".join(parts)}</svg>'


# metrics shown in the model-vs-baselines table, where the model and at least one baseline have them
_COMPARED_METRICS = ("image_auroc", "pixel_auroc", "slice_auroc", "voxel_auroc", "voxel_ap", "aupro")

BASELINES_NOTE = (
    "Baselines, fitted on the same normal training data: intensity_bright / intensity_dark score each voxel by "
    "its brightness / darkness inside the foreground, intensity_histogram by how rare its value is in normal "
    "tissue, feature_knn by the distance of the frozen teacher's features to the nearest normal training patch "
    "(PatchCore-style). A model that scores below a baseline does not earn its place on this data."
)


def _number(value) -> str:
    return "" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def baselines_html(metrics: dict) -> str:
    """The model-vs-baselines table (and the per-case voxel AUROCs) of ``metrics``; empty without baselines."""
    baselines = metrics.get(BASELINES_KEY)
    if not isinstance(baselines, dict) or not baselines:
        return ""
    names = [n for n in _COMPARED_METRICS if n in metrics and any(n in values for values in baselines.values())]
    rows = [("model", {n: metrics.get(n) for n in names})] + list(baselines.items())
    cells = "".join(
        "<tr>" + f"<td>{html.escape(scorer)}</td>" + "".join(f"<td>{_number(values.get(n))}</td>" for n in names) + "</tr>"
        for scorer, values in rows
    )
    page = (
        f"<h2>Model vs baselines</h2><p>{html.escape(BASELINES_NOTE)}</p>"
        f"<table><tr><th></th>{''.join(f'<th>{n}</th>' for n in names)}</tr>{cells}</table>"
    )
    per_case = metrics.get(PER_CASE_KEY)
    if isinstance(per_case, dict) and per_case:
        scorers = list(next(iter(per_case.values())))
        cells = "".join(
            f"<tr><td>{html.escape(case)}</td>" + "".join(f"<td>{_number(values.get(s))}</td>" for s in scorers) + "</tr>"
            for case, values in per_case.items()
        )
        page += (
            "<h3>Voxel AUROC inside the foreground, per case</h3>"
            f"<table><tr><th>case</th>{''.join(f'<th>{html.escape(s)}</th>' for s in scorers)}</tr>{cells}</table>"
        )
    return page


def _report_page(title: str, metrics: dict, body: str) -> str:
    """A self-contained HTML page: ``title``, the float metrics of the epoch as a table, the model-vs-baselines
    table when the evaluation has baselines, then ``body``."""
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in metrics.items() if isinstance(v, (int, float))
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} figure{{display:inline-block;margin:6px}}
td,th{{padding:2px 10px}} figcaption{{font-size:12px}}</style></head><body>
<h1>{title}</h1>
<table>{table}</table>
{baselines_html(metrics)}
{body}
</body></html>
"""


class EvaluationReportWriter:
    """After an evaluation epoch, writes ``report.html`` (with ``report/*.png``): the metrics, the ROC curve
    and the score histograms of normal vs anomalous images (threshold marked), and the ``max_examples``
    worst false positives (normal images with the highest scores) and false negatives (anomalous images
    with the lowest), each as image + heatmap overlay. Everything is relative to the report's folder, so
    the folder can be copied or zipped as is.

    Args:
        output_dir: folder of ``report.html``.
        network: module with the ``threshold`` buffer.
        mean, std: normalisation of the images, undone for display.
        max_examples: worst mistakes shown per kind.
    """

    def __init__(
        self,
        output_dir: str,
        network: torch.nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_examples: int = 8,
    ) -> None:
        self.output_dir = output_dir
        self.network = network
        self.overlays = NetworkOverlays(network, mean, std)
        self.max_examples = max_examples

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows: list[tuple[str, float, int]] = []
        # min-heaps of (badness, order, name, overlay): only the worst few overlays are kept in memory
        self._false_positives: list = []
        self._false_negatives: list = []

    def _keep(self, heap: list, badness: float, name: str, score: float, overlay: np.ndarray) -> None:
        item = (badness, len(self.rows), name, score, overlay)
        if len(heap) < self.max_examples:
            heapq.heappush(heap, item)
        elif badness > heap[0][0]:
            heapq.heapreplace(heap, item)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        if "label" not in output:
            return
        scores = torch.as_tensor(output[SCORE_KEY]).reshape(-1).tolist()
        labels = torch.as_tensor(output["label"]).reshape(-1).int().tolist()
        names = _sample_names(output, len(scores), len(self.rows))
        for index, (name, score, label) in enumerate(zip(names, scores, labels)):
            heap, badness = (self._false_negatives, -score) if label else (self._false_positives, score)
            if len(heap) < self.max_examples or badness > heap[0][0]:
                self._keep(heap, badness, name, score, self.overlays(output["image"][index], output[MAP_KEY][index]))
            self.rows.append((str(name), float(score), int(label)))

    def _gallery(self, heap: list, kind: str, folder: str) -> str:
        cells = []
        for rank, (_, _, name, score, overlay) in enumerate(sorted(heap, key=lambda item: item[:2], reverse=True)):
            file_name = f"{kind}_{rank:02d}.png"
            save_png(os.path.join(folder, file_name), overlay)
            cells.append(
                f'<figure><img src="report/{file_name}" width="384"><figcaption>{html.escape(name)} '
                f"(score {score:.4g})</figcaption></figure>"
            )
        return "".join(cells) or "<p>none</p>"

    def _write(self, engine: Engine) -> None:
        rows = gather_rows(self.rows)
        if idist.get_rank() > 0 or not rows:
            return
        scores = np.asarray([r[1] for r in rows])
        labels = np.asarray([r[2] for r in rows])
        threshold = float(self.network.threshold)
        folder = os.path.join(self.output_dir, "report")
        flagged = int((scores >= threshold).sum()) if math.isfinite(threshold) else 0
        body = f"""<p>{len(rows)} images ({int(labels.sum())} anomalous); threshold {threshold:.4g} (saved with the model);
{flagged} images at or above it.</p>
<h2>ROC curve (image scores)</h2>{roc_svg(scores, labels)}
<h2>Score histograms</h2><p>blue: normal, red: anomalous, dashed: threshold</p>{histogram_svg(scores, labels, threshold)}
<h2>Worst false positives (normal images, highest scores)</h2>{self._gallery(self._false_positives, "false_positive", folder)}
<h2>Worst false negatives (anomalous images, lowest scores)</h2>{self._gallery(self._false_negatives, "false_negative", folder)}"""
        page = _report_page("Multi-AD evaluation", engine.state.metrics, body)
        atomic_write_text(os.path.join(self.output_dir, "report.html"), page)


class TensorBoardOverlayHandler:
    """During validation, logs the first ``max_images`` validation images with their heatmaps (image |
    heatmap over it, thresholded region outlined) to TensorBoard, under ``tag`` at the trainer's epoch.

    Args:
        log_dir: TensorBoard folder (the training output folder).
        network: module with the ``threshold`` buffer.
        mean, std: normalisation of the images, undone for display.
        max_images: images logged per validation.
        tag: TensorBoard image tag.
    """

    def __init__(
        self,
        log_dir: str,
        network: torch.nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_images: int = 4,
        tag: str = "validation_overlays",
    ) -> None:
        self.log_dir = log_dir
        self.overlays = NetworkOverlays(network, mean, std)
        self.max_images = max_images
        self.tag = tag
        self._writer = None
        self._overlays: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._overlays.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for image, anomaly_map in zip(output["image"], output[MAP_KEY]):
            if len(self._overlays) >= self.max_images:
                return
            self._overlays.append(self.overlays(image, anomaly_map))

    def _write(self, engine: Engine) -> None:
        if not self._overlays:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        images = np.stack(self._overlays).astype(np.float32) / 255.0  # (N, H, 2W, 3)
        self._writer.add_images(self.tag, images, global_step=engine.state.epoch, dataformats="NHWC")
        self._writer.flush()


class VolumeEvaluationReportWriter:
    """After a volume evaluation epoch, writes ``report.html``: the metrics, the slice-level ROC curve and score
    histograms (slices whose foreground covers ``min_foreground`` of the plane; anomalous = holds a lesion
    voxel), and the per-volume table (score, decision, lesion and predicted voxels, Dice at the threshold).

    Args:
        output_dir: folder of ``report.html`` (the evaluation folder, beside the NIfTI maps it links to).
        axis, min_foreground: as the volume metrics.
        map_description: what the map is made of, shown under the title: a text, or a callable read when the
            report is written (``MultiAD.map_description``, after the checkpoint was loaded).
    """

    def __init__(
        self, output_dir: str, axis: int = 2, min_foreground: float = 0.1, map_description: str | Callable[[], str] = ""
    ) -> None:
        self.output_dir = output_dir
        self.map_description = map_description
        self.axis = axis
        self.min_foreground = min_foreground

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.volumes: list[dict] = []
        self.slices: list[tuple[float, int]] = []

    def _collect(self, engine: Engine) -> None:
        from multiad_monai.data.cases import volume_stem
        from multiad_monai.metrics.volume import slice_labels, volume_case_summary

        output = engine.state.output
        threshold = float(output["threshold"])
        label, foreground = output.get("label"), output.get("foreground")
        summary = volume_case_summary(output[MAP_KEY], label, foreground, threshold)
        score = float(output[SCORE_KEY].reshape(-1)[0])
        self.volumes.append({"name": volume_stem(str(output["name"])), "score": score, "threshold": threshold, **summary})
        if label is not None:
            lesion = np.asarray(label).reshape(np.asarray(label).shape[-3:]) > 0
            inside = None if foreground is None else np.asarray(foreground).reshape(lesion.shape) > 0
            eligible, anomalous = slice_labels(lesion if inside is None else lesion & inside, inside, self.axis, self.min_foreground)
            slice_scores = np.asarray(output["slice_scores"], dtype=np.float64)
            self.slices += [(float(s), int(a)) for s, a in zip(slice_scores[eligible], anomalous[eligible])]

    def _write(self, engine: Engine) -> None:
        volumes, slices = gather_rows(self.volumes), gather_rows(self.slices)
        if idist.get_rank() > 0 or not volumes:
            return
        header = ("volume", "score", "flagged", "foreground voxels", "lesion voxels", "predicted voxels", "Dice", "map")
        rows = []
        for v in volumes:
            flagged = "" if not math.isfinite(v["threshold"]) else ("yes" if v["score"] >= v["threshold"] else "no")
            cells = [html.escape(v["name"]), f"{v['score']:.4g}", flagged, v["foreground_voxels"], v["lesion_voxels"], v["predicted_voxels"]]
            cells += ["" if v["dice"] is None else f"{v['dice']:.3f}", f'<a href="{html.escape(v["name"])}_anomaly_map.nii.gz">NIfTI</a>']
            rows.append("<tr>" + "".join(f"<td>{'' if c is None else c}</td>" for c in cells) + "</tr>")
        plots = ""
        if slices:
            scores, labels = np.asarray([s for s, _ in slices]), np.asarray([a for _, a in slices])
            threshold = float(volumes[0]["threshold"])
            plots = (
                f"<h2>Slice-level ROC ({len(slices)} slices, {int(labels.sum())} with lesions)</h2>{roc_svg(scores, labels)}"
                f"<h2>Slice score histograms</h2><p>blue: normal, red: with lesion, dashed: threshold</p>"
                f"{histogram_svg(scores, labels, threshold)}"
            )
        description = self.map_description() if callable(self.map_description) else self.map_description
        described = f"<p>Map: {html.escape(description)}</p>" if description else ""
        body = f"""{described}{plots}
<h2>Volumes</h2><table><tr>{"".join(f"<th>{h}</th>" for h in header)}</tr>{"".join(rows)}</table>"""
        page = _report_page("Multi-AD volume evaluation", engine.state.metrics, body)
        atomic_write_text(os.path.join(self.output_dir, "report.html"), page)
