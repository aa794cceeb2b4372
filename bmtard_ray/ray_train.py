"""Ray Train (V2) layer: the core training loop on every worker of a ``TorchTrainer``.

``run_train.py`` comes here unless ``--local`` is given. The driver validates everything first (config,
data folder, teacher files, batch divisibility, the cluster's resources), prepares the teachers (so
workers only load cached files), then fits one ``TorchTrainer`` whose workers each run
:func:`train_loop_per_worker`: the core :class:`~bmtard_ray.loop.Trainer` with the process group Ray set
up, ``DistContext`` for rank / world size / all-reduce, DDP around the student only, and a ``report``
callable that hands rank 0's checkpoint dict to ``ray.train.report``.

Public API (the Tune layer builds the same trainer inside a Tune function trainable)::

    ScalingOptions(num_workers=1, cpus_per_worker=1.0, gpus_per_worker=None)  # None: GPUs if the cluster has them
    run_ray(cfg, scaling, *, address=None, storage_path=None, resume=None, overwrite=False, failure_max=2,
            keep_checkpoints=2, console=None) -> summary dict          # the whole run, driver side
    make_torch_trainer(cfg, scaling, *, run_config=None, storage_path=None, failure_max=2, keep_checkpoints=2,
                       callbacks=(), resume_from=None, finish=False) -> TorchTrainer
    train_loop_per_worker(config: dict) -> summary dict | None        # module level, picklable by reference
    absolute_paths(cfg) -> RunConfig                                  # call on the driver (workers chdir)

Inside Tune (Ray 2.60: ``from ray.tune.integration.ray_train import TuneReportCallback``)::

    run_config = ray.train.RunConfig(name=trial_id, storage_path=train_dir, callbacks=[TuneReportCallback()])
    make_torch_trainer(absolute_paths(cfg), ScalingOptions(num_workers=1, gpus_per_worker=0),
                       run_config=run_config).fit()

``make_torch_trainer`` only trains and checkpoints (every ``cfg.checkpoint_every`` epochs, one
``checkpoint.pt`` per Ray checkpoint folder ``checkpoint_epochNNNN``); every report is one epoch with the
metrics of :meth:`Trainer.train_epoch` (+ validation), JSON-safe (NaN -> None, as Ray stores them in its
snapshot). ``finish=True`` adds the final evaluation on the validation and test splits, rank 0 writes the
run folder's outputs, and the summary comes back as ``result.return_value``. ``run_ray`` turns it on; a
tuning trial should leave it off (tuning never looks at the test split).

Data parallelism: ``optim.batch_size`` is the *global* batch; each of N workers takes batch/N images per
step from its shard of a permutation every rank draws from the same per-epoch seed, so N workers take the
same optimisation steps as one worker with the whole batch (same number of steps per epoch, same learning
rate). The EBB/NLB statistics (L_adv, L_nat, H_adv, H_nat) are all-reduced before every balance update, so
every rank holds the same temperatures and weights. To train faster with more workers keep the global
batch; to scale the global batch with N, scale the learning rate with it (linear rule) at your own risk:
the paper's schedule is for 128.

Run folder: ``<storage_path>/<cfg.name>`` (``storage_path`` defaults to ``cfg.output_dir``, so a Ray run
lands where a local one would). It may be a shared filesystem path or a cloud URI (``s3://...``,
``gs://...``): required for multi-node runs, because the workers write checkpoints and rank 0 writes the
final outputs there. A run folder with Ray checkpoints resumes from its latest one when the same name and
storage path are used again (``--resume``); a worker that dies is replaced and the run continues from the
last checkpoint (``FailureConfig(max_failures)``).
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig
from ray.train import ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bmtard_ray import io
from bmtard_ray.config import RunConfig, from_dict, teacher_cache_dir, to_dict
from bmtard_ray.engine import teacher_roles
from bmtard_ray.errors import BmtardError, CheckpointError, ConfigError
from bmtard_ray.loop import Trainer, check_given_teachers, prepare_data
from bmtard_ray.runner import CHECKPOINT_FILE, find_checkpoint, print_summary
from bmtard_ray.teachers import cached_path, ensure_teachers

# Written by Ray Train into every run folder; its presence means "Ray will resume from here".
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_DIR = "checkpoint_epoch{:04d}"


@dataclass
class ScalingOptions:
    """How many workers and what each gets. ``None`` means decided against the cluster:
    ``cpus_per_worker`` = the cluster's CPUs shared out over the workers (at least 1; it is also the worker's
    torch thread count), ``gpus_per_worker`` = 1 if the cluster has GPUs and the config's device is not
    ``cpu``, else 0 (CPU workers, gloo)."""
    num_workers: int = 1
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    placement_strategy: str = "PACK"

    def validate(self) -> ScalingOptions:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ConfigError(f"number of workers must be an integer >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ConfigError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus per worker must be >= 0 (0 = CPU workers), got {self.gpus_per_worker}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"unknown placement strategy '{self.placement_strategy}'; choose one of: PACK, SPREAD, "
                              "STRICT_PACK, STRICT_SPREAD")
        return self

    def resolved(self, cfg: RunConfig, nodes: Sequence[dict[str, Any]] = ()) -> ScalingOptions:
        """Fix the automatic fields against the config's device and the cluster's alive ``nodes``
        (``ray.nodes()``)."""
        self.validate()
        res = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
        cluster_gpus = sum(r.get("GPU", 0.0) for r in res)
        cpus = self.cpus_per_worker
        if cpus is None:
            share = sum(r.get("CPU", 0.0) for r in res) // self.num_workers
            cpus = float(max(1.0, min(share, max((r.get("CPU", 0.0) for r in res), default=1.0))))
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cfg.device != "cpu" and (cluster_gpus or 0) > 0 else 0.0
        if cfg.device == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' needs GPU workers: pass --gpus-per-worker 1 (or --device cpu)")
        if cfg.device == "cpu" and gpus > 0:
            raise ConfigError("device 'cpu' with GPU workers: drop --gpus-per-worker or use --device auto")
        return ScalingOptions(self.num_workers, cpus, gpus, self.placement_strategy)

    def to_ray(self) -> ScalingConfig:
        gpus = self.gpus_per_worker or 0.0
        resources: dict[str, float] = {"CPU": self.cpus_per_worker or 1.0}
        if gpus:
            resources["GPU"] = gpus
        return ScalingConfig(num_workers=self.num_workers, use_gpu=gpus > 0, resources_per_worker=resources,
                             placement_strategy=self.placement_strategy)


# ---------------------------------------------------------------------------------------------------------
# Paths and run folders (local paths or URIs through pyarrow.fs).


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy with every file path absolute: Ray workers (and Tune trials) run in another directory."""
    out = from_dict(to_dict(cfg))

    def fix(p: str | None) -> str | None:
        return p if not p or is_uri(p) or p == "pyautoattack" else str(Path(p).expanduser().resolve())

    out.data.root = fix(out.data.root)
    out.output_dir = fix(out.output_dir)
    out.teachers.cache_dir = fix(out.teachers.cache_dir)
    for role in ("clean", "robust"):
        tc = getattr(out.teachers, role)
        tc.checkpoint = fix(tc.checkpoint)
    return out


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _latest_ray_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint folder Ray recorded in a run folder's snapshot (None if none)."""
    import json

    snap = _join(run_dir, RAY_SNAPSHOT)
    if not _exists(snap):
        return None
    fs, path = _fs(snap)
    with fs.open_input_stream(path) as f:
        state = json.loads(f.read().decode())
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return _join(run_dir, name) if name else None


