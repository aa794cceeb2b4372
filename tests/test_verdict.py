"""The words a finished search ends with: tied or ahead beyond one SE, and whether the balance reached its target."""
from __future__ import annotations

from pathlib import Path

from bmtard_ray.tuning.results import TrialRecord
from bmtard_ray.tuning.settings import TuneSettings
from bmtard_ray.tuning.verdict import balance_sentence, verdict, verdict_markdown


def record(tid: str, number: int, clean: float, robust: float, **extra: float) -> TrialRecord:
    metrics = {"epoch": 3, "val_clean": clean, "val_robust": robust, "val_w_robust": (clean + robust) / 2,
               "val_n": 256, **extra}
    return TrialRecord(tid, "TERMINATED", {}, metrics=metrics, history=[metrics], checkpoint_path="x", max_epochs=3,
                       number=number)


def settings(tmp_path: Path) -> TuneSettings:
    return TuneSettings(space_file="s.yaml", experiment_dir=str(tmp_path / "exp"), objectives=("val_w_robust",),
                        modes=("max",), num_samples=3)


def test_a_gap_within_one_standard_error_is_a_tie(tmp_path: Path) -> None:
    # 256 images at ~30 % / ~10 %: SE ~ 2.4 points; 1.0 point apart is a tie, 6 points is not.
    recs = [record("a", 0, 30, 10), record("b", 1, 29, 9), record("c", 2, 20, 7)]
    found = verdict(recs, settings(tmp_path), {"a": 5, "b": 7})
    assert found is not None and found["number"] == 5 and found["runner_up"]["number"] == 7
    assert found["versus_runner_up"].startswith("tied: 1.00 points ahead of the runner-up (trial 7), within 1 SE")
    assert found["run_folder"].endswith("train/trial005_a")
    far = verdict([record("a", 0, 36, 16), record("c", 2, 20, 7)], settings(tmp_path))
    assert far is not None and far["versus_runner_up"].startswith("ahead of the runner-up (trial 2) by 12.50 points, "
                                                                  "more than 1 SE")
    assert "**Selected: trial 5**" in verdict_markdown(found)
    assert verdict([], settings(tmp_path)) is None


def test_the_balance_sentence_tells_reached_missed_equalised_and_pinned() -> None:
    base = {"tau_adv_at_bound": 10.0, "tau_nat_at_bound": 0.0}
    assert balance_sentence(record("a", 0, 30, 10, H_adv=0.60, H_nat=0.58, H_target=0.58, **base)).startswith(
        "reached its target: H_adv 0.600, H_nat 0.580 against 0.580 nats")
    assert balance_sentence(record("a", 0, 30, 10, H_adv=1.87, H_nat=1.43, H_target=0.58, **base)).startswith(
        "missed its target by up to 1.290 nats")
    assert balance_sentence(record("a", 0, 30, 10, H_adv=0.9, H_nat=0.9, **base)).startswith("equalised the teachers")
    pinned = record("a", 0, 30, 10, H_adv=1.87, H_nat=1.43, H_target=0.58, tau_adv_at_bound=100.0,
                    tau_nat_at_bound=100.0)
    assert balance_sentence(pinned).startswith("did NOT act: tau_adv, tau_nat sat at a bound for every iteration")
    assert balance_sentence(record("a", 0, 30, 10)) == "no entropy balance in this trial's method"
