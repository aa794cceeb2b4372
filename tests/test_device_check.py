"""The GPU check (bench/device_check.py) stays ready while no GPU is available.

Its dry run runs every part on the CPU with tiny sizes, as the device machine would run them, with Ray,
Optuna and pyautoattack made unimportable (that machine has none of them); its pieces (deadlines, the
report, the data that travels) are checked on their own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import device_check, device_data, device_report  # noqa: E402
from bmtard_ray.data import load_dataset  # noqa: E402

BLOCKED = ("ray", "optuna", "pyautoattack", "autoattack")  # absent on the device machine
# Everything the check runs: its own modules, the benchmarks and the GPU tests (which import the core).
CHECK_MODULES = ("bench.device_check", "bench.device_data", "bench.device_report", "bench.device_epoch",
                 "bench.bench_step", "bench.ceilings", "test_gpu", "bmtard_ray.training.trainer",
                 "bmtard_ray.cli.evaluate")


def _blocked_import(modules: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """Import ``modules`` in a fresh interpreter where every name of BLOCKED fails to import."""
    code = (f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
            f"for m in {modules!r}:\n    __import__(m)\nprint('imported')\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=300)


def test_the_checks_modules_import_without_ray_optuna_or_pyautoattack() -> None:
    done = _blocked_import(CHECK_MODULES)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
    # The block works: the Ray layer does need Ray.
    control = _blocked_import(("bmtard_ray.ray_train",))
    assert control.returncode != 0 and "ray" in control.stderr


def _poisoned_path(tmp_path: Path) -> str:
    """A folder of packages named like BLOCKED that fail on import, for the front of PYTHONPATH: child
    processes inherit it, so every part of the dry run runs without them."""
    poison = tmp_path / "poison"
    for name in BLOCKED:
        (poison / name).mkdir(parents=True)
        (poison / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the device machine')\n")
    return str(poison)


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu_without_ray(tmp_path: Path, cifar_root: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": f"{_poisoned_path(tmp_path)}:{REPO}"}
    env.pop("BMTARD_GPU_TESTS_ON_CPU", None)  # the dry run sets it for its tests part itself
    cmd = [sys.executable, "bench/device_check.py", "--dry-run", "--out", str(out), "--data-root", str(cifar_root)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # What comes back from the device machine: at most 8 files, directly under --out.
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and set(files) == set(device_check.OUT_FILES), files
    status = json.loads((out / "status.json").read_text())
    assert [p["name"] for p in status["parts"]] == list(device_check.PARTS)
    assert all(p["status"] == "ok" for p in status["parts"]), status["parts"]
    tests = device_report.junit_results(out / "gpu_tests.xml")
    assert len([t for t in tests if t["outcome"] == "passed"]) >= 6 and all(t["outcome"] != "FAILED" for t in tests)
    rows = [row for name in ("step.json", "step_compile.json") for row in json.loads((out / name).read_text())["rows"]]
    assert [r["mode"] for r in rows] == ["reference", "fast", "fast+compile"]
    assert all(r["error"] is None and r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert json.loads((out / "step.json").read_text())["ceilings"]
    epoch = json.loads((out / "epoch.json").read_text())
    assert epoch["phase"] == "done" and epoch["train_images"] == 256 and "CIFAR-10" in epoch["data"]
    md = (out / "BENCHMARKS_rows.md").read_text()
    assert "(DRY RUN)" in md and "| reference |" in md and "| fast+compile |" in md
    assert "test_device_loader_gives_the_cpu_loaders_batches" in md and "| 256 |" in md
    assert md in done.stdout  # printed last, so the run tool's output tail holds it


def _check(tmp_path: Path, budget: float = 60.0) -> device_check.Check:
    args = device_check.parse_args(["--out", str(tmp_path), "--dry-run", "--budget", str(budget)])
    return device_check.Check(args)


def test_a_part_past_its_deadline_is_killed_and_recorded_and_the_check_goes_on(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(device_check.DEADLINES, "tests", 2.0)
    check = _check(tmp_path)
    check.part("tests", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    check.part("step", [sys.executable, "-c", "raise SystemExit(3)"])
    check.part("epoch", [sys.executable, "-c", "print('fine')"])
    check.log.close()
    parts = {p["name"]: p for p in json.loads((tmp_path / "status.json").read_text())["parts"]}
    assert parts["tests"]["status"] == "timeout" and parts["tests"]["seconds"] < 30
    assert parts["step"]["status"] == "failed" and "exit status 3" in parts["step"]["note"]
    assert parts["epoch"]["status"] == "ok"
    log = (tmp_path / "device_check.log").read_text()
    assert "started" in log and "fine" in log
    md = (tmp_path / "BENCHMARKS_rows.md").read_text()  # rendered from what there is
    assert "| tests | timeout |" in md and "No step benchmark rows" in md and "No epoch result" in md


def test_a_part_is_skipped_when_the_budget_is_spent(tmp_path: Path) -> None:
    check = _check(tmp_path, budget=10.0)
    check.part("compile", [sys.executable, "-c", "print('never')"])
    check.log.close()
    part = json.loads((tmp_path / "status.json").read_text())["parts"][0]
    assert part["status"] == "skipped" and "never" not in (tmp_path / "device_check.log").read_text()


def test_the_report_shows_failed_modes_and_targets(tmp_path: Path) -> None:
    base = {"config": "paper", "student": "resnet18", "teachers": "wrn34_10 + resnet56", "batch_size": 128,
            "attack_steps": 10, "timed_steps": 10, "peak_mem_gib": 9.5, "step_gflop": 5400.0,
            "device_peak_tflops": 989.0, "ceiling": "conv", "ceiling_tflops": 500.0, "sgemm_tflops": 700.0,
            "warmup_s": 2.0, "error": None}
    rows = [dict(base, mode="reference", images_per_s=1000.0, epoch_s=50.0, tflops=42.0),
            dict(base, mode="fast", images_per_s=4000.0, epoch_s=12.5, tflops=168.0)]
    env = {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "driver": "580", "cuda": "13.0", "cudnn": 91000,
           "torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5", "python": "3.12.3", "cpu": "x", "cpu_count": 16}
    (tmp_path / "step.json").write_text(json.dumps({"command": "python bench/bench_step.py", "env": env,
                                                    "ceilings": [], "rows": rows}))
    (tmp_path / "step_compile.json").write_text(json.dumps({"command": "c", "env": env, "ceilings": [], "rows": [
        dict(base, mode="fast+compile", images_per_s=None, epoch_s=None, tflops=None,
             error="BackendCompilerFailed: no triton")]}))
    md = device_report.render(tmp_path)
    assert "## GPU check: NVIDIA H200" in md and "driver 580" in md
    assert "| 4000.0 | 12.5 | 4.00x |" in md and "17% of 989" in md and "34% of 500" in md
    assert "failed: BackendCompilerFailed: no triton" in md
    assert "fast is 4.00x the reference mode (target: at least 3x; met)" in md


def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert device_check.main(["--out", str(tmp_path / "o"), "--parts", "tests,nope", "--dry-run"]) == 2
    assert device_check.main(["--out", str(tmp_path / "o"), "--budget", "0", "--dry-run"]) == 2
    (tmp_path / "file").write_text("x")
    assert device_check.main(["--out", str(tmp_path / "file"), "--dry-run"]) == 2
    if not torch.cuda.is_available():
        assert device_check.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err) and len(err) == (3 if torch.cuda.is_available() else 4)
    assert not (tmp_path / "o").exists()


def test_staged_cifar_copy_rebuilds_the_same_labels(tmp_path: Path, cifar_root: Path) -> None:
    shared = REPO.parent / "shared" / "data"
    staged = device_data.stage(shared, tmp_path / "stage")
    size = sum(p.stat().st_size for p in staged)
    assert size < 56 * 2**20  # with the code, within the 64 MiB that travel
    root = device_data.rebuild(tmp_path / "stage", tmp_path / "built", timeout=300)
    train, test, _ = load_dataset("cifar10", root)
    ref_train, ref_test, _ = load_dataset("cifar10", cifar_root)
    assert torch.equal(train.labels, ref_train.labels) and torch.equal(test.labels, ref_test.labels)
    assert train.images.shape == ref_train.images.shape == (50000, 3, 32, 32)
    # JPEG decodes, not the exact prefix: close to the reference copy's pixels but not all equal to them.
    diff = (train.images[:2000].float() - ref_train.images[:2000].float()).abs().mean().item()
    assert 0 < diff < 10
    with pytest.raises(device_data.DeviceDataError, match="missing"):
        device_data.rebuild(tmp_path / "nothing", tmp_path / "built2", timeout=10)


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unwritable_out_is_named_in_one_line_before_anything_else(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    dry_run: bool) -> None:
    """Under a regular file (as root, chmod stops no write): the path is named before the GPU check and any part."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "out"
    assert device_check.main(["--out", str(out)] + (["--dry-run"] if dry_run else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} cannot be created: {tmp_path / 'file'} is a file, not a folder"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
