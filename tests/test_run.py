"""End-to-end runs of the core loop on the real CIFAR-10 copy with tiny models (the `smoke` preset)."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_scalars
from rich.console import Console

from bmtard_ray.config import build_config
from bmtard_ray.launch.local import run_local
from bmtard_ray.training.metrics import TRACE_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def smoke_config(tmp_path: Path, cifar_root: Path, *overrides: str):
    return build_config("smoke", overrides=[f"data.root={cifar_root}", f"output_dir={tmp_path / 'runs'}",
                                            f"teachers.cache_dir={tmp_path / 'teachers'}", *overrides])


def test_smoke_run_writes_every_output_with_a_trace_row_per_iteration(tmp_path: Path, cifar_root: Path) -> None:
    # The robust teacher gets two epochs and a milestone, to check the teachers' schedule as well.
    cfg = smoke_config(tmp_path, cifar_root, "teachers.robust.epochs=2", "teachers.robust.milestones=[1]")
    assert cfg.optim.milestones == (1,) and cfg.optim.epochs == 2
    printed = io.StringIO()
    summary = run_local(cfg, console=Console(file=printed, width=400))
    run = tmp_path / "runs" / cfg.name
    for name in ("config.yaml", "checkpoint.pt", "model.pt", "trace.parquet", "metrics.parquet", "summary.json",
                 "summary.md"):
        assert (run / name).is_file(), name
    trace = pq.read_table(run / "trace.parquet")
    assert tuple(trace.column_names) == TRACE_COLUMNS
    iters_per_epoch = cfg.data.train_subset // cfg.optim.batch_size
    assert trace.num_rows == cfg.optim.epochs * iters_per_epoch
    assert trace.column("iteration").to_pylist() == list(range(trace.num_rows))
    epochs = [e for e in range(1, cfg.optim.epochs + 1) for _ in range(iters_per_epoch)]
    assert trace.column("epoch").to_pylist() == epochs
    # The trace obeys the update rules: each temperature moves by at most eta per iteration, weights sum to 1.
    tau = trace.column("tau_nat").to_pylist()
    assert all(abs(b - a) <= cfg.ebb.eta_tau + 1e-6 for a, b in zip(tau, tau[1:], strict=False))
    # Milestone 1: epoch 1 at the full rates, epoch 2 (after the milestone epoch) at 0.1x -- eta_tau included.
    epoch2 = [t for t, e in zip(tau, trace.column("epoch").to_pylist(), strict=False) if e == 2]
    assert all(abs(b - a) <= 0.1 * cfg.ebb.eta_tau + 1e-6 for a, b in zip(epoch2, epoch2[1:], strict=False))
    w = zip(trace.column("w_adv").to_pylist(), trace.column("w_nat").to_pylist(), strict=False)
    assert all(abs(a + b - 1) < 1e-6 for a, b in w)
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in metrics] == list(range(1, cfg.optim.epochs + 1))
    assert [m["lr"] for m in metrics] == pytest.approx([0.05, 0.005])
    robust_metrics = next((tmp_path / "teachers").glob("robust-*/metrics.parquet"))
    assert pq.read_table(robust_metrics).column("lr").to_pylist() == pytest.approx([0.05, 0.005])
    assert all(math.isfinite(m["train_loss"]) and 0 <= m["val_w_robust"] <= 100 for m in metrics)
    # ... and as TensorBoard events (losses, balance, validation), to watch a run while it trains.
    scalars = read_scalars(run)
    for name, tag in (("val_w_robust", "validation/val_w_robust"), ("train_L_adv", "loss/train_L_adv"),
                      ("w_adv", "balance/w_adv")):
        assert scalars[tag] == pytest.approx({m["epoch"]: m[name] for m in metrics}), tag
    saved = json.loads((run / "summary.json").read_text())
    test = saved["results"]["test"]
    assert test["w_robust"]["pgd_sat"] == pytest.approx((test["accuracy"]["clean"] + test["accuracy"]["pgd_sat"]) / 2)
    assert summary["results"]["val"]["n_examples"] == cfg.eval.n_examples
    model = torch.load(run / "model.pt", weights_only=True)
    assert model["arch"] == cfg.student and model["num_classes"] == 10
    # Teachers were trained once and are reused by the next run.
    assert len(list((tmp_path / "teachers").glob("*/model.pt"))) == 2
    # What it printed is true: teachers announced as teachers, their cache entries named once in place (not
    # the building folder they leave), and the last lines say where the student's outputs went.
    text = printed.getvalue()
    for role, method in (("clean", "natural"), ("robust", "sat")):
        assert f": {method} teacher {cfg.teachers.clean.arch} on cifar10" in text, text[-3000:]
        cached = next((tmp_path / "teachers").glob(f"{role}-*/model.pt"))
        assert f"{role} teacher: cached at {cached}" in text
    assert f"{cfg.name}: bmtard student {cfg.student} on cifar10" in text
    assert ".incomplete" not in "".join(line for line in text.splitlines() if "outputs in" in line)
    tail = text[text.rindex("outputs in"):]
    assert tail.startswith(f"outputs in {run}:") and "eval/" in tail and "model.pt" in tail, tail


def test_resume_continues_to_the_same_result(tmp_path: Path, cifar_root: Path) -> None:
    full = run_local(smoke_config(tmp_path, cifar_root, "name=full", "optim.epochs=2"))
    run_local(smoke_config(tmp_path, cifar_root, "name=part", "optim.epochs=1"))
    cfg2 = smoke_config(tmp_path, cifar_root, "name=part", "optim.epochs=2")
    resumed = run_local(cfg2, resume=tmp_path / "runs" / "part")
    full_trace = pq.read_table(tmp_path / "runs" / "full" / "trace.parquet")
    part_trace = pq.read_table(tmp_path / "runs" / "part" / "trace.parquet")
    assert full_trace.num_rows == part_trace.num_rows
    for col in ("L_adv", "L_nat", "tau_adv", "tau_nat", "w_adv"):
        assert full_trace.column(col).to_pylist() == pytest.approx(part_trace.column(col).to_pylist(), rel=1e-4,
                                                                   abs=1e-6)
    assert resumed["results"]["test"]["accuracy"] == pytest.approx(full["results"]["test"]["accuracy"], abs=1e-6)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--student", "vgg99"], "unknown student model 'vgg99'"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--set", "attack.eps=-0.1"], "attack.eps must be >= 0"),
    (["--set", "ebb.tau_min=5", "--set", "ebb.tau_max=2"], "ebb.tau_min (5.0) must be <= ebb.tau_max (2.0)"),
    (["--set", "nlb.rho=0"], "nlb.rho must be in (0, 1]"),
    (["--set", "ebb.mode=exact"], "unknown ebb.mode 'exact'; choose one of: step, solve"),
    (["--set", "ebb.mode=solve", "--set", "ebb.smoothing=1"], "ebb.smoothing must be in [0, 1), got 1.0"),
    (["--set", "nlb.rho=1.5"], "nlb.rho must be in (0, 1]"),
    (["--batch-size", "0"], "optim.batch_size must be >= 1"),
    (["--set", "optim.nope=1"], "unknown config key 'optim.nope'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--resume", "/nonexistent/run"], "no checkpoint to resume from"),
])
def test_bad_input_gives_one_line_error_exit_2_and_writes_nothing(tmp_path: Path, args: list[str],
                                                                  message: str) -> None:
    proc = cli("--local", "--preset", "smoke", *args, cwd=tmp_path) if "--preset" not in args else \
        cli("--local", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_teacher_with_wrong_class_count_is_rejected(tmp_path: Path, cifar_root: Path) -> None:
    from bmtard_ray.models import build_model

    bad = tmp_path / "t100.pt"
    torch.save(build_model("tiny_cnn", 100).state_dict(), bad)
    proc = cli("--local", "--preset", "smoke", "--data-root", str(cifar_root), "--set",
               f"teachers.clean.checkpoint={bad}",
               "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"teachers.cache_dir={tmp_path / 'teachers'}",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert "100" in proc.stderr and "10" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()
