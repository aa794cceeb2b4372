"""examples/distil_your_own.py runs as the README shows it: a timm student distilled from a user-module teacher
on an image folder (written from CIFAR-10 by the script's --demo-from), all through the Python API."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_worked_example_distils_a_timm_student_from_a_user_module_teacher(tmp_path: Path,
                                                                               cifar_root: Path) -> None:
    folder = tmp_path / "folder"
    argv = [sys.executable, str(REPO / "examples" / "distil_your_own.py"), "--demo-from", str(cifar_root),
            "--data-root", str(folder), "--per-class", "40", "--val-size", "100", "--student", "timm:test_resnet",
            "--epochs", "1", "--teacher-epochs", "1", "--quick", "--device", "cpu", "--output-dir",
            str(tmp_path / "runs")]
    # Run from an unrelated directory: the user's module is found beside the script, bmtard_ray as installed.
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (folder / "train").iterdir())[:2] == ["airplane", "automobile"]
    assert len(list((folder / "train" / "cat").glob("*.png"))) == 40
    run = tmp_path / "runs" / "own-models-and-data"
    assert (run / "model.pt").is_file() and (run / "eval").is_dir()
    teachers = sorted(p.name for p in (tmp_path / "runs" / "teachers").iterdir() if not p.name.startswith("."))
    assert any(n.startswith("clean-my_models-small_convnet") for n in teachers), teachers
    assert any(n.startswith("robust-my_models-small_convnet") for n in teachers), teachers
    assert "student timm:test_resnet: W-Robust (PGD)" in proc.stdout
    # A bad folder is one line and status 2.
    bad = subprocess.run([*argv[:2], "--data-root", str(tmp_path / "missing"), "--device", "cpu"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "missing" in bad.stderr, bad.stderr
