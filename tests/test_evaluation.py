"""Evaluation: attacks checked against hand computations and invariants, W-Robust, reports, and run_eval.py.

A tiny CNN with BatchNorm is trained for a few seconds on a synthetic, separable 10-class problem (each
class is a fixed +/-0.12 pattern around grey plus noise), so that attacks have something to break: it is
~100% accurate clean and loses accuracy as eps grows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from bmtard_ray.cli.evaluate import main as eval_main
from bmtard_ray.config import EvalConfig
from bmtard_ray.data import Split, load_dataset
from bmtard_ray.errors import ConfigError
from bmtard_ray.evaluation import (
    ATTACK_NAMES,
    EvalResult,
    cw_margin_loss,
    evaluate,
    fgsm,
    pgd,
    print_table,
    w_robust,
    write_reports,
)
from bmtard_ray.evaluation.autoattack import AutoAttackRunner, SquareRunner
from bmtard_ray.models import build_model

EPS = 8 / 255
SIZE = 16


def synthetic(n: int, seed: int, size: int = SIZE, k: int = 10) -> Split:
    templates = torch.rand(k, 3, size, size, generator=torch.Generator().manual_seed(1234)).round() * 2 - 1
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = 0.5 + 0.12 * templates[y] + 0.1 * torch.randn(n, 3, size, size, generator=g)
    return Split((x.clamp(0, 1) * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    train = synthetic(2000, seed=1)
    model = build_model("tiny_cnn", 10)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(train), (128,), generator=g)
        loss = F.cross_entropy(model(train.images[idx].float() / 255), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)  # the attack tests check that no attack leaves a .grad behind
    return model.eval()


@pytest.fixture(scope="module")
def test_split() -> Split:
    return synthetic(200, seed=2)


def _x(split: Split, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return split.images[:n].float() / 255, split.labels[:n]


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


# --- attacks ------------------------------------------------------------------------------------------


def test_pgd_with_zero_steps_is_clean(tiny: torch.nn.Module, test_split: Split) -> None:
    x, y = _x(test_split)
    x0 = pgd(tiny, x, y, eps=EPS, step_size=2 / 255, steps=0, random_start=False)
    assert torch.equal(x0, x)
    clean = evaluate(tiny, test_split, EvalConfig(attacks=("clean",))).accuracy["clean"]
    x_all, y_all = _x(test_split, len(test_split))
    assert _acc(tiny, pgd(tiny, x_all, y_all, eps=EPS, step_size=2 / 255, steps=0, random_start=False), y_all) == clean


def test_fgsm_is_one_pgd_step_of_size_eps(tiny: torch.nn.Module, test_split: Split) -> None:
    x, y = _x(test_split)
    a = fgsm(tiny, x, y, EPS)
    b = pgd(tiny, x, y, eps=EPS, step_size=EPS, steps=1, random_start=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    # The step goes up the CE loss: FGSM by hand.
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(tiny(xr), y, reduction="sum"), [xr])
    assert torch.equal(a, (x + EPS * grad.sign()).clamp(0, 1))


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_every_attack_stays_in_the_eps_ball_and_in_range(tiny: torch.nn.Module, test_split: Split) -> None:
    x, y = _x(test_split, 16)
    x = x.clone()
    x[:, :, :2] = 0.0  # pixels at the range limits: a missing clamp shows here
    x[:, :, -2:] = 1.0
    g = torch.Generator().manual_seed(0)
    outs = {
        "fgsm": fgsm(tiny, x, y, EPS),
        "pgd_ce": pgd(tiny, x, y, eps=EPS, step_size=2 / 255, steps=5, random_start=True, generator=g),
        "pgd_cw": pgd(tiny, x, y, eps=EPS, step_size=2 / 255, steps=5, random_start=True, loss="cw", generator=g),
        "start_only": pgd(tiny, x, y, eps=EPS, step_size=2 / 255, steps=0, random_start=True, generator=g),
        "big_steps": pgd(tiny, x, y, eps=EPS, step_size=0.5, steps=3, random_start=False),
        "square": SquareRunner(tiny, eps=EPS, queries=20, seed=0)(x, y),
        "autoattack": AutoAttackRunner(tiny, eps=EPS, seed=0)(x[:4], y[:4]),
    }
    for name, x_adv in outs.items():
        ref = x[: len(x_adv)]
        _in_ball(x_adv, ref, EPS)
        assert not x_adv.requires_grad, name
    assert not torch.equal(outs["start_only"], x)  # the random start moved
    assert all(p.grad is None for p in tiny.parameters())  # gradients w.r.t. the input only


def test_attacks_hurt_and_accuracy_does_not_increase_with_eps(tiny: torch.nn.Module, test_split: Split) -> None:
    rows = []
    split = test_split.subset(torch.arange(100))  # 10 per class
    for eps in (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255):
        acc = evaluate(tiny, split, EvalConfig(attacks=("fgsm", "pgd_sat", "cw_inf"), eps=eps, batch_size=100)).accuracy
        rows.append(acc)
    assert rows[0]["clean"] >= 95.0
    assert all(r["clean"] == rows[0]["clean"] for r in rows)
    for attack in ("fgsm", "pgd_sat", "cw_inf"):
        curve = [r[attack] for r in rows]
        assert curve[0] == rows[0]["clean"]  # eps 0: nothing to perturb
        assert all(b <= a for a, b in zip(curve, curve[1:], strict=False)), (attack, curve)
        assert curve[3] <= rows[0]["clean"] - 30, (attack, curve)  # the attack really attacks at 8/255
        assert curve[-1] <= 10.0, (attack, curve)
    assert rows[3]["pgd_sat"] <= rows[3]["fgsm"]  # 20 steps are at least as strong as one here


def test_cw_margin_loss_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0],    # true 1, best other 3: -(1 - 3 + 50) = -48
                           [60.0, 0.0, 5.0],   # true 60, best other 5: -(60 - 5 + 50) = -105
                           [0.0, 60.0, 1.0],   # wrong class leads by 60 > 50: nothing left, 0
                           [2.0, 2.0, -1.0]])  # y = 2: true -1, best other 2: -(-1 - 2 + 50) = -47
    y = torch.tensor([0, 0, 0, 2])
    assert torch.equal(cw_margin_loss(logits, y), torch.tensor([-48.0, -105.0, 0.0, -47.0]))
    assert torch.equal(cw_margin_loss(logits, y, confidence=0.0), torch.tensor([0.0, -55.0, 0.0, 0.0]))


def test_w_robust_arithmetic(tiny: torch.nn.Module, test_split: Split) -> None:
    assert w_robust(87.36, 53.60) == pytest.approx(70.48)  # MTARD's conference table (docs/algorithm.md §8.5)
    assert w_robust(100.0, 0.0) == 50.0
    res = evaluate(tiny, test_split, EvalConfig(attacks=("fgsm", "pgd_sat"), batch_size=64))
    assert set(res.w_robust) == {"fgsm", "pgd_sat"}
    for a, v in res.w_robust.items():
        assert v == (res.accuracy["clean"] + res.accuracy[a]) / 2
    assert res.headline("pgd_sat") == res.w_robust["pgd_sat"]
    with pytest.raises(ConfigError, match="not evaluated"):
        res.headline("cw_inf")
    # Accuracies are whole examples out of n.
    assert all(abs(v * res.n_examples / 100 - round(v * res.n_examples / 100)) < 1e-9 for v in res.accuracy.values())


# --- evaluate() ----------------------------------------------------------------------------------------


def test_deterministic_for_the_same_seed(tiny: torch.nn.Module, test_split: Split) -> None:
    small = test_split.subset(torch.arange(12))
    # (AutoAttack is left out: on points that survive APGD it runs FAB-T and 5000 Square queries, a minute.)
    cfg = EvalConfig(attacks=("pgd_sat", "cw_inf", "square"), batch_size=8, seed=3, square_queries=30)
    state = torch.random.get_rng_state()
    a = evaluate(tiny, small, cfg)
    b = evaluate(tiny, small, cfg)
    assert a.accuracy == b.accuracy and a.w_robust == b.w_robust
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    # Each attack has its own random stream: running it alone gives the same number.
    alone = evaluate(tiny, small, EvalConfig(attacks=("cw_inf",), batch_size=8, seed=3))
    assert alone.accuracy["cw_inf"] == a.accuracy["cw_inf"]


def test_autoattack_smoke(tiny: torch.nn.Module, test_split: Split) -> None:
    res = evaluate(tiny, test_split.subset(torch.arange(6)), EvalConfig(attacks=("autoattack",), batch_size=6))
    assert 0.0 <= res.accuracy["autoattack"] <= res.accuracy["clean"]
    assert res.accuracy["autoattack"] * 6 / 100 in (0, 1, 2, 3, 4, 5, 6)
    backend = res.meta["backends"]["autoattack"]
    assert backend["package"] in ("autoattack", "pyautoattack") and backend["version"]
    assert res.meta["attack_params"]["autoattack"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_model_mode_and_weights_restored(tiny: torch.nn.Module, test_split: Split) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.train()
    try:
        evaluate(tiny, test_split.subset(torch.arange(32)), EvalConfig(attacks=("fgsm", "pgd_sat")))
        assert tiny.training and all(m.training for m in tiny.modules())
    finally:
        tiny.eval()
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched: ran in eval mode
    evaluate(tiny, test_split.subset(torch.arange(8)), EvalConfig(attacks=("fgsm",)))
    assert not tiny.training


def test_config_errors(tiny: torch.nn.Module, test_split: Split) -> None:
    with pytest.raises(ConfigError) as info:
        evaluate(tiny, test_split, EvalConfig(attacks=("clean", "pgd50")))
    msg = str(info.value)
    assert "pgd50" in msg and all(a in msg for a in ATTACK_NAMES) and "\n" not in msg
    with pytest.raises(ConfigError, match="source model"):
        evaluate(tiny, test_split, EvalConfig(attacks=("bb_pgd",)))
    with pytest.raises(ConfigError, match="source model"):
        evaluate(tiny, test_split, EvalConfig(attacks=("clean", "bb_cw")))
    with pytest.raises(ConfigError, match="AutoAttack version 'fast'"):
        evaluate(tiny, test_split, EvalConfig(attacks=("autoattack",), autoattack_version="fast"))
    with pytest.raises(ConfigError, match="eps"):
        evaluate(tiny, test_split, EvalConfig(eps=float("nan")))


def test_black_box_transfer_uses_the_source(tiny: torch.nn.Module, test_split: Split) -> None:
    split = test_split.subset(torch.arange(64))
    same = evaluate(tiny, split, EvalConfig(attacks=("pgd_sat", "bb_pgd")), source_model=tiny)
    assert same.accuracy["bb_pgd"] == same.accuracy["pgd_sat"]  # same model, same attack: white-box numbers
    other = build_model("tiny_cnn", 10)  # an untrained source: its examples barely transfer
    weak = evaluate(tiny, split, EvalConfig(attacks=("bb_pgd", "bb_cw")), source_model=other)
    assert weak.accuracy["bb_pgd"] > same.accuracy["bb_pgd"]
    assert weak.meta["source_model_class"] == "TinyCNN"


def test_subset_is_stratified_and_recorded(tiny: torch.nn.Module, test_split: Split) -> None:
    res = evaluate(tiny, test_split, EvalConfig(attacks=("clean",), n_examples=50, seed=1))
    assert res.n_examples == 50 and res.meta["subset"] and res.meta["split_size"] == len(test_split)


# --- reports -------------------------------------------------------------------------------------------


def _result() -> EvalResult:
    acc = {"clean": 90.0, "pgd_sat": 40.0, "autoattack": 35.5}
    return EvalResult(accuracy=acc, w_robust={"pgd_sat": 65.0, "autoattack": 62.75}, n_examples=200,
                      seconds={"clean": 0.1, "pgd_sat": 2.0, "autoattack": 9.0},
                      meta={"eps": 8 / 255, "seed": 0, "headline": "pgd_sat",
                            "attack_params": {"pgd_sat": {"steps": 20}},
                            "backends": {"autoattack": {"package": "pyautoattack", "version": "0.2.0"}}})


def test_reports_have_robustbench_fields_and_readable_parquet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    info = {"name": "student", "architecture": "resnet18", "dataset": "cifar10", "split": "test",
            "teachers": {"robust": {"arch": "wrn34_10"}, "clean": {"arch": "resnet56"}}}
    paths = write_reports(_result(), tmp_path / "out", model_info=info, stem="s")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"s.json", "s.md", "s.parquet"}  # no temp files
    data = json.loads(paths["json"].read_text())
    for key in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote"):
        assert key in data
    assert (data["name"], data["architecture"], data["dataset"]) == ("student", "resnet18", "cifar10")
    assert (data["eps"], data["clean_acc"], data["autoattack_acc"], data["threat_model"]) == ("8/255", "90.00",
                                                                                              "35.50", "Linf")
    assert data["accuracy"]["pgd_sat"] == 40.0 and data["w_robust"]["autoattack"] == 62.75
    assert data["headline"] == {"attack": "pgd_sat", "w_robust": 65.0}
    assert data["n_examples"] == 200 and data["seed"] == 0 and data["teachers"]["robust"]["arch"] == "wrn34_10"
    assert data["backends"]["autoattack"]["version"] == "0.2.0"
    table = pq.read_table(paths["parquet"]).to_pylist()
    assert len(table) == 1
    row = table[0]
    assert row["acc_clean"] == 90.0 and row["w_robust_pgd_sat"] == 65.0 and row["headline_w_robust"] == 65.0
    assert row["name"] == "student" and row["n_examples"] == 200
    md = paths["md"].read_text()
    assert "| pgd_sat | 40.00 | 65.00 |" in md and "| clean | 90.00 |  |" in md
    print_table(_result(), "title")
    assert "62.75" in capsys.readouterr().out


def test_report_without_autoattack_has_null_autoattack_acc(tmp_path: Path) -> None:
    res = EvalResult(accuracy={"clean": 50.0}, w_robust={}, n_examples=10, seconds={}, meta={"eps": 0.03})
    data = json.loads(write_reports(res, tmp_path, model_info={"name": "m"})["json"].read_text())
    assert data["autoattack_acc"] is None and data["eps"] == "0.03"


# --- run_eval.py ---------------------------------------------------------------------------------------


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = eval_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("case", ["html", "truncated", "empty", "wrong_arch", "wrong_classes", "no_arch"])
def test_cli_bad_checkpoint(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "model.pt"
    argv = [str(ckpt), "--out", str(tmp_path / "eval"), "--data-root", str(tmp_path / "nodata"), "--device", "cpu"]
    if case == "html":
        ckpt.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>")
        words = ("web page",)
        argv += ["--arch", "resnet18"]
    elif case == "empty":
        ckpt.write_bytes(b"")
        words = ("empty",)
        argv += ["--arch", "resnet18"]
    else:
        torch.save(build_model("tiny_cnn", 100 if case == "wrong_classes" else 10).state_dict(), ckpt)
        if case == "truncated":
            data = ckpt.read_bytes()
            ckpt.write_bytes(data[: len(data) // 2])
            words = ("truncated",)
            argv += ["--arch", "tiny_cnn"]
        elif case == "wrong_arch":
            words = ("does not fit", "resnet18", "tiny_cnn")
            argv += ["--arch", "resnet18"]
        elif case == "wrong_classes":
            words = ("100 classes",)
            argv += ["--arch", "tiny_cnn"]
        else:
            words = ("--arch",)
    code, out, err = _run(argv, capsys)
    assert code == 2
    _one_line_error(err, str(ckpt), *words)
    assert not (tmp_path / "eval").exists()


def test_cli_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "m.pt"
    torch.save(build_model("tiny_cnn", 10).state_dict(), ckpt)
    base = [str(ckpt), "--arch", "tiny_cnn", "--out", str(tmp_path / "eval"), "--device", "cpu"]
    code, _, err = _run(base + ["--attacks", "clean,pgd7"], capsys)
    assert code == 2
    _one_line_error(err, "pgd7", "pgd_sat")
    code, _, err = _run(base + ["--attacks", "bb_pgd"], capsys)
    assert code == 2
    _one_line_error(err, "source")
    code, _, err = _run(base + ["--data-root", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    _one_line_error(err, "nowhere")
    assert not (tmp_path / "eval").exists()


def test_cli_evaluates_our_model_file_on_val(cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = build_model("tiny_cnn", 10)
    record = {"format": "bmtard_ray.model/1", "arch": "tiny_cnn", "num_classes": 10, "dataset": "cifar10",
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "state_dict": model.state_dict(),
              "teachers": {"robust": {"arch": "wrn34_10", "checkpoint": "t.pt"}},
              "config": {"method": {"name": "bmtard"}, "data": {"val_size": 1000, "split_seed": 3}}}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(record, run_dir / "model.pt")
    argv = [str(run_dir / "model.pt"), "--data-root", str(cifar_root), "--split", "val", "--attacks",
            "clean,fgsm,bb_pgd", "--source-checkpoint", str(run_dir / "model.pt"), "--n-examples", "40",
            "--batch-size", "16", "--device", "cpu", "--no-progress"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    files = sorted(p.name for p in (run_dir / "eval").iterdir())
    assert files == ["model_val.json", "model_val.md", "model_val.parquet"]
    data = json.loads((run_dir / "eval" / "model_val.json").read_text())
    assert (data["name"], data["architecture"], data["split"], data["method"]) == ("run", "tiny_cnn", "val", "bmtard")
    assert (data["val_size"], data["split_seed"], data["n_examples"]) == (1000, 3, 40)
    assert data["teachers"] == record["teachers"] and data["source_architecture"] == "tiny_cnn"
    assert data["w_robust"]["fgsm"] == (data["accuracy"]["clean"] + data["accuracy"]["fgsm"]) / 2
    assert math.isclose(data["eps_value"], 8 / 255)
    assert "W-Robust" in out and "fgsm" in out


def test_cli_reads_a_training_checkpoint(cifar_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The loop's per-epoch checkpoints keep the student's weights under "student" and its arch in the config."""
    model = build_model("tiny_cnn", 10)
    state = {"format": "bmtard_ray.checkpoint/1", "epoch": 3, "student": model.state_dict(),
             "config": {"student": "tiny_cnn", "data": {"dataset": "cifar10", "val_size": 500, "split_seed": 0},
                        "method": {"name": "sat"}}, "optimizer": {}, "history": []}
    torch.save(state, tmp_path / "checkpoint.pt")
    argv = [str(tmp_path / "checkpoint.pt"), "--data-root", str(cifar_root), "--attacks", "clean",
            "--n-examples", "20", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "out" / "checkpoint_test.json").read_text())
    assert data["architecture"] == "tiny_cnn" and data["method"] == "sat" and data["n_examples"] == 20
    _, test, _ = load_dataset("cifar10", cifar_root)  # the evaluated weights are the student's
    direct = evaluate(model, test, EvalConfig(attacks=("clean",), n_examples=20))
    assert data["accuracy"]["clean"] == direct.accuracy["clean"]


