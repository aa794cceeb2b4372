"""EBB's exact balance, ``ebb.mode: solve`` (this project's extension, docs/algorithm.md §6): the solver meets its
target, stops at the bound it hits, equalises where the paper's sign step ends, does not wander on noisy
batches, smooths as configured, feeds the iteration's losses and the trace, and gathers the global batch
across workers of unequal shards. Each test checks a value the rule determines, so a wrong rule fails it."""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bmtard_ray.config import EBBConfig, RunConfig, build_config
from bmtard_ray.data import DataBundle, DatasetInfo, Split
from bmtard_ray.errors import ConfigError
from bmtard_ray.runtime.dist import DistContext, local_rows
from bmtard_ray.training.balance import EntropyBalance
from bmtard_ray.training.entropy_solve import mean_entropy_at, solve_equalised, solve_temperatures
from bmtard_ray.training.losses import distill_kl, mean_entropy
from bmtard_ray.training.methods import Teachers, build_method
from bmtard_ray.training.metrics import STAT_NAMES, TRACE_COLUMNS
from bmtard_ray.training.teachers import freeze
from bmtard_ray.training.trainer import Trainer

K = 10
COL = {c: i for i, c in enumerate(STAT_NAMES)}


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a busy machine, intra-op threads cost far more in synchronisation than they
    save (a solve at N=128 measured 14 ms with one thread, 240 ms with two on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits(n: int, scales: tuple[float, float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits of two teachers, (n, K) each; a larger scale is a sharper (lower-entropy) teacher."""
    g = torch.Generator().manual_seed(seed)
    return tuple(s * torch.randn(n, K, generator=g) for s in scales)  # type: ignore[return-value]


def entropy(z: torch.Tensor, tau: float) -> float:
    """An independent computation of the batch's mean entropy: the losses' softmax and entropy."""
    return mean_entropy(torch.softmax(z / tau, dim=1)).item()


def solved(cfg: EBBConfig, z_adv: torch.Tensor, z_nat: torch.Tensor) -> EntropyBalance:
    ebb = EntropyBalance(cfg, K)
    ebb.solve(z_adv, z_nat, torch.ones(z_adv.shape[0], dtype=torch.bool))
    return ebb


# ---------------------------------------------------------------------------------------------------------
# The solver.


@pytest.mark.parametrize("target", [0.5, 1.0, 1.6])
def test_solve_meets_an_absolute_target_within_1e3_nats(target: float) -> None:
    z_adv, z_nat = logits(256, (8.0, 14.0))
    assert max(entropy(z_adv, 1.0), entropy(z_nat, 1.0)) < target  # the solve has work to do
    ebb = solved(EBBConfig(mode="solve", target_entropy=target), z_adv, z_nat)
    tau_adv, tau_nat = ebb.tau.tolist()
    assert abs(entropy(z_adv, tau_adv) - target) < 1e-3
    assert abs(entropy(z_nat, tau_nat) - target) < 1e-3
    assert tau_adv != tau_nat  # each teacher is solved on its own logits


def test_solve_meets_a_fraction_of_log_k_and_ignores_the_initial_temperatures() -> None:
    z_adv, z_nat = logits(128, (5.0, 3.0), seed=1)
    cfg = {"mode": "solve", "target_entropy": 0.6, "target_mode": "fraction"}
    a = solved(EBBConfig(**cfg), z_adv, z_nat)
    b = solved(EBBConfig(**cfg, tau_adv_init=7.0, tau_nat_init=3.0, eta_tau=0.5), z_adv, z_nat)
    assert torch.equal(a.tau, b.tau)
    for z, tau in zip((z_adv, z_nat), a.tau.tolist(), strict=False):
        assert abs(entropy(z, tau) - 0.6 * math.log(K)) < 1e-3


def test_an_unreachable_target_leaves_the_temperature_at_the_bound_it_hits() -> None:
    z_adv, z_nat = logits(128, (4.0, 4.0), seed=2)
    # Above the entropy either teacher reaches at tau_max = 3: both stop exactly at tau_max.
    high = 0.5 * (math.log(K) + max(entropy(z_adv, 3.0), entropy(z_nat, 3.0)))
    ebb = solved(EBBConfig(mode="solve", tau_max=3.0, target_entropy=high), z_adv, z_nat)
    assert ebb.tau.tolist() == [3.0, 3.0]
    # Below the entropy at tau_min = 1: both stay exactly at tau_min.
    low = 0.5 * min(entropy(z_adv, 1.0), entropy(z_nat, 1.0))
    assert solved(EBBConfig(mode="solve", target_entropy=low), z_adv, z_nat).tau.tolist() == [1.0, 1.0]
    # One reachable, one not: the sharp teacher cannot reach a target the soft one meets inside the bounds.
    soft, sharp = logits(128, (1.5, 30.0), seed=3)
    target = entropy(soft, 2.0)
    assert entropy(sharp, 3.0) < target
    ebb = solved(EBBConfig(mode="solve", tau_max=3.0, target_entropy=target), soft, sharp)
    assert ebb.tau[1].item() == 3.0
    assert ebb.tau[0].item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("scales", [(2.0, 6.0), (6.0, 2.0)], ids=["nat-sharper", "adv-sharper"])
def test_equalisation_is_where_the_sign_step_rule_ends_from_the_floor(scales: tuple[float, float]) -> None:
    z_adv, z_nat = logits(64, scales, seed=4)
    mask = torch.ones(64, dtype=torch.bool)
    exact = solved(EBBConfig(mode="solve"), z_adv, z_nat).tau
    # The higher-entropy teacher (the softer one) sits at tau_min; the other's entropy matches it.
    soft, sharp = (0, 1) if scales[0] < scales[1] else (1, 0)
    assert exact[soft].item() == 1.0 and exact[sharp].item() > 1.5
    z = torch.stack([z_adv, z_nat])
    h = mean_entropy_at(z, exact, mask)
    assert abs(h[0].item() - h[1].item()) < 1e-4
    # The paper's rule from both at the floor, on the same batch, ends in a +-eta cycle around that solution.
    eta = 0.005
    step = EntropyBalance(EBBConfig(eta_tau=eta), K)
    ends = []
    for i in range(1000):
        h = mean_entropy_at(z, step.tau, mask)
        step.step(h[0], h[1])
        if i >= 990:
            ends.append(step.tau.clone())
    for tau in ends:
        assert (tau - exact).abs().max().item() <= eta + 1e-5, (tau.tolist(), exact.tolist())
    assert len({tuple(t.tolist()) for t in ends}) == 2  # it cycles, it does not converge


def test_equalisation_does_not_wander_on_batches_from_a_stationary_distribution() -> None:
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([2.0, 6.0])[:, None, None]

    def draw(n: int) -> torch.Tensor:
        return scales * torch.randn(2, n, K, generator=g)

    population = solve_equalised(draw(10_000), 1.0, 10.0, torch.ones(10_000))
    ebb = EntropyBalance(EBBConfig(mode="solve"), K)
    ratchet = torch.ones(2)  # the rule re-solved from the current temperatures: the negative control
    ours, theirs = [], []
    for _ in range(200):
        z, mask = draw(128), torch.ones(128)
        ebb.solve(z[0], z[1], mask)
        ours.append(ebb.tau.clone())
        h = mean_entropy_at(z, ratchet, mask)
        ratchet = torch.where(h >= h.max(), ratchet, solve_temperatures(z, h.max(), 1.0, 10.0, mask))
        theirs.append(ratchet.clone())
    ours_t, theirs_t = torch.stack(ours), torch.stack(theirs)
    assert (ours_t[:, 0] == 1.0).all()  # the softer teacher stays anchored at tau_min
    first, last = ours_t[:100, 1].mean().item(), ours_t[100:, 1].mean().item()
    assert abs(last - first) < 0.1 and abs(last - population[1].item()) < 0.1, (first, last, population.tolist())
    # The control ratchets upward on the same noise and ends far from the population's solution.
    assert theirs_t[-100:, 1].mean().item() - population[1].item() > 1.0
    assert theirs_t[-1, 0].item() > 1.5


def test_smoothing_blends_with_the_previous_temperatures_but_the_first_solve_is_exact() -> None:
    batches = [logits(64, (3.0, 6.0), seed=s) for s in (6, 7)]
    exact = [solved(EBBConfig(mode="solve", target_entropy=1.0), *b).tau for b in batches]
    assert not torch.allclose(exact[0], exact[1])
    ebb = EntropyBalance(EBBConfig(mode="solve", target_entropy=1.0, smoothing=0.75, tau_adv_init=9.0), K)
    mask = torch.ones(64, dtype=torch.bool)
    ebb.solve(*batches[0], mask)
    assert torch.equal(ebb.tau, exact[0])  # nothing to blend with yet: the initial temperatures play no part
    ebb.solve(*batches[1], mask)
    assert torch.allclose(ebb.tau, 0.75 * exact[0] + 0.25 * exact[1], atol=1e-6)
    # The flag survives a checkpoint: a resumed balance keeps blending.
    again = EntropyBalance(EBBConfig(mode="solve", target_entropy=1.0, smoothing=0.75), K)
    again.load_state_dict(ebb.state_dict())
    again.solve(*batches[0], mask)
    assert torch.allclose(again.tau, 0.75 * ebb.tau + 0.25 * exact[0], atol=1e-6)


def test_padding_rows_are_masked_out() -> None:
    z_adv, z_nat = logits(40, (3.0, 6.0), seed=8)
    ebb = solved(EBBConfig(mode="solve", target_entropy=1.0), z_adv, z_nat)
    pad = torch.zeros(24, K)  # zero logits: the uniform distribution, entropy log K
    mask = torch.cat([torch.ones(40), torch.zeros(24)]).bool()
    padded = EntropyBalance(EBBConfig(mode="solve", target_entropy=1.0), K)
    padded.solve(torch.cat([z_adv, pad]), torch.cat([z_nat, pad]), mask)
    assert torch.allclose(padded.tau, ebb.tau, atol=1e-5)
    unmasked = EntropyBalance(EBBConfig(mode="solve", target_entropy=1.0), K)
    unmasked.solve(torch.cat([z_adv, pad]), torch.cat([z_nat, pad]), torch.ones(64, dtype=torch.bool))
    assert (unmasked.tau - ebb.tau).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------
# In the B-MTARD step and the training loop.


def tiny(seed: int, sharpen: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(32, K))
    with torch.no_grad():
        net[-1].weight.mul_(sharpen)  # random teachers are nearly uniform; sharpen them so tau has work to do
    return net


class Recorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_the_losses_use_the_solved_temperatures_and_the_row_logs_them_and_their_entropies() -> None:
    cfg = RunConfig()
    cfg.ebb.mode, cfg.ebb.target_entropy = "solve", 1.0
    student = tiny(0)
    robust, clean = Recorder(freeze(tiny(1, 60.0))), Recorder(freeze(tiny(2, 300.0)))
    task = build_method("bmtard", student, student, cfg, Teachers(clean=clean, robust=robust), K)
    g = torch.Generator().manual_seed(9)
    x, y = torch.rand(32, 3, 8, 8, generator=g), torch.randint(0, K, (32,), generator=g)
    out = task.step(x, y)
    row = out.row()
    t_adv, t_nat = robust.inner(robust.seen[0]), clean.inner(clean.seen[0])
    tau_adv, tau_nat = row[COL["tau_adv"]].item(), row[COL["tau_nat"]].item()
    # The row's temperatures are the solution on this batch (not the initial 1.0), met within 1e-3 nats...
    assert tau_adv > 1.05 and tau_nat > 1.05 and tau_adv != tau_nat
    assert abs(entropy(t_adv, tau_adv) - 1.0) < 1e-3 and abs(entropy(t_nat, tau_nat) - 1.0) < 1e-3
    # ... the logged entropies are those they give ...
    assert row[COL["H_adv"]].item() == pytest.approx(entropy(t_adv, tau_adv), abs=1e-5)
    assert row[COL["H_nat"]].item() == pytest.approx(entropy(t_nat, tau_nat), abs=1e-5)
    # ... and this iteration's losses were computed at them (not at the temperatures before the solve).
    student.train()
    with torch.no_grad():
        s_adv, s_nat = student(robust.seen[0]), student(x)
    assert row[COL["L_adv"]].item() == pytest.approx(distill_kl(t_adv, s_adv, tau_adv)[0].item(), rel=1e-5)
    assert row[COL["L_nat"]].item() == pytest.approx(distill_kl(t_nat, s_nat, tau_nat)[0].item(), rel=1e-5)
    assert row[COL["L_adv"]].item() != pytest.approx(distill_kl(t_adv, s_adv, 1.0)[0].item(), rel=1e-3)


def test_step_mode_never_gathers_and_mtard_never_solves() -> None:
    def refuse(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise AssertionError("step mode gathered teacher logits")

    g = torch.Generator().manual_seed(10)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, K, (16,), generator=g)
    for method, mode in (("bmtard", "step"), ("mtard", "solve")):
        cfg = RunConfig()
        cfg.ebb.mode = mode
        student = tiny(0)
        task = build_method(method, student, student, cfg, Teachers(clean=freeze(tiny(2, 300.0)),
                                                                    robust=freeze(tiny(1, 60.0))),
                          K, gather_rows=refuse)
        out = task.step(x, y)
        assert out.row()[COL["tau_adv"]].item() == 1.0 and out.row()[COL["tau_nat"]].item() == 1.0


def synthetic_trainer(tmp_path: Path, target: float | None) -> Trainer:
    """A Trainer on random 16x16 images with sharpened random tiny_cnn teachers: no CIFAR, no teacher training."""
    from bmtard_ray.models import build_model

    paths = {}
    for role, seed, sharpen in (("clean", 3, 300.0), ("robust", 4, 60.0)):
        torch.manual_seed(seed)
        model = build_model("tiny_cnn", K)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:  # the classifier
                    p.mul_(sharpen)
        paths[role] = tmp_path / f"{role}.pt"
        torch.save(model.state_dict(), paths[role])
    overrides = ["student=tiny_cnn", "ebb.mode=solve", f"ebb.target_entropy={'null' if target is None else target}",
                 "attack.steps=1", "optim.batch_size=16", "optim.epochs=2", "optim.milestones=[10]", "val_every=0",
                 "checkpoint_every=0", f"output_dir={tmp_path}", "data.augment=false"]
    for role, path in paths.items():
        overrides += [f"teachers.{role}.arch=tiny_cnn", f"teachers.{role}.checkpoint={path}"]
    cfg = build_config("smoke", overrides=overrides)
    g = torch.Generator().manual_seed(11)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % K)

    info = DatasetInfo("cifar10", K, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return Trainer(cfg, data=DataBundle(split(64), split(16), split(16), info), device=torch.device("cpu"))


@pytest.mark.parametrize("target", [1.2, None], ids=["target", "equalise"])
def test_the_trace_logs_the_solved_temperatures_and_the_entropies_they_give(tmp_path: Path,
                                                                            target: float | None) -> None:
    trainer = synthetic_trainer(tmp_path, target)
    robust, clean = Recorder(trainer.teachers.robust), Recorder(trainer.teachers.clean)
    trainer.method.teachers = Teachers(clean=clean, robust=robust)
    trainer.fit()
    trace = trainer.trace_table()
    assert tuple(trace.column_names) == TRACE_COLUMNS and trace.num_rows == 8
    tau = [trace.column(c).to_pylist() for c in ("tau_adv", "tau_nat")]
    h = [trace.column(c).to_pylist() for c in ("H_adv", "H_nat")]
    assert len(set(tau[0] + tau[1])) > 2  # solved per batch, not a constant
    for i in range(trace.num_rows):
        with torch.no_grad():
            z = (robust.inner(robust.seen[i]), clean.inner(clean.seen[i]))
        for j in range(2):
            assert h[j][i] == pytest.approx(entropy(z[j], tau[j][i]), abs=1e-5)  # the entropies the taus give
        if target is not None:
            assert abs(h[0][i] - target) < 1e-3 and abs(h[1][i] - target) < 1e-3
        else:  # equalised: one teacher at tau_min, the entropies equal
            assert min(tau[0][i], tau[1][i]) == 1.0 and max(tau[0][i], tau[1][i]) > 1.0
            assert abs(h[0][i] - h[1][i]) < 1e-3


# ---------------------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("override, message", [
    ("ebb.mode=exact", "unknown ebb.mode 'exact'; choose one of: step, solve"),
    ("ebb.smoothing=1", "ebb.smoothing must be in [0, 1), got 1.0"),
    ("ebb.smoothing=-0.1", "ebb.smoothing must be in [0, 1), got -0.1"),
    ("ebb.smoothing=.nan", "ebb.smoothing must be in [0, 1), got nan"),
])
def test_bad_mode_or_smoothing_is_a_one_line_error(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config("smoke", overrides=[override])
    assert str(info.value) == message


def test_solve_mode_does_not_check_the_initial_temperatures_it_never_uses() -> None:
    cfg = build_config("smoke", overrides=["ebb.mode=solve", "ebb.tau_min=2", "ebb.smoothing=0.9"])
    assert cfg.ebb.tau_adv_init == 1.0 and cfg.ebb.smoothing == 0.9
    with pytest.raises(ConfigError, match=r"ebb.tau_adv_init must lie in \[tau_min, tau_max\]"):
        build_config("smoke", overrides=["ebb.tau_min=2"])
    assert RunConfig().ebb.mode == "step" and RunConfig().ebb.smoothing == 0.0


# ---------------------------------------------------------------------------------------------------------
# The global batch across workers with shards of unequal size (torch.multiprocessing + gloo).


def _gather_worker(rank: int, out: str, store_id: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store-{store_id}", rank=rank, world_size=2)
    try:
        z_adv, z_nat = logits(8, (3.0, 6.0), seed=12)
        mine = slice(0, 3) if rank == 0 else slice(3, 8)  # 3 rows and 5 rows
        rows, mask = DistContext().all_gather_rows(torch.cat([z_adv[mine], z_nat[mine]], dim=1), max_rows=5)
        for mode_target in (1.0, None):
            ebb = EntropyBalance(EBBConfig(mode="solve", target_entropy=mode_target), K)
            ebb.solve(rows[:, :K], rows[:, K:], mask)
            torch.save({"rows": rows, "mask": mask, "tau": ebb.tau}, Path(out) / f"gather-{rank}-{mode_target}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_ray_train.py: a gloo process returning normally can abort in teardown


def test_unequal_shards_are_padded_gathered_and_solved_as_the_whole_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path), time.time_ns()), nprocs=2, join=True)
    z_adv, z_nat = logits(8, (3.0, 6.0), seed=12)
    for target in (1.0, None):
        got = [torch.load(tmp_path / f"gather-{r}-{target}.pt", weights_only=True) for r in range(2)]
        assert torch.equal(got[0]["tau"], got[1]["tau"])  # every rank holds the same temperatures
        assert got[0]["mask"].tolist() == [True] * 3 + [False] * 2 + [True] * 5
        rows = got[0]["rows"][got[0]["mask"]]
        assert torch.equal(rows, torch.cat([z_adv, z_nat], dim=1))
        whole = solved(EBBConfig(mode="solve", target_entropy=target), z_adv, z_nat)
        assert torch.allclose(got[0]["tau"], whole.tau, atol=1e-5)
    # One process: the rows themselves, all real.
    rows, mask = local_rows(z_adv)
    assert rows is z_adv and mask.all()


def test_an_absolute_target_at_or_above_log_k_is_said_to_be_unreachable_once_at_the_start() -> None:
    from bmtard_ray.config import EBBConfig
    from bmtard_ray.training.balance import unreachable_target

    note = unreachable_target(EBBConfig(mode="solve", target_entropy=3.0, tau_max=5.0), 10)
    assert note is not None and "ebb.target_entropy=3 nats can never be reached" in note and "log K = 2.303" in note
    assert "ebb.tau_max=5" in note and "\n" not in note
    assert unreachable_target(EBBConfig(mode="solve", target_entropy=2.0), 10) is None           # below log 10
    assert unreachable_target(EBBConfig(mode="step", target_entropy=3.0), 10) is None            # step: no solve
    assert unreachable_target(EBBConfig(mode="solve", target_entropy=0.9, target_mode="fraction"), 10) is None


def test_the_balance_reports_its_target_its_bounds_and_how_often_it_was_pinned() -> None:
    import math

    tau = torch.tensor([[1.0, 1.0], [1.0, 1.5], [1.0, 10.0], [2.0, 9.0]])  # [tau_adv, tau_nat] per iteration
    equalise = EntropyBalance(EBBConfig(tau_min=1.0, tau_max=10.0), 10).epoch_report(tau)
    assert math.isnan(equalise["H_target"]) and equalise["tau_min"] == 1.0 and equalise["tau_max"] == 10.0
    assert equalise["tau_adv_at_bound"] == 75.0 and equalise["tau_nat_at_bound"] == 50.0
    fraction = EntropyBalance(EBBConfig(target_entropy=0.5, target_mode="fraction"), 10).epoch_report(tau)
    assert fraction["H_target"] == pytest.approx(0.5 * math.log(10))
    off = EntropyBalance(EBBConfig(enabled=False), 10).epoch_report(tau)
    assert all(math.isnan(v) for v in off.values()) and len(off) == 5
