"""Checkpoint files in the safetensors format (``.safetensors``): what Hugging Face and timm publish.

A safetensors file is an 8-byte little-endian header length, a JSON header and the raw tensors; it holds
tensors only (no pickled code), so it is safe to read. :mod:`bmtard_ray.models.files` reads it through
the same loader as PyTorch files, for every architecture.
"""
from __future__ import annotations

import struct
from pathlib import Path

import torch

from bmtard_ray.errors import CheckpointError

SUFFIX = ".safetensors"


def is_safetensors(path: Path, head: bytes) -> bool:
    """By name, or by content: a plausible header length followed by a JSON object."""
    if path.suffix.lower() == SUFFIX:
        return True
    if len(head) < 10 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 2 <= size < 100_000_000


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` on the CPU; a damaged file is a one-line CheckpointError."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"checkpoint {path} is a safetensors file: pip install 'safetensors>=0.4' to read "
                              f"it") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors' SafetensorError, or an OSError
        text = " ".join(str(exc).split())
        text = text if len(text) <= 120 else text[:117] + "..."
        raise CheckpointError(f"checkpoint {path} is a truncated or corrupt safetensors file (an incomplete "
                              f"download?): {text or type(exc).__name__}") from None
