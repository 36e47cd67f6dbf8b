"""Resumable training: the whole training state saved at every epoch end, and loaded when the run restarts."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from multiad_monai.atomic import atomic_path
from multiad_monai.data.errors import CheckpointError, first_line
from multiad_monai.data.run_record import RERUN_WAYS_OUT, RESUME_STATE

__all__ = ["ResumeHandler", "RandomStates"]


class RandomStates:
    """The torch, numpy and Python random generators as one object with ``state_dict``/``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


def _stateful(obj: Any) -> Any:
    """The part of ``obj`` that holds its state: MONAI's CheckpointSaver and EarlyStopHandler keep it in the
    ignite handler they wrap (best checkpoints so far; patience counter and best score)."""
    for attribute in ("_key_metric_checkpoint", "_handler"):
        inner = getattr(obj, attribute, None)
        if inner is not None and hasattr(inner, "state_dict"):
            return inner
    if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
        raise TypeError(f"{type(obj).__name__} has no state_dict/load_state_dict; it cannot be saved for resuming.")
    return obj


class ResumeHandler:
    """Saves the training state to ``save_dir/resume.pt`` at the end of every epoch and, when training starts
    again with the same ``save_dir``, loads it and continues from the next epoch.

    Attach it last among the trainer's handlers, so that the state saved at an epoch's end includes that
    epoch's validation (threshold, best checkpoint, early-stopping counter). The file is written through a
    temporary file and a rename: a kill at any moment leaves the previous complete state. A finished run
    (all epochs, or stopped early) is marked so, and restarting it does nothing. In distributed runs every
    process loads and only rank 0 writes. Not ignite's ``Checkpoint``: under one fixed file name it removes the
    previous file before it writes the next (ignite 0.5), so a kill between the two would leave no state at all.

    What a kill costs: the epoch in progress is redone. Random generators are restored, but the data loader
    order after a restart is not the one the uninterrupted run would have drawn, so the weights at the end
    are close to, not equal to, those of an uninterrupted run.

    Args:
        save_dir: folder of ``resume.pt`` (the training output folder).
        objects: name -> object with ``state_dict``/``load_state_dict`` (network, optimisers, LR scheduler),
            or MONAI ``CheckpointSaver`` / ``EarlyStopHandler`` (their inner ignite state is saved).
        enabled: False turns the handler off (no saving, no loading).
        file_name: name of the state file.
        fingerprint: hash of what makes the model (see :mod:`multiad_monai.data.run_record`), saved with the
            state; a state saved with another one is not loaded. None: not checked.
    """

    def __init__(
        self,
        save_dir: str,
        objects: dict[str, Any],
        enabled: bool = True,
        file_name: str = RESUME_STATE,
        fingerprint: str | None = None,
    ) -> None:
        self.path = os.path.join(save_dir, file_name)
        self.objects = dict(objects)
        self.enabled = enabled
        self.fingerprint = fingerprint
        self.random_states = RandomStates()
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if os.path.isfile(self.path):  # a saved state from other settings fails here, before training starts
            self._check(self._read(), engine.state.max_epochs)
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save, completed=True)

    def _state(self, engine: Engine, completed: bool) -> dict[str, Any]:
        state = {name: _stateful(obj).state_dict() for name, obj in self.objects.items()}
        state["trainer"] = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "max_epochs": engine.state.max_epochs,
            "epoch_length": engine.state.epoch_length,
        }
        state["random_states"] = self.random_states.state_dict()
        state["completed"] = completed
        state["fingerprint"] = self.fingerprint
        return state

    def save(self, engine: Engine, completed: bool = False) -> None:
        state = self._state(engine, completed)  # every rank builds it: some state_dicts may synchronise
        if idist.get_rank() > 0:
            return
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    def _read(self) -> dict[str, Any]:
        try:
            return torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise CheckpointError(f"{self.path}: cannot read the saved training state ({error}); delete it to start afresh.") from error

    def _check(self, state: dict[str, Any], max_epochs: int | None) -> None:
        missing = sorted(set(self.objects) - set(state))
        if missing:
            raise CheckpointError(f"{self.path}: saved training state lacks {missing}; it is from another configuration.")
        if self.fingerprint is not None and state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{self.path}: saved from other settings or data than this run's (fingerprint differs); {RERUN_WAYS_OUT}."
            )
        saved_epochs = state["trainer"]["max_epochs"]
        if max_epochs is not None and saved_epochs != max_epochs:
            raise CheckpointError(
                f"{self.path}: saved for {saved_epochs} epochs, this run has {max_epochs}; "
                "use the same settings to resume, or another output folder."
            )

    def load(self, engine: Engine) -> None:
        if not os.path.isfile(self.path):
            return
        state = self._read()
        self._check(state, engine.state.max_epochs)
        trainer_state = state["trainer"]
        for name, obj in self.objects.items():
            try:
                _stateful(obj).load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as error:
                raise CheckpointError(
                    f"{self.path}: the saved {name!r} does not fit this configuration ({first_line(error)}); "
                    "use the same settings to resume, or another output folder."
                ) from error
        engine.state.epoch = trainer_state["epoch"]
        engine.state.iteration = trainer_state["iteration"]
        self.random_states.load_state_dict(state["random_states"])
        if state["completed"]:
            self.logger.info(f"training in {os.path.dirname(self.path)} is already complete; nothing to do.")
            engine.terminate()
        else:
            self.logger.info(f"resuming from {self.path} after epoch {engine.state.epoch}")
