"""How often TPE's random start misses a categorical value: the first n draws of a space's categorical
parameters over many sampler seeds, through the same sampler and define-by-run function run_tune.py uses.

    python bench/startup_draws.py --space ebb --seeds 40 --draws 6
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from bmtard_ray.errors import BmtardError  # noqa: E402
from bmtard_ray.tuning.optuna_space import DefineByRun  # noqa: E402
from bmtard_ray.tuning.space import load_space  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="ebb")
    p.add_argument("--seeds", type=int, default=40, help="sampler seeds 0..N-1")
    p.add_argument("--draws", type=int, default=6, help="random start: the first draws of each seed")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.seeds < 1 or args.draws < 1:
        p.error("--seeds and --draws must be at least 1")
    try:
        space = load_space(args.space)
    except BmtardError as e:
        p.error(str(e))
    names = [q.key for q in space.params if q.kind == "categorical"]
    if not names:
        p.error(f"space {args.space} has no categorical parameter")
    print(f"| parameter | value | draws (of {args.seeds} seeds x {args.draws}) | seeds that never drew it |")
    print("|---|---|---:|---:|")
    for name in names:
        counts: Counter[str] = Counter()
        never: Counter[str] = Counter()
        choices = [str(c) for c in next(q for q in space.params if q.key == name).choices]
        for seed in range(args.seeds):
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=args.draws, constant_liar=True)
            study = optuna.create_study(direction="maximize", sampler=sampler)
            draw = DefineByRun(space, {})
            seen = []
            for _ in range(args.draws):
                trial = study.ask()
                draw(trial)
                seen.append(str(trial.params[name]))
                study.tell(trial, 0.0)
            counts.update(seen)
            never.update(c for c in choices if c not in seen)
        for c in choices:
            print(f"| {name} | {c} | {counts[c]} | {never[c]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
