"""A finished run's summary and the files it leaves: the model file, trace, metrics, summary and reports."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bmtard_ray.config import RunConfig
from bmtard_ray.data import DatasetInfo
from bmtard_ray.evaluation.core import EvalResult
from bmtard_ray.evaluation.report import write_reports
from bmtard_ray.names import teacher_roles
from bmtard_ray.runtime import fileio
from bmtard_ray.storage.run_folder import MODEL_FILE, SUMMARY_FILE


def teacher_provenance(cfg: RunConfig) -> dict[str, Any]:
    return {role: {"arch": getattr(cfg.teachers, role).arch, "checkpoint": getattr(cfg.teachers, role).checkpoint}
            for role in teacher_roles(cfg.method.name)}


def build_summary(cfg: RunConfig, history: list[dict[str, Any]], epochs: int, results: dict[str, dict[str, Any]],
                  info: DatasetInfo) -> dict[str, Any]:
    hist = history
    return {"name": cfg.name, "method": cfg.method.name, "student": cfg.student, "dataset": info.name,
            "epochs": epochs, "seed": cfg.seed, "headline": cfg.eval.headline,
            "train_seconds": sum(h["seconds"] for h in hist),
            "final_tau": [hist[-1].get("tau_adv"), hist[-1].get("tau_nat")] if hist else None,
            "final_w": [hist[-1].get("w_adv"), hist[-1].get("w_nat")] if hist else None,
            "teachers": teacher_provenance(cfg),
            **({"classes": list(info.classes)} if info.classes else {}),
            "results": {split: {"n_examples": r["n_examples"], "accuracy": r["accuracy"], "w_robust": r["w_robust"]}
                        for split, r in results.items()}}


def summary_markdown(summary: dict[str, Any]) -> str:
    attacks = list(summary["results"]["test"]["accuracy"])
    w_robust = " | ".join(f"W-Robust {a}" for a in attacks if a != "clean")
    lines = [f"# {summary['name']}: {summary['method']} student {summary['student']} on {summary['dataset']}", "",
             f"{summary['epochs']} epochs, seed {summary['seed']}, training time {summary['train_seconds']:.0f} s.", "",
             "| split | n | " + " | ".join(attacks) + " | " + w_robust + " |",
             "|---|---:|" + "---:|" * (2 * len(attacks) - 1)]
    for split, r in summary["results"].items():
        accs = " | ".join(f"{r['accuracy'][a]:.2f}" for a in attacks)
        ws = " | ".join(f"{r['w_robust'][a]:.2f}" for a in attacks if a != "clean")
        lines.append(f"| {split} | {r['n_examples']} | {accs} | {ws} |")
    return "\n".join(lines) + "\n"


def write_run_outputs(run_dir: Path, cfg: RunConfig, summary: dict[str, Any], results: dict[str, dict[str, Any]],
                      model_file: dict[str, Any], trace: Any | None, history: list[dict[str, Any]]) -> None:
    """Everything a finished run leaves in its folder, each file written atomically."""
    info = {"name": cfg.name, "architecture": cfg.student, "dataset": summary["dataset"],
            "teachers": teacher_provenance(cfg), "method": cfg.method.name}
    for split, r in results.items():
        result = EvalResult(r["accuracy"], r["w_robust"], r["n_examples"], r["seconds"], r["meta"])
        write_reports(result, run_dir / "eval", model_info=info | {"split": split}, stem=split)
    fileio.atomic_torch_save(model_file, run_dir / MODEL_FILE)
    if trace is not None:
        fileio.atomic_parquet(trace, run_dir / "trace.parquet")
    fileio.atomic_parquet(fileio.history_table(history), run_dir / "metrics.parquet")
    fileio.atomic_text(json.dumps(summary, indent=2, default=str), run_dir / SUMMARY_FILE)
    fileio.atomic_text(summary_markdown(summary), run_dir / "summary.md")
