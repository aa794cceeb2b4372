"""The clean teacher's logit cache (issue 17): a run that reads the cache computes bit for bit what a run
without it computes, runs of other methods on the same seed read every batch from it, and a damaged entry is
recomputed rather than trusted."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_mid_epoch import _trainer  # the mid-epoch tests' runs: 80 synthetic images, batch 16, 2 epochs

from bmtard_ray.errors import ConfigError
from bmtard_ray.models import build_model
from bmtard_ray.training.logit_cache import CachedTeacher, batch_digest
from bmtard_ray.training.trainer import Trainer

K = 10


def _fit(trainer: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.fit()
    return torch.cat(trainer.state.trace), {k: v.clone() for k, v in trainer.student.state_dict().items()}


def test_cached_runs_equal_uncached_and_share_batches_across_methods(tmp_path: Path) -> None:
    cache = tmp_path / "logits"
    plain = _fit(_trainer(tmp_path))
    filling = _trainer(tmp_path, f"teachers.logit_cache={cache}")
    filled = _fit(filling)
    assert filling.teachers.clean.misses == 10 and filling.teachers.clean.hits == 0  # 2 epochs x 5 batches
    reading = _trainer(tmp_path, f"teachers.logit_cache={cache}")
    read = _fit(reading)
    assert reading.teachers.clean.hits == 10 and reading.teachers.clean.misses == 0
    for run in (filled, read):
        assert torch.equal(plain[0].nan_to_num(-1), run[0].nan_to_num(-1))
        assert all(torch.equal(plain[1][k], run[1][k]) for k in plain[1])
    # Another balance on the same seed sees the same natural batches: all hits.
    other = _trainer(tmp_path, f"teachers.logit_cache={cache}", "ebb.mode=solve")
    other.fit()
    assert other.teachers.clean.hits == 10 and other.teachers.clean.misses == 0
    # Another seed draws other batches (order, crops): nothing to reuse.
    reseeded = _trainer(tmp_path, f"teachers.logit_cache={cache}", "seed=1")
    reseeded.fit()
    assert reseeded.teachers.clean.hits == 0


def test_other_teacher_weights_do_not_share_entries(tmp_path: Path) -> None:
    x = torch.rand(4, 3, 16, 16)
    a, b = build_model("tiny_cnn", K).eval(), build_model("tiny_cnn", K).eval()
    ca, cb = CachedTeacher(a, tmp_path), CachedTeacher(b, tmp_path)
    assert ca.folder != cb.folder and ca.folder.name.endswith("-cpu")  # one folder per teacher and device type
    with torch.no_grad():
        assert torch.equal(ca(x), a(x)) and torch.equal(cb(x), b(x))
        assert torch.equal(ca(x), a(x)) and ca.hits == 1
    # The key follows the values, not the memory layout.
    assert batch_digest(x) == batch_digest(x.to(memory_format=torch.channels_last))
    assert batch_digest(x) != batch_digest(x + 1e-7)
    assert batch_digest(x) != batch_digest(x.bfloat16())  # any dtype hashes, and the dtype is in the key


def test_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    model = build_model("tiny_cnn", K).eval()
    cached = CachedTeacher(model, tmp_path)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        want = cached(x)
        entry = cached.folder / f"{batch_digest(x)}.pt"
        entry.write_bytes(entry.read_bytes()[:20])  # truncated
        again = CachedTeacher(model, tmp_path)
        assert torch.equal(again(x), want) and again.misses == 1
        assert torch.equal(CachedTeacher(model, tmp_path)(x), want)  # replaced by a whole entry


def test_unwritable_cache_folder_is_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="teachers.logit_cache"):
        CachedTeacher(build_model("tiny_cnn", K), blocker / "logits")
