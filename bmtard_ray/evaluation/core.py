"""Robustness evaluation: every attack of docs/algorithm.md §8, W-Robust accuracy, seeded and deterministic.

``evaluate(model, split, cfg)`` runs the attacks named in ``cfg.attacks`` (L-inf, eps ``cfg.eps``, fp32 with
TF32 off (:mod:`bmtard_ray.evaluation.precision`), model in eval mode, inputs in [0, 1]) over the split
batch by batch and returns an :class:`EvalResult` with accuracies and W-Robust = (clean + robust) / 2 in
percent. Training runs call it at the end (and on the validation subset every epoch); ``run_eval.py``
calls it for any checkpoint.

Robust accuracy is the accuracy of the model on the attacked images, as the released code and RobustBench
count it (an image misclassified when clean usually stays misclassified). Clean accuracy is always measured,
because every W-Robust needs it.

Determinism: every attack with a random start gets its own ``torch.Generator`` seeded from (seed, attack),
so an attack's numbers do not depend on which other attacks ran or in what order; AutoAttack and Square get
``seed`` and reseed their own RNG per batch. Same checkpoint, seed, examples and batch size -> same numbers
(on CUDA up to the non-determinism of cuDNN's backward kernels).
"""
from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bmtard_ray.data import Split, stratified_subset
from bmtard_ray.errors import ConfigError
from bmtard_ray.evaluation.attacks import CW_CONFIDENCE, fgsm, pgd
from bmtard_ray.evaluation.precision import true_fp32
from bmtard_ray.names import ATTACK_NAMES, BLACK_BOX

if TYPE_CHECKING:
    from bmtard_ray.config import EvalConfig


# Gradient attacks of docs/algorithm.md §8.2. step_size None means "eps" (FGSM is one full-size step).
PGD_ATTACKS: dict[str, dict[str, Any]] = {
    "fgsm": {"steps": 1, "step_size": None, "random_start": False, "loss": "ce"},
    "pgd_sat": {"steps": 20, "step_size": 2 / 255, "random_start": True, "loss": "ce"},
    "pgd_trades": {"steps": 20, "step_size": 0.003, "random_start": True, "loss": "ce"},
    "cw_inf": {"steps": 30, "step_size": 2 / 255, "random_start": True, "loss": "cw"},
}
PGD_ATTACKS["bb_pgd"] = dict(PGD_ATTACKS["pgd_sat"])
PGD_ATTACKS["bb_cw"] = dict(PGD_ATTACKS["cw_inf"])


def w_robust(clean_acc: float, robust_acc: float) -> float:
    """Weighted robust accuracy (docs/algorithm.md §8.5): the mean of clean and robust accuracy, in their unit."""
    return (clean_acc + robust_acc) / 2


