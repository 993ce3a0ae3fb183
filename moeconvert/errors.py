"""Exceptions with messages that tell the user what to do.

Every error a user can cause derives from :class:`MoeConvertError`; the CLI prints its message on one
line and exits with its ``exit_code`` (2 for bad input or a failed write, 1 for a
failed check, 3 for a failed upload, 130 when interrupted),
never with a traceback.
"""

from __future__ import annotations


class MoeConvertError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is a complete one-line message."""

    exit_code = 2


class BadInputError(MoeConvertError):
    """The input model, folder or option is not usable."""


class ModelNotFoundError(BadInputError):
    """Neither a local folder nor a reachable Hub repository (or revision) matches MODEL."""


class UnsupportedModelError(BadInputError):
    """The checkpoint is not an MoE model of a supported family, or holds only pickle weights."""


class CorruptCheckpointError(BadInputError):
    """A safetensors file or index is malformed, truncated or inconsistent with the config."""


class OutputExistsError(BadInputError):
    """The output path exists and ``force`` was not given."""


class NotEnoughSpaceError(BadInputError):
    """The output's filesystem has less free space than the run will write (found before any work)."""


class OutputWriteError(MoeConvertError):
    """Writing the output failed (full disk, file-size limit, I/O error); finished work is kept to resume."""


class InterruptedRunError(MoeConvertError):
    """The run was interrupted (Ctrl-C); finished work is kept to resume."""

    exit_code = 130


class PushFailedError(MoeConvertError):
    """The Hub refused an upload or could not be reached; the local output is untouched."""

    exit_code = 3


class CheckFailedError(MoeConvertError):
    """A verification ran and its result is outside the thresholds."""

    exit_code = 1
