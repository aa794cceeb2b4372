"""The trainer: the epoch loop, its schedule, validation, checkpoints, trace and final evaluation.

It knows nothing about Ray. Whoever runs it passes a ``report(metrics, checkpoint)`` callable (the in-process
launch writes the checkpoint to disk; the Ray Train layer hands it to ``ray.train.report``) and, for data
parallelism, an initialised torch.distributed process group (see :mod:`bmtard_ray.runtime.dist`). What it
reports is :mod:`bmtard_ray.training.metrics`'; the checkpoint's format is :mod:`bmtard_ray.storage.checkpoints`'.
Inside an epoch nothing waits on the device: the per-iteration statistics are stacked on the device and
moved to the host once, at the end of the epoch.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bmtard_ray.config import EvalConfig, RunConfig, to_dict
from bmtard_ray.data import BatchLoader, DataBundle, Split, make_reference_loader, prepare_data, stratified_subset
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.evaluation.core import evaluate, w_robust
from bmtard_ray.models import build_model
from bmtard_ray.models.files import model_record
from bmtard_ray.names import teacher_roles
from bmtard_ray.runtime.device import autocast_for, select_device
from bmtard_ray.runtime.dist import DistContext
from bmtard_ray.storage import checkpoints
from bmtard_ray.training.logit_cache import CachedTeacher
from bmtard_ray.training.methods import Method, Teachers, build_method
from bmtard_ray.training.metrics import COUNT_NAMES, EPOCH_METRICS, STAT_NAMES, TRACE_COLUMNS
from bmtard_ray.training.outputs import build_summary, teacher_provenance, write_run_outputs
from bmtard_ray.training.teachers import load_teacher

Reporter = Callable[[dict[str, Any], "dict[str, Any] | None"], None]
EpochLogger = Callable[[dict[str, Any]], None]
# Called on every rank after every iteration; True = checkpoint now (e.g. a preemption notice). Every rank
# must return the same answer (the checkpoint's statistics are all-reduced).
CheckpointNow = Callable[[], bool]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def schedule_factor(epoch: int, milestones: tuple[int, ...], gamma: float) -> float:
    """Multiplier for lr, eta_tau and rho in (1-based) ``epoch``: gamma ** (milestones already completed).

    As released, the decay happens *after* the training of a milestone epoch (``if epoch in milestones`` at
    the end of the epoch loop): with milestones (215, 260, 285) epoch 215 still runs at the full rate and
    epoch 216 is the first at 0.1x.
    """
    return gamma ** sum(epoch > m for m in milestones)


@dataclass
class PartialEpoch:
    """The part of epoch ``epoch`` done before a mid-epoch checkpoint: its first ``batches`` global batches'
    statistics (global, one row each, STAT_NAMES), counts (summed over ranks, COUNT_NAMES) and seconds."""
    epoch: int
    batches: int
    stats: Tensor
    counts: Tensor
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.batches, "stats": self.stats, "counts": self.counts,
                "seconds": self.seconds}


@dataclass
class TrainState:
    epoch: int = 0                                   # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    trace: list[Tensor] = field(default_factory=list)  # one (iters, len(TRACE_COLUMNS)) CPU tensor per epoch
    partial: PartialEpoch | None = None              # epoch + 1, begun (restored from a mid-epoch checkpoint)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Holds everything one run needs; ``fit()`` runs the remaining epochs."""

    def __init__(self, cfg: RunConfig, *, data: DataBundle | None = None, device: torch.device | None = None,
                 dist: DistContext | None = None, report: Reporter | None = None,
                 log: EpochLogger | None = None, compile_backend: str = "inductor",
                 checkpoint_now: CheckpointNow | None = None) -> None:
        # compile_backend: torch.compile's backend when cfg.compile (benchmarks and the device check's dry
        # run pass "aot_eager", which traces the same graphs without generating code).
        self.cfg = cfg
        self.dist = dist or DistContext()
        self.device = device or select_device(cfg.device)
        self.report = report
        self.log = log
        self.checkpoint_now = checkpoint_now
        seed_everything(cfg.seed)
        self.data = data or prepare_data(cfg)
        info = self.data.info
        o = cfg.optim
        if o.batch_size < self.dist.world_size:
            raise ConfigError(f"optim.batch_size ({o.batch_size}) is smaller than the number of workers "
                              f"({self.dist.world_size})")
        if cfg.data.loader == "reference" and o.batch_size % self.dist.world_size:
            raise ConfigError(f"data.loader=reference splits optim.batch_size ({o.batch_size}) evenly: it must be "
                              f"divisible by the number of workers ({self.dist.world_size})")
        # The global batch is split with the remainder on the lowest ranks (data.BatchLoader): at most this many rows.
        self.local_batch = -(-o.batch_size // self.dist.world_size)
        roles = teacher_roles(cfg.method.name)
        self.teachers = Teachers(**{r: load_teacher(r, getattr(cfg.teachers, r), info, self.device,
                                                    cfg.teachers.model_dir) for r in roles})
        if cfg.teachers.logit_cache and self.teachers.clean is not None:
            self.teachers.clean = CachedTeacher(self.teachers.clean, cfg.teachers.logit_cache)
        # Black-box attacks are crafted on the robust teacher, also for methods that train without one.
        self.source: nn.Module | None = None
        if any(a.startswith("bb_") for a in cfg.eval.attacks):
            if self.teachers.robust is not None:
                self.source = self.teachers.robust
            elif cfg.teachers.robust.checkpoint:
                self.source = load_teacher("robust", cfg.teachers.robust, info, self.device, cfg.teachers.model_dir)
            else:
                raise ConfigError("black-box attacks (bb_*) need a robust teacher: set teachers.robust.checkpoint "
                                  f"(method {cfg.method.name} does not train with one)")
        # fast: bf16 autocast on CUDA only (CPU autocast is slower than fp32 here), channels_last everywhere:
        # oneDNN's CPU convolutions and max-pooling are NHWC-native, so NCHW costs reorders and a slow pooling
        # kernel (BENCHMARKS.md, "The CPU path": 1.6x on the cpu preset's step).
        self.fast = cfg.fast and self.device.type == "cuda"
        self.channels_last = cfg.fast
        self.student = build_model(cfg.student, info.num_classes, pretrained=cfg.student_pretrained,
                                   default_stats=(info.mean, info.std)).to(self.device)
        if self.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
            for t in (self.teachers.clean, self.teachers.robust):
                if t is not None:
                    t.to(memory_format=torch.channels_last)
        self.model = self.dist.wrap(self.student, self.device)
        raw: Any = self.student  # torch.compile returns a callable wrapper, not a module
        model: Any = self.model
        if cfg.compile:
            raw = torch.compile(self.student, backend=compile_backend)
            model = torch.compile(self.model, backend=compile_backend)
        self.autocast = autocast_for(self.device, self.fast)
        self.method: Method = build_method(cfg.method.name, model, raw, cfg, self.teachers, info.num_classes,
                                     reduce_mean=self.dist.all_reduce_mean,
                                     gather_rows=partial(self.dist.all_gather_rows, max_rows=self.local_batch),
                                     autocast=self.autocast)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.loader = self._make_loader()
        self.state = TrainState()
        self.val_subset = (stratified_subset(self.data.val, cfg.val_examples, cfg.seed)
                           if cfg.val_examples and len(self.data.val) > cfg.val_examples else self.data.val)

    def _make_loader(self) -> Any:
        d, o = self.cfg.data, self.cfg.optim
        if d.loader == "reference":
            # The released code's way: CPU DataLoader with worker processes, host-to-device copy per step.
            return make_reference_loader(self.data.train, self.local_batch, shuffle=True, augment=d.augment,
                                         num_workers=d.num_workers, seed=self.cfg.seed, rank=self.dist.rank,
                                         world_size=self.dist.world_size)
        return BatchLoader(self.data.train, o.batch_size, shuffle=True, augment=d.augment, device=self.device,
                           seed=self.cfg.seed, drop_last=True, rank=self.dist.rank, world_size=self.dist.world_size,
                           channels_last=self.channels_last)

    # --- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"format": checkpoints.FORMAT, "epoch": self.state.epoch, "config": to_dict(self.cfg),
                "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
                # "task": the method's balance state (the checkpoint format's key for it)
                "optimizer": self.optimizer.state_dict(), "task": self.method.state_dict(),
                "history": self.state.history, "trace": self.state.trace, "rng": _rng_state(),
                "world_size": self.dist.world_size,
                "partial": self.state.partial.to_dict() if self.state.partial else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checkpoints.check_format(state, "this checkpoint")
        try:
            self.student.load_state_dict(state["student"])
        except RuntimeError:  # another architecture (or class count) than the one the run trains
            saved = (state.get("config") or {}).get("student", "another architecture")
            raise CheckpointError(f"the checkpoint holds a {saved} student, not the {self.cfg.student} this run "
                                  "trains") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["task"])
        partial = state.get("partial")
        self.state = TrainState(epoch=int(state["epoch"]), history=list(state["history"]), trace=list(state["trace"]),
                                partial=PartialEpoch(**partial) if partial else None)
        if self.state.partial is not None and not isinstance(self.loader, BatchLoader):
            raise CheckpointError("a mid-epoch checkpoint continues only with data.loader=device")
        _set_rng_state(state["rng"])

    # --- one epoch -------------------------------------------------------------------------------------
    def _set_schedule(self, epoch: int) -> float:
        o = self.cfg.optim
        factor = schedule_factor(epoch, o.milestones, o.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * factor
        self.method.decay(factor)
        return factor

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        factor = self._set_schedule(epoch)
        # A run restored from a mid-epoch checkpoint continues this epoch at the batch after it.
        prior = self.state.partial if self.state.partial is not None and self.state.partial.epoch == epoch else None
        first = prior.batches if prior is not None else 0
        device_loader = isinstance(self.loader, BatchLoader)
        if device_loader:
            self.loader.set_epoch(epoch, first)
        elif hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        ws, every = self.dist.world_size, self.cfg.checkpoint_every_iters
        stats: list[dict[str, Tensor]] = []
        counts: list[dict[str, Tensor]] = []
        start = time.perf_counter()
        for k, (x, y) in enumerate(self.loader, start=first):
            if x.device != self.device:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            loss_scale = 1.0
            if device_loader and ws > 1:
                total = self.loader.global_size(k)
                self.method.shard = (self.loader.batch_rows(k)[0], total)
                # DDP averages the ranks' gradients; scaling each rank's mean loss by its share of the global
                # batch (n_r * W / B) makes that average the gradient of the global batch's mean loss.
                loss_scale = y.shape[0] * ws / total
            out = self.method.step(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            (out.loss * loss_scale if loss_scale != 1.0 else out.loss).backward()
            self.optimizer.step()
            stats.append(out.stats)
            counts.append(out.counts)
            if self.cfg.sync_every_step:
                out.loss.item()  # reference mode: the released code logs a Python float every step
            done = k + 1
            timed = bool(every) and done % every == 0 and done < len(self.loader)
            if device_loader and (self.checkpoint_now is not None and self.checkpoint_now() or timed):
                prior = self._fold(prior, epoch, done, stats, counts, start)
                stats, counts, start = [], [], time.perf_counter()
                self._checkpoint_mid_epoch(prior)
        folded = self._fold(prior, epoch, len(self.loader), stats, counts, start)
        self.state.partial = None
        table, seconds = folded.stats, folded.seconds
        first_iter = sum(t.shape[0] for t in self.state.trace)
        idx = torch.arange(first_iter, first_iter + table.shape[0], dtype=torch.float32).unsqueeze(1)
        ep = torch.full_like(idx, float(epoch))
        self.state.trace.append(torch.cat([idx, ep, table], dim=1))
        c = dict(zip(COUNT_NAMES, folded.counts.tolist(), strict=False))
        means = dict(zip(STAT_NAMES, table.nanmean(0).tolist() if table.shape[0] else [math.nan] * len(STAT_NAMES),
                         strict=False))
        last = dict(zip(STAT_NAMES, table[-1].tolist() if table.shape[0] else [math.nan] * len(STAT_NAMES),
                        strict=False))
        values: dict[str, Any] = {"epoch": epoch, "lr": self.cfg.optim.lr * factor, "seconds": seconds,
                                  "images_per_s": c["n"] / seconds if seconds > 0 else math.nan}
        values.update({f"train_{k}": means[k] for k in ("loss", "L_adv", "L_nat")})
        values.update({k: last[k] for k in STAT_NAMES if k.startswith(("tau", "w_"))})
        values.update({"H_adv": means["H_adv"], "H_nat": means["H_nat"]})
        values.update(self.method.balance_report(table[:, [STAT_NAMES.index("tau_adv"), STAT_NAMES.index("tau_nat")]]))
        values["train_acc_adv"] = 100 * c["correct_adv"] / c["seen_adv"] if c["seen_adv"] else math.nan
        values["train_acc_nat"] = 100 * c["correct_nat"] / c["seen_nat"] if c["seen_nat"] else math.nan
        return {name: values[name] for name in EPOCH_METRICS if name in values}  # the registry's order

    def _fold(self, prior: PartialEpoch | None, epoch: int, batches: int, stats: list[dict[str, Tensor]],
              counts: list[dict[str, Tensor]], start: float) -> PartialEpoch:
        """``prior`` (the epoch's batches before these, or None) extended by these batches' statistics, made
        global (a collective: every rank calls it at the same batch)."""
        table, summed = self._stack_stats(stats, counts), self._sum_counts(counts)
        seconds = time.perf_counter() - start
        if prior is not None:
            table, summed, seconds = torch.cat([prior.stats, table]), prior.counts + summed, prior.seconds + seconds
        return PartialEpoch(epoch, batches, table, summed, seconds)

    def _checkpoint_mid_epoch(self, partial: PartialEpoch) -> None:
        """Report a checkpoint after ``partial.batches`` batches of epoch ``partial.epoch``: a restart (a
        failure, an elastic resize, a preemption) redoes only the batches after it. The metrics carry no
        ``epoch`` key, so epoch views and TensorBoard skip them."""
        self.state.partial = partial
        if self.report is not None:
            iteration = sum(t.shape[0] for t in self.state.trace) + partial.batches
            self.report({"partial_epoch": partial.epoch, "batches": partial.batches, "iteration": iteration},
                        self.state_dict())

    def _stack_stats(self, stats: list[dict[str, Tensor]], counts: list[dict[str, Tensor]]) -> Tensor:
        """The statistics of these iterations as a host (iters, len(STAT_NAMES)) table, NaN where the method has
        none.

        Stacked on the device and moved to the host once. Methods whose statistics are per rank (every method
        but B-MTARD, which all-reduces its own every step for the balance) are averaged over ranks here, once,
        each rank's means weighted by its example count (uneven shards).
        """
        if not stats:
            return torch.zeros(0, len(STAT_NAMES))
        names = [k for k in STAT_NAMES if k in stats[0]]
        table = torch.stack([torch.stack([s[k] for k in names]) for s in stats]).float()
        if not self.method.global_stats:
            table = self.dist.all_reduce_mean(table, torch.stack([c["n"] for c in counts]).float())
        full = torch.full((table.shape[0], len(STAT_NAMES)), math.nan)
        full[:, [STAT_NAMES.index(k) for k in names]] = table.cpu()
        return full

    def _sum_counts(self, counts: list[dict[str, Tensor]]) -> Tensor:
        """The epoch's counts (COUNT_NAMES order) summed over iterations and ranks, on the host."""
        if not counts:
            return torch.zeros(len(COUNT_NAMES))
        per_step = torch.stack([torch.stack([c[k] for k in COUNT_NAMES]) for c in counts])
        return self.dist.all_reduce_sum(per_step.sum(0)).cpu()

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, split: Split, attacks: tuple[str, ...], n_examples: int | None = None,
                 source_model: nn.Module | None = None, progress: bool = False) -> dict[str, Any]:
        """Evaluate the student on ``split``, sharded over ranks; returns accuracies and W-Robust (percent)."""
        ec = self.cfg.eval
        if n_examples is not None and n_examples < len(split):
            split = stratified_subset(split, n_examples, ec.seed)
        ws, rank = self.dist.world_size, self.dist.rank
        shard = split.subset(torch.arange(rank, len(split), ws)) if ws > 1 else split
        cfg = EvalConfig(attacks=attacks, eps=ec.eps, n_examples=None, batch_size=ec.batch_size, seed=ec.seed + rank,
                         headline=ec.headline, square_queries=ec.square_queries,
                         autoattack_version=ec.autoattack_version)
        result = evaluate(self.student, shard, cfg, device=self.device, source_model=source_model, progress=progress)
        # Combine per-rank accuracies into global ones through correct counts.
        names = list(result.accuracy)
        correct = torch.tensor([result.accuracy[a] * result.n_examples / 100 for a in names] + [result.n_examples],
                               dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        summed = self.dist.all_reduce_sum(correct).cpu().tolist()
        n = summed[-1]
        acc = {a: 100 * round(c) / n for a, c in zip(names, summed[:-1], strict=False)}
        out: dict[str, Any] = {"n_examples": int(n), "accuracy": acc,
                               "w_robust": {a: w_robust(acc["clean"], v) for a, v in acc.items() if a != "clean"}
                               if "clean" in acc else {}, "meta": result.meta, "seconds": result.seconds}
        return out

    def validate(self) -> dict[str, float]:
        ec = self.cfg.eval
        res = self.evaluate(self.val_subset, ("clean", ec.headline))
        return {"val_clean": res["accuracy"]["clean"], "val_robust": res["accuracy"][ec.headline],
                "val_w_robust": res["w_robust"][ec.headline], "val_n": res["n_examples"]}

    # --- the run ---------------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        cfg = self.cfg
        for epoch in range(self.state.epoch + 1, cfg.optim.epochs + 1):
            metrics = self.train_epoch(epoch)
            last = epoch == cfg.optim.epochs
            if cfg.val_every and (epoch % cfg.val_every == 0 or last):
                metrics.update(self.validate())
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith("train_loss")):
                raise FloatingPointError(f"training diverged at epoch {epoch}: loss is {metrics['train_loss']}")
            self.state.epoch = epoch
            self.state.history.append(metrics)
            checkpoint = None
            if cfg.checkpoint_every and (epoch % cfg.checkpoint_every == 0 or last):
                checkpoint = self.state_dict()
            if self.report is not None:
                self.report(metrics, checkpoint)
            if self.log is not None and self.dist.is_main:
                self.log(metrics)
        return self.state

    def trace_table(self) -> Any:
        import pyarrow as pa

        data = torch.cat(self.state.trace) if self.state.trace else torch.zeros(0, len(TRACE_COLUMNS))
        cols = {name: data[:, i].numpy() for i, name in enumerate(TRACE_COLUMNS)}
        cols["iteration"] = cols["iteration"].astype("int64")
        cols["epoch"] = cols["epoch"].astype("int32")
        return pa.table(cols)

    def finish(self, run_dir: Path, *, progress: bool = False) -> dict[str, Any]:
        """Final evaluation on validation and test, then (rank 0) the model file, trace, metrics and summary."""
        cfg, ec = self.cfg, self.cfg.eval
        source = self.source
        results = {"val": self.evaluate(self.data.val, ec.attacks, ec.n_examples, source, progress),
                   "test": self.evaluate(self.data.test, ec.attacks, ec.n_examples, source, progress)}
        summary = build_summary(cfg, self.state.history, self.state.epoch, results, self.data.info)
        if self.dist.is_main:
            extra = {"teachers": teacher_provenance(cfg), "summary": summary}
            write_run_outputs(run_dir, cfg, summary, results,
                              model_record(self.student, cfg.student, self.data.info, cfg, extra),
                              self.trace_table() if cfg.trace else None, self.state.history)
        return summary