def eps_label(eps: float) -> str:
    """``8/255`` for a multiple of 1/255 (how RobustBench and papers write it), else the plain number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255" if round(k) else "0"
    return f"{eps:g}"


@dataclass
class EvalResult:
    accuracy: dict[str, float]          # percent, per attack name (clean included)
    w_robust: dict[str, float]          # per non-clean attack: (clean + robust) / 2
    n_examples: int
    seconds: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def headline(self, name: str) -> float:
        """W-Robust of attack ``name`` (the run's objective when it is ``cfg.headline``)."""
        if name not in self.w_robust:
            have = ", ".join(self.w_robust) or "none"
            raise ConfigError(f"headline attack '{name}' was not evaluated; evaluated attacks with a W-Robust: {have}")
        return self.w_robust[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attack_params(name: str, cfg: EvalConfig) -> dict[str, Any]:
    """The parameters an attack runs with (recorded in every report)."""
    if name == "clean":
        return {}
    if name in PGD_ATTACKS:
        spec = PGD_ATTACKS[name]
        out: dict[str, Any] = {"eps": cfg.eps, "steps": spec["steps"],
                               "step_size": cfg.eps if spec["step_size"] is None else spec["step_size"],
                               "start": "uniform" if spec["random_start"] else "none", "loss": spec["loss"]}
        if spec["loss"] == "cw":
            out["confidence"] = CW_CONFIDENCE
        if name in BLACK_BOX:
            out["crafted_on"] = "source model (robust teacher)"
        return out
    if name == "autoattack":
        return {"eps": cfg.eps, "version": cfg.autoattack_version}
    if name == "square":
        return {"eps": cfg.eps, "queries": cfg.square_queries}
    raise ConfigError(f"unknown attack '{name}'; choose from: {', '.join(ATTACK_NAMES)}")


def check_attacks(cfg: EvalConfig, *, has_source: bool) -> list[str]:
    """The attacks to run in order (clean first, duplicates dropped), or a ConfigError naming the problem."""
    names = list(cfg.attacks)
    for a in names:
        if a not in ATTACK_NAMES:
            raise ConfigError(f"unknown attack '{a}'; choose from: {', '.join(ATTACK_NAMES)}")
    bb = [a for a in names if a in BLACK_BOX]
    if bb and not has_source:
        raise ConfigError(f"black-box attacks ({', '.join(bb)}) need a source model (the robust teacher); "
                          f"pass source_model / --source-checkpoint or drop them")
    if not (isinstance(cfg.eps, (int, float)) and math.isfinite(cfg.eps) and cfg.eps >= 0):
        raise ConfigError(f"eps must be a finite number >= 0, got {cfg.eps!r}")
    if cfg.batch_size < 1:
        raise ConfigError(f"eval batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.n_examples is not None and cfg.n_examples < 1:
        raise ConfigError(f"n_examples must be positive or None, got {cfg.n_examples}")
    if "square" in names and cfg.square_queries < 1:
        raise ConfigError(f"square_queries must be >= 1, got {cfg.square_queries}")
    if "autoattack" in names or "square" in names:  # a missing package is found before anything runs
        from bmtard_ray.evaluation.autoattack import AUTOATTACK_VERSIONS, autoattack_backend, square_backend

        if "autoattack" in names:
            if cfg.autoattack_version not in AUTOATTACK_VERSIONS:
                raise ConfigError(f"unknown AutoAttack version '{cfg.autoattack_version}'; choose one of: "
                                  f"{', '.join(AUTOATTACK_VERSIONS)}")
            autoattack_backend()
        if "square" in names:
            square_backend()
    ordered = ["clean"] + [a for a in names if a != "clean"]
    return list(dict.fromkeys(ordered))


# A black-box attack draws the random starts of the white-box attack it transfers, so with the student
# itself as the source it reproduces that attack's numbers exactly (a check that the wiring is right).
_SEED_OF = {"bb_pgd": "pgd_sat", "bb_cw": "cw_inf"}


def _attack_seed(seed: int, name: str) -> int:
    # A distinct, fixed stream per (seed, attack): adding or reordering attacks changes no other numbers.
    return (seed * 1_000_003 + 7919 * (ATTACK_NAMES.index(_SEED_OF.get(name, name)) + 1)) % (2 ** 63)


@contextmanager
def _eval_modes(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode for every model given; each gets its own previous mode back, even after an error."""
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(present, modes, strict=False):
            m.train(was)


def _check_device(model: nn.Module, device: torch.device, what: str) -> None:
    p = next(model.parameters(), None)
    if p is None:
        return
    if p.device.type != device.type or (device.index is not None and p.device.index != device.index):
        raise ConfigError(f"the {what} is on {p.device} but evaluation runs on {device}: move it there first")
    if p.dtype != torch.float32:
        raise ConfigError(f"the {what} has {p.dtype} weights; evaluation runs in float32 (call .float())")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


class _Progress:
    """A rich progress bar over batches, one line per attack; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.bar = Progress(TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, name: str, total: int) -> Callable[[], None]:
        if self.bar is None:
            return lambda: None
        bar = self.bar
        tid = bar.add_task(name, total=total)
        return lambda: bar.advance(tid)


def evaluate(model: nn.Module, split: Split, cfg: EvalConfig, *, device: torch.device | str = "cpu",
             source_model: nn.Module | None = None, progress: bool = False) -> EvalResult:
    """Accuracy (percent) of ``model`` under each attack of ``cfg.attacks`` on ``split``.

    ``model`` (and ``source_model``, the robust teacher for bb_pgd / bb_cw) must already be on ``device``;
    the data is moved there batch by batch. Both run in eval mode and get their previous mode back.
    """
    names = check_attacks(cfg, has_source=source_model is not None)
    device = torch.device(device)
    _check_device(model, device, "model")
    if source_model is not None and any(a in BLACK_BOX for a in names):
        _check_device(source_model, device, "source model")
    split_size = len(split)
    if cfg.n_examples is not None and cfg.n_examples < split_size:
        split = stratified_subset(split, cfg.n_examples, cfg.seed)  # seeded, equal counts per class
    n = len(split)
    if n == 0:
        raise ConfigError("nothing to evaluate: the split holds no examples")

    # A resident split moves to the device once (uint8: 4x smaller than float); a streamed one is read from
    # disk batch by batch, never whole.
    images = None if split.is_streamed else split.images.to(device)
    labels = split.labels.to(device=device, dtype=torch.long)
    bs = cfg.batch_size
    batches = [(i, min(i + bs, n)) for i in range(0, n, bs)]

    def batch(i: int, j: int) -> tuple[Tensor, Tensor]:
        x = images[i:j] if images is not None else split.read_range(i, j).to(device)
        # float32 in [0, 1], contiguous (AutoAttack and Square fail on non-contiguous inputs).
        return x.float().div_(255).contiguous(), labels[i:j]

    accuracy: dict[str, float] = {}
    seconds: dict[str, float] = {}
    params = {a: attack_params(a, cfg) for a in names}
    backends: dict[str, Any] = {}
    # fp32 even if the caller runs under bf16 autocast (training loops do), and true fp32: TF32 off for
    # cuDNN and matmuls while evaluating (cuDNN allows TF32 by default); the caller's flags come back after.
    no_autocast = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else nullcontext()
    with _eval_modes(model, source_model), no_autocast, true_fp32(), _Progress(progress) as bar:
        for name in names:
            start = time.perf_counter()
            attack = _make_attack(name, model, source_model, cfg, device)
            if hasattr(attack, "params"):  # the reference implementations' runners (autoattack.py)
                runner: Any = attack
                params[name] = {**params[name], **runner.params()}
                backends[name] = {"package": runner.backend, "version": runner.backend_version}
            step = bar.task(name, len(batches))
            correct = torch.zeros((), dtype=torch.long, device=device)
            for i, j in batches:
                x, y = batch(i, j)
                x_adv = attack(x, y)
                with torch.no_grad():
                    correct += (model(x_adv).argmax(dim=1) == y).sum()
                step()
            accuracy[name] = 100.0 * int(correct.item()) / n  # the one host sync per attack
            seconds[name] = time.perf_counter() - start
    wr = {a: w_robust(accuracy["clean"], v) for a, v in accuracy.items() if a != "clean"}
    meta = {"threat_model": "Linf", "eps": cfg.eps, "eps_label": eps_label(cfg.eps), "seed": cfg.seed,
            "batch_size": bs, "n_examples": n, "split_size": split_size, "subset": n < split_size,
            "headline": cfg.headline, "attack_params": params, "backends": backends, "dtype": "float32",
            "tf32": False,
            "device": str(device), "device_name": _device_name(device), "torch": torch.__version__,
            "model_class": type(model).__name__, "model_arch": getattr(model, "arch_name", None),
            "source_model_class": type(source_model).__name__ if source_model is not None else None,
            "source_model_arch": getattr(source_model, "arch_name", None) if source_model is not None else None}
    return EvalResult(accuracy=accuracy, w_robust=wr, n_examples=n, seconds=seconds, meta=meta)


def _make_attack(name: str, model: nn.Module, source: nn.Module | None, cfg: EvalConfig,
                 device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """A callable ``(x, y) -> x_adv`` for one attack (clean returns x)."""
    if name == "clean":
        return lambda x, y: x
    if name in PGD_ATTACKS:
        spec = PGD_ATTACKS[name]
        target = source if name in BLACK_BOX else model
        assert target is not None  # check_attacks guarantees a source for black-box attacks
        if name == "fgsm":
            return lambda x, y: fgsm(target, x, y, cfg.eps)
        # CPU generator: the same random starts on every device.
        gen = torch.Generator().manual_seed(_attack_seed(cfg.seed, name))
        return lambda x, y: pgd(target, x, y, eps=cfg.eps, step_size=spec["step_size"], steps=spec["steps"],
                                random_start=spec["random_start"], loss=spec["loss"], generator=gen)
    from bmtard_ray.evaluation.autoattack import AutoAttackRunner, SquareRunner

    if name == "autoattack":
        return AutoAttackRunner(model, eps=cfg.eps, version=cfg.autoattack_version, seed=cfg.seed, device=device)
    if name == "square":
        return SquareRunner(model, eps=cfg.eps, queries=cfg.square_queries, seed=cfg.seed, device=device)
    raise ConfigError(f"unknown attack '{name}'; choose from: {', '.join(ATTACK_NAMES)}")
