"""Random crop (zero padding) and horizontal flip of a uint8 batch on its own device, in one gather.

The parameters are drawn separately from the images (:func:`crop_params`), so that a loader can draw a
whole epoch's on the CPU and move them once (:func:`epoch_crop_params`): the same seed then gives the
same crops on every device.
"""
from __future__ import annotations

import torch
from torch import Tensor

CROP_PADDING = 4  # the standard CIFAR recipe (and the paper's): RandomCrop(32, padding=4) + flip


def crop_flip(x: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, pad: int = CROP_PADDING) -> Tensor:
    """Image i of the output is the (H, W) window at column ``dx[i]``, row ``dy[i]`` of ``x[i]`` zero-padded
    by ``pad`` on every side, mirrored left-right where ``flip[i]``. One gather for the whole batch."""
    n, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = dy.to(dev).view(n, 1) + torch.arange(h, device=dev).view(1, h)                       # (n, h)
    cols = torch.arange(w, device=dev).view(1, w).expand(n, w)
    cols = torch.where(flip.to(dev).view(n, 1), w - 1 - cols, cols) + dx.to(dev).view(n, 1)     # (n, w)
    # Advanced indexing broadcasts to (n, c, h, w): every image reads its own window of the padded batch.
    return padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def crop_params(generator: torch.Generator, n: int, pad: int = CROP_PADDING) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dy, flip) for ``n`` images, drawn in that order on the generator's device."""
    dev = generator.device
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.randint(0, 2, (n,), generator=generator, device=dev).bool()
    return dx, dy, flip


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = CROP_PADDING) -> Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip; randomness from ``generator``
    (on any device: the parameters are moved to ``x``'s)."""
    return crop_flip(x, *crop_params(generator, x.shape[0], pad), pad)


def epoch_crop_params(generator: torch.Generator, sizes: list[int], device: torch.device,
                      pad: int = CROP_PADDING) -> Tensor:
    """The crop parameters of a whole epoch as one (3, sum(sizes)) int64 tensor on ``device`` (rows dx, dy,
    flip), drawn batch by batch exactly as :func:`augment_batch` would draw them for batches of ``sizes``.

    Drawing on a CPU generator makes the crops a function of the seed alone, the same on every device (a
    CUDA generator draws another stream), and moving them once costs the epoch one small host-to-device
    copy instead of one per batch."""
    drawn = [torch.stack([t.long() for t in crop_params(generator, n, pad)]) for n in sizes]
    params = torch.cat(drawn, dim=1) if drawn else torch.zeros(3, 0, dtype=torch.long)
    return params.to(device)
