"""``run_tune.py --review FOLDER``: the dashboards a search (or a training run) is reviewed in.

For an experiment folder (``settings.json``): optuna-dashboard on its study and TensorBoard on the folder
(every trial's curves); for a ``run_train.py`` run folder (``config.yaml``): TensorBoard on it. Both listen
on 127.0.0.1 (``--bind-all``: 0.0.0.0, with a warning: neither has any authentication) on free ports, and
read their files live, so a running search or run can be watched. The Ray dashboard of a cluster that is up
(the one the search recorded, ``RAY_ADDRESS``, or the default local one) is printed with how to get past its
token prompt; the token itself is never printed. Ctrl-C (or SIGTERM) stops both servers.

Pure Python plus the two servers' own command-line programs (``optuna-dashboard``, ``tensorboard``, from the
``dashboard`` extra): no Ray is started or joined here.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from bmtard_ray.errors import ConfigError
from bmtard_ray.storage.run_folder import CONFIG_FILE
from bmtard_ray.tuning.ray_dashboard import ENDED, OTHER, SAME, RayDashboard, candidates, locate
from bmtard_ray.tuning.settings import SETTINGS_FILE, TB_DIR, read_settings_file
from bmtard_ray.tuning.study_lock import check_unlocked

START_TIMEOUT_S = 180.0                         # TensorBoard takes tens of seconds on a busy 2-core machine
EXTRA_HINT = "install the dashboard extra: pip install -e '.[dashboard]'"


@dataclass
class Target:
    """What a folder is reviewed with."""
    folder: Path
    kind: str                                   # "experiment" | "run"
    storage: str | None = None                  # the Optuna storage URL (experiments)
    study_name: str | None = None
    ray_candidates: list[str] = field(default_factory=list)


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for any other database)."""
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) else None


def target_of(folder: Path) -> Target:
    """Check the folder and decide what to start (one-line errors for anything else)."""
    if not folder.is_dir():
        raise ConfigError(f"--review: {folder} is not a folder; give an experiment folder (runs/tune/<name>) or a "
                          "run_train.py run folder (runs/<name>)")
    folder = folder.resolve()
    if (folder / SETTINGS_FILE).is_file():
        settings = read_settings_file(folder)
        db = sqlite_file(settings.storage_url)
        if db is not None and not db.is_file():
            raise ConfigError(f"--review: {folder} holds no Optuna study yet ({db} is missing: the search has not "
                              "created its trials)")
        if db is not None:
            check_unlocked(db, write=False, what="--review")
        return Target(folder, "experiment", settings.storage_url, settings.study_name, candidates(folder))
    if (folder / CONFIG_FILE).is_file():
        return Target(folder, "run", ray_candidates=candidates(folder))
    raise ConfigError(f"--review: {folder} is neither a run_tune.py experiment ({SETTINGS_FILE}) nor a run_train.py "
                      f"run ({CONFIG_FILE})")


def program(name: str) -> str:
    """A dashboard's command-line program: beside this Python (a venv need not be activated), else on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise ConfigError(f"--review needs {name}, which is not installed: {EXTRA_HINT}")
    return found


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def study_path(storage: str, study_name: str) -> str:
    """optuna-dashboard's page of the study (its id in the storage), or the study list if it cannot tell."""
    import optuna

    try:
        storage_obj = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        return f"/dashboard/studies/{storage_obj.get_study_id_from_name(study_name)}"
    except Exception:  # noqa: BLE001 - any storage problem: optuna-dashboard itself will show it
        return "/dashboard"


def server_commands(target: Target, host: str, ports: tuple[int, int]) -> list[tuple[str, list[str], str]]:
    """(name, command, path of the page to open) per server."""
    optuna_port, tb_port = ports
    out = []
    if target.kind == "experiment":
        assert target.storage is not None and target.study_name is not None
        out.append(("Optuna study", [program("optuna-dashboard"), target.storage, "--host", host,
                                     "--port", str(optuna_port), "--quiet"],
                    study_path(target.storage, target.study_name)))
    # --reload_interval 5: new epochs and new trials show up within seconds of being written.
    # A search's trials have their own folder of runs, named by Optuna number (tuning/tb.py); older searches
    # and training runs keep their events in the folder itself.
    logdir = target.folder / TB_DIR if (target.folder / TB_DIR).is_dir() else target.folder
    out.append(("TensorBoard", [program("tensorboard"), "--logdir", str(logdir), "--host", host,
                                "--port", str(tb_port), "--reload_interval", "5"], "/"))
    return out


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start(name: str, cmd: list[str], url: str, logs: Path) -> Server:
    log = logs / f"{name.split()[0].lower()}.log"
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 - the child writes to it until it stops
    # Its own session: the terminal's Ctrl-C reaches only this process, which stops the servers in order.
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    out.close()
    return Server(name, url, proc, log)


def wait_until_up(servers: Sequence[Server], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited with status {s.proc.returncode}:\n{_tail(s.log)}")
            if _answers(s.url):
                pending.remove(s)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"{', '.join(s.name for s in pending)} did not answer within {timeout_s:.0f} s")
        if pending:
            time.sleep(0.5)


