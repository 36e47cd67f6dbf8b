"""Multi-AD training on ignite: one student distillation step and one discriminator step per iteration."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from multiad_monai.engines.utils import to_device
from multiad_monai.losses import CosineDistillationLoss, DiscriminatorLoss, StudentAdversarialLoss
from multiad_monai.networks.multiad import MultiAD

__all__ = ["MultiADTrainer", "TEACHER_FEATURES_KEY", "loss_terms"]

TEACHER_FEATURES_KEY = "teacher_features"


LOSS_TERMS = (Keys.LOSS, "distillation_loss", "adversarial_loss", "discriminator_loss")


def loss_terms(output: dict) -> dict[str, float]:
    """The scalar losses of a :class:`MultiADTrainer` iteration output, for ``StatsHandler`` and TensorBoard."""
    return {key: float(output[key]) for key in LOSS_TERMS if key in output}


class RealFakeDiscriminator(nn.Module):
    """Runs a discriminator on real and on fake features in one ``forward``, as DDP needs one call per step;
    the two batches are passed separately, so batch-norm statistics stay per batch as in a plain GAN step."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(real), self.discriminator(fake)


class MultiADTrainer(Trainer):
    """Trains the student of a :class:`MultiAD` network to reproduce its frozen teacher, with an adversarial term.

    Each iteration: the student loss ``distillation + adversarial_weight * fool-the-discriminator`` is
    minimised; then the discriminator is trained on teacher (real) vs detached student (fake) features
    (it is given all levels and judges the deepest, or several: :mod:`multiad_monai.networks.discriminator`).
    Handlers attach as to any MONAI trainer (StatsHandler, CheckpointSaver, ValidationHandler,
    LrScheduleHandler, ...).

    Args:
        device: torch device.
        max_epochs: number of epochs.
        train_data_loader: batches of dicts holding ``image_key`` ``(B, C, H, W[, D])`` and, when the
            frozen teacher's features were cached (:class:`multiad_monai.transforms.TeacherFeaturesd`),
            ``teacher_features_key``: a list of L tensors ``(B, C_i, ...)``.
        network: the :class:`MultiAD` network.
        optimizer: optimiser of ``network.student`` parameters.
        discriminator_optimizer: optimiser of ``network.discriminator``; required when the network has one.
        distillation_loss: defaults to :class:`CosineDistillationLoss`.
        adversarial_weight: weight of the student's adversarial loss (0 disables the discriminator).
        adversarial_warmup_epochs: the weight rises linearly from 0 to ``adversarial_weight`` over this many
            epochs (0: full weight from the first step), so the student learns the teacher's features before a
            discriminator, trained from the first step, pulls it; the discriminator trains throughout.
        image_key, teacher_features_key: batch keys.
        channels_last: run convolutions in channels-last memory format (faster on CPU).
        epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric, additional_metrics,
        metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, decollate, optim_set_to_none:
            as in :class:`monai.engines.SupervisedTrainer`.
        distributed: when ``torch.distributed`` is initialised, wrap the student and the discriminator step in
            ``DistributedDataParallel`` so their gradients are averaged over the processes (the frozen teacher
            needs none). The data loader must then use a ``DistributedSampler``.

    ``engine.state.output`` holds ``image``, ``loss`` (student total) and ``distillation_loss``,
    ``adversarial_loss``, ``discriminator_loss`` as floats.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: MultiAD,
        optimizer: Optimizer,
        discriminator_optimizer: Optimizer | None = None,
        distillation_loss: Callable | None = None,
        adversarial_weight: float = 0.01,
        adversarial_warmup_epochs: float = 0,
        image_key: str = Keys.IMAGE,
        teacher_features_key: str = TEACHER_FEATURES_KEY,
        channels_last: bool = True,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = True,
        distributed: bool = False,
    ) -> None:
        use_discriminator = network.discriminator is not None and adversarial_weight > 0
        if use_discriminator and discriminator_optimizer is None:
            raise ValueError("the network has a discriminator and adversarial_weight > 0: give a discriminator_optimizer.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=[IterationEvents] + list(event_names or []),
            event_to_attr=event_to_attr,
            decollate=decollate,
        )
        if channels_last:
            network.to(memory_format=torch.channels_last)
        self.network = network
        self.optimizer = optimizer
        self.discriminator_optimizer = discriminator_optimizer if use_discriminator else None
        self.distillation_loss = distillation_loss if distillation_loss is not None else CosineDistillationLoss()
        self.adversarial_weight = adversarial_weight if use_discriminator else 0.0
        if adversarial_warmup_epochs < 0:
            raise ValueError(f"adversarial_warmup_epochs must be >= 0, got {adversarial_warmup_epochs}.")
        self.adversarial_warmup_epochs = adversarial_warmup_epochs
        self.student_adversarial_loss = StudentAdversarialLoss()
        self.discriminator_loss = DiscriminatorLoss()
        self.image_key = image_key
        self.teacher_features_key = teacher_features_key
        self.channels_last = channels_last
        self.optim_set_to_none = optim_set_to_none
        # The modules that take gradients, each called once per step; DDP-wrapped in distributed runs.
        self.student_step: nn.Module = network.student
        self.discriminator_step: nn.Module | None = (
            RealFakeDiscriminator(network.discriminator) if self.discriminator_optimizer is not None else None
        )
        if distributed and dist.is_available() and dist.is_initialized():
            device_ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
            self.student_step = DistributedDataParallel(network.student, device_ids=device_ids)
            if self.discriminator_step is not None:
                self.discriminator_step = DistributedDataParallel(self.discriminator_step, device_ids=device_ids)
            # the module's logger: the bundles' logging.conf keeps ignite's engine loggers at WARNING
            logging.getLogger(__name__).info(
                f"rank {dist.get_rank()} of {dist.get_world_size()}: student and discriminator in DistributedDataParallel"
            )

    def current_adversarial_weight(self) -> float:
        """The adversarial weight of the current iteration: ``adversarial_weight`` after the warm-up."""
        if self.adversarial_warmup_epochs <= 0:
            return self.adversarial_weight
        done_epochs = self.state.iteration / max(1, self.state.epoch_length or 1)
        return self.adversarial_weight * min(1.0, done_epochs / self.adversarial_warmup_epochs)

    def _iteration(self, engine: MultiADTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        device, non_blocking = engine.state.device, engine.non_blocking
        images = to_device(batchdata[engine.image_key], device, non_blocking, engine.channels_last)
        network: MultiAD = engine.network
        network.train()
        if engine.teacher_features_key in batchdata:
            teacher_features = to_device(batchdata[engine.teacher_features_key], device, non_blocking, False)
        else:
            with torch.no_grad():
                teacher_features = network.teacher(images)
        engine.state.output = {Keys.IMAGE: images}

        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        student_features = engine.student_step(images)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        distillation = engine.distillation_loss(teacher_features, student_features)
        loss = distillation
        adversarial = torch.zeros(())
        if engine.discriminator_optimizer is not None:
            network.discriminator.requires_grad_(False)
            adversarial = engine.student_adversarial_loss(network.discriminator(student_features))
            loss = distillation + engine.current_adversarial_weight() * adversarial
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()

        discriminator_loss = torch.zeros(())
        if engine.discriminator_optimizer is not None:
            network.discriminator.requires_grad_(True)
            engine.discriminator_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            detached = [features.detach() for features in student_features]
            real_logits, fake_logits = engine.discriminator_step(teacher_features, detached)
            discriminator_loss = engine.discriminator_loss(real_logits, fake_logits)
            discriminator_loss.backward()
            engine.discriminator_optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        engine.state.output.update(
            {
                Keys.LOSS: loss.item(),
                "distillation_loss": distillation.item(),
                "adversarial_loss": adversarial.item(),
                "discriminator_loss": discriminator_loss.item(),
            }
        )
        return engine.state.output
