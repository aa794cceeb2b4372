"""`run_tune.py --review`: bad input is one line and exit 2; on a study and on a training run folder the
dashboards answer on loopback with what the folder holds, and Ctrl-C stops them (ports closed)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from bmtard_ray.cli.tune import main as tune_main
from bmtard_ray.launch.events import EpochEvents
from bmtard_ray.tuning.settings import TuneSettings

REPO = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_experiment(exp: Path, with_study: bool = True) -> None:
    """A finished two-trial experiment as run_tune.py leaves it (settings, study, a trial's events)."""
    exp.mkdir(parents=True)
    (exp / "settings.json").write_text(TuneSettings(space_file="s.yaml", experiment_dir=str(exp),
                                                    study_name="demo").to_json())
    if not with_study:
        return
    study = optuna.create_study(study_name="demo", storage=f"sqlite:///{exp / 'optuna.db'}", direction="maximize")
    study.set_metric_names(["val_w_robust"])
    for i, values in enumerate(([20.0, 25.0, 27.0], [18.0])):
        t = study.ask({"ebb.eta_tau": optuna.distributions.FloatDistribution(1e-3, 5e-2, log=True)})
        t.set_user_attr("ray_trial_id", f"t{i}")
        for step, v in enumerate(values, 1):
            t.report(v, step)
        study.tell(t, values[-1] if len(values) == 3 else None,
                   state=optuna.trial.TrialState.COMPLETE if len(values) == 3 else optuna.trial.TrialState.PRUNED)
    events = EpochEvents(exp / "trial_t0", fresh=True)
    events({"epoch": 1, "val_w_robust": 20.0})
    events.close()


@pytest.mark.parametrize("args, message", [
    (["--review", "{tmp}/none"], "is not a folder"),
    (["--review", "{tmp}"], "is neither a run_tune.py experiment (settings.json) nor a run_train.py run"),
    (["--review", "{tmp}/nostudy"], "holds no Optuna study yet"),
    (["--bind-all"], "--bind-all is an option of --review FOLDER"),
    (["--review", "{tmp}/nostudy", "--space", "ebb"], "--review opens a folder's dashboards and runs nothing"),
])
def test_bad_review_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                                 message: str) -> None:
    make_experiment(tmp_path / "nostudy", with_study=False)
    assert tune_main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "nostudy" / "optuna.db").exists()  # looking does not create a study


