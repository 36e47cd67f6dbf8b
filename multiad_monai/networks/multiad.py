"""The Multi-AD network: a frozen teacher, a student of the same design, a discriminator and the map head."""

from __future__ import annotations

import torch
import torch.nn as nn

from multiad_monai.inferers.anomaly_map import AnomalyMapGenerator
from multiad_monai.networks.inference_folding import fold_batch_norms, fold_zero_padding
from multiad_monai.networks.intensity_prior import IntensityPrior

__all__ = ["MultiAD"]


class MultiAD(nn.Module):
    """Teacher-student anomaly detector.

    Args:
        teacher: pretrained encoder returning L feature maps; frozen here (no gradients, always eval mode).
        student: encoder with the same ``out_channels`` as the teacher, trained to reproduce its features.
        discriminator: optional module judging the deepest features (teacher real, student fake).
        map_generator: turns feature pairs into a fused, smoothed map; default mean fusion, sigma 4.
        test_time_flip: the map is the mean of the maps of the image and of its mirror image (flipped along
            the last spatial axis, left-right for axial slices, and flipped back): twice the inference cost,
            and the student's errors that are not mirror-symmetric average out. Training is unchanged.
        intensity_prior: optional :class:`IntensityPrior` mixed into the map (beyond the method; off by default).

    ``forward(images)`` with images ``(B, C, H, W[, D])`` returns the anomaly map ``(B, 1, H, W[, D])``;
    :meth:`distillation_map` the map of the method alone (without the intensity prior).
    Buffers ``threshold`` (anomalous when the image score, or a pixel of the map, is at or above it) and
    ``score_scale`` (spread of normal scores, for 0-1 normalised scores) are NaN until estimated.
    :meth:`prepare_for_inference` makes a loaded network faster to run and unable to train.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        discriminator: nn.Module | None = None,
        map_generator: AnomalyMapGenerator | None = None,
        test_time_flip: bool = False,
        intensity_prior: IntensityPrior | None = None,
    ) -> None:
        super().__init__()
        t_channels, s_channels = list(teacher.out_channels), list(student.out_channels)
        if t_channels != s_channels:
            raise ValueError(f"student feature channels {s_channels} must equal the teacher's {t_channels}.")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.discriminator = discriminator
        self.map_generator = map_generator if map_generator is not None else AnomalyMapGenerator(num_levels=len(t_channels))
        self.test_time_flip = test_time_flip
        self.intensity_prior = intensity_prior
        # set from normal validation images (NormalThresholdHandler) and saved with the weights
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("score_scale", torch.tensor(float("nan")))
        self.inference_only = False

    def prepare_for_inference(self) -> int:
        """Folds the batch norms and symmetric zero paddings of teacher and student into their convolutions
        (:mod:`~multiad_monai.networks.inference_folding`): the same maps (to float rounding) for less work per
        image. The network is put in eval mode for good: training it raises, and its state dict no longer has a
        checkpoint's keys. Call it after loading the weights. Returns the number of batch norms folded.
        """
        self.eval()
        folded = fold_batch_norms(self.teacher) + fold_batch_norms(self.student)
        fold_zero_padding(self.teacher)
        fold_zero_padding(self.student)
        self.inference_only = True
        return folded

    def train(self, mode: bool = True) -> "MultiAD":
        if mode and self.inference_only:
            raise RuntimeError("this network was prepared for inference (batch norms folded): build it again to train it.")
        super().train(mode)
        self.teacher.eval()  # BN statistics of the pretrained teacher must never move
        return self

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student features, each a list of L maps ``(B, C_i, H / s_i, W / s_i)``."""
        with torch.no_grad():
            teacher_features = self.teacher(images)
        return teacher_features, self.student(images)

    def single_map(self, images: torch.Tensor) -> torch.Tensor:
        """The map of ``images`` without test-time flipping: ``(B, 1, *spatial)``."""
        teacher_features, student_features = self.features(images)
        return self.map_generator(teacher_features, student_features, images.shape[2:])

    def distillation_map(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher-student map, flipped at test time when ``test_time_flip``: ``(B, 1, *spatial)``."""
        if not self.test_time_flip:
            return self.single_map(images)
        return 0.5 * (self.single_map(images) + self.single_map(images.flip(-1)).flip(-1))

    @property
    def has_intensity_prior(self) -> bool:
        return self.intensity_prior is not None and self.intensity_prior.enabled

    def map_description(self) -> str:
        """One line naming what the map is made of, for reports: whether the intensity prior is in it."""
        if not self.has_intensity_prior:
            return "Multi-AD map (teacher-student distillation)"
        return f"Multi-AD map mixed with an intensity prior, beyond the method ({self.intensity_prior.describe()})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        anomaly_map = self.distillation_map(images)
        return self.intensity_prior(images, anomaly_map) if self.has_intensity_prior else anomaly_map
