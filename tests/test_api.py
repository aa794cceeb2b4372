"""The Python API (bmtard_ray.train / evaluate / search): light to import, the same configuration rules as the
command line, results that hold the summary, the folder and the model, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bmtard_ray
from bmtard_ray.api.configs import run_config
from bmtard_ray.config import build_config
from bmtard_ray.errors import BmtardError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_package_loads_neither_torch_nor_ray() -> None:
    code = ("import sys, bmtard_ray; assert 'torch' not in sys.modules and 'ray' not in sys.modules; "
            "import bmtard_ray.api as api; assert bmtard_ray.train is api.train and bmtard_ray.search is api.search; "
            "assert 'ray' not in sys.modules, 'the API must not import Ray before a search runs'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with pytest.raises(AttributeError, match="no attribute 'tune'"):
        bmtard_ray.tune  # noqa: B018 -- the search is named search, so that it never shadows ray.tune


def test_a_mapping_is_applied_as_set_overrides_nested_or_dotted() -> None:
    cfg = run_config({"ebb": {"mode": "solve", "tau_max": 8}, "optim.epochs": 3, "student": "small_cnn"},
                     preset="smoke")
    same = build_config("smoke", overrides=["ebb.mode=solve", "ebb.tau_max=8", "optim.epochs=3", "student=small_cnn"])
    assert cfg == same
    # the dataset-dependent defaults apply as on the command line (CIFAR-100's loss scale)
    assert run_config({"data.dataset": "cifar100"}).loss.scale == 10.0
    with pytest.raises(ConfigError, match="unknown config key 'ebb.tau_mx'"):
        run_config({"ebb.tau_mx": 3})
    with pytest.raises(ConfigError, match="tau_min"):
        run_config({"ebb": {"tau_min": 5, "tau_max": 2}})
    with pytest.raises(ConfigError, match="give it alone"):
        run_config(cfg, preset="smoke")
    with pytest.raises(ConfigError, match="mapping of config keys"):
        run_config(["student=small_cnn"])  # type: ignore[arg-type]


def test_bad_options_are_one_line_errors_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown search option"):
        bmtard_ray.search("smoke", num_sample=3)
    with pytest.raises(ConfigError, match="unknown Ray option"):
        bmtard_ray.train({"output_dir": str(tmp_path)}, preset="smoke", ray={"worker": 2})
    with pytest.raises(ConfigError, match="unknown evaluation key"):
        bmtard_ray.evaluate("pyautoattack", {"attack": "clean"})
    with pytest.raises(BmtardError, match="unknown search space"):
        bmtard_ray.search("no-such-space", output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_train_then_evaluate_from_python(tmp_path: Path, cifar_root: Path) -> None:
    config = {"data.root": str(cifar_root), "output_dir": str(tmp_path / "runs"), "name": "api", "device": "cpu",
              "method": {"name": "sat"}, "optim.epochs": 1}
    result = bmtard_ray.train(config, preset="smoke")
    assert Path(result.run_dir) == (tmp_path / "runs" / "api").resolve()
    assert result.summary["results"]["test"]["n_examples"] == 64 and result.config.method.name == "sat"
    model = result.model
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # The model object and the run's file give the same clean accuracy on the same images.
    on_file = bmtard_ray.evaluate(result, {"attacks": "clean", "n_examples": 64}, data_root=cifar_root,
                                  device="cpu", out=tmp_path / "eval")
    on_module = bmtard_ray.evaluate(model, {"attacks": ["clean"], "n_examples": 64}, data_root=cifar_root,
                                    device="cpu")
    assert on_file.accuracy["clean"] == on_module.accuracy["clean"]
    assert on_file.reports and all(Path(p).is_file() for p in on_file.reports.values())
    assert on_module.reports == {}
    # resuming a finished run is a no-op that still returns its summary
    again = bmtard_ray.train({"device": "cpu"}, resume=result.run_dir)
    assert again.summary["results"] == result.summary["results"]
    with pytest.raises(ConfigError, match="student cannot change"):
        bmtard_ray.train({"student": "small_cnn"}, resume=result.run_dir)


@pytest.mark.slow
def test_a_smoke_search_over_a_timm_student_from_python(tmp_path: Path, cifar_root: Path) -> None:
    found = bmtard_ray.search(smoke_test=True, config={"student": "timm:test_resnet", "data.root": str(cifar_root)},
                              num_samples=1, num_cpus=2, output_dir=str(tmp_path / "runs"), final_attacks="clean",
                              quiet=True)
    assert found.complete and found.best is not None, found.summary
    assert found.experiment_dir == (tmp_path / "runs" / "smoke").resolve()
    assert found.summary["trials"] == 1 and found.summary["errored"] == 0
    model = found.model
    assert type(model).__module__.startswith("timm."), type(model)  # timm's class, normalising inside
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
