"""The balance study's durable records: one small JSON file per finished run, search and teacher, no weights.

A study's run folders (weights, checkpoints, logit cache) live in an ignored folder that a fresh machine does
not have; these records are committed (``results/balance-study/`` for the cpu study) as each part finishes. The
study skips every run that has a record, and its report is written from the records alone, so
``--report-only`` on a fresh clone rewrites the same block and figures byte for byte.

Layout under the records folder:
    runs/<group>/<arm>-seed<s>.json   a run: summary, suite evaluation, per-epoch metrics, the trace's balance
                                      columns, hardware (<group> is the teacher strength, or ``shared`` for
                                      the arms that use no teacher)
    search/<strength>.json            a search: its summary, seconds, trial table and per-epoch histories
    teachers.json                     every teacher: recipe, weights hash, machine, test evaluation, re-checks
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from bmtard_ray.runtime import fileio as io  # noqa: E402

# The trace columns the report's figure draws (every iteration), stored to 6 significant digits.
TRACE_COLUMNS = ("iteration", "tau_adv", "tau_nat", "H_adv", "H_nat")
FORMAT = "bmtard_ray.balance_study_record/1"


def _number(v: Any) -> Any:
    """JSON-safe and small: floats to 6 significant digits, NaN/inf as None, other scalars as they are."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return float(f"{f:.6g}") if math.isfinite(f) else None


def _write(path: Path, record: dict[str, Any]) -> Path:
    return io.atomic_text(json.dumps({"format": FORMAT, **record}, indent=1, sort_keys=True) + "\n", path)


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: study record {path} is unreadable ({exc}); restore it from git or delete it "
                         "to redo that part") from exc
    if record.get("format") != FORMAT:
        raise SystemExit(f"error: study record {path} has format {record.get('format')!r}, this script reads {FORMAT}")
    return record


# --- runs ----------------------------------------------------------------------------------------------------
def run_path(records: Path, group: str, arm: str, seed: int) -> Path:
    return records / "runs" / group / f"{arm}-seed{seed}.json"


def read_run(records: Path, group: str, arm: str, seed: int) -> dict[str, Any] | None:
    return _read(run_path(records, group, arm, seed))


def write_run(records: Path, group: str, arm: str, seed: int, run: Path, hardware: str) -> Path:
    """The record of a finished, evaluated run folder (``run_local``'s outputs plus reproduce.suite's)."""
    import pyarrow.parquet as pq

    summary = json.loads((run / "summary.json").read_text())
    suite = {name: json.loads(f.read_text()) for name in ("suite", "autoattack")
             if (f := run / "suite" / name / "model_test.json").is_file()}
    for report in suite.values():
        report.pop("meta", None)  # paths and versions of this machine; the hardware line says what matters
    history = [{k: _number(v) for k, v in row.items()} for row in pq.read_table(run / "metrics.parquet").to_pylist()]
    trace: dict[str, list[Any]] = {}
    if (run / "trace.parquet").is_file():
        table = pq.read_table(run / "trace.parquet").to_pydict()
        trace = {c: [_number(v) for v in table[c]] for c in TRACE_COLUMNS if c in table}
    return _write(run_path(records, group, arm, seed), {
        "group": group, "arm": arm, "seed": seed, "hardware": hardware, "summary": summary, "suite": suite,
        "history": history, "trace": trace})


# --- searches ------------------------------------------------------------------------------------------------
def search_path(records: Path, strength: str) -> Path:
    return records / "search" / f"{strength}.json"


def read_search(records: Path, strength: str) -> dict[str, Any] | None:
    return _read(search_path(records, strength))


def _trial_history(trial_dir: str | None) -> list[dict[str, Any]]:
    """Every epoch a trial reported, from Tune's ``result.json`` (one JSON object per line)."""
    if not trial_dir or not (Path(trial_dir) / "result.json").is_file():
        return []
    keep = ("epoch", "val_clean", "val_robust", "val_w_robust", "tau_adv", "tau_nat", "w_adv", "w_nat",
            "H_adv", "H_nat", "train_loss", "time_total_s")
    rows = []
    for line in (Path(trial_dir) / "result.json").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: _number(row[k]) for k in keep if k in row})
    return rows


def write_search(records: Path, strength: str, exp: Path, seconds: float, hardware: str) -> Path:
    import pyarrow.parquet as pq

    summary = json.loads((exp / "summary.json").read_text())
    trials = []
    if (exp / "trials.parquet").is_file():
        for row in pq.read_table(exp / "trials.parquet").to_pylist():
            trial = {k: _number(v) for k, v in row.items() if k not in ("checkpoint_path", "trial_dir")}
            trial["history"] = _trial_history(row.get("trial_dir"))
            trials.append(trial)
    return _write(search_path(records, strength), {"strength": strength, "hardware": hardware, "seconds": seconds,
                                                   "summary": summary, "trials": trials})


# --- teachers ------------------------------------------------------------------------------------------------
def teachers_path(records: Path) -> Path:
    return records / "teachers.json"


def read_teachers(records: Path) -> dict[str, Any]:
    found = _read(teachers_path(records))
    return found["teachers"] if found else {}


def write_teacher(records: Path, name: str, entry: dict[str, Any]) -> None:
    teachers = read_teachers(records)
    teachers[name] = entry
    _write(teachers_path(records), {"teachers": teachers})


def weights_hash(spec: str) -> str:
    """SHA-256 of a model's weights (tensors in key order, as loaded), whatever wrapper its file uses."""
    from bmtard_ray.models.files import load_model

    state = load_model(spec, None, 10, dataset="cifar10").model.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
