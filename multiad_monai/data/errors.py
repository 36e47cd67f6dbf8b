"""Exception raised for datasets that cannot be used as given."""

from __future__ import annotations

__all__ = ["DatasetError", "CheckpointError"]


class DatasetError(ValueError):
    """A dataset folder or datalist is missing, malformed, or holds unusable files.

    The message names the offending file or folder and says what is wrong, so it can be
    shown to the user as is.
    """


class CheckpointError(RuntimeError):
    """A checkpoint or saved training state that is missing, unreadable, or from another configuration;
    the message names the file."""
