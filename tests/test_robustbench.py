"""RobustBench names as teachers, offline: files this test writes in RobustBench's on-disk layout
(<model_dir>/<dataset>/Linf/<Name>.pt). The robustbench package's own (online) loader is not installed here;
its call is checked against a stand-in module only, and the README says the online path was not exercised."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bmtard_ray.models.zoo as zoo
from bmtard_ray.cli import evaluate as eval_cli
from bmtard_ray.config import build_config
from bmtard_ray.data import dataset_info
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.models import DMWideResNet, WideResNet, build_model
from bmtard_ray.models import robustbench as rb
from bmtard_ray.models.files import load_model
from bmtard_ray.names import CIFAR10_MEAN, CIFAR10_STD, KnownModel, known_robustbench_model
from bmtard_ray.training.teachers import load_teacher

REPO = Path(__file__).resolve().parents[1]
C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in CI: no robustbench package (even where one happens to be installed)."""
    monkeypatch.setattr(rb, "package_available", lambda: False)


def _rb_file(model_dir: Path, dataset: str, name: str) -> Path:
    path = model_dir / dataset / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_names_of_the_paper_teachers_map_to_their_architectures() -> None:
    known = known_robustbench_model
    assert known("robustbench:Zhang2019Theoretically", "cifar10") == KnownModel("wrn34_10")
    for name in ("Gowal2020Uncovering_70_16", "Gowal2020Uncovering_70_16_extra"):
        assert known(f"robustbench:{name}", "cifar10") == KnownModel("wrn70_16", CIFAR10_MEAN, CIFAR10_STD)
    for name in ("Gowal2020Uncovering", "Gowal2020Uncovering_extra"):
        assert known(f"robustbench:{name}", "cifar100") == KnownModel("wrn70_16", C100_MEAN, C100_STD)
    assert known("robustbench:Zhang2019Theoretically", "cifar100") is None  # a CIFAR-10 model only
    assert rb.robustbench_path("robustbench:Gowal2020Uncovering", "cifar100",
                               "m") == Path("m/cifar100/Linf/Gowal2020Uncovering.pt")


def test_the_config_takes_the_architecture_from_the_name() -> None:
    # The paper preset's robust arch (wrn34_10) is a default the name replaces; the user's own arch is not.
    cfg = build_config("paper", overrides=["teachers.robust.checkpoint=robustbench:Gowal2020Uncovering_70_16_extra"])
    assert cfg.teachers.robust.arch == "wrn70_16"
    cfg = build_config("paper-cifar100", overrides=["teachers.robust.checkpoint=robustbench:Gowal2020Uncovering"])
    assert cfg.teachers.robust.arch == "wrn70_16" and cfg.loss.scale == 10.0
    with pytest.raises(ConfigError, match=r"is a 'wrn70_16' model; teachers.robust.arch=wrn34_10 contradicts it"):
        build_config("paper", overrides=["teachers.robust.checkpoint=robustbench:Gowal2020Uncovering_70_16",
                                         "teachers.robust.arch=wrn34_10"])
    with pytest.raises(ConfigError, match="no L-inf models for dataset 'tiny-imagenet'"):
        build_config("paper", overrides=["teachers.robust.checkpoint=robustbench:Zhang2019Theoretically",
                                         "data.dataset=tiny-imagenet"])
    with pytest.raises(ConfigError, match="not a RobustBench model name"):
        build_config("paper", overrides=["teachers.robust.checkpoint=robustbench:cifar10/Linf/X.pt"])


def test_gowal_cifar100_loads_as_the_robust_teacher_with_robustbench_normalisation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real WRN-70-16 is 267 M parameters: the same class and layout at depth 10, width 1 stands in for it.
    monkeypatch.setitem(zoo._BUILDERS, "wrn70_16", lambda k, m, s: DMWideResNet(10, 1, k, mean=m, std=s))
    src = DMWideResNet(10, 1, 100).eval()
    model_dir = tmp_path / "models"
    mean, std = torch.tensor(C100_MEAN).view(3, 1, 1), torch.tensor(C100_STD).view(3, 1, 1)
    # RobustBench's DMWideResNet keeps mean/std as buffers; a DataParallel-saved file prefixes "module."
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()} | {"module.mean": mean, "module.std": std},
               _rb_file(model_dir, "cifar100", "Gowal2020Uncovering"))
    # ... and a file without them gets the statistics RobustBench uses for the name.
    torch.save(src.state_dict(), _rb_file(model_dir, "cifar100", "Gowal2020Uncovering_extra"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = src((x - mean) / std)
    for name in ("Gowal2020Uncovering", "Gowal2020Uncovering_extra"):
        cfg = build_config("paper-cifar100", overrides=[f"teachers.robust.checkpoint=robustbench:{name}",
                                                        f"teachers.model_dir={model_dir}"])
        teacher = load_teacher("robust", cfg.teachers.robust, dataset_info("cifar100"), torch.device("cpu"),
                               cfg.teachers.model_dir)
        assert isinstance(teacher, DMWideResNet) and not teacher.training
        with torch.no_grad():
            torch.testing.assert_close(teacher(x), expected)


@pytest.mark.slow
def test_zhang2019theoretically_loads_as_trades_wrn34_10_with_sub_block1(tmp_path: Path) -> None:
    src = WideResNet(34, 10, 10).eval()  # full size (46 M parameters): the name must give exactly this layout
    torch.save(src.state_dict(), _rb_file(tmp_path, "cifar10", "Zhang2019Theoretically"))
    loaded = load_model("robustbench:Zhang2019Theoretically", "wrn34_10", 10, dataset="cifar10", role="robust teacher",
                        model_dir=str(tmp_path))
    assert loaded.arch == "wrn34_10" and loaded.path == tmp_path / "cifar10" / "Linf" / "Zhang2019Theoretically.pt"
    torch.testing.assert_close(loaded.model.sub_block1.layer[0].conv1.weight, src.sub_block1.layer[0].conv1.weight)
    x = torch.rand(2, 3, 32, 32)  # TRADES trained on [0, 1] images: no normalisation
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), src(x))


