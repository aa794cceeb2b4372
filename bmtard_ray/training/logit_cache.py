"""A disk cache of a frozen teacher's outputs, keyed by the exact bytes of the batch it was given.

Why: the clean teacher only ever sees natural batches, and the loader draws those (order, crops, flips) from
the seed and epoch alone (``data.BatchLoader``), so every run that shares the seed and the data settings
feeds the clean teacher the very same batches, whatever its method or balance. A study that trains many arms
on one seed pays for the clean teacher's forward passes once (for a ResNet-18 teacher on a 2-core CPU they
cost as much as the rest of the step). Adversarial batches are crafted against each run's own student and
never repeat, so the robust teacher is not cached.

The key is a hash of the teacher's weights, the batch's values, shape and dtype, and the autocast state;
a hit returns the very tensor the teacher computed for that batch, so a cached run computes bit for bit
what an uncached one does (``tests/test_logit_cache.py``). Entries are written atomically (``io``), so an
interrupted run leaves whole entries or none; an unreadable entry is recomputed and replaced.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.models.refs import normalization_of
from bmtard_ray.names import is_model_ref
from bmtard_ray.runtime import fileio


def _bytes(t: Tensor) -> bytes:
    """A tensor's values in logical (NCHW) order whatever its memory format; any dtype, bfloat16 included."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name and values: which teacher this is. A model named by
    reference (``timm:<name>``, ``<module>:<callable>``) adds its full name and input normalisation, so two
    references never share an entry (the built-in names keep the keys they always had)."""
    h = hashlib.blake2b(digest_size=16)
    arch = getattr(model, "arch_name", None)
    if is_model_ref(arch):
        h.update(f"arch={arch}|normalization={normalization_of(model)}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(_bytes(t))
    return h.hexdigest()


def batch_digest(x: Tensor) -> str:
    """A hash of a batch's values, shape, dtype and autocast state."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{tuple(x.shape)}|{x.dtype}|{torch.is_autocast_enabled(x.device.type)}".encode())
    h.update(_bytes(x))
    return h.hexdigest()


class CachedTeacher(nn.Module):
    """Wraps a frozen teacher; ``forward`` reads the output from ``folder`` or computes and stores it.

    Entries live in one folder per teacher and device type: the same teacher's logits differ in their last
    bits between a CPU and a GPU, and a run must get what its own device computes. On a GPU each step copies
    the batch to the host to hash it (a synchronisation): the cache is for CPU-bound studies."""

    def __init__(self, teacher: nn.Module, folder: str | Path) -> None:
        super().__init__()
        self.teacher = teacher
        device = next(teacher.parameters()).device.type
        self.folder = Path(folder) / f"{weights_digest(teacher)}-{device}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"teachers.logit_cache: cannot create {self.folder} ({exc.strerror or exc})") from exc
        self.hits = 0
        self.misses = 0

    def forward(self, x: Tensor) -> Tensor:
        path = self.folder / f"{batch_digest(x)}.pt"
        if path.is_file():
            try:
                out = fileio.safe_load(path, "teacher logit cache entry")
                if isinstance(out, Tensor) and out.shape[0] == x.shape[0]:
                    self.hits += 1
                    return out.to(x.device)
            except CheckpointError:
                pass  # unreadable: recomputed and replaced below
        out = self.teacher(x)
        fileio.atomic_torch_save(out.detach().cpu(), path)
        self.misses += 1
        return out
