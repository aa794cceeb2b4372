"""Models by reference: ``timm:<name>`` and ``<module>:<callable>`` as student, teacher and --arch; their
normalisation, strict loading of timm's own keys and of .safetensors files; every bad input as one line; a
1-epoch run and its evaluation; the factory imported on a Ray worker (slow)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import one_line
from safetensors.torch import save_file

from bmtard_ray.config import build_config, from_dict, to_dict
from bmtard_ray.data import dataset_info
from bmtard_ray.errors import BmtardError, CheckpointError, ConfigError, ModelError
from bmtard_ray.models import build_model, check_outputs, load_model, load_weights, model_record, normalization_of
from bmtard_ray.models.files import inspect_checkpoint
from bmtard_ray.names import arch_slug, check_arch
from bmtard_ray.training.logit_cache import weights_digest
from bmtard_ray.training.teachers import check_model_refs, teacher_config
from bmtard_ray.tuning.space import parse_space
from bmtard_ray.tuning.trials import check_space

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIMM = "timm:test_resnet"  # timm's own test model: 0.4 M parameters, takes 32x32 images
USER = "user_models:tiny_net"
STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def plain(model: torch.nn.Module) -> torch.nn.Module:
    """The same module without the normalising pre-hook: what timm itself computes."""
    raw = copy.deepcopy(model)
    raw._forward_pre_hooks.clear()
    return raw


# ----------------------------------------------------------------------------------------------- building
def test_a_timm_model_takes_unit_images_and_normalises_inside_with_timms_own_keys() -> None:
    import timm

    model = build_model(TIMM, 10, default_stats=STATS).eval()
    assert type(model).__module__.startswith("timm.") and model.arch_name == TIMM
    assert list(model.state_dict()) == list(timm.create_model("test_resnet", num_classes=10).state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10)
        assert torch.allclose(out, plain(model)((x - 0.5) / 0.25), atol=1e-5)
        assert not torch.allclose(out, plain(model)(x), atol=1e-3)
    assert normalization_of(model) == ([0.5] * 3, [0.25] * 3)
    # explicit statistics win over the dataset's; no statistics at all: timm's plain forward
    assert normalization_of(build_model(TIMM, 10, mean=(0.1, 0.2, 0.3), std=(1, 1, 1), default_stats=STATS)) == (
        pytest.approx([0.1, 0.2, 0.3]), [1.0] * 3)
    assert normalization_of(build_model(TIMM, 10)) is None


def test_timm_is_imported_only_when_a_timm_model_is_built() -> None:
    code = ("import sys, bmtard_ray.models, bmtard_ray.training.trainer, bmtard_ray.cli.train\n"
            "assert 'timm' not in sys.modules, 'timm imported'\n"
            "bmtard_ray.models.build_model('timm:test_resnet', 10)\nassert 'timm' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_user_factory_is_called_with_num_classes(tmp_path: Path) -> None:
    model = build_model(USER, 7)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7) and model.arch_name == USER
    assert normalization_of(model) is None  # a factory normalises as it likes; given stats are attached
    assert normalization_of(build_model(USER, 7, mean=(0.5,) * 3, std=(0.5,) * 3)) == ([0.5] * 3, [0.5] * 3)
    assert build_model("user_models:Nets.wide", 4)(torch.rand(1, 3, 8, 8)).shape == (1, 4)
    # a module in the working directory is found, as `python -m` finds it
    (tmp_path / "cwd_nets.py").write_text("from user_models import tiny_net as net\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert build_model("cwd_nets:net", 3)(torch.rand(1, 3, 8, 8)).shape == (1, 3)
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ref, kind, needles", [
    ("timm:resnet10", ModelError, ["unknown timm model 'resnet10'", "did you mean timm:resnet10t?"]),
    ("timm:test_resnett", ModelError, ["did you mean timm:test_resnet?"]),
    ("no_such_module_xyz:net", ModelError, ["no module named 'no_such_module_xyz'", "working directory"]),
    ("user_models:nope", ModelError, ["module 'user_models'", "has no 'nope'"]),
    ("user_models:broken_net", ModelError, ["broken_net(num_classes=10) raised ValueError: no layout for 10 classes"]),
    ("user_models:not_a_module", ModelError, ["returned a dict, not a torch.nn.Module"]),
    ("timm:", ConfigError, ["is not a timm model name"]),
    ("my models:net", ConfigError, ["is not a model reference: write <module>:<callable>"]),
    ("robustbench:Zhang2019Theoretically", ConfigError, ["names a checkpoint, not an architecture"]),
    ("resnet19", ConfigError, ["unknown model 'resnet19'", "timm:<name> or <module>:<callable>"]),
])
def test_bad_references_are_one_line_errors(ref: str, kind: type[BmtardError], needles: list[str]) -> None:
    with pytest.raises(kind) as exc:
        build_model(ref, 10)
    msg = one_line(exc, *needles)
    assert "second line" not in msg


def test_a_model_whose_class_count_does_not_match_the_dataset_is_refused() -> None:
    with pytest.raises(ModelError) as exc:
        check_outputs(build_model("user_models:three_outputs", 10), 10, 32, "student user_models:three_outputs")
    one_line(exc, "student user_models:three_outputs gives outputs of shape (1, 3)", "the dataset has 10 classes")
    with pytest.raises(ModelError) as exc:  # a model that cannot take the dataset's image size
        check_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)), 10, 32, "student x:y")
    one_line(exc, "student x:y cannot take the dataset's 32x32 images: RuntimeError")
    cfg = build_config("smoke", overrides=["student=user_models:three_outputs"])
    with pytest.raises(ModelError, match="student user_models:three_outputs gives outputs of shape"):
        check_model_refs(cfg, dataset_info("cifar10"))


def test_pretrained_weights_offline_fail_at_once_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelError) as exc:
        build_model(TIMM, 10, pretrained=True)
    one_line(exc, "timm:test_resnet: the pretrained weights could not be fetched: the hub 127.0.0.1:9 is unreachable")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as exc:
        build_model(TIMM, 10, pretrained=True)
    one_line(exc, "could not be fetched: the hub is unreachable (HF_HUB_OFFLINE is set)")
    assert time.monotonic() - start < 10
    with pytest.raises(ModelError, match="timm has no pretrained weights for this model"):
        build_model("timm:lcnet_035", 10, pretrained=True)


def test_pretrained_weights_in_the_local_cache_are_used_without_the_network(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    import timm
    from huggingface_hub import constants

    source = timm.create_model("test_resnet", num_classes=1000)
    repo = tmp_path / "hf" / "models--timm--test_resnet.r160_in1k"
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(repo / "snapshots" / ("a" * 40) / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    model = build_model(TIMM, 10, pretrained=True, default_stats=STATS)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight) and model.fc.weight.shape == (10, 96)
    assert normalization_of(model) == ([0.5] * 3, [0.5] * 3)  # timm's pretrained statistics, not the dataset's


def test_the_configuration_accepts_references_and_checks_the_pretrained_option() -> None:
    cfg = build_config("smoke", overrides=[f"student={TIMM}", f"teachers.clean.arch={USER}",
                                           "student_pretrained=true", "teachers.robust.arch=timm:resnet10t",
                                           "teachers.robust.pretrained=true"])
    assert cfg.student == TIMM and cfg.teachers.clean.arch == USER and cfg.student_pretrained
    assert from_dict(to_dict(cfg)).teachers.robust.pretrained
    for overrides, needle in [
        (["student_pretrained=true"], "student_pretrained needs a timm:<name> student"),
        ([f"teachers.clean.arch={USER}", "teachers.clean.pretrained=true"], "teachers.clean.pretrained needs a timm"),
        (["teachers.robust.arch=timm:x", "teachers.robust.pretrained=true", "teachers.robust.checkpoint=pyautoattack"],
         "with teachers.robust.checkpoint set it would be ignored"),
        (["student=timm:bad name"], "'timm:bad name' is not a timm model name"),
        (["teachers.clean.arch=a.:b"], "teachers.clean.arch 'a.:b' is not a model reference"),
    ]:
        with pytest.raises(ConfigError) as exc:
            build_config("smoke", overrides=overrides)
        one_line(exc, needle)
    check_arch("pkg.sub:Factory.make", "student model")  # dotted modules and attributes are fine


def test_two_references_never_share_a_cached_teacher_or_logits() -> None:
    base = build_config("smoke", overrides=[f"teachers.clean.arch={TIMM}"])
    other = build_config("smoke", overrides=["teachers.clean.arch=timm:test_efficientnet"])
    pre = build_config("smoke", overrides=[f"teachers.clean.arch={TIMM}", "teachers.clean.pretrained=true"])
    names = {teacher_config(c, "clean").name for c in (base, other, pre)}
    assert len(names) == 3 and all(n.startswith("clean-timm-test_") for n in names), names
    assert teacher_config(pre, "clean").student_pretrained
    assert arch_slug("user_models:Nets.wide") == "user_models-Nets.wide"
    a = build_model(USER, 10)
    b = copy.deepcopy(a)
    b.arch_name = "user_models:Nets.wide"  # the same weights under another reference
    c = copy.deepcopy(a)
    c.arch_name = "tiny_cnn"
    assert len({weights_digest(a), weights_digest(b), weights_digest(c)}) == 3


def test_a_search_space_may_search_a_timm_student() -> None:
    space = parse_space({"base": {"preset": "smoke-search"},
                         "params": {"student": {"type": "categorical", "choices": ["tiny_cnn", TIMM, USER]},
                                    "optim.lr": {"type": "float", "low": 0.01, "high": 0.1}}}, source="refs.yaml")
    assert check_space(space, build_config("smoke-search")) == 6


# ----------------------------------------------------------------------------------------------- files
def test_timm_state_dicts_load_strictly_plain_dataparallel_and_ours(tmp_path: Path) -> None:
    import timm

    info = dataset_info("cifar10")
    source = timm.create_model("test_resnet", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "dp.pt")
    for name in ("plain.pt", "dp.pt"):
        loaded = load_model(str(tmp_path / name), TIMM, 10, dataset="cifar10", default_stats=(info.mean, info.std))
        assert torch.equal(loaded.model.fc.weight, source.fc.weight) and loaded.arch == TIMM
        assert normalization_of(loaded.model) == (pytest.approx(list(info.mean)), pytest.approx(list(info.std)))
    # our model file records the reference and its normalisation; a plain timm model takes its state dict
    ours = build_model(TIMM, 10, default_stats=STATS)
    torch.save(model_record(ours, TIMM, info, build_config("smoke")), tmp_path / "model.pt")
    rebuilt = load_model(str(tmp_path / "model.pt"), None, 10, dataset="cifar10")
    assert rebuilt.arch == TIMM and normalization_of(rebuilt.model) == ([0.5] * 3, [0.25] * 3)
    timm.create_model("test_resnet", num_classes=10).load_state_dict(ours.state_dict(), strict=True)
    # strict: a wrong class count and another architecture are one line each
    torch.save(timm.create_model("test_resnet", num_classes=100).state_dict(), tmp_path / "k100.pt")
    with pytest.raises(CheckpointError) as exc:
        load_model(str(tmp_path / "k100.pt"), TIMM, 10, dataset="cifar10")
    one_line(exc, "has 100 classes, model 'timm:test_resnet' has 10")
    with pytest.raises(CheckpointError) as exc:
        load_model(str(tmp_path / "plain.pt"), "timm:test_efficientnet", 10, dataset="cifar10")
    one_line(exc, "does not fit model 'timm:test_efficientnet'")


@pytest.mark.parametrize("arch", ["tiny_cnn", TIMM, USER])
def test_safetensors_files_load_for_every_architecture(tmp_path: Path, arch: str) -> None:
    source = build_model(arch, 10)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert inspect_checkpoint(str(path)).record is None
    with pytest.raises(ConfigError, match="plain state dict: say which architecture"):
        load_model(str(path), None, 10, dataset="cifar10")
    loaded = load_model(str(path), arch, 10, dataset="cifar10")
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    # DataParallel keys in a safetensors file too
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, str(path))
    load_weights(build_model(arch, 10), path)


def test_a_truncated_or_corrupt_safetensors_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("tiny_cnn", 10).state_dict().items()}, str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\xff" * 300)
    for bad in (cut, junk):
        with pytest.raises(CheckpointError) as exc:
            load_model(str(bad), "tiny_cnn", 10, dataset="cifar10")
        one_line(exc, f"checkpoint {bad} is a truncated or corrupt safetensors file")
    renamed = tmp_path / "no_suffix.bin"  # recognised by content, whatever its name
    shutil.copy(path, renamed)
    load_weights(build_model("tiny_cnn", 10), renamed)


# ----------------------------------------------------------------------------------------------- runs
def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_run_with_a_timm_student_and_a_user_teacher_and_its_evaluation(tmp_path: Path, cifar_root: Path) -> None:
    shutil.copy(HERE / "user_models.py", tmp_path)  # the user's module, in the working directory
    common = ["--set", f"output_dir={tmp_path / 'runs'}", "--set", f"teachers.cache_dir={tmp_path / 'teachers'}"]
    proc = cli("run_train.py", "--local", "--preset", "smoke", "--data-root", str(cifar_root), "--student", TIMM,
               "--set", f"teachers.clean.arch={USER}", "--set", "optim.epochs=1", "--name", "refs", *common,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "refs"
    record = torch.load(run / "model.pt", weights_only=True)
    assert record["arch"] == TIMM and record["mean"] == pytest.approx(list(dataset_info("cifar10").mean))
    assert len(list((tmp_path / "teachers").glob("clean-user_models-tiny_net-natural-1ep-*/model.pt"))) == 1
    proc = cli("run_eval.py", str(run / "model.pt"), "--data-root", str(cifar_root), "--attacks", "clean",
               "--n-examples", "64", "--out", str(tmp_path / "eval"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert TIMM in json.dumps(report)


@pytest.mark.parametrize("args, needle", [
    (["--student", "timm:resnt18"], "did you mean timm:resnet18?"),
    (["--student", "user_models:broken_net"], "raised ValueError: no layout for 10 classes"),
    (["--student", "user_models:three_outputs"], "gives outputs of shape (1, 3)"),
    (["--set", "teachers.clean.arch=user_models:nope"], "module 'user_models'"),
])
def test_bad_references_on_the_command_line_are_one_line_exit_2_and_write_nothing(
        tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    from bmtard_ray.cli import evaluate, train

    code = train.main(["--local", "--preset", "smoke", "--data-root", str(cifar_root), *args,
                       "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"teachers.cache_dir={tmp_path / 't'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "w.pt")
    assert evaluate.main([str(tmp_path / "w.pt"), "--arch", "timm:nope_x", "--data-root", str(cifar_root)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown timm model 'nope_x'" in lines[0], lines
    assert list(tmp_path.iterdir()) == [tmp_path / "w.pt"]
