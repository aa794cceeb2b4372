"""Reports of one evaluation: JSON (RobustBench model-info fields + ours), Markdown, a Parquet row, a rich table.

The JSON starts with the fields of a RobustBench ``model_info`` file, in RobustBench's own conventions
(``eps`` as "8/255", accuracies as strings with two decimals, ``autoattack_acc`` null when AutoAttack did
not run), so an entry can be put beside the leaderboard's; then come our fields with plain numbers: every
attack's accuracy and W-Robust, the attack parameters, number of examples, seed, backend versions and the
teachers used. The Parquet file is one row with a fixed column naming (``acc_<attack>``,
``w_robust_<attack>``, ...) so that many evaluations concatenate into one comparable table.
All files are written atomically (temporary name, then ``os.replace``).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bmtard_ray.evaluation.core import EvalResult, eps_label
from bmtard_ray.names import ATTACK_NAMES
from bmtard_ray.runtime import fileio

# RobustBench model_info fields that the caller may fill (the rest are computed from the result).
ROBUSTBENCH_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote")


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}"


def _ordered(result: EvalResult) -> list[str]:
    return sorted(result.accuracy, key=lambda a: ATTACK_NAMES.index(a) if a in ATTACK_NAMES else len(ATTACK_NAMES))


def report_dict(result: EvalResult, model_info: dict[str, Any]) -> dict[str, Any]:
    """The JSON report as a dict (RobustBench fields first, then ours)."""
    info = dict(model_info)
    headline = result.meta.get("headline")
    out: dict[str, Any] = {
        "link": info.pop("link", None),
        "name": info.pop("name", None),
        "authors": info.pop("authors", None),
        "additional_data": info.pop("additional_data", False),
        "number_forward_passes": info.pop("number_forward_passes", 1),
        "dataset": info.pop("dataset", None),
        "venue": info.pop("venue", None),
        "architecture": info.pop("architecture", None),
        "eps": eps_label(result.meta.get("eps", float("nan"))),
        "clean_acc": _pct(result.accuracy.get("clean")),
        "reported": info.pop("reported", None),
        "autoattack_acc": _pct(result.accuracy.get("autoattack")),
        "footnote": info.pop("footnote", None),
        "threat_model": "Linf",
        # --- ours ---
        "accuracy": {a: result.accuracy[a] for a in _ordered(result)},
        "w_robust": {a: result.w_robust[a] for a in _ordered(result) if a in result.w_robust},
        "headline": {"attack": headline, "w_robust": result.w_robust.get(headline) if headline else None},
        "eps_value": result.meta.get("eps"),
        "n_examples": result.n_examples,
        "seed": result.meta.get("seed"),
        "attack_params": result.meta.get("attack_params", {}),
        "backends": result.meta.get("backends", {}),
        "teachers": info.pop("teachers", None),
        "seconds": result.seconds,
        "meta": result.meta,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.update(info)  # whatever else the caller knows (checkpoint, split, method, ...)
    return out


def markdown(result: EvalResult, model_info: dict[str, Any]) -> str:
    name = model_info.get("name") or "model"
    meta = result.meta
    facts = [f"architecture {model_info.get('architecture')}", f"dataset {model_info.get('dataset')}"]
    if model_info.get("split"):
        facts.append(f"split {model_info['split']}")
    facts += [f"{result.n_examples} examples", f"L-inf eps {eps_label(meta.get('eps', float('nan')))}",
              f"seed {meta.get('seed')}"]
    lines = [f"# Robustness of {name}", "", ", ".join(facts) + ".", ""]
    headline = meta.get("headline")
    if headline in result.w_robust:
        lines += [f"Headline: W-Robust under {headline} = **{result.w_robust[headline]:.2f}**.", ""]
    lines += ["| attack | accuracy (%) | W-Robust (%) | parameters | time (s) |", "|---|---:|---:|---|---:|"]
    for a in _ordered(result):
        wr = f"{result.w_robust[a]:.2f}" if a in result.w_robust else ""
        p = meta.get("attack_params", {}).get(a, {})
        ptxt = ", ".join(f"{k}={eps_label(v) if k == 'step_size' else _fmt(v)}" for k, v in p.items() if k != "eps")
        lines.append(f"| {a} | {result.accuracy[a]:.2f} | {wr} | {ptxt} | {result.seconds.get(a, 0.0):.1f} |")
    backends = meta.get("backends", {})
    if backends:
        lines += ["", "Backends: " + ", ".join(f"{a}: {b['package']} {b['version']}" for a,
                                               b in backends.items()) + "."]
    teachers = model_info.get("teachers")
    if teachers:
        lines += ["", "Teachers: " + ", ".join(f"{role}: {_fmt(t)}" for role, t in teachers.items()) + "."]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "/".join(_fmt(x) for x in v)
    return str(v)


def parquet_row(result: EvalResult, model_info: dict[str, Any]) -> dict[str, Any]:
    """One flat row: scalar columns only (dicts are stored as JSON text)."""
    meta = result.meta
    headline = meta.get("headline")
    row: dict[str, Any] = {
        "name": model_info.get("name"), "architecture": model_info.get("architecture"),
        "dataset": model_info.get("dataset"), "split": model_info.get("split"),
        "checkpoint": str(model_info["checkpoint"]) if model_info.get("checkpoint") is not None else None,
        "threat_model": "Linf", "eps": float(meta.get("eps", float("nan"))), "n_examples": int(result.n_examples),
        "seed": meta.get("seed"), "headline": headline,
        "headline_w_robust": result.w_robust.get(headline) if headline else None,
    }
    for a in _ordered(result):
        row[f"acc_{a}"] = float(result.accuracy[a])
    for a in _ordered(result):
        if a in result.w_robust:
            row[f"w_robust_{a}"] = float(result.w_robust[a])
    for a in _ordered(result):
        row[f"seconds_{a}"] = float(result.seconds.get(a, float("nan")))
    for a, b in meta.get("backends", {}).items():
        row[f"{a}_backend"] = f"{b['package']} {b['version']}"
    row["device"] = meta.get("device")
    row["torch"] = meta.get("torch")
    row["teachers"] = json.dumps(model_info.get("teachers"), default=str) if model_info.get("teachers") else None
    row["attack_params"] = json.dumps(meta.get("attack_params", {}), default=str)
    row["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def write_reports(result: EvalResult, out_dir: Path, *, model_info: dict[str, Any],
                  stem: str = "eval") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.parquet`` into ``out_dir`` (created if needed)."""
    import pyarrow as pa

    out_dir = Path(out_dir)
    data = report_dict(result, model_info)
    text = json.dumps(data, indent=2, default=str) + "\n"
    md = markdown(result, model_info)
    row = parquet_row(result, model_info)
    table = pa.table({k: [v] for k, v in row.items()})  # built before any file is written
    return {"json": fileio.atomic_text(text, out_dir / f"{stem}.json"),
            "md": fileio.atomic_text(md, out_dir / f"{stem}.md"),
            "parquet": fileio.atomic_parquet(table, out_dir / f"{stem}.parquet")}


def print_table(result: EvalResult, title: str) -> None:
    """The result as a rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    headline = result.meta.get("headline")
    eps = eps_label(result.meta.get("eps", float("nan")))
    table = Table(title=title, caption=f"{result.n_examples} examples, L-inf eps {eps}, seed {result.meta.get('seed')}")
    table.add_column("attack")
    table.add_column("accuracy (%)", justify="right")
    table.add_column("W-Robust (%)", justify="right")
    table.add_column("time (s)", justify="right")
    for a in _ordered(result):
        wr = f"{result.w_robust[a]:.2f}" if a in result.w_robust else ""
        style = "bold" if a == headline else None
        table.add_row(a, f"{result.accuracy[a]:.2f}", wr, f"{result.seconds.get(a, 0.0):.1f}", style=style)
    Console().print(table)
