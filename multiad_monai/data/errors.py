"""Exceptions for datasets and checkpoints that cannot be used as given, and the short reason shown for a wrapped error."""

from __future__ import annotations

__all__ = ["DatasetError", "CheckpointError", "first_line", "root_cause"]


class DatasetError(ValueError):
    """A dataset folder or datalist is missing, malformed, or holds unusable files.

    The message names the offending file or folder and says what is wrong, so it can be
    shown to the user as is.
    """


class CheckpointError(RuntimeError):
    """A checkpoint or saved training state that is missing, unreadable, or from another configuration;
    the message names the file."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (readers' messages run to many lines), or its type's name when empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_cause(error: BaseException) -> BaseException:
    """The error to show: MONAI's config parser and transforms wrap errors of ``$`` expressions, ``_target_``
    calls and transforms; the outermost of this package's own errors (which name the file) if any, else the
    innermost exception."""
    chain = [error]
    while chain[-1].__cause__ is not None and chain[-1].__cause__ not in chain:  # a re-raised error can close a loop
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if isinstance(e, (DatasetError, CheckpointError))]
    return ours[0] if ours else chain[-1]
