"""Do two run folders hold the same numbers? A check for changes that must not move a single number.

Compares what two ``run_train.py`` runs left: ``trace.parquet`` must be identical, ``metrics.parquet``
identical except its timing columns, ``summary.json`` identical except its timing fields. Give two run
folders, or two parents of run folders (every run folder under the first is compared with the one of the
same name under the second)::

    python bench/compare_runs.py /tmp/before/bmtard /tmp/after/bmtard
    python bench/compare_runs.py /tmp/before /tmp/after        # every run folder of /tmp/before

Prints one line per run and exits 1 if any differs (or a file is missing).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# Wall-clock numbers: they differ between any two runs of the same configuration.
TIMING_COLUMNS = ("seconds", "images_per_s")
TIMING_FIELDS = ("train_seconds", "seconds", "run_dir")
RUN_FILES = ("trace.parquet", "metrics.parquet", "summary.json")


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN equal to NaN (baselines report NaN temperatures)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=False))
    return bool(a == b)


def _without(data: Any, fields: Sequence[str]) -> Any:
    if isinstance(data, dict):
        return {k: _without(v, fields) for k, v in data.items() if k not in fields}
    if isinstance(data, list):
        return [_without(v, fields) for v in data]
    return data


def compare_table(a: Path, b: Path, skip: Sequence[str] = ()) -> list[str]:
    """Differences between two Parquet tables, column by column (``skip``: columns left out)."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    cols_a = [c for c in ta.column_names if c not in skip]
    cols_b = [c for c in tb.column_names if c not in skip]
    if cols_a != cols_b:
        return [f"{a.name}: columns {cols_a} != {cols_b}"]
    if ta.num_rows != tb.num_rows:
        return [f"{a.name}: {ta.num_rows} rows != {tb.num_rows}"]
    out = []
    for col in cols_a:
        if not _same(ta.column(col).to_pylist(), tb.column(col).to_pylist()):
            out.append(f"{a.name}: column {col} differs")
    return out


def compare_summary(a: Path, b: Path, skip: Sequence[str] = TIMING_FIELDS) -> list[str]:
    sa, sb = (_without(json.loads(p.read_text()), skip) for p in (a, b))
    if _same(sa, sb):
        return []
    keys = sorted(k for k in set(sa) | set(sb) if not _same(sa.get(k), sb.get(k)))
    return [f"{a.name}: {', '.join(keys)} differ"]


def compare_runs(a: Path, b: Path) -> list[str]:
    """Every difference between run folders ``a`` and ``b`` (empty: the same numbers)."""
    missing = [f"{p}/{name} is missing" for p in (a, b) for name in RUN_FILES if not (p / name).is_file()]
    if missing:
        return missing
    return (compare_table(a / "trace.parquet", b / "trace.parquet")
            + compare_table(a / "metrics.parquet", b / "metrics.parquet", TIMING_COLUMNS)
            + compare_summary(a / "summary.json", b / "summary.json"))


def run_pairs(a: Path, b: Path) -> list[tuple[str, Path, Path]]:
    if (a / "summary.json").is_file() or (b / "summary.json").is_file():
        return [(a.name, a, b)]
    runs = sorted(p.parent.name for p in a.glob("*/summary.json"))
    return [(name, a / name, b / name) for name in runs]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="a run folder, or a folder of run folders")
    p.add_argument("b", type=Path, help="the same for the other side")
    args = p.parse_args(argv)
    pairs = run_pairs(args.a, args.b)
    if not pairs:
        print(f"no run folders (with a summary.json) under {args.a}", file=sys.stderr)
        return 1
    failed = 0
    for name, ra, rb in pairs:
        diffs = compare_runs(ra, rb)
        failed += bool(diffs)
        print(f"{name}: " + ("identical" if not diffs else "DIFFERS: " + "; ".join(diffs)))
    print(f"{len(pairs) - failed} of {len(pairs)} runs identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
