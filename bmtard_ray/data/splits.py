"""Deterministic, class-balanced subsets: the validation split carved from the training set (tuning never
sees the test set) and the stratified subsets of the CPU presets and evaluations."""
from __future__ import annotations

import torch
from torch import Tensor

from bmtard_ray.data.datasets import Split
from bmtard_ray.errors import ConfigError


def _balanced_quota(counts: Tensor, n: int, order: Tensor) -> Tensor:
    """How many of each class to take: ``n`` in all, as equal as the class sizes allow (water filling).

    Classes too small for their share give it up to the others; the last few that cannot be split evenly
    go to classes in ``order`` (a seeded permutation, so no class is always favoured).
    """
    quota = torch.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = (quota < counts).nonzero().squeeze(1)
        share = remaining // len(open_)
        if share == 0:
            ranked = order[torch.isin(order, open_)]
            quota[ranked[:remaining]] += 1
            break
        add = torch.minimum(counts[open_] - quota[open_], torch.tensor(share))
        quota[open_] += add
        remaining -= int(add.sum())
    return quota


def _stratified_indices(labels: Tensor, n: int, seed: int) -> Tensor:
    """``n`` sorted indices with (as far as possible) equal counts per class, picked by a seeded permutation."""
    labels = labels.cpu()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    # Group the permutation by class while keeping its random order inside each class.
    by_class = perm[torch.argsort(labels[perm], stable=True)]
    _, counts = torch.unique_consecutive(labels[by_class], return_counts=True)
    quota = _balanced_quota(counts, n, torch.randperm(len(counts), generator=g))
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - torch.repeat_interleave(starts, counts)
    return by_class[rank_in_class < torch.repeat_interleave(quota, counts)].sort().values


def stratified_subset(split: Split, n: int, seed: int) -> Split:
    """A class-balanced subset of ``n`` examples (the whole split when ``n >= len(split)``)."""
    if n < 0:
        raise ConfigError(f"subset size must be >= 0, got {n}")
    if n >= len(split):
        return split
    return split.subset(_stratified_indices(split.labels, n, seed).to(split.labels.device))


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """(rest of train, val): a stratified validation split carved from the training set, so that tuning
    never sees the test set. Deterministic for a given seed."""
    if val_size < 0 or val_size >= len(train):
        raise ConfigError(f"val_size must be in [0, {len(train)}) (the training set's size), got {val_size}")
    if val_size == 0:
        return train, train.subset(torch.zeros(0, dtype=torch.long))
    val_idx = _stratified_indices(train.labels, val_size, seed)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    dev = train.labels.device
    return train.subset(keep.nonzero().squeeze(1).to(dev)), train.subset(val_idx.to(dev))
