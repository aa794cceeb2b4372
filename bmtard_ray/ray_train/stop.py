"""A cooperative stop of a Ray Train run, asked for from outside the run (a Tune trial that ASHA stops).

Killing a run's driver takes its Train controller and workers with it, and Ray's Train state (the dashboard's
``/api/train/v2/runs``) then reads the run as ABORTED ("Terminated due to system errors or killed by the
user"). Instead, whoever owns the run creates a :class:`StopSignal` (a tiny named actor, no CPU) before
``fit()``, passes its :class:`StopAddress` to the workers (``make_torch_trainer(stop_signal=...)``) and calls
``request()`` on it. The workers' :class:`StopPoll` notices at an iteration boundary that every rank agrees
on, and the training function returns normally: the controller ends the run FINISHED.

Agreement: rank 0 asks the signal every ``every`` iterations (and at each epoch's end, before that epoch's
report) and broadcasts the answer (``ray.train.collective.broadcast_from_rank_zero``); every rank makes the
same calls, so all ranks leave after the same optimiser step, with no collective left half-done. Nothing is
reported (no metrics, no checkpoint) after the stop is seen: the checkpoint the owner saw last stays the
run's newest (a trial keeps one).
"""
from __future__ import annotations

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

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def requested(self) -> str | None:
        return self.reason


class StopSignal:
    """The owner's side. Lives (and dies) with the process that created it."""

    def __init__(self, label: str) -> None:
        name = f"bmtard-stop-{label}-{uuid.uuid4().hex[:8]}"
        self.address = StopAddress(name, ray.get_runtime_context().namespace)
        self._actor = _SignalActor.options(name=name, namespace=self.address.namespace).remote()  # type: ignore[attr-defined]
        ray.get(self._actor.requested.remote())  # up before any worker looks it up

    def request(self, reason: str) -> None:
        ray.get(self._actor.request.remote(reason), timeout=30)

    def close(self) -> None:
        ray.kill(self._actor)


def _ask(address: StopAddress) -> str | None:
    """Rank 0: the reason a stop was requested, or None (also when the signal cannot be reached: its owner is
    gone, and Ray ends this run anyway)."""
    try:
        actor = ray.get_actor(address.name, namespace=address.namespace)
        reason = ray.get(actor.requested.remote(), timeout=10)
    except Exception:  # noqa: BLE001 - any Ray failure here means "no request seen"
        return None
    return str(reason) if reason else None


class StopPoll:
    """The workers' side: wraps the Trainer's ``checkpoint_now`` hook (called after every optimiser step,
    alike on every rank) and is called at each epoch's end; raises :class:`StopRequested` where the ranks
    agree to stop. Without an address it only passes ``inner`` through."""

    def __init__(self, address: StopAddress | None, *, rank: int, world_size: int,
                 inner: Callable[[], bool] | None = None, every: int = 10) -> None:
        self.address, self.rank, self.world_size, self.inner, self.every = address, rank, world_size, inner, every
        self.calls = 0
        self.reason: str | None = None

    def check(self) -> None:
        """A collective when world_size > 1: every rank calls it at the same point."""
        if self.address is None:
            return
        reason = _ask(self.address) if self.rank == 0 else None
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
