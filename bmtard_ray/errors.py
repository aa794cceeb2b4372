"""Errors that the command-line tools turn into a one-line message and a non-zero exit.

Every problem a user can cause (a bad option, a missing folder, a checkpoint that is not one) raises a
subclass of :class:`BmtardError` whose message names the problem and, where it helps, the accepted
values. The entry points catch ``BmtardError`` and print ``error: <message>``; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


def find_cause(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s causes, contexts and Ray's wrappers (a Train controller's
    ``controller_failure``, a worker group's ``worker_failures``, a task error's ``cause``); None if none."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
        for name in ("worker_failures", "_worker_failures"):
            failures = getattr(e, name, None)
            if isinstance(failures, dict):
                todo += list(failures.values())
    return None


class BmtardError(Exception):
    """Base class for user-facing errors (one line, no traceback)."""


class ConfigError(BmtardError, ValueError):
    """An option or configuration value is unknown or out of range."""


class DataError(BmtardError):
    """A dataset folder is missing, unreadable or malformed."""


class CheckpointError(BmtardError):
    """A checkpoint file is missing, truncated, of another architecture, or not a checkpoint at all."""


class ModelError(BmtardError):
    """A model named by reference (``timm:<name>``, ``<module>:<callable>``) cannot be built or does not fit the
    data: an unknown name, an import that fails, a factory that raises, a wrong output shape."""


class ClusterError(BmtardError):
    """The Ray cluster cannot give a run what it needs in time (e.g. its workers cannot be placed)."""


class ClusterLostError(ClusterError):
    """The run lost its Ray cluster (the head, or the driver's connection to it) while it ran.

    The command line prints it as one line and ends the process at once (``EXIT_LOST``): nothing of Ray's that
    could still be shut down answers, and a wait for it would end in Ray's own fatal exit instead."""

    EXIT_LOST = 3
