"""Which device a run uses, and the precision the fast path runs at (shared by training and evaluation)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch

from bmtard_ray.errors import ConfigError


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device, fast: bool) -> Callable[[], AbstractContextManager[Any]]:
    """bf16 autocast on CUDA when ``fast``; fp32 otherwise (CPU autocast is slower than fp32 here)."""
    if fast and device.type == "cuda":
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return nullcontext
