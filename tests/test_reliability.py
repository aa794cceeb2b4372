"""The ways a run can go wrong before or around training, each tested as a class (issue 19).

Every entry point checks, before any teacher is trained, Ray is started or a file is written: the paths it
will write (a real write probe), the cluster it is given, and that every split holds a batch. ``--resume``
continues the run that is there. Caches, checkpoints and settings carry format versions and appear whole or
not at all. Ctrl-C and OSErrors end in one line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port
from rich.console import Console

from bmtard_ray.cli.train import main as train_main
from bmtard_ray.cli.tune import main as tune_main
from bmtard_ray.config import build_config, read_yaml
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.launch.local import run_local
from bmtard_ray.launch.preflight import probe_writable
from bmtard_ray.storage.checkpoints import FILE as CHECKPOINT_FILE
from bmtard_ray.storage.checkpoints import load_resume_state
from bmtard_ray.training.teachers import BUILDING, ENTRY_FILE, cached_path, ensure_teachers, teacher_config
from bmtard_ray.tuning.settings import TuneSettings

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(quiet=True)


def one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def common(tmp: Path, cifar_root: Path) -> list[str]:
    return ["--data-root", str(cifar_root), "--set", f"teachers.cache_dir={tmp / 'teachers'}"]


# ---------------------------------------------------------------------------------------------------------
# 1. A cluster address that does not answer: one line, exit 2, before any teacher is trained (both CLIs).


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("entry", ["train", "tune"])
def test_an_unreachable_cluster_fails_in_seconds_before_any_teacher(
        tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
        entry: str, how: str) -> None:
    import ray

    address = f"127.0.0.1:{free_port()}"
    args = common(tmp_path, cifar_root) + ["--output-dir", str(tmp_path / "out")]
    if how == "flag":
        args += ["--address", address]
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    main = train_main if entry == "train" else tune_main
    args = (["--preset", "smoke"] if entry == "train" else ["--smoke-test"]) + args
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, f"cannot reach a Ray cluster at {address}")
    assert not ray.is_initialized()
    assert list(tmp_path.iterdir()) == []  # no teacher cache, no run or experiment folder


# ---------------------------------------------------------------------------------------------------------
# 2. Paths that cannot be written: one line naming the path, exit 2, nothing written, from all three CLIs.


def tiny_checkpoint(path: Path) -> Path:
    from bmtard_ray.models import build_model

    torch.save(build_model("tiny_cnn", 10).state_dict(), path)
    return path


def test_probe_finds_a_path_under_a_file_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is a file, not a folder"):
        probe_writable(tmp_path / "file" / "runs" / "x", "run folder")
    with pytest.raises(ConfigError, match=r"run folder .*file is a file"):
        probe_writable(tmp_path / "file", "run folder")
    probe_writable(tmp_path / "new" / "deeper", "run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # probing wrote nothing


def cli_cases(tmp: Path, cifar_root: Path, out: Path) -> dict[str, list[str]]:
    ckpt = tiny_checkpoint(tmp / "tiny.pt")
    return {
        "run_train.py --local": ["run_train.py", "--local", "--preset", "smoke", *common(tmp, cifar_root),
                                 "--output-dir", str(out / "runs")],
        "run_train.py": ["run_train.py", "--preset", "smoke", *common(tmp, cifar_root), "--output-dir", str(out / "r")],
        "run_tune.py": ["run_tune.py", "--smoke-test", *common(tmp, cifar_root), "--output-dir", str(out / "tune")],
        "run_eval.py": ["run_eval.py", str(ckpt), "--arch", "tiny_cnn", "--data-root", str(cifar_root),
                        "--out", str(out / "eval")],
    }


@pytest.mark.slow
def test_every_cli_refuses_an_output_under_a_file_or_on_a_read_only_mount(tmp_path: Path, cifar_root: Path) -> None:
    """As root, chmod does not stop a write: a read-only tmpfs in a private mount namespace does."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    for label, argv in cli_cases(tmp_path, cifar_root, blocker).items():
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (label, proc.stderr[-2000:])
        one_error_line(proc.stderr, str(blocker), "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "tiny.pt"]

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("a read-only mount needs unshare and root")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = "; ".join(f"{sys.executable} {' '.join(argv)} >/dev/null 2>>{tmp_path / 'errs'}; "
                       f"echo $? >>{tmp_path / 'rcs'}"
                       for argv in cli_cases(tmp_path, cifar_root, ro).values())
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro} && {script}"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    # As root with unshare (CI) a private mount must work: a failure here is a failure, not a skip.
    assert not (probe.returncode != 0 and "mount" in probe.stderr), \
        f"private read-only mount failed: {probe.stderr[:200]}"
    assert (tmp_path / "rcs").read_text().split() == ["2"] * 4, (tmp_path / "errs").read_text()
    for line in (tmp_path / "errs").read_text().strip().splitlines():
        assert line.startswith("error: ") and str(ro) in line and "not writable" in line, line
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# 3. --resume continues the run that is there.


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cifar_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", f"output_dir={tmp / 'runs'}",
                                           f"teachers.cache_dir={tmp / 'teachers'}", "optim.epochs=1", "name=done"])
    run_local(cfg, console=QUIET)
    return tmp / "runs" / "done"


