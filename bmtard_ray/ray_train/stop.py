"""A cooperative stop of a Ray Train run, asked for from outside the run (a Tune trial that ASHA stops).

Killing a run's driver takes its Train controller and workers with it, and Ray's Train state (the dashboard's
``/api/train/v2/runs``) then reads the run as ABORTED ("Terminated due to system errors or killed by the
user"). Instead, whoever owns the run creates a :class:`StopSignal` (a tiny named actor, no CPU) before
``fit()``, passes its :class:`StopAddress` to the workers (``make_torch_trainer(stop_signal=...)``) and calls
``request()`` on it. The workers' :class:`StopPoll` notices at an iteration boundary that every rank agrees
on, and the training function returns normally: the controller ends the run FINISHED.

Agreement: rank 0 asks the signal every ``every`` iterations (and at each epoch's end, before that epoch's
report) and broadcasts the answer (``ray.train.collective.broadcast_from_rank_zero``); every rank makes the
same calls, so all ranks leave after the same optimiser step, with no collective left half-done.

No checkpoint after the owner's verdict: a report reaches the owner seconds after the workers made it (Ray
Train's controller polls them every 2 s), so workers with short epochs are an epoch ahead when the owner
decides to stop on epoch N; had they reported epoch N+1 meanwhile, its checkpoint would replace epoch N's (a
trial keeps one), the one the owner's last result names. So the owner ``acknowledge()`` s each epoch it lets
go on past, and the workers report epoch N+1 only once epoch N is acknowledged or a stop is requested (then
they report nothing). Epochs longer than that latency never wait.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

# What a stopped worker returns (rank 0's becomes ``Result.return_value``).
STOPPED_KEY = "stopped"


class StopRequested(Exception):
    """Raised on every rank at the boundary where they agreed to stop; train_loop_per_worker catches it."""


@dataclass(frozen=True)
class StopAddress:
    """Where the workers find the signal (a named actor), as the workers' config carries it."""
    name: str
    namespace: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace}

    @staticmethod
    def from_dict(d: dict[str, Any] | None) -> StopAddress | None:
        return StopAddress(str(d["name"]), d.get("namespace")) if d else None


@ray.remote(num_cpus=0, max_restarts=0)
class _SignalActor:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.acked = 0

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def acknowledge(self, epoch: int) -> None:
        self.acked = max(self.acked, epoch)

    def state(self) -> tuple[str | None, int]:
        return self.reason, self.acked


class StopSignal:
    """The owner's side. Lives (and dies) with the process that created it."""

    def __init__(self, label: str) -> None:
        name = f"bmtard-stop-{label}-{uuid.uuid4().hex[:8]}"
        self.address = StopAddress(name, ray.get_runtime_context().namespace)
        self._actor = _SignalActor.options(name=name, namespace=self.address.namespace).remote()  # type: ignore[attr-defined]
        ray.get(self._actor.state.remote())  # up before any worker looks it up

    def request(self, reason: str) -> None:
        ray.get(self._actor.request.remote(reason), timeout=30)

    def acknowledge(self, epoch: int) -> None:
        """The owner has seen epoch ``epoch`` and lets the run go on past it. Never raises: a signal closed
        meanwhile (the run just ended) has no worker left to tell."""
        try:
            ray.get(self._actor.acknowledge.remote(int(epoch)), timeout=30)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        ray.kill(self._actor)


_HANDLES: dict[StopAddress, Any] = {}  # looked up once per worker process (a GCS call)


def _ask(address: StopAddress) -> tuple[str | None, int | None]:
    """Rank 0: the reason a stop was requested (or None) and the epoch acknowledged last; (None, None) when the
    signal cannot be reached (its owner is gone, and Ray ends this run anyway). About a millisecond."""
    try:
        if address not in _HANDLES:
            _HANDLES[address] = ray.get_actor(address.name, namespace=address.namespace)
        reason, acked = ray.get(_HANDLES[address].state.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - any Ray failure here means "no request seen"
        _HANDLES.pop(address, None)
        return None, None
    return (str(reason) if reason else None), int(acked)


class StopPoll:
    """The workers' side: wraps the Trainer's ``checkpoint_now`` hook (called after every optimiser step,
    alike on every rank) and is called at each epoch's end; raises :class:`StopRequested` where the ranks
    agree to stop. Without an address it only passes ``inner`` through."""

    def __init__(self, address: StopAddress | None, *, rank: int, world_size: int,
                 inner: Callable[[], bool] | None = None, every: int = 10, wait_s: float = 0.1) -> None:
        self.address, self.rank, self.world_size, self.inner, self.every = address, rank, world_size, inner, every
        self.wait_s = wait_s
        self.calls = 0
        self.reason: str | None = None

    def check(self, acked_at_least: int = 0) -> None:
        """Raise StopRequested if a stop was requested; first wait (rank 0) until the owner has acknowledged
        epoch ``acked_at_least`` or asked to stop. A collective when world_size > 1: every rank calls it at
        the same point."""
        if self.address is None:
            return
        reason = None
        if self.rank == 0:
            while True:
                reason, acked = _ask(self.address)
                if reason or acked is None or acked >= acked_at_least:
                    break
                time.sleep(self.wait_s)
        if self.world_size > 1:
            from ray.train.collective import broadcast_from_rank_zero

            reason = broadcast_from_rank_zero(reason)
        if reason:
            self.reason = reason
            raise StopRequested(reason)

    def __call__(self) -> bool:
        self.calls += 1
        if self.calls % self.every == 0:
            self.check()
        return self.inner() if self.inner is not None else False