def test_a_missing_file_offline_says_where_to_put_it_and_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        load_model("robustbench:Zhang2019Theoretically", "wrn34_10", 10, dataset="cifar10", model_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"is not at {tmp_path / 'cifar10' / 'Linf' / 'Zhang2019Theoretically.pt'}: put the file there" in msg
    assert ("pip install robustbench && python -c \"from robustbench.utils import load_model; "
            f"load_model('Zhang2019Theoretically', model_dir='{tmp_path}', dataset='cifar10', "
            "threat_model='Linf')\"") in msg


def test_run_train_with_a_missing_robustbench_teacher_is_one_line_and_exit_2(tmp_path: Path, cifar_root: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), "--local", "--preset", "smoke", "--data-root",
                           str(cifar_root), "--output-dir", str(tmp_path / "runs"),
                           "--set", "teachers.robust.checkpoint=robustbench:Zhang2019Theoretically",
                           "--set", f"teachers.model_dir={tmp_path / 'rb'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: RobustBench model Zhang2019Theoretically (cifar10, Linf) is not at ")
    assert str(tmp_path / "rb" / "cifar10" / "Linf" / "Zhang2019Theoretically.pt") in lines[0]
    assert "load_model(" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_other_names_need_their_architecture_and_run_eval_reads_them(
        tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = build_model("tiny_cnn", 10)
    torch.save({"state_dict": src.state_dict()}, _rb_file(tmp_path / "models", "cifar10", "Someone2024Tiny"))
    with pytest.raises(ConfigError, match="say which architecture .* is with --arch"):
        load_model("robustbench:Someone2024Tiny", None, 10, dataset="cifar10", model_dir=str(tmp_path / "models"))
    code = eval_cli.main(["robustbench:Someone2024Tiny", "--arch", "tiny_cnn", "--model-dir", str(tmp_path / "models"),
                          "--attacks", "clean", "--n-examples", "50", "--device", "cpu", "--data-root", str(cifar_root),
                          "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "Someone2024Tiny_test.json").is_file()
    # A known name with a contradicting --arch is refused before anything is evaluated.
    code = eval_cli.main(["robustbench:Zhang2019Theoretically", "--arch", "resnet18", "--model-dir", str(tmp_path)])
    assert code == 2 and "is a 'wrn34_10' model; --arch resnet18 contradicts it" in capsys.readouterr().err


def test_with_the_package_installed_its_own_loader_is_used_and_its_failure_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for robustbench.utils, recording the call the real package would get.
    calls: list[dict] = []
    fake_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def load_model_ok(**kwargs: object) -> nn.Module:
        calls.append(kwargs)
        return fake_model

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model_ok  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    monkeypatch.setattr(rb, "package_available", lambda: True)
    loaded = load_model("robustbench:Zhang2019Theoretically", None, 10, dataset="cifar10", model_dir=str(tmp_path))
    assert loaded.model is fake_model and loaded.arch == "wrn34_10"
    assert calls == [{"model_name": "Zhang2019Theoretically", "model_dir": str(tmp_path), "dataset": "cifar10",
                      "threat_model": "Linf"}]

    def load_model_offline(**kwargs: object) -> nn.Module:
        raise OSError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")

    utils.load_model = load_model_offline  # type: ignore[attr-defined]
    with pytest.raises(CheckpointError) as e:
        load_model("robustbench:Zhang2019Theoretically", None, 10, dataset="cifar10", model_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "put the file there" in msg and "load_model('Zhang2019Theoretically'" in msg
    assert "robustbench could not load it: Failed to establish a new connection" in msg
