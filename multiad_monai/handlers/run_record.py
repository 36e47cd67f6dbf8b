"""Writing the run record (``run.json``) when training starts, and clearing a replaced run's files."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from multiad_monai.data.run_record import MODEL_FILE, RESUME_STATE, write_run_record

__all__ = ["RunRecordWriter"]


class RunRecordWriter:
    """Writes the record checked by :func:`~multiad_monai.data.run_record.check_training_run` to
    ``output_dir/run.json`` when the trainer starts, i.e. after the data was loaded and cached without error,
    so a run that fails on its inputs leaves the folder as it was.

    With ``resume`` False the run replaces what the folder held: the old ``resume.pt`` and ``model.pt`` are
    removed first, so that a kill before the first validation cannot leave the old model beside the new record.
    Attach it before :class:`~multiad_monai.handlers.ResumeHandler`. Only rank 0 writes.

    Args:
        output_dir: the training output folder.
        record: the run record.
        resume: the ``resume`` setting.
    """

    def __init__(self, output_dir: str, record: Mapping[str, Any], resume: bool = True) -> None:
        self.output_dir = output_dir
        self.record = dict(record)
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() > 0:
            return
        if not self.resume:
            for name in (RESUME_STATE, MODEL_FILE):
                path = os.path.join(self.output_dir, name)
                if os.path.isfile(path):
                    logging.getLogger(__name__).warning(f"resume=false: removing {path} of the run this one replaces")
                    os.remove(path)
        write_run_record(self.output_dir, self.record)
