"""bench/balance_study.py (issue 17): the study end to end at smoke scale (every arm, the search, the tuned
arm retrained with the search's choice, the report), resumed without redoing anything, and its bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "balance_study.py"
ARMS = ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve", "bmtard-tuned", "sat", "trades")


@pytest.mark.slow
def test_smoke_study_runs_every_arm_resumes_and_writes_its_block(tmp_path: Path, cifar_root: Path) -> None:
    out = tmp_path / "study"
    results = tmp_path / "RESULTS.md"
    results.write_text("# kept above\n<!-- balance-study:begin (written by bench/balance_study.py) -->\nold\n"
                       "<!-- balance-study:end -->\nkept below\n")
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--data-root", str(cifar_root),
           "--device", "cpu", "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# kept above\n") and text.endswith("<!-- balance-study:end -->\nkept below\n")
    assert "\nold\n" not in text and "14 of 14 runs finished" in text and "Partial" not in text
    for arm in ARMS:
        assert f"| {arm} | 2 |" in text
        assert (out / "runs" / f"{arm}-seed1" / "suite" / "suite" / "model_test.json").is_file()
    assert "| bmtard-solve | " in text.split("Gaps")[1] and "W-Robust PGD-20 (primary)" in text
    assert "Does some balanced arm beat MTARD by a clear gap on the primary metric?" in text
    assert (out / "smoke_balance_study.png").stat().st_size > 1000
    # The tuned arm trains with the search's choice, the space's fixed settings included.
    best = json.loads((out / "search" / "ebb" / "summary.json").read_text())["best"]["effective"]
    saved = yaml.safe_load((out / "runs" / "bmtard-tuned-seed1" / "config.yaml").read_text())
    assert saved["ebb"]["target_mode"] == "fraction"
    for key, value in best.items():
        assert saved["ebb"][key.split(".")[1]] == pytest.approx(value)
    # The clean teacher ran once per batch of each seed: the other arms and the search read its logits.
    entries = list((out / "logits").glob("*/*.pt"))
    assert len(entries) == 2 * 8  # 2 seeds x (256 images / batch 32) x 1 epoch
    # Again: nothing is trained, searched or evaluated twice.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch   1/" not in again.stdout and "search: " not in again.stdout and "model_test.json" not in again.stdout
    assert len(list((out / "logits").glob("*/*.pt"))) == 16


def test_unknown_arm_is_refused_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arms", "mtard,foo", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown arm(s) foo" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--trials", "0"], "--trials must be >= 1, got 0"),
    (["--results", "/nonexistent/RESULTS.md"], "--results /nonexistent/RESULTS.md does not exist"),
    (["--set", "optim.epochs=0"], "optim.epochs must be >= 1, got 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(tmp_path / "s"), *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def test_report_only_before_any_run_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(tmp_path / "s"),
                           "--report-only"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no robust teacher" in proc.stderr and "Traceback" not in proc.stderr


def _rows(**primary: list[float]) -> dict[str, list[dict]]:
    return {arm.replace("_", "-"): [{"w_robust": {"pgd_sat": v}, "accuracy": {"clean": v}, "aa": None} for v in vals]
            for arm, vals in primary.items()}


def test_verdict_follows_the_rule_written_before_the_study() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import balance_study as study

    noise = [30.0, 31.0, 30.5]
    rows = _rows(mtard=noise, bmtard_step=noise, bmtard_step_large=[30.2, 31.1, 30.4],
                 bmtard_solve=[35.0, 36.0, 35.5], bmtard_tuned=[31.0, 30.0, 30.5])
    q1, q2 = study.verdict(rows)
    assert q1.endswith("**yes**: bmtard-solve.") and q2.endswith("**yes**: bmtard-solve.")
    rows = _rows(mtard=noise, bmtard_step=noise, bmtard_step_large=noise, bmtard_solve=[31.0, 30.0, 30.6],
                 bmtard_tuned=[20.0, 21.0, 20.5])
    q1, q2 = study.verdict(rows)
    assert q1.endswith("**no** (clearly worse than MTARD: bmtard-tuned).") and q2.endswith("**no**.")
    rows["bmtard-solve"] = rows["bmtard-solve"][:1]  # one seed: no standard error, no reading
    assert all("cannot be read yet" in q for q in study.verdict(rows))


def test_plan_runs_every_arm_and_seed_once_core_comparison_first() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import balance_study as study

    order = study.plan(argparse.Namespace(seeds=3, arms=list(study.ARMS)))
    assert sorted(order) == sorted((s, a) for s in range(3) for a in study.ARMS)
    core = [i for i, (_, a) in enumerate(order) if a in ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve")]
    assert core == list(range(12))  # all seeds of the core comparison before the search, the tuned arm, SAT, TRADES
    assert [a for s, a in order[:4]] == ["mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve"]  # mtard fills
