"""A whole Ray Train run, driver side: checks, connection, teachers, the TorchTrainer and its result."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, LoggingConfig, UserCallback
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.text import Text

from bmtard_ray.config import RunConfig, dataset_settings, teacher_cache_dir, to_dict
from bmtard_ray.data import num_classes, prepare_data
from bmtard_ray.errors import BmtardError, CheckpointError, ClusterLostError, ConfigError, find_cause
from bmtard_ray.launch.console import print_outputs, print_summary, what_trains
from bmtard_ray.launch.events import EpochEvents
from bmtard_ray.launch.preflight import check_batches, probe_all
from bmtard_ray.ray_train.cluster import check_resources, cluster_address, connect, stop_local_ray
from bmtard_ray.ray_train.error_log import write_error_log
from bmtard_ray.ray_train.lost import GcsWatch, exit_lost, gcs_answers, lost_error, resume_advice, what_was_lost
from bmtard_ray.ray_train.node_preflight import preflight_nodes
from bmtard_ray.ray_train.placement import failure_config, not_placed, placement_deadline
from bmtard_ray.ray_train.scaling import ScalingOptions
from bmtard_ray.ray_train.stop import StopAddress
from bmtard_ray.ray_train.view import EpochView, ForwardToDriver, pump
from bmtard_ray.ray_train.worker import train_loop_per_worker
from bmtard_ray.storage import checkpoints
from bmtard_ray.storage.paths import is_uri, join
from bmtard_ray.storage.run_folder import absolute_paths, check_run_folder, write_config
from bmtard_ray.training.balance import unreachable_target
from bmtard_ray.training.teachers import check_given_teachers, ensure_teachers, roles_to_train


def make_torch_trainer(cfg: RunConfig, scaling: ScalingOptions, *, run_config: RayRunConfig | None = None,
                       storage_path: str | None = None, failure_max: int = 2, keep_checkpoints: int = 2,
                       callbacks: Sequence[UserCallback] = (), resume_from: str | Path | None = None,
                       finish: bool = False, worker_hook: dict[str, Any] | None = None,
                       stop_signal: StopAddress | None = None) -> TorchTrainer:
    """The TorchTrainer for ``cfg`` (paths must already be absolute: see :func:`absolute_paths`).

    With ``run_config`` (e.g. Tune's, carrying ``TuneReportCallback``) its name and storage path define the
    run folder; otherwise the run is ``<storage_path or cfg.output_dir>/<cfg.name>`` with
    :func:`~bmtard_ray.ray_train.placement.failure_config` and the newest ``keep_checkpoints`` checkpoints kept.
    ``stop_signal``: where the workers look for a cooperative stop (see :mod:`bmtard_ray.ray_train.stop`)."""
    scaling = scaling.validate()
    if scaling.gpus_per_worker is None or scaling.cpus_per_worker is None:
        scaling = scaling.resolved(cfg, ray.nodes() if ray.is_initialized() else ())
    if run_config is None:
        run_config = RayRunConfig(
            name=cfg.name, storage_path=str(storage_path or cfg.output_dir),
            failure_config=failure_config(scaling, failure_max),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks), logging_config=LoggingConfig(log_level="WARNING"))
    run_dir = join(str(run_config.storage_path), str(run_config.name))
    loop_config = {"cfg": to_dict(cfg), "run_dir": run_dir, "resume_from": str(resume_from) if resume_from else None,
                   "finish": finish, "worker_hook": worker_hook,
                   "stop_signal": stop_signal.to_dict() if stop_signal else None}
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling.to_ray(),
                        run_config=run_config)


def user_error(exc: BaseException) -> BmtardError | None:
    """A BmtardError raised inside a worker, found through Ray's wrappers (None if there is none)."""
    found = find_cause(exc, BmtardError)
    return found if isinstance(found, BmtardError) else None


def fit_with_view(trainer: TorchTrainer, cfg: RunConfig, console: Console, title: str,
                  listeners: Sequence[Callable[[dict[str, Any]], None]] = ()) -> Any:
    """``trainer.fit()`` with the live per-epoch view fed by the controller callback's queue; each of
    ``listeners`` also gets every epoch's metrics (rank 0's report)."""
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a 0-CPU actor may land anywhere, and a node that leaves (an elastic run's
    # lost node) must not take the driver's view with it. Hard affinity: a soft one was seen to land on
    # another node of a 2-node test cluster, which then took the queue (and the run) with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gcs = ray.get_runtime_context().gcs_address
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    trainer.run_config.callbacks.append(ForwardToDriver(queue))
    stop = threading.Event()
    with EpochView(console, cfg.optim.epochs, title) as view:
        pumper = threading.Thread(target=pump, args=(queue, view, stop, listeners), daemon=True)
        pumper.start()
        try:
            return trainer.fit()
        except Exception as exc:
            err = user_error(exc)
            if err is not None:  # one line; Ray's full text of it (tracebacks, node) in the run's error log
                where = write_error_log(exc, join(str(trainer.run_config.storage_path), str(trainer.run_config.name)),
                                        str(trainer.run_config.name))
                raise type(err)(f"{err} (the workers' error text: {where})") from None
            raise
        finally:
            stop.set()
            pumper.join(timeout=10)
            if gcs_answers(gcs):  # a call to a dead GCS would hold the driver until Ray ends it
                queue.shutdown()


def check_before_start(cfg: RunConfig, scaling: ScalingOptions) -> None:
    """Checks that must pass before anything starts (workers would fail and retry on each)."""
    data = prepare_data(cfg)  # a bad data folder fails here, not on every worker
    check_given_teachers(cfg, data.info, data.val)
    # Any world size splits the global batch (uneven shards), so there is no divisibility to check; the
    # largest world size an (elastic) run can reach gives every worker the smallest shard.
    check_batches(cfg, data, roles_to_train(cfg), workers=scaling.max_workers)
    teacher_files = [getattr(cfg.teachers, r).checkpoint or "" for r in ("clean", "robust")]
    if any(is_uri(f) for f in teacher_files) or is_uri(teacher_cache_dir(cfg)):
        raise ConfigError("teacher checkpoints and the teacher cache (teachers.cache_dir, default "
                          "<output_dir>/teachers) must be filesystem paths (shared between nodes for multi-node "
                          "runs), not URIs")


def gcs_of() -> str | None:
    """The connected cluster's GCS address (None when Ray is not connected)."""
    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


def fit_run(cfg: RunConfig, scaling: ScalingOptions, *, storage: str, resume_from: Path | None, resume: bool,
             overwrite: bool, failure_max: int, keep_checkpoints: int, console: Console,
             worker_hook: dict[str, Any] | None, watch: GcsWatch | None = None,
             own_folder: bool = True) -> dict[str, Any]:
    """One Ray Train run into ``<storage>/<cfg.name>``. ``own_folder``: a loss of the cluster is reported with
    this folder's --resume command (a teacher's run leaves that to :func:`run_ray`)."""
    run_dir = join(storage, cfg.name)
    check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    if resume and resume_from is None and checkpoints.latest_ray(run_dir) is None:
        raise CheckpointError(f"no checkpoint to resume from in {run_dir} (it holds no Ray checkpoint snapshot with "
                              f"a checkpoint, nor a {checkpoints.FILE})")
    write_config(cfg, run_dir)
    trainer = make_torch_trainer(cfg, scaling, storage_path=storage, failure_max=failure_max,
                                 keep_checkpoints=keep_checkpoints, resume_from=resume_from, finish=True,
                                 worker_hook=worker_hook)
    gpus = f", {scaling.gpus_per_worker:g} GPU" if scaling.gpus_per_worker else ""
    console.print(f"{what_trains(cfg)} on {cfg.data.dataset} "
                  f"({dataset_settings(cfg)}), "
                  f"{scaling.describe()} Ray worker(s) x ({scaling.cpus_per_worker:g} CPU{gpus}, "
                  f"{scaling.placement_strategy.lower()}), global batch "
                  f"{cfg.optim.batch_size} -> {run_dir}")
    classes = num_classes(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
    if (note := unreachable_target(cfg.ebb, classes)) is not None:
        console.print(note, style="yellow", soft_wrap=True, markup=False)
    # TensorBoard events in the run folder, written here on the driver from rank 0's reports (a storage
    # URI gets none: tensorboardX writes local files).
    events = None if is_uri(run_dir) else EpochEvents(run_dir, fresh=not resume and resume_from is None)
    try:
        with placement_deadline(scaling):
            result = fit_with_view(trainer, cfg, console, f"{cfg.name} ({scaling.describe()} worker(s))",
                                   listeners=[events] if events else [])
    except BaseException as exc:
        lost = lost_error(exc, gcs_address=gcs_of(), watch=watch, run_dir=run_dir,
                          created=not resume and resume_from is None, keep=keep_checkpoints,
                          command="run_train.py") if own_folder else None
        if lost is not None:
            raise lost from None
        err = not_placed(exc, scaling) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise
    finally:
        if events:
            events.close()
    summary = dict(result.return_value or {})
    if not summary:
        raise RuntimeError(f"the run in {run_dir} ended without a summary from rank 0")
    summary["run_dir"] = run_dir
    return summary


def run_ray(cfg: RunConfig, scaling: ScalingOptions, *, address: str | None = None,
            storage_path: str | None = None, resume: str | Path | None = None, overwrite: bool = False,
            failure_max: int = 2, keep_checkpoints: int = 2, console: Console | None = None,
            worker_hook: dict[str, Any] | None = None, **ray_init: Any) -> dict[str, Any]:
    """Validate, connect, train missing teachers (through Ray, same scaling), fit, return the summary.

    ``resume``: a run folder (Ray's, with checkpoint folders and a snapshot, or a local one with
    its checkpoint file) or a checkpoint file; the run continues in that folder. ``worker_hook`` is a
    testing hook (see :func:`~bmtard_ray.ray_train.worker.run_worker_hook`). ``ray_init`` goes to ``ray.init``
    when a local Ray is started (e.g. ``num_cpus=2``)."""
    console = console or Console()
    if failure_max < -1:
        raise ConfigError(f"max failures must be >= 0 (or -1 for unlimited), got {failure_max}")
    if keep_checkpoints < 1:
        raise ConfigError(f"checkpoints to keep must be >= 1, got {keep_checkpoints}")
    scaling.validate()
    cfg = absolute_paths(cfg)
    resume_from: Path | None = None
    if resume is not None:
        run_dir = checkpoints.run_dir_of(resume)
        if not is_uri(run_dir) and checkpoints.latest_ray(run_dir) is None:  # a local run: start from its file
            resume_from = checkpoints.find(Path(resume).expanduser().resolve())
        storage, _, name = run_dir.rpartition("/")
        cfg.name, cfg.output_dir = name, storage
    storage = str(storage_path) if storage_path else cfg.output_dir
    if not is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    # Every folder this run writes, probed before any check that loads data, any teacher and any Ray start.
    probe_all([(join(storage, cfg.name), "run folder")]
              + ([(teacher_cache_dir(cfg), "teacher cache")] if roles_to_train(cfg) else []))
    check_before_start(cfg, scaling)
    started = connect(address, **ray_init)
    lost = False
    # On a joined cluster the head can go while the run trains: watch its GCS (see lost.py).
    gcs = gcs_of() if started and cluster_address(address) else None

    def report_lost() -> None:  # from the watch's thread, before Ray's own exit
        exit_lost(ClusterLostError(f"{what_was_lost(gcs, watched=True)}; " + resume_advice(
            join(storage, cfg.name), created=resume is None, keep=keep_checkpoints, command="run_train.py")))

    watch = GcsWatch(gcs, report_lost)
    try:
        scaling = scaling.resolved(cfg, ray.nodes())
        check_resources(scaling)
        # Every node that could host a worker reads the inputs and writes the folders, before anything is written.
        preflight_nodes(cfg, scaling, [(join(storage, cfg.name), "run folder")]
                        + ([(teacher_cache_dir(cfg), "teacher cache")] if roles_to_train(cfg) else []))
        common: dict[str, Any] = dict(failure_max=failure_max, keep_checkpoints=keep_checkpoints, console=console,
                                      watch=watch)

        def train_teacher(tcfg: RunConfig) -> None:
            # Teachers train through Ray too (a big teacher wants the same GPUs), into the shared cache.
            # An interrupted teacher run with a checkpoint continues; anything else there is replaced.
            resumable = checkpoints.latest_ray(join(tcfg.output_dir, tcfg.name)) is not None
            fit_run(absolute_paths(tcfg), scaling, storage=tcfg.output_dir, resume_from=None, resume=resumable,
                     overwrite=True, worker_hook=None, own_folder=False, **common)

        with watch:
            given = to_dict(cfg)["teachers"]
            cfg = ensure_teachers(cfg, train_teacher,
                                  log=lambda s: console.print(Text(s, style="bold"), soft_wrap=True))
            if to_dict(cfg)["teachers"] != given:  # the cache's teacher files, now named: on every node too
                preflight_nodes(cfg, scaling, [])
            summary = fit_run(cfg, scaling, storage=storage, resume_from=resume_from, resume=resume is not None,
                               overwrite=overwrite, worker_hook=worker_hook, **common)
    except ClusterLostError:
        lost = True
        raise
    except BaseException as exc:
        # Lost while a teacher trained: the teacher continues from its own checkpoint when the run starts again.
        err = lost_error(exc, gcs_address=gcs_of(), watch=watch, run_dir=join(storage, cfg.name),
                         created=resume is None, keep=keep_checkpoints, command="run_train.py")
        lost = err is not None
        if err is not None:
            raise err from None
        raise
    finally:
        if started and not (lost and gcs):  # a lost cluster's shutdown would wait on it
            stop_local_ray()
    if summary.get("results"):
        print_summary(summary, console)
    print_outputs(cfg, summary["run_dir"], console)
    return summary
