"""bench/balance_study.py (issues 17 and 29): the study end to end at smoke scale (every arm at both teacher
strengths, the searches, the tuned arms retrained with their search's choice, the report), its records (a
fresh clone rewrites the block and figures from them byte for byte), resumed without redoing anything, and its
bad input."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "balance_study.py"
ARMS = ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve", "bmtard-tuned", "sat", "trades")


@pytest.mark.slow
def test_smoke_study_runs_every_arm_records_resumes_and_writes_its_block(tmp_path: Path, cifar_root: Path) -> None:
    out, records = tmp_path / "study", tmp_path / "records"
    results = tmp_path / "RESULTS.md"
    results.write_text("# kept above\n<!-- balance-study:begin (written by bench/balance_study.py) -->\nold\n"
                       "<!-- balance-study:end -->\nkept below\n")
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--records", str(records),
           "--data-root", str(cifar_root), "--device", "cpu", "--results", str(results), "--figures", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# kept above\n") and text.endswith("<!-- balance-study:end -->\nkept below\n")
    assert "\nold\n" not in text and "24 of 24 runs finished" in text and "Partial" not in text
    weak, strong = text.split("### Weak robust teacher")[1].split("### Strong robust teacher")
    for arm in ARMS:
        assert f"| {arm} | 2 |" in weak and f"| {arm} | 2 |" in strong
    assert "W-Robust PGD-20 (primary)" in weak and "| bmtard-solve | " in weak.split("Gaps")[1]
    assert "Does some balanced arm beat MTARD by a clear gap on the primary metric?" in strong
    assert "Does the answer change with the teacher's strength?" in text and "| Spearman |" in weak
    for group, arm in [("weak", a) for a in ARMS[:5]] + [("strong", a) for a in ARMS[:5]] + [("shared", "sat")]:
        assert (records / "runs" / group / f"{arm}-seed1.json").is_file()
    teachers = json.loads((records / "teachers.json").read_text())["teachers"]
    assert {"clean", "robust-weak", "robust-strong"} <= set(teachers)
    # The tuned arm trains with its search's choice, the space's fixed settings included.
    best = json.loads((records / "search" / "strong.json").read_text())["summary"]["best"]["effective"]
    saved = yaml.safe_load((out / "runs" / "strong" / "bmtard-tuned-seed1" / "config.yaml").read_text())
    assert saved["ebb"]["target_mode"] == "fraction"
    for key, value in best.items():
        assert saved["ebb"][key.split(".")[1]] == pytest.approx(value)
    # The clean teacher ran once per batch of each seed: every other arm, both strengths and the searches read it.
    entries = list((out / "logits").glob("*/*.pt"))
    assert len(entries) == 2 * 8  # 2 seeds x (256 images / batch 32) x 1 epoch
    # A fresh clone (records only, no run folders) rewrites the block and figures byte for byte.
    block, figures = text, {f.name: f.read_bytes() for f in tmp_path.glob("smoke_balance_study_*.png")}
    assert len(figures) == 2
    shutil.rmtree(out)
    for f in tmp_path.glob("smoke_balance_study_*.png"):
        f.unlink()
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert results.read_text() == block
    assert {f.name: f.read_bytes() for f in tmp_path.glob("smoke_balance_study_*.png")} == figures
    # On a fresh machine with the records: only the run without a record is trained (its transfer source, the
    # weak teacher, is retrained from its seed and its weights' hash matches the record's: no note).
    (records / "runs" / "shared" / "trades-seed1.json").unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("== ") == 1 and "== shared: trades seed 1" in again.stdout, again.stdout[-3000:]
    assert "search (" not in again.stdout and "retrained here" not in again.stdout
    assert (records / "runs" / "shared" / "trades-seed1.json").is_file() and "24 of 24 runs" in results.read_text()


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
    (["--strengths", "weak,medium"], "unknown strength(s) medium"),
    (["--records", "/proc/nope/records"], "--records /proc/nope/records is not writable"),
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
    assert proc.returncode == 2 and "no study records in" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s").exists()


def _rows(**primary: list[float]) -> dict[str, list[dict]]:
    return {arm.replace("_", "-"): [{"w_robust": {"pgd_sat": v}, "accuracy": {"clean": v}, "aa": None} for v in vals]
            for arm, vals in primary.items()}


def test_verdict_follows_the_rule_written_before_the_study() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import study_report as study

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
    assert all("cannot be read yet (bmtard-solve: fewer than 2 seeds)" in q for q in study.verdict(rows))


def test_the_third_question_compares_the_yes_or_no_alone() -> None:
    """"no (clearly worse than MTARD: ...)" at one strength and a bare "no" at the other is the same answer:
    the pre-registered rule reads yes/no. A yes at one strength only is a change."""
    sys.path.insert(0, str(REPO / "bench"))
    import study_report as study

    noise = [30.0, 31.0, 30.5]
    level = _rows(mtard=noise, bmtard_step=noise, bmtard_step_large=noise, bmtard_solve=noise, bmtard_tuned=noise)
    worse = {**level, **_rows(bmtard_solve=[20.0, 21.0, 20.5])}
    better = {**level, **_rows(bmtard_solve=[35.0, 36.0, 35.5])}
    same = study.strength_answer({"weak": worse, "strong": level})
    assert same[0].startswith("- Does the answer change with the teacher's strength? **no**: both questions")
    assert "`bmtard-solve` +10.00 ± " in same[3] and same[3].endswith("(clear)")
    changed = study.strength_answer({"weak": worse, "strong": better})[0]
    assert "**yes**: questions 1 and 2 are answered differently" in changed


def test_plan_runs_every_arm_and_seed_once_core_comparisons_first() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import balance_study as study

    order = study.plan(argparse.Namespace(seeds=3, arms=list(study.ARMS), strengths=["weak", "strong"]))
    expected = [(g, s, a) for g in ("weak", "strong") for s in range(3) for a in ARMS[:5]]
    assert sorted(order) == sorted(expected + [("shared", s, a) for s in range(3) for a in ("sat", "trades")])
    core = ("mtard", "bmtard-step", "bmtard-step-large", "bmtard-solve")
    # The core comparison at each strength (all seeds) before the searches, the tuned arms, SAT and TRADES.
    assert [(g, a in core) for g, _, a in order[:24]] == [("weak", True)] * 12 + [("strong", True)] * 12
    assert [a for _, _, a in order[:4]] == list(core)  # mtard first: it fills the seed's clean-teacher cache
    assert [g for g, _, _ in order[-6:]] == ["shared"] * 6
    weak_only = study.plan(argparse.Namespace(seeds=1, arms=list(study.ARMS), strengths=["weak"]))
    assert {g for g, _, _ in weak_only} == {"weak", "shared"}


def test_rank_correlation_and_its_interval() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import study_report as report

    assert report.ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    same = [[float(i), float(i) + 1] for i in range(6)]
    assert all(abs(rho - 1) < 1e-12 for _, rho, _, _ in report.rank_correlations(same))
    flipped = [[float(i), float(-i)] for i in range(6)]
    (_, first, lo, hi), (_, last, _, _) = report.rank_correlations(flipped)
    assert abs(first + 1) < 1e-12 and abs(last - 1) < 1e-12 and lo <= first <= hi
    assert report.rank_correlations(same[:3]) == []  # too few curves to say anything
    # the first epoch whose interval lies above the floor; the last epoch (the final ranking itself) never counts
    corr = [(1, -0.3, -0.7, 0.2), (2, 0.4, 0.1, 0.8), (3, 0.8, 0.6, 0.95), (4, 1.0, 1.0, 1.0)]
    assert report.first_agreeing_epoch(corr, 0.0) == 2 and report.first_agreeing_epoch(corr, 0.5) == 3
    assert report.first_agreeing_epoch(corr[:2] + corr[3:], 0.5) is None
    assert report.first_agreeing_epoch([(1, math.nan, math.nan, math.nan), *corr[2:]], 0.0) == 3


@pytest.mark.parametrize("mode", ["step", "solve"])
def test_validating_every_epoch_leaves_training_bit_for_bit_the_same(tmp_path: Path, mode: str) -> None:
    """The study's runs validate after every epoch (val_every=1) for the early-versus-final ranking; the
    validation attack must draw from its own generator and leave the student in training mode, so that the
    trace and the weights equal a run that never validates."""
    import torch
    from test_mid_epoch import _result, _same, _trainer

    plain = _trainer(tmp_path, "val_every=0", f"ebb.mode={mode}")
    plain.fit()
    validated = _trainer(tmp_path, "val_every=1", f"ebb.mode={mode}")
    validated.fit()
    assert [h.get("val_w_robust") is not None for h in validated.state.history] == [True, True]
    assert all("val_w_robust" not in h for h in plain.state.history)
    _same(_result(plain), _result(validated))
    assert torch.equal(torch.cat(plain.state.trace).nan_to_num(-1), torch.cat(validated.state.trace).nan_to_num(-1))


def test_the_strong_teacher_is_judged_by_the_bar_set_before_it_was_trained(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import study_markdown
    import study_records as records

    args = argparse.Namespace(records=tmp_path)
    assert study_markdown.strength_check(args) == ""  # nothing to compare before both teachers exist
    records.write_teacher(tmp_path, "robust-weak", {"test": {"clean": 40.6, "pgd_sat": 23.8}})
    records.write_teacher(tmp_path, "robust-strong", {"test": {"clean": 50.0, "pgd_sat": 27.8}})
    assert "+4.0 points" in study_markdown.strength_check(args)
    assert "NOT clearly stronger" in study_markdown.strength_check(args)
    records.write_teacher(tmp_path, "robust-strong", {"test": {"clean": 61.2, "pgd_sat": 35.2}})
    assert ": clearly stronger" in study_markdown.strength_check(args)


def test_a_search_s_seconds_are_saved_while_it_runs_and_add_up_across_resumes(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import balance_study

    timing = tmp_path / "search" / "seconds.json"
    # the child reads the file mid-run: exit 0 only if its running time was already saved
    peek = ("import json, sys, time; time.sleep(0.6); "
            "sys.exit(0 if json.load(open(sys.argv[1]))['seconds'] > 0.2 else 1)")
    assert balance_study.timed([sys.executable, "-c", peek, str(timing)], timing, every_s=0.1) == 0
    first = json.loads(timing.read_text())["seconds"]
    assert first >= 0.6
    assert balance_study.timed([sys.executable, "-c", "raise SystemExit(3)"], timing, every_s=0.1) == 3
    assert json.loads(timing.read_text())["seconds"] > first  # a resumed search adds to what was counted


def test_a_search_with_errored_trials_is_refused_not_recorded(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import argparse

    import balance_study

    exp = tmp_path / "out" / "search" / "weak" / balance_study.SPACE
    exp.mkdir(parents=True)
    first = "22 of 24 trials errored; the selection is among the others. Trial 2: ModuleNotFoundError: x"
    (exp / "summary.json").write_text(json.dumps({"trials": 24, "errored": 22, "first_error": first,
                                                  "best": {"effective": {}}}))
    args = argparse.Namespace(records=tmp_path / "records", out=tmp_path / "out", scale="smoke")
    with pytest.raises(SystemExit) as exc:
        balance_study.search(args, "weak")
    assert "not recorded: 22 of 24 trials errored" in str(exc.value) and "move" in str(exc.value)
    assert not (tmp_path / "records").exists()  # nothing recorded


def test_the_search_line_counts_whole_stopped_and_errored_trials_and_the_rules_tried() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import study_markdown

    trials = [{"param.ebb.mode": "solve"}] * 3 + [{"param.ebb.mode": "step"}]
    found = {"seconds": 600.0, "trials": trials,
             "summary": {"trials": 4, "finished": 4, "stopped_early": 3, "errored": 0,
                         "best": {"effective": {"ebb.mode": "solve", "ebb.tau_max": 2.06141},
                                  "validation": {"val_w_robust": 35.6}}}}
    line = study_markdown.search_line(found)[0]
    assert line.startswith("Search: 4 trials (1 ran every epoch, 3 stopped early by ASHA, 0 errored), 10 min")
    assert "EBB rule per trial: step 1, solve 3." in line and "`ebb.tau_max=2.061`" in line
    assert study_markdown.search_line(None) == ["Search: not run yet."]


def test_the_correlations_show_the_runs_alone_beside_runs_and_search_trials() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import study_markdown

    def curve(i: int) -> dict:
        return {"history": [{"val_w_robust": float(v)} for v in (i % 3, i, 2 * i, i + 1)]}

    rows = {"mtard": [curve(i) for i in range(3)], "bmtard-step": [curve(i) for i in range(3, 6)]}
    found = {"trials": [curve(i) for i in range(6, 10)] + [{"history": [{"val_w_robust": 1.0}]}]}  # 1 stopped
    lines = study_markdown.correlation_lines(rows, found, 4, 1)
    assert "6 runs and 4 search trials that ran every epoch" in lines[0]
    alone = [line for line in lines if line.startswith("| Spearman, the 6 runs alone |")]
    assert len(alone) == 1 and alone[0].endswith("| 1.00 [1.00, 1.00] |")
    assert not any("alone" in line for line in study_markdown.correlation_lines(rows, None, 4, 1))


def test_the_unshared_cost_drops_paused_runs_but_keeps_what_one_arm_alone_pays() -> None:
    """Runs paused for an hour (SIGSTOP while CI ran) must not inflate what a part costs on a machine of its
    own, while the arm that fills the logit cache (dearer on every seed) still counts at its own price."""
    sys.path.insert(0, str(REPO / "bench"))
    import study_report

    def run(train: float) -> dict:
        return {"train_seconds": train, "eval_seconds": 100.0}

    by_arm = {"mtard": [run(500.0), run(520.0), run(510.0)],            # fills the cache: dearer
              "bmtard-step": [run(2200.0), run(3800.0), run(220.0)]}    # seeds 0 and 1 were paused
    assert study_report.run_seconds(run(200.0)) == 300.0
    assert study_report.unshared_hours(by_arm) == pytest.approx((600.0 * 3 + 320.0 * 3) / 3600)
    assert sum(map(study_report.run_seconds, [r for rs in by_arm.values() for r in rs])) / 3600 > 2.0
    assert study_report.unshared_hours({}) == 0.0