def _write_text(run_dir: str, name: str, text: str) -> None:
    if not is_uri(run_dir):
        io.atomic_text(text, Path(run_dir) / name)
        return
    fs, path = _fs(run_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(text.encode())


def _upload_dir(local: Path, run_dir: str) -> None:
    import pyarrow.fs

    fs, path = _fs(run_dir)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def _remove_run(run_dir: str) -> None:
    fs, path = _fs(run_dir)
    fs.delete_dir(path)


def _check_run_folder(run_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Never clobber, and never silently continue, a run of the same name (Ray would resume it)."""
    if resume or not _exists(run_dir):
        return
    held = [n for n in ("model.pt", CHECKPOINT_FILE, RAY_SNAPSHOT) if _exists(_join(run_dir, n))]
    if not held:
        return
    if overwrite:
        _remove_run(run_dir)  # else Ray Train would restore the old run from its snapshot
        return
    raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                      "or --name to start another")


# ---------------------------------------------------------------------------------------------------------
# Connecting to Ray and checking what the cluster can give.


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init on a dead address retries for minutes: try a TCP connection first."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"address {address} is a dashboard / job-server URL; give the cluster's GCS address "
                          "(host:6379) or submit the run with `ray job submit --address " + address + "`")
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"cluster address '{address}' must look like host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                          "`ray start --head` or fix --address / RAY_ADDRESS") from None


_STARTED_ENV: dict[str, str | None] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def start_local_ray(**init: Any) -> None:
    """Start a private Ray instance on this machine that Ray Train's own helpers can find.

    ``address="local"``: plain ``ray.init()`` would silently join a cluster someone else started here with
    ``ray start``. Ray Train V2's placement-group cleaner and state actor ask the State API (served by the
    dashboard, so it is kept) about the run's controller; they look "their" cluster up through RAY_ADDRESS,
    else through the last cluster recorded in /tmp/ray, which may be a dead one (a crashed or stopped
    instance) and then they time out with tracebacks, and a stopped trial's resources are never freed.
    So the instance gets a known GCS port and every process it starts inherits RAY_ADDRESS pointing at it.
    """
    from ray._private.services import get_node_ip_address

    port = _free_port()
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"{get_node_ip_address()}:{port}"}
    _STARTED_ENV.update({k: os.environ.get(k) for k in env})
    os.environ.update(env)  # before ray.init: the raylet and every worker inherit it
    try:
        ray.init(address="local", include_dashboard=True, **init)
    except BaseException:
        _restore_env()
        raise


def _restore_env() -> None:
    for key, value in _STARTED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _STARTED_ENV.clear()


def stop_local_ray() -> None:
    """Stop what :func:`start_local_ray` started and restore the environment."""
    ray.shutdown()
    _restore_env()


def connect(address: str | None = None, **local_init: Any) -> bool:
    """Join ``address`` (or RAY_ADDRESS, as under ``ray job submit``) or start a local Ray with this
    machine's resources. Returns True when this call started the connection (the caller shuts it down).
    An existing connection (tests, a Tune trial) is reused as is."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS")
    try:
        if target:
            _check_reachable(target)
            # Joining a cluster: its resources are what they are, so no counts are passed.
            ray.init(address=target, log_to_driver=True)
        else:
            # The dashboard's Train view needs this flag in the driver before the trainer is built.
            os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
            # The driver's live view is fed by a queue, not by worker output; what workers and Ray's own
            # actors print (deprecation notes, internal warnings) stays in the session's log folder.
            start_local_ray(**{"log_to_driver": False, **local_init})
    except (ConnectionError, TimeoutError) as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {target}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # AuthenticationError and friends: one line, with the usual fix
        if type(exc).__name__ == "AuthenticationError":
            raise ConfigError(f"the Ray cluster at {target} refused the connection (token authentication): set "
                              "RAY_AUTH_MODE=token and make its token available (~/.ray/auth_token or "
                              "RAY_AUTH_TOKEN)") from None
        raise
    return True


