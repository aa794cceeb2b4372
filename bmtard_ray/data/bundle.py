"""A run's data: the splits a configuration trains, validates and tests on."""
from __future__ import annotations

from dataclasses import dataclass

from bmtard_ray.config import RunConfig, data_cache_dir
from bmtard_ray.data.datasets import DatasetInfo, Split, load_dataset
from bmtard_ray.data.splits import stratified_subset, train_val_split
from bmtard_ray.errors import ConfigError


@dataclass
class DataBundle:
    train: Split
    val: Split
    test: Split
    info: DatasetInfo


def prepare_data(cfg: RunConfig) -> DataBundle:
    """Load the dataset, carve the validation split from the training set, apply the CPU-preset subsets."""
    d = cfg.data
    train, test, info = load_dataset(d.dataset, d.root, download=d.download, image_size=d.image_size,
                                     memory_budget_mb=d.memory_budget_mb, cache_dir=data_cache_dir(cfg))
    if d.val_size >= len(train):
        raise ConfigError(f"data.val_size ({d.val_size}) must be smaller than the training set ({len(train)} "
                          f"images): set a smaller one, e.g. --set data.val_size={len(train) // 10}")
    train, val = train_val_split(train, d.val_size, d.split_seed)
    if d.train_subset is not None and d.train_subset < len(train):
        train = stratified_subset(train, d.train_subset, d.split_seed)
    if d.test_subset is not None and d.test_subset < len(test):
        test = stratified_subset(test, d.test_subset, d.split_seed)
    return DataBundle(train, val, test, info)
