"""A run that loses its Ray cluster (the head, or the driver's connection to it) ends in one line.

What Ray 2.60 does on its own when the head dies under a joined run: the Train controller (an actor on the
driver's node, usually the head) goes with it, and ``fit()`` raises ``ActorUnavailableError`` or
``ActorDiedError`` with a traceback; a driver that is instead blocked in a call to the GCS waits
``gcs_rpc_server_reconnect_timeout_s`` (60 s by default, a C++ setting read from the environment as
``RAY_gcs_rpc_server_reconnect_timeout_s``) and is then ended by Ray with ``std::_Exit(1)`` and a log line,
with no word of what to do (``RetryableGrpcClient``'s unavailable-timeout callback in ``gcs_rpc_client.h``).

Here, instead:

- :func:`bound_gcs_wait` lowers that timeout in the driver (before ``ray.init``) to :data:`GCS_WAIT_S`, so a
  dead GCS never holds the driver for a minute;
- :class:`GcsWatch` polls the GCS port while the run trains; once it has not answered for
  :data:`LOST_AFTER_S` seconds it reports the loss and ends the driver, sooner than Ray's own exit (the main
  thread may be blocked inside Ray meanwhile);
- :func:`lost_error` turns what ``fit()`` raised into a :class:`ClusterLostError` whose one line says what was
  lost and gives the exact ``--resume`` command, after :func:`bmtard_ray.storage.checkpoints.prune` has held the
  run folder to ``--keep-checkpoints`` (never removing the newest good checkpoint, nor one Ray's own snapshot
  names, which Ray needs to resume). A run folder with no checkpoint yet, made by this very run, is removed:
  there is nothing to resume from it.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bmtard_ray.errors import ClusterLostError
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import is_uri, remove_run

GCS_WAIT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
GCS_WAIT_S = 30          # Ray's default is 60; a user's own setting wins
LOST_AFTER_S = 10.0      # the GCS port unanswered this long: the head is gone
POLL_S = 1.0


def bound_gcs_wait() -> None:
    """Bound how long Ray lets this process wait for a dead GCS (read when Ray's core worker starts)."""
    os.environ.setdefault(GCS_WAIT_ENV, str(GCS_WAIT_S))


def gcs_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts a TCP connection at the GCS address ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except (OSError, ValueError):
        return False


class GcsWatch:
    """While the block runs, poll the GCS at ``address`` (no watch when None); once it has not answered for
    ``lost_after_s``, call ``on_lost`` from the watching thread: it reports the loss in one line and ends the
    process (:func:`exit_lost`). The driver's main thread may be blocked inside Ray meanwhile, and interrupting
    it would only start Ray's own clean-up, which waits on the dead cluster. When the main thread sees the
    loss first (Ray raises ``ActorUnavailableError``), :func:`lost_error` :meth:`claim` s it, so that the loss
    is reported once."""

    def __init__(self, address: str | None, on_lost: Callable[[], None], *, lost_after_s: float = LOST_AFTER_S,
                 poll_s: float = POLL_S) -> None:
        self.address, self.on_lost, self.lost_after_s, self.poll_s = address, on_lost, lost_after_s, poll_s
        self._claimed = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def claim(self) -> bool:
        """True for the first caller only: the one that reports the loss."""
        return self._claimed.acquire(blocking=False)

    def __enter__(self) -> GcsWatch:
        if self.address:
            self._thread = threading.Thread(target=self._watch, name="bmtard-gcs-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()

    def _watch(self) -> None:
        assert self.address is not None
        since: float | None = None
        while not self._stop.wait(self.poll_s):
            if gcs_answers(self.address):
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= self.lost_after_s and not self._stop.is_set() and self.claim():
                self.on_lost()
                return


def exit_lost(error: ClusterLostError) -> None:
    """Print the one line (as the command lines print errors) and end the process at once with
    ``EXIT_LOST``: Ray's clean-up would wait on the lost cluster."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(ClusterLostError.EXIT_LOST)


def _ray_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is Ray saying that the driver's own actor, its node or the
    connection went away. Ray's wrappers of *worker* failures are not looked into: a worker that dies is a
    failure of the run (``--max-failures``), not a lost cluster."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, OwnerDiedError, RaySystemError

    kinds = (ActorDiedError, ActorUnavailableError, NodeDiedError, OwnerDiedError, RaySystemError, ConnectionError)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kinds):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def what_was_lost(gcs_address: str | None, watched: bool = False) -> str:
    """The words for what went away, from whether the GCS still answers (``watched``: it did not, for long)."""
    if gcs_address and (watched or not gcs_answers(gcs_address)):
        return f"lost the Ray cluster: its head (GCS at {gcs_address}) stopped answering"
    return "lost the connection to the Ray cluster's Train controller (its node died or the driver was cut off)"


def lost_error(exc: BaseException, *, gcs_address: str | None, watch: GcsWatch | None, run_dir: str,
               created: bool, keep: int, command: str) -> ClusterLostError | None:
    """The one-line error for a run that lost its cluster, or None if ``exc`` is something else.

    ``created``: this run made ``run_dir`` (a fresh start, not a resume), so a folder with no checkpoint is
    removed rather than left half-made; ``command``: ``run_train.py`` or ``run_tune.py``."""
    if not _ray_lost(exc):
        return None
    if watch is not None and not watch.claim():  # the watch is reporting it and ending the process
        time.sleep(3600)
    what = what_was_lost(gcs_address)
    return ClusterLostError(f"{what}; {resume_advice(run_dir, created=created, keep=keep, command=command)}")


def resume_advice(run_dir: str, *, created: bool, keep: int, command: str) -> str:
    """What to do next: the exact --resume command, after the folder is held to ``keep`` checkpoints."""
    if command == "run_train.py":
        checkpoints.prune(run_dir, keep)
        can_resume = checkpoints.resumable(run_dir)
    else:  # an experiment folder: Tune's saved state is what --resume needs
        can_resume = any(Path(run_dir).glob("experiment_state-*.json")) if not is_uri(run_dir) else True
    if can_resume:
        if command == "run_train.py":
            return (f"the checkpoints are intact: continue with `python run_train.py --resume {run_dir}` (on this "
                    "cluster once it is back, on a new one with --address, or here with --local)")
        return (f"the search's state is saved: continue with `python run_tune.py --resume {run_dir}` (on this "
                "cluster once it is back with --address, on a new one, or here with a Ray of its own)")
    if created and not is_uri(run_dir) and Path(run_dir).exists():
        remove_run(run_dir)
        return f"no checkpoint had been written, so {run_dir} was removed: start the run again"
    if command == "run_tune.py":
        return f"{run_dir} holds no saved search state yet: start the search again with --overwrite"
    return f"{run_dir} holds no checkpoint to resume from: start the run again"
