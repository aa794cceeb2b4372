"""Data: datasets as uint8 tensors (:mod:`.datasets`; the user's own image folders and .npz files:
:mod:`.references`, streamed from a memory-mapped cache past the memory budget: :mod:`.disk_cache`), what a
split is (:mod:`.store`), seeded class-balanced splits (:mod:`.splits`), crop and flip on the device
(:mod:`.augment`), the loaders (:mod:`.loaders`) and a run's splits (:mod:`.bundle`).
The names below are the package's public face."""
from __future__ import annotations

from bmtard_ray.data.bundle import DataBundle, prepare_data
from bmtard_ray.data.datasets import DatasetInfo, Split, dataset_folder, dataset_info, load_dataset, num_classes
from bmtard_ray.data.loaders import BatchLoader, make_reference_loader
from bmtard_ray.data.splits import stratified_subset, train_val_split

__all__ = ["BatchLoader", "DataBundle", "DatasetInfo", "Split", "dataset_folder", "dataset_info", "load_dataset",
           "make_reference_loader", "num_classes", "prepare_data", "stratified_subset", "train_val_split"]