def test_evaluation_turns_tf32_off_while_it_runs_and_restores_the_flags(test_split: Split) -> None:
    """A GPU's "fp32" evaluation would otherwise run cuDNN convolutions in TF32 (torch's default); the
    flags are global, so a training loop that evaluates between epochs must get its own back."""
    from bmtard_ray.evaluation.precision import tf32_flags

    seen: list[tuple[bool, bool, str]] = []

    class Spy(torch.nn.Module):
        def __init__(self, fail: bool = False) -> None:
            super().__init__()
            self.inner, self.fail = build_model("tiny_cnn", 10), fail

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                         torch.get_float32_matmul_precision()))
            if self.fail:
                raise RuntimeError("boom")
            return self.inner(x)

    before = tf32_flags()
    try:
        torch.set_float32_matmul_precision("high")  # what a fast-path training script may have set
        torch.backends.cudnn.allow_tf32 = True
        evaluate(Spy(), test_split, EvalConfig(attacks=("clean", "fgsm"), n_examples=16))
        assert seen and all(s == (False, False, "highest") for s in seen)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                torch.get_float32_matmul_precision()) == (True, True, "high")
        with pytest.raises(RuntimeError, match="boom"):
            evaluate(Spy(fail=True), test_split, EvalConfig(attacks=("clean",), n_examples=16))
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == (True, "high")
    finally:
        torch.set_float32_matmul_precision(before.matmul_precision)
        torch.backends.cuda.matmul.allow_tf32 = before.matmul_allow_tf32
        torch.backends.cudnn.allow_tf32 = before.cudnn_allow_tf32
