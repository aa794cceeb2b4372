#!/usr/bin/env python
"""Search B-MTARD's balance with Optuna inside Ray Tune, each trial a Ray Train run: `python run_tune.py --help`."""
from bmtard_ray.cli.tune import main

if __name__ == "__main__":
    raise SystemExit(main())
