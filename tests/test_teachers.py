"""Toolkit-trained teachers: one teacher per teacher configuration, whatever the student's method."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from bmtard_ray.config import build_config
from bmtard_ray.launch.local import run_local
from bmtard_ray.names import teacher_roles
from bmtard_ray.training import teachers as teachers_mod
from bmtard_ray.training.methods import METHODS
from bmtard_ray.training.teachers import cached_path, teacher_config

ROLES = ("clean", "robust")


def _cfg(tmp_path: Path, *overrides: str):
    return build_config("smoke", overrides=[f"output_dir={tmp_path / 'runs'}", *overrides])


def test_the_cache_key_ignores_the_students_method_section(tmp_path: Path) -> None:
    base = {role: cached_path(_cfg(tmp_path), role) for role in ROLES}
    for method in METHODS:
        for extra in ([], ["method.trades_beta=3", "method.ard_alpha=0.5", "method.rslad_adv_weight=0.7"]):
            cfg = _cfg(tmp_path, f"method.name={method}", *extra)
            assert {role: cached_path(cfg, role) for role in ROLES} == base, (method, extra)
    # Nor do the student's own loss / balance settings or evaluation and folders other than the cache.
    other = _cfg(tmp_path, "loss.scale=3", "ebb.eta_tau=0.01", "nlb.rho=0.1", "eval.n_examples=32", "name=x",
                 "student=small_cnn", "optim.epochs=7", "optim.lr=0.2", "data.test_subset=99")
    assert {role: cached_path(other, role) for role in ROLES} == base


def test_the_cache_key_follows_what_does_determine_a_teacher(tmp_path: Path) -> None:
    base = {role: cached_path(_cfg(tmp_path), role) for role in ROLES}

    def changed(*overrides: str) -> set[str]:
        cfg = _cfg(tmp_path, *overrides)
        return {role for role in ROLES if cached_path(cfg, role) != base[role]}

    assert changed("teachers.robust.epochs=2") == {"robust"}
    assert changed("teachers.clean.lr=0.1") == {"clean"}
    assert changed("teachers.clean.milestones=[1]") == {"clean"}
    assert changed("attack.eps=0.02") == {"robust"}  # the SAT teacher's attack; natural training has none
    assert changed("data.train_subset=128") == set(ROLES)
    assert changed("seed=1") == set(ROLES)
    assert changed("optim.weight_decay=0.001") == set(ROLES)


def test_a_rules_version_bump_retires_every_cached_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    before = {role: cached_path(cfg, role) for role in ROLES}
    monkeypatch.setattr(teachers_mod, "TEACHER_RULES_VERSION", teachers_mod.TEACHER_RULES_VERSION + 1)
    after = {role: cached_path(cfg, role) for role in ROLES}
    assert all(before[r] != after[r] and before[r].parent.parent == after[r].parent.parent for r in ROLES)


def test_a_settings_field_added_later_keeps_the_keys_of_teachers_cached_before_it(tmp_path: Path) -> None:
    # The cpu preset's robust teacher as the balance study cached it (results/balance-study/teachers.json)
    # before TeacherConfig.pretrained and data.image_size existed: a new field at its default must not rename
    # it, or every user's cache would silently train its teachers again.
    cfg = build_config("cpu", overrides=[f"output_dir={tmp_path}", "data.root=data", "device=cpu"])
    assert teacher_config(cfg, "robust").name == "robust-small_cnn-sat-4ep-dcc5f063bc92"
    # Set, the field is in the key: tests/test_model_refs.py (a pretrained timm teacher is another entry).


def test_a_teacher_trains_with_its_own_methods_defaults(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "method.name=ard", "method.trades_beta=2", "teachers.robust.train_method=trades")
    robust = teacher_config(cfg, "robust")
    assert robust.method.name == "trades" and robust.method.trades_beta == 6.0  # not the student's 2
    assert teacher_config(cfg, "clean").method.name == "natural"


@pytest.mark.slow
def test_two_methods_run_separately_share_both_teachers(tmp_path: Path, cifar_root: Path) -> None:
    logs: list[str] = []

    def run(method: str, *extra: str) -> dict:
        cfg = _cfg(tmp_path, f"data.root={cifar_root}", f"name={method}", f"method.name={method}", "optim.epochs=1",
                   "eval.attacks=[clean]", *extra)
        assert set(teacher_roles(method)) == set(ROLES)
        out = io.StringIO()
        summary = run_local(cfg, console=Console(file=out, width=200))
        logs.append(out.getvalue())
        return summary

    first = run("bmtard")
    second = run("mtard", "method.trades_beta=3")
    assert first["teachers"] == second["teachers"]
    assert {Path(t["checkpoint"]).parent.parent for t in first["teachers"].values()} == {tmp_path / "runs" / "teachers"}
    assert len(list((tmp_path / "runs" / "teachers").glob("*/model.pt"))) == 2  # trained once, by the first run
    assert "training" in logs[0] and "training" not in logs[1]
    assert logs[1].count("reusing") == 2
