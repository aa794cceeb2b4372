"""A known model: the standard (non-robust) CIFAR-10 ResNet-18 shipped in the pyautoattack wheel.

It is loaded through our checkpoint import (the path ``run_eval.py pyautoattack`` takes) and must score about
94% clean on the exact CIFAR-10 test pixels (the first 1,017 test images, which the offline copy this
project is developed with holds byte-exact) and about 0% under PGD-20 (eps 8/255): a wrong attack, a missing
normalisation, a transposed image layout or a mis-loaded checkpoint all break one of the two numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bmtard_ray.config import EvalConfig
from bmtard_ray.data import Split
from bmtard_ray.evaluation import evaluate
from bmtard_ray.models.files import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
N_EXACT = 1017
N_PGD = 200  # ResNet-18 PGD-20 on the CPU: ~200 images keep this test around a minute


def exact_cifar10_test() -> Split:
    data = SHARED / "data"
    assert (data / "cifar10_exact_prefix.npz").is_file(), f"{data} is missing: the tests need ../shared beside the repo"
    with np.load(data / "cifar10_exact_prefix.npz", allow_pickle=False) as z:
        images = z["test_exact"]  # (1017, 3072): CIFAR rows are the R, G, B planes, each 32x32 row-major
    with np.load(data / "cifar10_jpeg.npz", allow_pickle=False) as z:
        labels = z["test_labels"][:N_EXACT]
    assert images.shape == (N_EXACT, 3072)
    return Split(torch.from_numpy(images.reshape(N_EXACT, 3, 32, 32).copy()),
                 torch.from_numpy(labels.astype(np.int64)))


@pytest.mark.slow
def test_pyautoattack_resnet18_clean_and_pgd20() -> None:
    loaded = load_model("pyautoattack", None, 10, dataset="cifar10")
    assert loaded.arch == "resnet18" and loaded.record is None
    # channels_last: ~20% faster convolutions on the CPU, and the layout training runs use on the GPU.
    model = loaded.model.to(memory_format=torch.channels_last)
    split = exact_cifar10_test()

    clean = evaluate(model, split, EvalConfig(attacks=("clean",), batch_size=256))
    assert clean.n_examples == N_EXACT
    assert clean.accuracy["clean"] >= 92.0, clean.accuracy  # about 94 (93.8 on the full test set)

    res = evaluate(model, split, EvalConfig(attacks=("pgd_sat",), n_examples=N_PGD, batch_size=100, seed=0))
    assert res.n_examples == N_PGD
    assert res.accuracy["clean"] >= 88.0  # the stratified subset is as easy as the rest
    assert res.accuracy["pgd_sat"] <= 2.0, res.accuracy  # a standard model has no robustness: about 0
    assert res.w_robust["pgd_sat"] == (res.accuracy["clean"] + res.accuracy["pgd_sat"]) / 2
    assert res.meta["attack_params"]["pgd_sat"]["steps"] == 20
