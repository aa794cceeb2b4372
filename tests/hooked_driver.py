"""``run_train.py`` as a subprocess with a worker hook (tests/faults.py), for tests that need the driver in a
process of its own (one that kills the head it is connected to) and a paced run.

    python tests/hooked_driver.py '<hook as JSON>' <run_train.py arguments>
"""
from __future__ import annotations

import json
import sys
from typing import Any


def main() -> int:
    hook = json.loads(sys.argv[1])
    import bmtard_ray.ray_train as ray_train
    from bmtard_ray.cli.train import main as train_main

    real_run_ray = ray_train.run_ray

    def run_ray(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return real_run_ray(*args, **kwargs, worker_hook=hook)

    ray_train.run_ray = run_ray  # cli/train.py imports it from the package when it runs
    return train_main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
