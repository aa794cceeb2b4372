"""Errors that the command-line tools turn into a one-line message and a non-zero exit.

Every problem a user can cause (a bad option, a missing folder, a checkpoint that is not one) raises a
subclass of :class:`BmtardError` whose message names the problem and, where it helps, the accepted
values. The entry points catch ``BmtardError`` and print ``error: <message>``; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


class BmtardError(Exception):
    """Base class for user-facing errors (one line, no traceback)."""


class ConfigError(BmtardError, ValueError):
    """An option or configuration value is unknown or out of range."""


class DataError(BmtardError):
    """A dataset folder is missing, unreadable or malformed."""


class CheckpointError(BmtardError):
    """A checkpoint file is missing, truncated, of another architecture, or not a checkpoint at all."""


class ClusterError(BmtardError):
    """The Ray cluster cannot give a run what it needs in time (e.g. its workers cannot be placed)."""