def copy_run(run: Path, tmp: Path) -> Path:
    out = tmp / "runs" / run.name
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize("args, message", [
    (["--method", "trades"], "method.name cannot change"),
    (["--student", "small_cnn"], "student cannot change"),
    (["--dataset", "cifar100"], "data.dataset cannot change"),
    (["--set", "data.train_subset=128"], "data.train_subset cannot change"),
    (["--set", "teachers.robust.epochs=3"], "teachers.robust.epochs cannot change"),
    (["--set", "loss.scale=10"], "loss.scale cannot change"),
    (["--set", "optim.milestones=[5]"], "optim.milestones cannot change"),  # the preset has [1]
    (["--name", "other"], "name cannot change"),
    (["--preset", "smoke"], "--preset cannot be combined with --resume"),
    (["--config", "x.yaml"], "--config cannot be combined with --resume"),
    (["--epochs", "0"], "optim.epochs=0 is fewer than the 1 epochs"),
])
def test_resume_refuses_to_change_what_is_trained(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  args: list[str], message: str) -> None:
    run = copy_run(finished, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert train_main(["--local", "--resume", str(run), *args]) == 2
    one_error_line(capsys.readouterr().err, message)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_resuming_a_finished_run_changes_nothing_unless_it_adds_epochs(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture, cifar_root: Path) -> None:
    import pyarrow.parquet as pq

    run = copy_run(finished, tmp_path)
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    # Keys that may change (where it runs, validation cadence) are accepted; the run is finished: no-op.
    assert train_main(["--local", "--resume", str(run), "--device", "cpu", "--set", "val_every=1",
                       "--data-root", str(cifar_root)]) == 0
    assert "already finished its 1 epochs; nothing to do" in capsys.readouterr().out
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # More epochs continue the same run (same method, teachers, data) to the new end.
    assert train_main(["--local", "--resume", str(run), "--epochs", "2", "--data-root", str(cifar_root)]) == 0
    assert [r["epoch"] for r in pq.read_table(run / "metrics.parquet").to_pylist()] == [1, 2]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["name"] == "bmtard" and saved["optim"]["epochs"] == 2


def test_a_checkpoint_of_another_architecture_or_format_is_one_line(finished: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from bmtard_ray.training.trainer import Trainer

    state, cfg = load_resume_state(finished)
    cfg.student = "small_cnn"
    with pytest.raises(CheckpointError, match="holds a tiny_cnn student, not the small_cnn"):
        Trainer(cfg, device=torch.device("cpu")).load_state_dict(state)
    run = copy_run(finished, tmp_path)
    torch.save({**state, "format": "bmtard_ray.checkpoint/9"}, run / CHECKPOINT_FILE)
    assert train_main(["--local", "--resume", str(run)]) == 2
    one_error_line(capsys.readouterr().err, "format bmtard_ray.checkpoint/9", "cannot continue it")


# ---------------------------------------------------------------------------------------------------------
# 4. Too little data for one batch: the value is named, before anything trains.


@pytest.mark.parametrize("sets, message", [
    (["data.train_subset=10"], "data.train_subset=10 leaves 10 training image(s), less than one batch of "
                               "optim.batch_size=32"),
    (["data.train_subset=40", "teachers.robust.batch_size=64"], "less than one batch of teachers.robust.batch_size=64"),
    (["data.val_size=49990", "optim.batch_size=16", "teachers.clean.batch_size=16",
      "teachers.robust.batch_size=16", "val_every=0"], "the training split holds 10 image(s)"),
])
def test_a_split_smaller_than_one_batch_is_named(tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture,
                                                 sets: list[str], message: str) -> None:
    extra = [a for s in sets for a in ("--set", s)]
    assert train_main(["--local", "--preset", "smoke", *common(tmp_path, cifar_root), "--output-dir",
                       str(tmp_path / "runs"), *extra]) == 2
    one_error_line(capsys.readouterr().err, message)
    assert list(tmp_path.iterdir()) == []


def test_ray_workers_each_need_a_batch(tmp_path: Path, cifar_root: Path) -> None:
    from bmtard_ray.ray_train.driver import check_before_start
    from bmtard_ray.ray_train.scaling import ScalingOptions

    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", "data.train_subset=30",
                                           f"teachers.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="over 2 workers"):
        check_before_start(cfg, ScalingOptions(num_workers=2))


# ---------------------------------------------------------------------------------------------------------
# Teacher cache entries appear whole or not at all.


def test_an_interrupted_teacher_leaves_no_entry_and_is_trained_again(tmp_path: Path, cifar_root: Path) -> None:
    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", f"output_dir={tmp_path / 'runs'}",
                                           f"teachers.cache_dir={tmp_path / 'cache'}", "method.name=ard"])
    entry = cached_path(cfg, "robust").parent

    def dies_half_way(t: object) -> None:
        run_dir = Path(t.output_dir) / t.name
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("half made\n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_teachers(cfg, dies_half_way, log=lambda s: None)
    assert not entry.exists()
    # A half-made entry left by an older version (config.yaml only) is replaced as well.
    entry.mkdir(parents=True)
    (entry / "config.yaml").write_text("left by an older version\n")
    trained: list[str] = []
    resolved = ensure_teachers(cfg, lambda t: trained.append(t.name) or run_local(t, overwrite=True, console=QUIET),
                               log=lambda s: None)
    assert trained == [entry.name] and Path(resolved.teachers.robust.checkpoint) == entry / "model.pt"
    assert json.loads((entry / ENTRY_FILE).read_text())["format"] == "bmtard_ray.teacher_cache/1"
    assert list((tmp_path / "cache" / BUILDING).iterdir()) == []
    # An entry of an unknown format is refused with one line instead of being loaded.
    (entry / ENTRY_FILE).write_text(json.dumps({"format": "bmtard_ray.teacher_cache/7"}))
    with pytest.raises(CheckpointError, match="teacher_cache/7"):
        ensure_teachers(cfg, lambda t: None, log=lambda s: None)


@pytest.mark.slow
def test_a_teacher_killed_half_way_is_trained_again_by_the_next_run(tmp_path: Path, cifar_root: Path) -> None:
    import signal
    import time

    argv = [sys.executable, str(REPO / "run_train.py"), "--local", "--preset", "smoke", "--method", "ard",
            *common(tmp_path, cifar_root), "--output-dir", str(tmp_path / "runs"), "--set", "teachers.robust.epochs=3"]
    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", f"teachers.cache_dir={tmp_path / 'teachers'}",
                                           "method.name=ard", "teachers.robust.epochs=3"])
    name = teacher_config(cfg, "robust").name
    building = tmp_path / "teachers" / BUILDING / name
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (building / CHECKPOINT_FILE).is_file():  # one teacher epoch done, two to go
        assert proc.poll() is None and time.monotonic() < deadline, "the teacher never checkpointed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "teachers" / name).exists()
    again = subprocess.run(argv + ["--epochs", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "robust teacher: training" in again.stdout
    assert (tmp_path / "teachers" / name / "model.pt").is_file()


# ---------------------------------------------------------------------------------------------------------
# 5. Format versions of the files read back.


def test_config_and_tune_settings_carry_a_format_that_is_checked(tmp_path: Path) -> None:
    from bmtard_ray.storage.run_folder import write_config

    write_config(build_config("smoke"), tmp_path)
    saved = tmp_path / "config.yaml"
    assert yaml.safe_load(saved.read_text())["format"] == "bmtard_ray.config/1"
    assert "format" not in read_yaml(saved)  # a run's config.yaml is usable with --config
    saved.write_text(saved.read_text().replace("bmtard_ray.config/1", "bmtard_ray.config/2"))
    with pytest.raises(ConfigError, match="config format 'bmtard_ray.config/2'"):
        read_yaml(saved)

    settings = TuneSettings(space_file="/s.yaml", experiment_dir="/e")
    data = json.loads(settings.to_json())
    assert data["format"] == "bmtard_ray.tune_settings/1"
    assert TuneSettings.from_json(settings.to_json()) == settings
    del data["format"]  # written before settings carried a format: the same fields, continues as is
    assert TuneSettings.from_json(json.dumps(data)) == settings
    with pytest.raises(ConfigError, match="tune_settings/3"):
        TuneSettings.from_json(json.dumps({**data, "format": "bmtard_ray.tune_settings/3"}))


# ---------------------------------------------------------------------------------------------------------
# CLIs: OSErrors and Ctrl-C end in one line; --resume is named only when there is something to resume.


def test_oserror_and_ctrl_c_are_one_line(tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import bmtard_ray.launch.local as runner

    def disk_full(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "runs" / "x" / "model.pt"))

    args = ["--local", "--preset", "smoke", *common(tmp_path, cifar_root), "--output-dir", str(tmp_path / "runs")]
    monkeypatch.setattr(runner, "run_local", disk_full)
    assert train_main(args) == 2
    one_error_line(capsys.readouterr().err, "model.pt: No space left on device")

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_local", interrupted)
    assert train_main(args) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing to resume" in err
    run = tmp_path / "runs" / "bmtard-smoke"
    run.mkdir(parents=True)
    torch.save({}, run / CHECKPOINT_FILE)
    assert train_main(args) == 130
    assert f"python run_train.py --resume {run}" in capsys.readouterr().err


def test_tune_resume_refuses_options_that_define_the_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert tune_main(["--resume", str(tmp_path), "--preset", "smoke", "--set", "optim.lr=1"]) == 2
    one_error_line(capsys.readouterr().err, "--preset, --set cannot be combined with --resume")


def test_a_model_file_of_another_format_version_is_one_line(finished: Path, tmp_path: Path) -> None:
    from bmtard_ray.models.files import inspect_checkpoint

    record = torch.load(finished / "model.pt", weights_only=True)
    assert record["format"] == "bmtard_ray.model/1"
    assert inspect_checkpoint(str(finished / "model.pt")).record["arch"] == "tiny_cnn"
    torch.save({**record, "format": "bmtard_ray.model/2"}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="has format bmtard_ray.model/2; this version reads bmtard_ray.model/1"):
        inspect_checkpoint(str(tmp_path / "newer.pt"))