def check_resources(scaling: ScalingOptions, nodes: Sequence[dict[str, Any]] | None = None) -> None:
    """Refuse a request that no node set of this cluster can ever hold (Ray would wait forever).

    Counts, per alive node, how many workers fit in its *total* resources (not what is free now)."""
    nodes = [n for n in (ray.nodes() if nodes is None else nodes) if n.get("Alive", True)]
    need = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        need["GPU"] = scaling.gpus_per_worker
    fit = 0
    for node in nodes:
        have = node.get("Resources", {})
        fit += int(min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items()))
    if fit >= scaling.num_workers:
        return
    total = {k: sum(n.get("Resources", {}).get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    want = " and ".join(f"{v:g} {k}" for k, v in need.items())
    raise ConfigError(f"{scaling.num_workers} workers with {want} each do not fit on this Ray cluster "
                      f"({len(nodes)} node(s), {total['CPU']:g} CPUs, {total['GPU']:g} GPUs in all; at most {fit} "
                      "such workers): lower --workers, --cpus-per-worker or --gpus-per-worker")


# ---------------------------------------------------------------------------------------------------------
# The worker side.


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray stores reported metrics as JSON in its checkpoint snapshot: plain floats, NaN as None."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def _maybe_inject_failure(trainer: Trainer, spec: dict[str, Any] | None) -> None:
    """Testing hook: make one worker die in the middle of epoch ``spec['epoch']``, once (a marker file on
    storage every attempt sees records that it fired). ``mode`` 'exit' kills the process like a lost node;
    'raise' raises an exception in the training function. ``delay_s`` waits before failing (the other ranks
    block in their next collective meanwhile), so the Train controller has polled the previous epoch's
    report: a report is registered only once every worker's copy of it has been polled."""
    if not spec or trainer.dist.rank != int(spec.get("rank", 0)) or Path(spec["marker"]).exists():
        return
    step = trainer.task.step
    seen = {"n": 0}

    def failing_step(x: torch.Tensor, y: torch.Tensor) -> Any:
        if trainer.state.epoch + 1 == int(spec["epoch"]):
            seen["n"] += 1
            if seen["n"] > int(spec.get("after_steps", 1)):
                Path(spec["marker"]).write_text(f"fired in epoch {spec['epoch']}\n")
                time.sleep(float(spec.get("delay_s", 0.0)))
                if spec.get("mode", "exit") == "exit":
                    os._exit(1)
                raise RuntimeError(f"injected failure in epoch {spec['epoch']}")
        return step(x, y)

    trainer.task.step = failing_step  # type: ignore[method-assign]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker. ``config`` is what :func:`make_torch_trainer` built:
    ``cfg`` (RunConfig as a dict, absolute paths), ``run_dir`` (storage path or URI of the run folder),
    ``resume_from`` (a checkpoint file to start from when Ray has none), ``finish``, ``inject_failure``
    (tests). Returns the run's summary when ``finish`` (Ray hands rank 0's to the driver), else None."""
    from bmtard_ray.dist import DistContext

    _quiet_ray_train_worker()
    cfg = from_dict(config["cfg"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = DistContext()  # the process group Ray Train initialised (gloo on CPU, nccl on GPU)

    def report(metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        metrics = _jsonable(metrics)
        if checkpoint is None or rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="bmtard-ckpt-") as tmp:
            torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=CHECKPOINT_DIR.format(metrics["epoch"]))

    trainer = Trainer(cfg, device=device, dist=dist, report=report)
    state = None
    restored = ray.train.get_checkpoint()  # set after a worker failure, or when the run folder has a snapshot
    if restored is not None:
        with restored.as_directory() as folder:
            state = io.safe_load(Path(folder) / CHECKPOINT_FILE)
    elif config.get("resume_from"):
        state = io.safe_load(Path(config["resume_from"]))
    if state is not None:
        trainer.load_state_dict(state)
    _maybe_inject_failure(trainer, config.get("inject_failure"))
    trainer.fit()
    if not config.get("finish"):
        return None
    run_dir = str(config["run_dir"])
    if not is_uri(run_dir):
        return trainer.finish(Path(run_dir))
    with tempfile.TemporaryDirectory(prefix="bmtard-out-") as tmp:
        summary = trainer.finish(Path(tmp))
        if dist.is_main:
            _upload_dir(Path(tmp), run_dir)
    return summary


def _quiet_ray_train_worker() -> None:
    """Ray 2.60 logs every report's full metrics at INFO through loggers named by file path, which
    ``LoggingConfig(log_level)`` does not reach; the driver's view shows the same numbers once."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for module in (context, storage):
        for name in (module.__file__, module.__name__):
            logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------
# The driver side.


def make_torch_trainer(cfg: RunConfig, scaling: ScalingOptions, *, run_config: RayRunConfig | None = None,
                       storage_path: str | None = None, failure_max: int = 2, keep_checkpoints: int = 2,
                       callbacks: Sequence[UserCallback] = (), resume_from: str | Path | None = None,
                       finish: bool = False, inject_failure: dict[str, Any] | None = None) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` (paths must already be absolute: see :func:`absolute_paths`).

    With ``run_config`` (e.g. Tune's, carrying ``TuneReportCallback``) its name and storage path define the
    run folder; otherwise the run is ``<storage_path or cfg.output_dir>/<cfg.name>`` with
    ``FailureConfig(max_failures=failure_max)`` and the newest ``keep_checkpoints`` checkpoints kept."""
    scaling = scaling.validate()
    if scaling.gpus_per_worker is None or scaling.cpus_per_worker is None:
        scaling = scaling.resolved(cfg, ray.nodes() if ray.is_initialized() else ())
    if run_config is None:
        run_config = RayRunConfig(
            name=cfg.name, storage_path=str(storage_path or cfg.output_dir),
            failure_config=FailureConfig(max_failures=failure_max),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks), logging_config=LoggingConfig(log_level="WARNING"))
    run_dir = _join(str(run_config.storage_path), str(run_config.name))
    loop_config = {"cfg": to_dict(cfg), "run_dir": run_dir, "resume_from": str(resume_from) if resume_from else None,
                   "finish": finish, "inject_failure": inject_failure}
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling.to_ray(),
                        run_config=run_config)


class _ForwardToDriver(UserCallback):
    """Runs in the Train controller: forwards rank 0's report (and worker failures) to the driver's view."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(("report", metrics[0] if metrics else {}))

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        text = {rank: f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}"
                for rank, e in worker_exceptions.items()}
        self.queue.put(("failure", text))


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class EpochView:
    """Driver output: a live table on a terminal, one line per epoch otherwise (job logs, CI)."""

    COLUMNS = ("epoch", "loss", "L_adv", "L_nat", "tau_adv", "tau_nat", "w_adv", "w_nat", "val W-Robust", "img/s",
               "time", "ETA")

    def __init__(self, console: Console, epochs: int, title: str) -> None:
        self.console, self.epochs, self.title = console, epochs, title
        self.rows: dict[int, list[str]] = {}
        self.events: list[str] = []
        self.started = time.perf_counter()
        self.last_time = self.started
        self.epoch_walls: list[float] = []
        self.live: Live | None = None

    def __enter__(self) -> EpochView:
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    # The live table pairs the adv/nat values and leaves out the weighted loss and the elapsed time (both
    # in the lines and metrics.parquet) so that it fits 80 columns.
    TABLE_COLUMNS = ("epoch", "L adv/nat", "tau adv/nat", "w adv/nat", "val W-Rob", "img/s", "ETA")

    def _table(self) -> Group:
        table = Table(title=self.title, box=None, pad_edge=False, header_style="bold underline")
        for c in self.TABLE_COLUMNS:
            table.add_column(c, justify="right", no_wrap=True)
        shown = sorted(self.rows)[-max(3, self.console.height - 12):]  # the newest epochs that fit
        for epoch in shown:
            r = self.rows[epoch]
            table.add_row(r[0], f"{r[2]}/{r[3]}", f"{r[4][:5]}/{r[5][:5]}", f"{r[6][:5]}/{r[7][:5]}", r[8], r[9], r[11])
        # Events go below the table, not in its caption (a long caption would widen and squeeze the table).
        return Group(table, *(Text(e, style="yellow") for e in self.events[-3:]))

    def report(self, m: dict[str, Any]) -> None:
        if "epoch" not in m:
            return
        now = time.perf_counter()
        # ETA from the recent wall time per epoch (validation and checkpointing included); the first epoch
        # after a (re)start also holds the workers' start-up, so its training time stands in for it.
        first = not self.epoch_walls
        self.epoch_walls.append(float(m.get("seconds") or 0.0) if first else now - self.last_time)
        self.last_time = now
        epoch = int(m["epoch"])
        recent = self.epoch_walls[-5:]
        eta = (sum(recent) / len(recent)) * (self.epochs - epoch)
        row = [f"{epoch}/{self.epochs}", _fmt(m.get("train_loss")), _fmt(m.get("train_L_adv")),
               _fmt(m.get("train_L_nat")), _fmt(m.get("tau_adv")), _fmt(m.get("tau_nat")), _fmt(m.get("w_adv")),
               _fmt(m.get("w_nat")), _fmt(m.get("val_w_robust"), ".2f"), _fmt(m.get("images_per_s"), ".0f"),
               _duration(now - self.started), _duration(eta)]
        if epoch in self.rows:
            self.events.append(f"epoch {epoch} redone after a restart")
        self.rows[epoch] = row
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(" | ".join(f"{c} {v}" for c, v in zip(self.COLUMNS, row)), soft_wrap=True)

    def failure(self, errors: dict[int, str]) -> None:
        msg = "worker failure (" + "; ".join(f"rank {r}: {e}" for r, e in sorted(errors.items())) + \
              "): restarting from the last checkpoint"
        self.events.append(msg)
        self.epoch_walls.clear()
        if self.live is not None:
            self.live.update(self._table())
        else:
            self.console.print(Text(msg, style="yellow"), soft_wrap=True)


def _pump(queue: Any, view: EpochView, stop: threading.Event) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            kind, payload = queue.get(timeout=0.5)
        except Empty:
            if stop.is_set():
                return
            continue
        except Exception:  # the queue actor went away (shutdown): nothing more to show
            return
        try:
            if kind == "report":
                view.report(payload)
            elif kind == "failure":
                view.failure(payload)
        except Exception as exc:  # a display problem must never stop the run or the view
            view.console.print(f"(driver view: {type(exc).__name__}: {exc})", markup=False)


def _user_error(exc: BaseException) -> BmtardError | None:
    """A BmtardError raised inside a worker, found through Ray's wrappers (None if there is none)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BmtardError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        for name in ("worker_failures", "_worker_failures"):
            failures = getattr(e, name, None)
            if isinstance(failures, dict):
                todo += list(failures.values())
    return None


def fit_with_view(trainer: TorchTrainer, cfg: RunConfig, console: Console, title: str) -> Any:
    """``trainer.fit()`` with the live per-epoch view fed by the controller callback's queue."""
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    trainer.run_config.callbacks.append(_ForwardToDriver(queue))
    stop = threading.Event()
    with EpochView(console, cfg.optim.epochs, title) as view:
        pump = threading.Thread(target=_pump, args=(queue, view, stop), daemon=True)
        pump.start()
        try:
            return trainer.fit()
        except Exception as exc:
            err = _user_error(exc)
            if err is not None:
                raise type(err)(str(err)) from None
            raise
        finally:
            stop.set()
            pump.join(timeout=10)
            queue.shutdown()


def _prepare(cfg: RunConfig, scaling: ScalingOptions) -> None:
    """Checks that must pass before anything starts (workers would fail and retry on each)."""
    data = prepare_data(cfg)  # a bad data folder fails here, not on every worker
    check_given_teachers(cfg, data.info)
    n = scaling.num_workers
    if cfg.optim.batch_size % n:
        raise ConfigError(f"optim.batch_size ({cfg.optim.batch_size}) must be divisible by the number of workers ({n})")
    per_worker = cfg.optim.batch_size // n
    if len(data.train) // n < per_worker:
        raise ConfigError(f"{len(data.train)} training images over {n} workers leave less than one batch of "
                          f"{per_worker} per worker: lower --workers or optim.batch_size")
    for role in teacher_roles(cfg.method.name):
        tc = getattr(cfg.teachers, role)
        if not tc.checkpoint and not cached_path(cfg, role).is_file() and tc.batch_size % n:
            raise ConfigError(f"teachers.{role}.batch_size ({tc.batch_size}) must be divisible by the number of "
                              f"workers ({n}) to train that teacher")
    if any(is_uri(getattr(cfg.teachers, r).checkpoint or "") for r in ("clean", "robust")) or is_uri(teacher_cache_dir(cfg)):
        raise ConfigError("teacher checkpoints and the teacher cache (teachers.cache_dir, default <output_dir>/teachers) must be filesystem paths (shared between "
                          "nodes for multi-node runs), not URIs")


def _fit_run(cfg: RunConfig, scaling: ScalingOptions, *, storage: str, resume_from: Path | None, resume: bool,
             overwrite: bool, failure_max: int, keep_checkpoints: int, console: Console,
             inject_failure: dict[str, Any] | None) -> dict[str, Any]:
    run_dir = _join(storage, cfg.name)
    _check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    if resume and resume_from is None and _latest_ray_checkpoint(run_dir) is None:
        raise CheckpointError(f"no checkpoint to resume from in {run_dir} (it holds no Ray checkpoint snapshot with "
                              f"a checkpoint, nor a {CHECKPOINT_FILE})")
    _write_text(run_dir, "config.yaml", _yaml(cfg))
    trainer = make_torch_trainer(cfg, scaling, storage_path=storage, failure_max=failure_max,
                                 keep_checkpoints=keep_checkpoints, resume_from=resume_from, finish=True,
                                 inject_failure=inject_failure)
    gpus = f", {scaling.gpus_per_worker:g} GPU" if scaling.gpus_per_worker else ""
    console.print(f"{cfg.name}: {cfg.method.name} student {cfg.student} on {cfg.data.dataset}, "
                  f"{scaling.num_workers} Ray worker(s) x ({scaling.cpus_per_worker:g} CPU{gpus}), global batch "
                  f"{cfg.optim.batch_size} -> {run_dir}")
    result = fit_with_view(trainer, cfg, console, f"{cfg.name} ({scaling.num_workers} worker(s))")
    summary = dict(result.return_value or {})
    if not summary:
        raise RuntimeError(f"the run in {run_dir} ended without a summary from rank 0")
    summary["run_dir"] = run_dir
    return summary


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def run_ray(cfg: RunConfig, scaling: ScalingOptions, *, address: str | None = None,
            storage_path: str | None = None, resume: str | Path | None = None, overwrite: bool = False,
            failure_max: int = 2, keep_checkpoints: int = 2, console: Console | None = None,
            inject_failure: dict[str, Any] | None = None, **ray_init: Any) -> dict[str, Any]:
    """Validate, connect, train missing teachers (through Ray, same scaling), fit, return the summary.

    ``resume``: a run folder (Ray's, with checkpoint folders and a snapshot, or a local one with
    ``checkpoint.pt``) or a checkpoint file; the run continues in that folder. ``inject_failure`` is a
    testing hook (see :func:`_maybe_inject_failure`). ``ray_init`` goes to ``ray.init`` when a local Ray is
    started (e.g. ``num_cpus=2``)."""
    console = console or Console()
    if failure_max < -1:
        raise ConfigError(f"max failures must be >= 0 (or -1 for unlimited), got {failure_max}")
    if keep_checkpoints < 1:
        raise ConfigError(f"checkpoints to keep must be >= 1, got {keep_checkpoints}")
    scaling.validate()
    cfg = absolute_paths(cfg)
    resume_from: Path | None = None
    if resume is not None:
        if is_uri(resume):
            run_dir = str(resume).rstrip("/")
        else:
            target = Path(resume).expanduser().resolve()
            run_dir = str(target if target.is_dir() else target.parent)
            if target.is_file() and target.parent.name.startswith("checkpoint_epoch"):
                run_dir = str(target.parent.parent)
            if _latest_ray_checkpoint(run_dir) is None:  # a local run folder or file: start from that file
                resume_from = find_checkpoint(target)
        storage, _, name = run_dir.rpartition("/")
        cfg.name, cfg.output_dir = name, storage
    storage = str(storage_path) if storage_path else cfg.output_dir
    if not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    _prepare(cfg, scaling)
    started = connect(address, **ray_init)
    try:
        scaling = scaling.resolved(cfg, ray.nodes())
        check_resources(scaling)
        common = dict(failure_max=failure_max, keep_checkpoints=keep_checkpoints, console=console)

        def train_teacher(tcfg: RunConfig) -> None:
            # Teachers train through Ray too (a big teacher wants the same GPUs), into the shared cache.
            # An interrupted teacher run with a checkpoint continues; anything else there is replaced.
            resumable = _latest_ray_checkpoint(_join(tcfg.output_dir, tcfg.name)) is not None
            _fit_run(absolute_paths(tcfg), scaling, storage=tcfg.output_dir, resume_from=None, resume=resumable,
                     overwrite=True, inject_failure=None, **common)

        cfg = ensure_teachers(cfg, train_teacher, log=lambda s: console.print(Text(s, style="bold"), soft_wrap=True))
        summary = _fit_run(cfg, scaling, storage=storage, resume_from=resume_from, resume=resume is not None,
                           overwrite=overwrite, inject_failure=inject_failure, **common)
    finally:
        if started:
            stop_local_ray()
    if summary.get("results"):
        print_summary(summary, console)
    console.print(f"outputs in {summary['run_dir']}")
    return summary


def scaling_from_args(args: Any) -> ScalingOptions:
    """ScalingOptions from run_train.py's flags, over an optional ``--ray-config`` YAML file."""
    values: dict[str, Any] = {}
    if getattr(args, "ray_config", None):
        from bmtard_ray.config import read_yaml

        data = read_yaml(args.ray_config)
        names = {f.name for f in fields(ScalingOptions)} | {"address", "storage_path", "max_failures",
                                                            "keep_checkpoints"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {args.ray_config}; valid keys: "
                              f"{', '.join(sorted(names))}")
        values.update(data)
    for flag, key in (("workers", "num_workers"), ("cpus_per_worker", "cpus_per_worker"),
                      ("gpus_per_worker", "gpus_per_worker"), ("address", "address"),
                      ("storage_path", "storage_path"), ("max_failures", "max_failures"),
                      ("keep_checkpoints", "keep_checkpoints")):
        if getattr(args, flag, None) is not None:
            values[key] = getattr(args, flag)
    args.address = values.pop("address", None)
    args.storage_path = values.pop("storage_path", None)
    args.max_failures = values.pop("max_failures", 2)
    args.keep_checkpoints = values.pop("keep_checkpoints", 2)
    return ScalingOptions(**values).validate()


def run_from_args(cfg: RunConfig, args: Any) -> dict[str, Any]:
    """What ``run_train.py`` (without ``--local``) does."""
    scaling = scaling_from_args(args)
    return run_ray(cfg, scaling, address=args.address, storage_path=args.storage_path, resume=args.resume,
                   overwrite=args.overwrite, failure_max=args.max_failures, keep_checkpoints=args.keep_checkpoints)
