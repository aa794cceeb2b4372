"""Mid-epoch checkpoints (issue 15): a restart (a failure, an elastic resize, a preemption) redoes only the
batches after the last checkpoint, and a run restored from one continues exactly as if it had never stopped.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from bmtard_ray.config import build_config
from bmtard_ray.data import DataBundle, DatasetInfo, Split
from bmtard_ray.errors import ConfigError
from bmtard_ray.models import build_model
from bmtard_ray.storage.checkpoints import folder_name
from bmtard_ray.training.trainer import Trainer

K = 10
INFO = DatasetInfo("cifar10", K, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _data() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (80, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(80) % K)
    return DataBundle(split, split.subset(torch.arange(16)), split.subset(torch.arange(16)), INFO)


def _trainer(folder: Path, *overrides: str, **kwargs: Any) -> Trainer:
    args = ["student=tiny_cnn", "attack.steps=1", "optim.batch_size=16", "optim.epochs=2", "optim.milestones=[1]",
            "val_every=0", f"output_dir={folder}", "device=cpu", "data.augment=true", *overrides]
    for role in ("clean", "robust"):
        path = folder / f"{role}.pt"
        if not path.exists():
            torch.manual_seed(len(role))
            torch.save(build_model("tiny_cnn", K).state_dict(), path)
        args += [f"teachers.{role}.arch=tiny_cnn", f"teachers.{role}.checkpoint={path}"]
    return Trainer(build_config("smoke", overrides=args), data=_data(), device=torch.device("cpu"), **kwargs)


def _saved(state: dict[str, Any] | None) -> dict[str, Any] | None:
    if state is None:
        return None
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _result(trainer: Trainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.cat(trainer.state.trace), {k: v.clone() for k, v in trainer.student.state_dict().items()}


def _same(a: tuple[torch.Tensor, dict[str, torch.Tensor]], b: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    # Bit for bit: the same process, the same batches, the restored RNG, optimizer and balance state.
    assert torch.equal(a[0].nan_to_num(-1), b[0].nan_to_num(-1))
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_a_run_restored_mid_epoch_continues_bit_for_bit(tmp_path: Path) -> None:
    whole = _trainer(tmp_path)
    whole.fit()
    reports: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    # Serialised at once, as the runners do (the state dict holds references to the live tensors).
    timed = _trainer(tmp_path, "checkpoint_every_iters=2", report=lambda m, c: reports.append((m, _saved(c))))
    timed.fit()
    _same(_result(whole), _result(timed))  # checkpointing changes nothing
    # 5 batches per epoch: mid-epoch checkpoints after batches 2 and 4 of each epoch, then the epoch's own.
    kinds = [(m.get("epoch"), m.get("partial_epoch"), m.get("batches")) for m, _ in reports]
    assert kinds == [(None, 1, 2), (None, 1, 4), (1, None, None), (None, 2, 2), (None, 2, 4), (2, None, None)]
    assert [m["iteration"] for m, _ in reports if "iteration" in m] == [2, 4, 7, 9]
    # Restore from each mid-epoch checkpoint into a fresh trainer: the same run to the last bit.
    for metrics, state in reports:
        if "partial_epoch" in metrics:
            restored = _trainer(tmp_path)
            restored.load_state_dict(state)
            assert restored.state.partial is not None and restored.state.partial.batches == metrics["batches"]
            restored.fit()
            _same(_result(whole), _result(restored))
            assert [h["epoch"] for h in restored.state.history] == [1, 2]  # every epoch once
    assert folder_name(1, 2) == "checkpoint_epoch0001_batch00002"
    assert sorted([folder_name(2), folder_name(1, 4), folder_name(1)]) == [
        "checkpoint_epoch0001", "checkpoint_epoch0001_batch00004", "checkpoint_epoch0002"]


def test_checkpoint_now_reports_at_once(tmp_path: Path) -> None:
    calls = iter(range(100))
    reports: list[dict[str, Any]] = []
    trainer = _trainer(tmp_path, "optim.epochs=1", report=lambda m, c: reports.append(m),
                       checkpoint_now=lambda: next(calls) == 2)  # e.g. a preemption notice after the third batch
    trainer.fit()
    assert [r.get("partial_epoch") for r in reports] == [1, None]
    assert reports[0]["batches"] == 3


def test_checkpoint_every_iters_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every"):
        build_config("smoke", overrides=["checkpoint_every_iters=-1"])
