"""AutoAttack and Square from maintained packages, behind one small interface.

AutoAttack comes from the official ``autoattack`` package (fra31/auto-attack) when it is installed, else
from ``pyautoattack`` (PyPI), which carries the same reference attack code. torchattacks' AutoAttack is
never used: it runs 10 iterations instead of the standard 100, so its numbers are not AutoAttack numbers.
Square always comes from pyautoattack (the official package as a fallback).

Both packages seed the GLOBAL torch RNG inside their attacks; every call here runs under
``torch.random.fork_rng`` so that the caller's random state is the same before and after an evaluation.
Both also fail on non-contiguous inputs, so inputs are made contiguous here.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from bmtard_ray.errors import ConfigError

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
SQUARE_P_INIT = 0.8
_INSTALL_HINT = "install it with `pip install pyautoattack` (or the official fra31/auto-attack package)"


def _version(dist: str, module: Any) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


def autoattack_backend() -> tuple[str, str, Any]:
    """(package name, version, AutoAttack class): official ``autoattack`` first, else ``pyautoattack``."""
    for name in ("autoattack", "pyautoattack"):
        try:
            module = importlib.import_module(name)
            cls = module.AutoAttack
        except (ImportError, AttributeError):
            continue
        return name, _version(name, module), cls
    raise ConfigError(f"attack 'autoattack' needs an AutoAttack package: {_INSTALL_HINT}")


def square_backend() -> tuple[str, str, Any]:
    """(package name, version, SquareAttack class): ``pyautoattack`` first, else the official package."""
    for name in ("pyautoattack", "autoattack"):
        try:
            module = importlib.import_module(name)
            cls = importlib.import_module(f"{name}.square").SquareAttack
        except (ImportError, AttributeError):
            continue
        return name, _version(name, module), cls
    raise ConfigError(f"attack 'square' needs the pyautoattack package: {_INSTALL_HINT}")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without requires_grad while a package attacks: FAB calls ``.backward()``, which would
    otherwise leave ``.grad`` on the model's parameters (and cost a weight-gradient computation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def _private_rng(device: torch.device) -> Iterator[None]:
    """Let the packages reseed the global RNG without changing the caller's random state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class AutoAttackRunner:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) with a fixed seed, batch by batch."""

    def __init__(self, model: nn.Module, *, eps: float, version: str = "standard", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if version not in AUTOATTACK_VERSIONS:
            raise ConfigError(f"unknown AutoAttack version '{version}'; choose one of: "
                              f"{', '.join(AUTOATTACK_VERSIONS)}")
        self.backend, self.backend_version, cls = autoattack_backend()
        self.device = torch.device(device)
        self.version = version
        self.model = model
        if self.backend == "autoattack":  # official API: verbose and log_path in the constructor
            self.adversary = cls(model, norm="Linf", eps=eps, version=version, seed=seed, verbose=False,
                                 device=self.device)
        else:
            self.adversary = cls(model, norm="Linf", eps=eps, version=version, seed=seed, device=self.device)
            self.adversary.verbose = False
        self.attacks_run = list(self.adversary.attacks_to_run)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = x.detach().contiguous(), y.contiguous()
        # The packages' sanity checks (randomised defence, zero gradients) log warnings: left visible.
        with _private_rng(self.device), _frozen(self.model):
            if self.backend == "autoattack":
                out = self.adversary.run_standard_evaluation(x, y, bs=len(x))
            else:
                out = self.adversary.run_standard_evaluation(x, y, batch_size=len(x))
        # pyautoattack returns (x_adv, y_adv); the official package x_adv (or a tuple with return_labels).
        x_adv = out[0] if isinstance(out, (tuple, list)) else out
        return x_adv.detach().to(x.device)

    def params(self) -> dict[str, Any]:
        return {"version": self.version, "attacks": self.attacks_run, "backend": self.backend,
                "backend_version": self.backend_version}


class SquareRunner:
    """Square attack (L-inf, margin loss, one restart) with a query budget and a fixed seed."""

    def __init__(self, model: nn.Module, *, eps: float, queries: int, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if queries < 1:
            raise ConfigError(f"square_queries must be >= 1, got {queries}")
        self.backend, self.backend_version, cls = square_backend()
        self.device = torch.device(device)
        self.queries = queries
        # resc_schedule=True: the schedule of square sizes is stretched to the budget (the package's default
        # for a standalone Square; AutoAttack's own Square runs 5000 queries without rescaling).
        self.attack = cls(model, norm="Linf", n_queries=queries, eps=eps, p_init=SQUARE_P_INIT, n_restarts=1,
                          seed=seed, verbose=False, loss="margin", resc_schedule=True, device=self.device)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        x, y = x.detach().contiguous(), y.contiguous()
        with _private_rng(self.device), torch.no_grad():
            x_adv = self.attack.perturb(x, y)  # queries only: no gradient anywhere
        return x_adv.detach().to(x.device)

    def params(self) -> dict[str, Any]:
        return {"queries": self.queries, "p_init": SQUARE_P_INIT, "loss": "margin", "restarts": 1,
                "rescaled_schedule": True, "backend": self.backend, "backend_version": self.backend_version}

