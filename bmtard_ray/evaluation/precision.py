"""True float32 arithmetic while evaluating: TF32 off for cuDNN convolutions and CUDA matmuls.

PyTorch lets cuDNN run float32 convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32`` is
True), and a training script may allow it for matmuls too (the fast path's users often do). TF32 keeps 10
mantissa bits, so a "float32" evaluation on an Ampere or Hopper GPU would otherwise carry errors of about
1e-3 relative in every layer: enough to move attack gradients' signs and accuracies near the decision
boundary. Evaluation runs inside :func:`true_fp32`, which turns TF32 off and gives every flag its previous
value back afterwards (also after an error), so a training loop that evaluates between epochs keeps its
own settings. On a CPU the flags change nothing.

Only the flags that exist in every torch this project supports are used (the legacy ``allow_tf32``
switches and the float32 matmul precision), not the newer per-backend ``fp32_precision`` settings, so that
one API family sets and restores them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TF32Flags:
    cudnn_allow_tf32: bool
    matmul_allow_tf32: bool
    matmul_precision: str  # torch.get_float32_matmul_precision(): "highest", "high" or "medium"


def tf32_flags() -> TF32Flags:
    """The current TF32-related settings."""
    return TF32Flags(torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                     torch.get_float32_matmul_precision())


def _apply(flags: TF32Flags) -> None:
    # The precision first: setting it rewrites matmul.allow_tf32, which is then set to its own value.
    torch.set_float32_matmul_precision(flags.matmul_precision)
    torch.backends.cuda.matmul.allow_tf32 = flags.matmul_allow_tf32
    torch.backends.cudnn.allow_tf32 = flags.cudnn_allow_tf32


@contextmanager
def true_fp32() -> Iterator[TF32Flags]:
    """float32 convolutions and matmuls in full float32 inside; the previous flags restored on exit."""
    previous = tf32_flags()
    _apply(TF32Flags(cudnn_allow_tf32=False, matmul_allow_tf32=False, matmul_precision="highest"))
    try:
        yield previous
    finally:
        _apply(previous)
