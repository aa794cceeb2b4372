"""A model's train/eval mode, switched for a while: the attacks (training and evaluation) run in eval mode."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch to eval mode and restore the previous mode, whatever it was."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
