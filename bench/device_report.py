"""BENCHMARKS.md rows from the device check's result files (no torch: it runs even when a part crashed).

Reads what the parts wrote under ``--out`` (status.json, gpu_tests.xml, step.json, step_compile.json,
epoch.json; any may be missing or partial) and returns Markdown ready to paste into BENCHMARKS.md.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

EPOCH_IMAGES = 50_000
TARGET_SPEEDUP = 3.0      # issue 20: the fast path at least 3x the reference mode (paper configuration)
TARGET_EPOCH_S = 10.0     # issue 20: a B-MTARD ResNet-18 epoch on 50,000 images within 10 s on an H200


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_results(path: Path) -> list[dict[str, Any]]:
    """One dict per test case of a JUnit file: name, outcome, seconds, message, recorded properties."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = " ".join((node.get("message") or "").split())[:200]
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        out.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                    "message": message, "properties": props})
    return out


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _versions(env: dict[str, Any]) -> str:
    parts = []
    if env.get("gpu"):
        parts.append(f"GPU {env['gpu']} ({env.get('gpu_memory_gib')} GiB), driver {env.get('driver')}, "
                     f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}")
    parts.append(f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, numpy {env.get('numpy')}, "
                 f"Python {env.get('python')}")
    parts.append(f"CPU {env.get('cpu')} ({env.get('cpu_count')} logical CPUs)")
    return "; ".join(parts)


def _ceiling(ceilings: list[dict[str, Any]], gpu: bool, mode: str) -> float | None:
    """The conv ceiling for a row measured in another process (the compile part measures none): the
    rule of bench/ceilings.ceiling_for."""
    dtype, layout = (("bf16", "channels_last") if mode != "reference" else ("fp32-default", "NCHW")) if gpu \
        else ("fp32", "channels_last")
    found = [c["tflops"] for c in ceilings if c["op"] == "conv" and c["dtype"] == dtype and c["layout"] == layout]
    return max(found, default=None)