def stop(servers: Sequence[Server], grace_s: float = 10.0) -> None:
    """SIGTERM each server's process group (they were started in their own sessions), then SIGKILL."""
    for s in servers:
        if s.proc.poll() is None:
            try:
                os.killpg(s.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for s in servers:
        try:
            s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(s.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            s.proc.wait()


MIN_COMPLETE_FOR_IMPORTANCE = 10   # below this, optuna-dashboard's importance panel is a hint, not a ranking


def importance_warnings(storage: str, study_name: str) -> list[str]:
    """What optuna-dashboard's parameter-importance panel does not say: how few complete trials it rests on,
    and which categorical parameters took one value among them (they score 0 for want of contrast)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    out = []
    if len(complete) < MIN_COMPLETE_FOR_IMPORTANCE:
        out.append(f"parameter importance rests on {len(complete)} complete trial(s) (PRUNED ones do not count); "
                   f"below about {MIN_COMPLETE_FOR_IMPORTANCE} read it as a hint, not a ranking")
    values: dict[str, set[str]] = {}
    for t in complete:
        for name, dist in t.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                values.setdefault(name, set()).add(repr(t.params[name]))
    for name, seen in values.items():
        if len(seen) == 1:
            out.append(f"{name} took one value among the complete trials ({next(iter(seen))}): its importance of 0 "
                       "says nothing about it")
    return out


def print_ray(console: Console, found: RayDashboard | None, urls: Sequence[str]) -> None:
    """The Ray dashboard line: the search's cluster only when its identity was checked (ray_dashboard.py)."""
    if found is None:
        console.print(f"  Ray dashboard:  none answers (looked at {', '.join(urls)}); no cluster is up here")
        return
    if found.status == ENDED:
        console.print(f"  Ray dashboard:  the search's cluster (session {found.session}) has ended: nothing answers "
                      "where it recorded its dashboard", soft_wrap=True)
        return
    if found.status == OTHER:
        console.print(f"  Ray dashboard:  the search's cluster (session {found.session}) has ended; {found.url} now "
                      f"belongs to another cluster (session {found.found}), not shown as the search's",
                      soft_wrap=True)
        return
    console.print(f"  Ray dashboard:  {found.url}   (the job: Jobs; the training workers and their nodes: Actors; "
                  f"Ray Train's state as JSON: {found.url}/api/train/v2/runs/v1)", soft_wrap=True)
    if found.status == SAME:
        console.print(f"                  the search's own cluster (session {found.session}, checked)", soft_wrap=True)
    elif found.session:
        console.print(f"                  cannot be verified as the search's cluster (session {found.session}) "
                      "without its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)", soft_wrap=True)
    else:
        console.print("                  a cluster that answers here; which one ran this cannot be verified (no "
                      "session was recorded)", soft_wrap=True)
    if found.mode == "token":
        console.print("                  token authentication is on: paste the output of `ray get-auth-token` "
                      "(run on the head node) into the dashboard's prompt; it is not printed here", soft_wrap=True)


def review(folder: Path, *, bind_all: bool = False, console: Console | None = None) -> int:
    """Start the dashboards for ``folder``, print where they are, and keep them up until Ctrl-C or SIGTERM."""
    console = console or Console()
    target = target_of(folder)
    host = "0.0.0.0" if bind_all else "127.0.0.1"
    shown = socket.gethostname() if bind_all else "127.0.0.1"
    commands = server_commands(target, host, (free_port(host), free_port(host)))
    if bind_all:
        console.print("[bold red]warning:[/bold red] --bind-all: optuna-dashboard and TensorBoard listen on every "
                      "network interface and have no authentication; anyone who can reach this machine can read "
                      "(and, in optuna-dashboard, edit notes of) the study", soft_wrap=True)
    logs = Path(tempfile.mkdtemp(prefix="bmtard-review-"))
    servers: list[Server] = []
    # Ctrl-C and SIGTERM both stop the servers; SIGINT explicitly, since a shell's background job ignores it.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name, cmd, page in commands:
            port = cmd[cmd.index("--port") + 1]  # answered on loopback in both modes: polled and printed there
            servers.append(start(name, cmd, f"http://127.0.0.1:{port}{page}", logs))
        what = (f"experiment {target.folder} (study '{target.study_name}' in {target.storage})"
                if target.kind == "experiment" else f"training run {target.folder}")
        console.print(f"reviewing {what}; starting {' and '.join(s.name for s in servers)} ...", soft_wrap=True)
        if target.kind == "experiment" and target.storage and target.study_name:
            for warning in importance_warnings(target.storage, target.study_name):
                console.print(f"[yellow]note:[/yellow] {warning}", soft_wrap=True)
        wait_until_up(servers)
        for s in servers:
            console.print(f"  {s.name + ':':<15} {s.url.replace('127.0.0.1', shown) if bind_all else s.url}",
                          soft_wrap=True)
        print_ray(console, locate(target.folder, target.ray_candidates), target.ray_candidates)
        console.print("press Ctrl-C to stop the dashboards", soft_wrap=True)
        while True:
            for s in servers:
                if s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} stopped (status {s.proc.returncode}):\n{_tail(s.log)}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping the dashboards")
        return 0
    except RuntimeError as exc:
        console.print(str(exc), style="red", soft_wrap=True, markup=False)
        return 1
    finally:
        stop(servers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(logs, ignore_errors=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
