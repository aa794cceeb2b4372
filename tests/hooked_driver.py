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
    from bmtard_ray.cli import train_main

    def run_from_args(cfg: Any, args: Any) -> dict[str, Any]:
        scaling = ray_train.scaling_from_args(args)
        return ray_train.run_ray(cfg, scaling, address=args.address, storage_path=args.storage_path,
                                 resume=args.resume, overwrite=args.overwrite, failure_max=args.max_failures,
                                 keep_checkpoints=args.keep_checkpoints, worker_hook=hook)

    ray_train.run_from_args = run_from_args  # train_main imports it from the package when it runs
    return train_main(sys.argv[2:])


if __name__ == "__main__":
    raise SystemExit(main())