def start_review(folder: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`run_tune.py --review folder`; returns the process and what it printed up to its Ctrl-C hint."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="")
    proc = subprocess.Popen([sys.executable, str(REPO / "run_tune.py"), "--review", str(folder), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = ""
    assert proc.stdout is not None
    while "press Ctrl-C" not in out:
        line = proc.stdout.readline()
        assert line, f"--review ended early ({proc.wait()}):\n{out}"
        out += line
    return proc, out


def url_of(out: str, name: str) -> str:
    m = re.search(rf"{name}:\s+(http://\S+)", out)
    assert m, out
    return m.group(1)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read().decode())


def closed(url: str) -> bool:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def stop_review(proc: subprocess.Popen[str], urls: list[str]) -> str:
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopping the dashboards" in rest
    for url in urls:
        assert closed(url), f"{url} still answers after Ctrl-C"
    return rest


@pytest.mark.slow
def test_review_serves_the_study_and_the_curves_then_stops_on_ctrl_c(tmp_path: Path) -> None:
    exp = tmp_path / "runs" / "tune" / "demo"
    make_experiment(exp)
    proc, out = start_review(exp)
    study_url, tb_url = url_of(out, "Optuna study"), url_of(out, "TensorBoard")
    try:
        assert study_url.startswith("http://127.0.0.1:") and tb_url.startswith("http://127.0.0.1:")
        assert re.search(r"/dashboard/studies/\d+$", study_url)
        # The page's own data: the study's trials with their states, curves, names and user attributes.
        detail: dict = get_json(study_url.replace("/dashboard/studies/", "/api/studies/"))  # type: ignore[assignment]
        assert detail["name"] == "demo" and detail["objective_names"] == ["val_w_robust"]
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Pruned"]
        assert [len(t["intermediate_values"]) for t in detail["trials"]] == [3, 1]
        assert detail["trials"][0]["user_attrs"] == [{"key": "ray_trial_id", "value": "t0"}]
        tags = get_json(f"{tb_url}data/plugin/scalars/tags")
        assert "validation/val_w_robust" in tags["trial_t0"]  # type: ignore[index]
    finally:
        stop_review(proc, [study_url, tb_url])


@pytest.mark.slow
def test_review_of_a_training_run_serves_tensorboard_only_and_bind_all_warns(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "bmtard-cpu"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: bmtard-cpu\n")
    events = EpochEvents(run, fresh=True)
    for epoch in (1, 2):
        events({"epoch": epoch, "val_w_robust": 30.0 + epoch, "tau_adv": 1.5})
    events.close()
    proc, out = start_review(run, "--bind-all")
    shown = url_of(out, "TensorBoard")
    assert shown.startswith(f"http://{socket.gethostname()}:")  # reachable from elsewhere, and says so
    assert "warning:" in out and "no authentication" in out
    tb_url = re.sub(r"^http://[^:/]+", "http://127.0.0.1", shown)
    try:
        assert "Optuna" not in out and "Ray dashboard:" in out
        tags = get_json(f"{tb_url}data/plugin/scalars/tags")
        assert {"validation/val_w_robust", "balance/tau_adv"} <= set(tags["."])  # type: ignore[index]
    finally:
        stop_review(proc, [tb_url])


def hold_exclusive_lock(db: Path) -> subprocess.Popen[str]:
    """Another process inside ``BEGIN EXCLUSIVE`` on ``db`` until it is killed (prints 'locked' once it is)."""
    code = ("import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("how", ["--review", "--resume"])
def test_a_study_database_another_process_holds_locked_is_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    import shutil

    exp = tmp_path / "demo"
    make_experiment(exp)
    shutil.copyfile(REPO / "search_spaces" / "smoke.yaml", exp / "space.yaml")
    holder = hold_exclusive_lock(exp / "optuna.db")
    try:
        start = time.monotonic()
        assert tune_main([how, str(exp)]) == 2
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {how}: the Optuna study database {exp / 'optuna.db'} is locked by another "
                          "process (SQLite refused ") and err.count("\n") == 1, err
    assert "database is locked" in err and elapsed < 30, (err, elapsed)


class _FakeRayDashboard:
    """A dashboard on loopback that answers as Ray's does: a public authentication mode, and /api/version
    (with the session name) only for the right bearer token when token authentication is on."""

    def __init__(self, session: str, token: str | None) -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                if self.path == "/api/authentication_mode":
                    body = {"authentication_mode": "token" if outer.token else "disabled"}
                elif self.path == "/api/version":
                    if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                        self.send_response(401)
                        self.end_headers()
                        return
                    body = {"version": "4", "ray_version": "2.60.0", "session_name": outer.session}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.session, self.token = session, token
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_review_shows_the_searchs_ray_dashboard_only_when_it_is_the_searchs_cluster(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from bmtard_ray.tuning import ray_dashboard as rd
    from bmtard_ray.tuning.review import print_ray

    monkeypatch.setenv("HOME", str(tmp_path))  # no token file of this machine's Ray is read
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def shown(found: rd.RayDashboard | None) -> str:
        console = Console(record=True, width=300)
        print_ray(console, found, [])
        return console.export_text()

    def record(url: str, session: str | None = "session_A") -> None:
        (tmp_path / "ray_cluster.json").write_text(json.dumps({"dashboard_url": url, "session_name": session}))

    dash = _FakeRayDashboard("session_A", token="s3cret")
    try:
        record(dash.url)
        found = rd.locate(tmp_path, rd.candidates(tmp_path))  # token on, no token here: cannot be verified
        assert found is not None and found.status == rd.UNVERIFIED and found.url == dash.url
        assert "cannot be verified" in shown(found) and "s3cret" not in shown(found)
        monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
        found = rd.locate(tmp_path, rd.candidates(tmp_path))
        assert found is not None and found.status == rd.SAME and "the search's own cluster" in shown(found)
        assert "s3cret" not in shown(found)
        dash.session = "session_B"  # the search's Ray stopped; another cluster took its port
        found = rd.locate(tmp_path, rd.candidates(tmp_path))
        assert found is not None and found.status == rd.OTHER and found.found == "session_B"
        text = shown(found)
        assert "has ended" in text and "another cluster (session session_B)" in text and "Jobs" not in text
        monkeypatch.delenv("RAY_AUTH_TOKEN")
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("s3cret\n")  # where `ray get-auth-token` keeps it
        assert rd.locate(tmp_path, rd.candidates(tmp_path)).status == rd.OTHER
        record(dash.url, session=None)  # an experiment from before the session was recorded
        assert rd.locate(tmp_path, [dash.url]).status == rd.UNVERIFIED
    finally:
        dash.close()
    record(dash.url)  # nothing answers there any more
    found = rd.locate(tmp_path, rd.candidates(tmp_path))
    assert found is not None and found.status == rd.ENDED and "has ended" in shown(found)


def test_review_says_when_parameter_importance_rests_on_too_little(tmp_path: Path) -> None:
    from bmtard_ray.tuning.review import importance_warnings

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for i, tau_max in enumerate((2.0, 5.0, 9.0, 3.0)):  # every trial draws the solve: no contrast in ebb.mode
        study.enqueue_trial({"ebb.mode": "solve", "ebb.tau_max": tau_max})
        trial = study.ask()
        trial.suggest_categorical("ebb.mode", ["step", "solve"])
        trial.suggest_float("ebb.tau_max", 2.0, 10.0)
        study.tell(trial, float(i)) if i < 3 else study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    warnings = importance_warnings(storage, "s")
    assert len(warnings) == 2, warnings
    assert "rests on 3 complete trial(s)" in warnings[0]  # the PRUNED one does not count
    assert warnings[1].startswith("ebb.mode took one value among the complete trials ('solve')")