def _step_section(runs: list[dict[str, Any]]) -> list[str]:
    rows = [r for run in runs for r in run.get("rows", [])]
    ceilings = [c for run in runs for c in run.get("ceilings", [])]
    gpu = any(run.get("env", {}).get("gpu") for run in runs)
    for r in rows:
        if r.get("ceiling_tflops") is None:
            r["ceiling_tflops"] = _ceiling(ceilings, gpu, r["mode"])
    if not rows:
        return ["No step benchmark rows (see status above)."]
    first = rows[0]
    lines = [f"Synthetic images, randomly initialised teachers, batch {first['batch_size']}, "
             f"PGD-{first['attack_steps']}, {first['timed_steps']} timed steps after warm-up. Commands: "
             + "; ".join(f"`{run['command']}`" for run in runs if run.get("command")), "",
             "| config (student; teachers) | mode | images/s | s per 50k-image epoch | vs reference "
             "| peak GPU mem GiB | achieved TFLOP/s | vs device peak | vs measured conv ceiling | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {r["config"]: r["images_per_s"] for r in rows if r["mode"] == "reference" and r.get("images_per_s")}
    for r in rows:
        label = f"{r['config']} ({r['student']}; {r['teachers']})"
        if r.get("error"):
            lines.append(f"| {label} | {r['mode']} | failed: {r['error']} | | | | | | | |")
            continue
        speed = f"{r['images_per_s'] / ref[r['config']]:.2f}x" if r["config"] in ref else "-"
        peak = f"{r['tflops'] / r['device_peak_tflops']:.0%} of {r['device_peak_tflops']:g}" \
            if r.get("device_peak_tflops") else "-"
        vs_ceiling = f"{r['tflops'] / r['ceiling_tflops']:.0%} of {r['ceiling_tflops']:.3g}" \
            if r.get("ceiling_tflops") else "-"
        lines.append(f"| {label} | {r['mode']} | {r['images_per_s']:.1f} | {r['epoch_s']:.1f} | {speed} | "
                     f"{_f(r.get('peak_mem_gib'), '.2f')} | {r['tflops']:.3g} | {peak} | {vs_ceiling} | "
                     f"{_f(r.get('warmup_s'), '.1f')} |")
    lines += ["", "Device peak: the vendor's dense figure, bf16 for the fast modes, TF32 for the reference mode (its "
                  "float32 convolutions run in TF32 under torch's default cuDNN flags). Conv ceiling: the best 3x3 "
                  "convolution measured below, bf16 channels_last for the fast modes, fp32 NCHW under the default "
                  "flags for the reference mode (fp32 channels_last on a CPU)."]
    if ceilings:
        lines += ["", "Ceilings measured in the same run (`bench/ceilings.py`):", "",
                  "| operation | dtype | layout | TFLOP/s |", "|---|---|---|---:|"]
        lines += [f"| {c['name']} | {c['dtype']} | {c['layout']} | {c['tflops']:.3g} |" for c in ceilings]
    paper = {r["mode"]: r["images_per_s"] for r in rows if r["config"] == "paper" and r.get("images_per_s")}
    if "reference" in paper and len(paper) > 1:
        best_mode = max((m for m in paper if m != "reference"), key=lambda m: paper[m])
        ratio = paper[best_mode] / paper["reference"]
        lines += ["", f"Paper configuration: {best_mode} is {ratio:.2f}x the reference mode (target: at least "
                      f"{TARGET_SPEEDUP:g}x; {'met' if ratio >= TARGET_SPEEDUP else 'NOT met'})."]
    return lines


def _epoch_section(epoch: dict[str, Any] | None, runs: list[dict[str, Any]]) -> list[str]:
    if not epoch:
        return ["No epoch result (see status above)."]
    if epoch.get("phase") != "done":
        return [f"The epoch did not finish (last phase: {epoch.get('phase')})."]
    fast = next((r["images_per_s"] for run in runs for r in run.get("rows", [])  # the same student's fast row
                 if r["student"] == epoch["student"] and r["mode"] == "fast" and r.get("images_per_s")), None)
    per_50k = EPOCH_IMAGES / epoch["loop_images_per_s"]
    lines = [f"{epoch['student']} student, {epoch['teachers']} teachers (random weights), batch {epoch['batch_size']}, "
             f"PGD-{epoch['attack_steps']}, fast path; data: {epoch['data']}. `Trainer.fit()` for one epoch "
             "(with its validation), then `Trainer.finish()` (final evaluation, files written).", "",
             "| train images | steps | loop s | loop images/s | step benchmark fast images/s "
             "| s per 50k at the loop's rate | validation s | final evaluation s | data load s | set-up s | wall s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {epoch['train_images']} | {epoch['steps']} | {epoch['train_s']:.1f} | "
             f"{epoch['loop_images_per_s']:.0f} | "
             f"{_f(fast, '.0f')} | {per_50k:.1f} | {epoch['validation_s']:.1f} | {epoch['final_eval_s']:.1f} | "
             f"{epoch['data_s']:.1f} | {epoch['setup_s']:.1f} | {epoch['wall_s']:.1f} |", "",
             f"The first epoch includes the warm-up (cuDNN heuristics, allocator). 50,000 images at the loop's rate: "
             f"{per_50k:.1f} s (target: within {TARGET_EPOCH_S:g} s on an H200; "
             f"{'met' if per_50k <= TARGET_EPOCH_S else 'NOT met'})."]
    return lines


def _tests_section(tests: list[dict[str, Any]]) -> list[str]:
    if not tests:
        return ["No test results (see status above)."]
    lines = ["| test | result | s | measured |", "|---|---|---:|---|"]
    for t in tests:
        measured = ", ".join(f"{k} {v}" for k, v in t["properties"].items())
        note = f" ({t['message']})" if t["message"] and t["outcome"] != "passed" else ""
        lines.append(f"| {t['name']} | {t['outcome']}{note} | {t['seconds']:.1f} | {measured} |")
    return lines


def render(out: Path) -> str:
    """The Markdown for BENCHMARKS.md from the files under ``out``."""
    status = read_json(out / "status.json") or {}
    runs = [r for r in (read_json(out / "step.json"), read_json(out / "step_compile.json")) if r]
    epoch = read_json(out / "epoch.json")
    env = next((r["env"] for r in runs if r.get("env")), None) or (epoch or {}).get("env") or {}
    dry = status.get("dry_run", False)
    title = env.get("gpu") or "CPU"
    lines = [f"## GPU check: {title}, {status.get('date', 'date unknown')}" + (" (DRY RUN)" if dry else ""), ""]
    if dry:
        lines += ["**Dry run on the CPU: tiny models and sizes, to keep the script working. The numbers mean "
                  "nothing.**", ""]
    command = status.get("command", 'PYTHONPATH=. python3 bench/device_check.py --out "$OUT"')
    lines += [f"Command: `{command}`"
              f" (wall {_f(status.get('wall_s'), '.0f')} s of a {_f(status.get('budget_s'), '.0f')} s budget).",
              "", f"Versions: {_versions(env)}." if env else "Versions: not recorded.", "",
              "| part | status | s | deadline s | note |", "|---|---|---:|---:|---|"]
    for p in status.get("parts", []):
        lines.append(f"| {p['name']} | {p['status']} | {_f(p.get('seconds'), '.1f')} | "
                     f"{_f(p.get('deadline_s'), '.0f')} | {p.get('note', '')} |")
    lines += ["", "### GPU tests (`tests/test_gpu.py`, marker `gpu`)", ""]
    lines += _tests_section(junit_results(out / "gpu_tests.xml"))
    lines += ["", "### One B-MTARD step: reference, fast, fast + compile (`bench/bench_step.py`)", ""]
    lines += _step_section(runs)
    lines += ["", "### One real epoch through the training loop, no Ray (`bench/device_epoch.py`)", ""]
    lines += _epoch_section(epoch, runs)
    return "\n".join(lines) + "\n"
