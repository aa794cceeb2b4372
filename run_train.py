#!/usr/bin/env python
"""Train a student by B-MTARD or a baseline: `python run_train.py --help`."""
from bmtard_ray.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
