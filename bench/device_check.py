#!/usr/bin/env python
"""The GPU check in one command: GPU tests, step benchmark and one real epoch, each with its own deadline.

    PYTHONPATH=. python3 bench/device_check.py --out "$OUT"              # on a lent GPU: stops itself at 290 s
    PYTHONPATH=. python3 bench/device_check.py --dry-run --out /tmp/dc   # on any CPU: tiny sizes (CI runs it)

Made for a short window on a machine that reaches no network and has torch, torchvision, numpy, pyarrow,
rich, pyyaml, pillow and pytest but no Ray, Optuna or pyautoattack (none of the code it runs imports them; a
test checks). Parts, in order of what matters most, each run as a child process killed at its deadline:

  data     CIFAR-10: --data-root, else data/, else rebuilt from the staged copy in .device_data/
           (bench/device_data.py), else synthetic images (the tables then say so)
  tests    pytest -m gpu tests/test_gpu.py                      -> gpu_tests.xml
  step     bench/bench_step.py, paper + MobileNetV2 configs, reference and fast modes, ceilings -> step.json
  epoch    bench/device_epoch.py: one B-MTARD ResNet-18 epoch through the loop -> epoch.json
  compile  bench/bench_step.py, the same configs in fast+compile mode (compiling takes longest) -> step_compile.json

Everything it writes lies directly under --out (7 files): device_check.log (all output), status.json (each
part's status, time and deadline, rewritten after every part), the four result files above and
BENCHMARKS_rows.md (the rows for BENCHMARKS.md, rewritten after every part). A part that fails or runs out
of time is recorded and the next one runs. Exit status 0 when every part passed, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import device_data, device_report  # noqa: E402

PARTS = ("data", "tests", "step", "epoch", "compile")
# Each part's own limit in seconds; the budget caps them further. Measured guesses for an H100/H200 with
# room to spare: tests ~1 min (compiling the small CNN most of it), step ~40 s, epoch ~30 s, compile 1-2 min.
DEADLINES = {"data": 60.0, "tests": 120.0, "step": 100.0, "epoch": 90.0, "compile": 180.0}
MIN_LEFT = {"tests": 30.0, "step": 30.0, "epoch": 30.0, "compile": 45.0}  # skipped with less than this left
OUT_FILES = ("device_check.log", "status.json", "gpu_tests.xml", "step.json", "step_compile.json", "epoch.json",
             "BENCHMARKS_rows.md")
RUN_DIR = "runs/device-check"  # the parts' scratch files (random teachers, the epoch's run): not under --out


@dataclass
class PartResult:
    name: str
    status: str = "pending"      # ok | failed | timeout | skipped
    seconds: float | None = None
    deadline_s: float | None = None
    note: str = ""


@dataclass
class Status:
    command: str
    dry_run: bool
    budget_s: float
    date: str
    parts: list[PartResult] = field(default_factory=list)
    wall_s: float | None = None
    data: str | None = None
    nvidia_smi: str | None = None


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.start = time.perf_counter()
        self.status = Status(command=" ".join(["PYTHONPATH=. python3 bench/device_check.py"] + sys.argv[1:]),
                             dry_run=args.dry_run, budget_s=args.budget,
                             date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        self.log: IO[str] = (self.out / "device_check.log").open("a", buffering=1)
        self.data_root = "synthetic"

    # --- bookkeeping -------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def say(self, text: str) -> None:
        line = f"[device_check {time.perf_counter() - self.start:6.1f}s] {text}\n"
        self.log.write(line)
        sys.stdout.write(line)
        sys.stdout.flush()

    def save(self) -> None:
        self.status.wall_s = time.perf_counter() - self.start
        tmp = self.out / "status.json.tmp"
        tmp.write_text(json.dumps(asdict(self.status), indent=2) + "\n")
        os.replace(tmp, self.out / "status.json")
        try:
            (self.out / "BENCHMARKS_rows.md").write_text(device_report.render(self.out))
        except Exception as exc:  # the report must never stop the check
            self.say(f"could not render BENCHMARKS_rows.md: {type(exc).__name__}: {exc}")

    # --- running a child with a deadline -------------------------------------------------------------------
    def child(self, cmd: list[str], deadline: float, env: dict[str, str] | None = None) -> tuple[int | None, float]:
        """Run ``cmd`` from the repository root, its output teed to the log and stdout; (exit code or None
        when killed at the deadline, seconds)."""
        self.say("$ " + " ".join(cmd))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]), **(env or {})}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.log.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: int | None = proc.wait(timeout=max(deadline, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's whole group: compile workers, loader workers
            proc.wait()
            rc = None
        reader.join(timeout=10)
        return rc, time.perf_counter() - start

    def part(self, name: str, cmd: list[str], env: dict[str, str] | None = None, ok_note: str = "") -> None:
        result = PartResult(name)
        self.status.parts.append(result)
        left = self.left()
        if left < MIN_LEFT.get(name, 0.0):
            result.status, result.note = "skipped", f"{left:.0f} s of the budget left"
            self.say(f"{name}: skipped ({result.note})")
            self.save()
            return
        result.deadline_s = min(DEADLINES[name], left)
        rc, result.seconds = self.child(cmd, result.deadline_s, env)
        if rc is None:
            result.status, result.note = "timeout", f"killed at its deadline of {result.deadline_s:.0f} s"
        elif rc == 0:
            result.status, result.note = "ok", ok_note
        else:
            result.status, result.note = "failed", f"exit status {rc} (device_check.log has the output)"
        self.say(f"{name}: {result.status} in {result.seconds:.1f} s {result.note}")
        self.save()

    # --- the parts ---------------------------------------------------------------------------------------
    def data(self) -> None:
        result = PartResult("data", deadline_s=DEADLINES["data"])
        self.status.parts.append(result)
        start = time.perf_counter()
        a = self.args
        staged = REPO / ".device_data"
        try:
            if a.data_root:
                if not device_data.built(Path(a.data_root)):
                    raise device_data.DeviceDataError(f"{a.data_root} holds no {device_data.FOLDER}/")
                self.data_root, result.note = a.data_root, f"CIFAR-10 at {a.data_root}"
            elif device_data.built(REPO / "data"):
                self.data_root, result.note = "data", "CIFAR-10 copy in data/"
            elif (staged / device_data.NPZ).is_file():
                root = device_data.rebuild(staged, REPO / RUN_DIR / "data", timeout=DEADLINES["data"])
                self.data_root = str(root)
                result.note = "CIFAR-10 rebuilt from the staged JPEG copy (every image JPEG-decoded, --no-exact)"
            else:
                result.note = "no CIFAR-10 copy found: synthetic images (timing only)"
            result.status = "ok"
        except device_data.DeviceDataError as exc:
            result.status, result.note = "failed", f"{exc}; using synthetic images (timing only)"
            self.data_root = "synthetic"
        result.seconds = time.perf_counter() - start
        self.status.data = result.note
        self.say(f"data: {result.status}: {result.note}")
        self.save()

    def run(self, parts: list[str]) -> int:
        py, a, out = sys.executable, self.args, self.out
        dry = a.dry_run
        device = ["--device", "cpu" if dry else "cuda"]
        tmp = ["--tmp", f"{RUN_DIR}/bench-tmp"]
        sizes = ["--batch-size", "16", "--steps", "2", "--warmup", "1", "--attack-steps", "1", "--workers", "0"] \
            if dry else []
        configs = ["--config", "tiny"] if dry else ["--config", "paper", "--config", "paper-mbv2"]
        self.status.nvidia_smi = nvidia_smi()
        if "data" in parts or "epoch" in parts:  # the epoch needs to know where the images are
            self.data()
        if "tests" in parts:
            self.part("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                                f"--junitxml={out / 'gpu_tests.xml'}", "-m", "gpu", "tests/test_gpu.py"],
                      env={"BMTARD_GPU_TESTS_ON_CPU": "1"} if dry else None)
        if "step" in parts:
            self.part("step", [py, "bench/bench_step.py", *configs, "--modes", "reference,fast", *sizes, *device, *tmp,
                               "--json", str(out / "step.json")] + (["--small-ceilings"] if dry else []))
        if "epoch" in parts:
            self.part("epoch", [py, "bench/device_epoch.py", "--data-root", self.data_root, *device,
                                "--tmp", f"{RUN_DIR}/epoch", "--json", str(out / "epoch.json")]
                      + (["--dry-run"] if dry else []), ok_note=self.status.data or "")
        if "compile" in parts:
            self.part("compile", [py, "bench/bench_step.py", *configs, "--modes", "fast+compile", *sizes, *device, *tmp,
                                  "--no-ceilings", "--json", str(out / "step_compile.json")]
                      + (["--compile-backend", "aot_eager"] if dry else []))
        self.save()
        self.log.close()
        for stale in out.glob("*.tmp"):  # a child killed while replacing its file: keep within 8 files
            stale.unlink()
        print((out / "BENCHMARKS_rows.md").read_text())
        return 0 if all(p.status == "ok" for p in self.status.parts) else 1


def nvidia_smi() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the result files (created; e.g. the run tool's $OUT)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny models and sizes")
    p.add_argument("--budget", type=float, default=290.0, help="seconds for the whole check (default 290)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    p.add_argument("--data-root", help="a folder holding cifar-10-batches-py/ (default: see the data part)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        print(f"error: --parts takes a comma-separated subset of {', '.join(PARTS)}, got {args.parts!r}",
              file=sys.stderr)
        return 2
    if not args.budget > 0:
        print(f"error: --budget must be a positive number of seconds, got {args.budget}", file=sys.stderr)
        return 2
    # The outputs first: a bad --out is named before the GPU check and before any part runs.
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    from bmtard_ray.errors import ConfigError
    from bmtard_ray.launch.preflight import probe_writable

    try:
        probe_writable(out, "--out")  # a real write probe in the nearest existing folder; leaves nothing
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU is visible; use --dry-run to run every part on the CPU", file=sys.stderr)
            return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: --out {out} cannot be created ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return Check(args).run(parts)


if __name__ == "__main__":
    raise SystemExit(main())
