#!/usr/bin/env python
"""Evaluate a checkpoint under the paper's attacks and write reports: `python run_eval.py --help`."""
from bmtard_ray.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
