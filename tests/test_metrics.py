"""The metrics home (bmtard_ray.training.metrics): what the trainer reports is what the table names, in its
order, and every reader (Tune's objectives, TensorBoard's tags, the leaderboard) takes it from there."""
from __future__ import annotations

from pathlib import Path

from test_mid_epoch import _trainer

from bmtard_ray.training.metrics import (
    BY_NAME,
    EPOCH_METRICS,
    MAX,
    METRICS,
    MIN,
    NEITHER,
    STAT_NAMES,
    TRACE_COLUMNS,
    default_mode,
    label_of,
    objective_names,
    tag_of,
)
from bmtard_ray.tuning.settings import check_objectives


def test_the_trainer_reports_the_tables_metrics_in_its_order(tmp_path: Path) -> None:
    reports: list[dict] = []
    trainer = _trainer(tmp_path, "val_every=1", "optim.epochs=1", report=lambda m, c: reports.append(m))
    trainer.fit()
    assert list(reports[-1]) == list(EPOCH_METRICS)
    assert list(trainer.trace_table().column_names) == list(TRACE_COLUMNS)


def test_every_metric_has_a_meaning_a_direction_and_a_group() -> None:
    assert len(BY_NAME) == len(METRICS)
    for m in METRICS:
        assert m.meaning and m.direction in (MAX, MIN, NEITHER) and (m.group or m.name == "epoch"), m
    assert TRACE_COLUMNS == ("iteration", "epoch") + STAT_NAMES


def test_the_readers_follow_the_table() -> None:
    assert "epoch" not in objective_names() and "tau_adv" not in objective_names()
    assert default_mode("train_loss") == "min" and default_mode("val_w_robust") == "max"
    check_objectives(objective_names(), tuple(default_mode(m) for m in objective_names()))
    assert tag_of("val_w_robust") == "validation/val_w_robust" and tag_of("epoch") is None
    assert tag_of("something_new") == "other/something_new"
    assert label_of("val_w_robust") == "W-robust" and label_of("train_loss") == "train_loss"
