"""The comparison script end to end at smoke scale: every method, teachers shared, RESULTS.md and plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduce_smoke_runs_every_method_and_writes_results(tmp_path: Path, cifar_root: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--scale", "smoke", "--seeds", "2",
           "--data-root", str(cifar_root), "--out", str(out), "--attacks", "clean,fgsm,pgd_sat,autoattack,bb_pgd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    for method in ("sat", "trades", "rslad", "mtard", "bmtard"):
        assert f"| {method} |" in text
        assert (out / "runs" / f"{method}-seed1" / "summary.json").is_file()
    assert "±" in text and "Ordering" in text and "AutoAttack (standard) on 32 of them" in text
    assert "B-MTARD minus each baseline" in text and "| mtard | " in text.split("B-MTARD minus")[1]
    # The suite ran on the test split through run_eval: 64 images, AutoAttack on its own 32.
    suite = json.loads((out / "runs" / "bmtard-seed0" / "suite" / "suite" / "model_test.json").read_text())
    aa = json.loads((out / "runs" / "bmtard-seed0" / "suite" / "autoattack" / "model_test.json").read_text())
    assert suite["n_examples"] == 64 and set(suite["accuracy"]) == {"clean", "fgsm", "pgd_sat", "bb_pgd"}
    assert aa["n_examples"] == 32 and set(aa["accuracy"]) == {"clean", "autoattack"}
    assert (out / "smoke_clean_vs_robust.png").stat().st_size > 1000
    assert (out / "smoke_bmtard_balance.png").stat().st_size > 1000
    assert "![smoke_clean_vs_robust.png](smoke_clean_vs_robust.png)" in text
    # Two teachers trained once for all ten runs.
    assert len(list((out / "teachers").glob("*/model.pt"))) == 2
    # A second invocation reuses every finished run (nothing is retrained).
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "epoch   1/" not in again.stdout
    # ...and every evaluation (run_eval prints the report paths it writes, as the first run shows).
    assert "model_test.json" in proc.stdout and "model_test.json" not in again.stdout


def test_reproduce_rejects_unknown_method(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--methods", "sat,foo",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown method(s) foo" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_reproduce_rejects_unknown_attack(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--attacks", "clean,pgd50",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown attack(s) pgd50" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--n-examples", "0"], "--n-examples must be >= 1, got 0"),
    (["--set", "optim.epochs=-1"], "optim.epochs must be >= 1, got -1"),
    (["--data-root", "/nonexistent-cifar"], "data root /nonexistent-cifar does not exist"),
])
def test_reproduce_rejects_bad_input_in_one_line_and_writes_nothing(tmp_path: Path, flags: list[str],
                                                                    message: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--scale", "smoke",
                           "--out", str(tmp_path / "r"), *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
