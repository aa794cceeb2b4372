"""The paper's own teachers load: the MTARD repository's ResNet-56 layout beside the option-A one, in every
wrapping a public file comes in, with an accuracy probe that catches a wrong input normalisation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bmtard_ray.cli import evaluate as eval_cli
from bmtard_ray.config import build_config
from bmtard_ray.data import prepare_data
from bmtard_ray.errors import CheckpointError
from bmtard_ray.evaluation import probe as probe_mod
from bmtard_ray.evaluation.probe import chance_warning, near_chance
from bmtard_ray.models import build_model, count_parameters, layout_for_keys
from bmtard_ray.models.files import load_model
from bmtard_ray.training.teachers import check_given_teachers


# --------------------------------------------------------------------------------------------------------
# The authors' definition, written here independently of bmtard_ray.models from the MTARD repository's
# cifar10_nat_teacher_models/resnet.py: torchvision's BasicBlock (in-place ReLU, `out += identity`), a
# 16-32-64 CIFAR ResNet with 9 blocks per stage, a conv1x1 + BN `downsample` only where the shape changes,
# adaptive average pooling and a classifier named `fc`.
class AuthorsBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class AuthorsCifarResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int] = (9, 9, 9), num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, layers[0])
        self.layer2 = self._make_layer(32, layers[1], stride=2)
        self.layer3 = self._make_layer(64, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [AuthorsBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [AuthorsBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode logits depend on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


FORMS = ["bare", "module", "state_dict", "net"]


def _save(sd: dict[str, torch.Tensor], form: str, path: Path) -> Path:
    obj = {"bare": sd, "module": {f"module.{k}": v for k, v in sd.items()},  # DataParallel
           "state_dict": {"state_dict": sd, "best_prec1": 93.0}, "net": {"net": sd, "acc": 93.0, "epoch": 199}}[form]
    torch.save(obj, path)
    return path


def test_the_authors_layout_has_projection_shortcuts_and_fc() -> None:
    model = build_model("resnet56", 10, layout="projection")
    keys = set(model.state_dict())
    assert keys == set(AuthorsCifarResNet().state_dict())  # exactly the authors' parameter names
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer3.0.downsample.0.weight",
            "fc.weight", "fc.bias"} <= keys
    assert not any(k.startswith("layer1.0.downsample") or k.startswith("linear") for k in keys)
    # 853,018 for option A + 1x1 convs 16->32 (512) and 32->64 (2,048) + their BNs (64 + 128)
    assert count_parameters(model) == 853_018 + 512 + 2048 + 64 + 128 == count_parameters(AuthorsCifarResNet())
    assert layout_for_keys("resnet56", keys) == "projection"
    assert layout_for_keys("resnet56", set(build_model("resnet56", 10).state_dict())) == "option_a"
    assert layout_for_keys("resnet56", keys - {"fc.bias"}) is None


@pytest.mark.parametrize("form", FORMS)
def test_the_authors_checkpoint_loads_under_arch_resnet56_with_the_authors_logits(tmp_path: Path, form: str) -> None:
    torch.manual_seed(0)
    authors = _randomise_bn(AuthorsCifarResNet(), seed=1)
    path = _save(authors.state_dict(), form, tmp_path / "resnet56.pt")
    loaded = load_model(str(path), "resnet56", 10, dataset="cifar10",
                        role="clean teacher")  # run_eval's and the teachers' loader
    assert loaded.arch == "resnet56" and loaded.model.layout == "projection"
    x = torch.rand(4, 3, 32, 32)  # [0, 1] images, no normalisation: as the authors trained
    with torch.no_grad():
        expected = authors(x)
        got = loaded.model.eval()(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert expected.std() > 0  # not a degenerate comparison


@pytest.mark.parametrize("form", FORMS)
def test_the_option_a_checkpoint_still_loads_under_the_same_arch(tmp_path: Path, form: str) -> None:
    src = _randomise_bn(build_model("resnet56", 10), seed=2)
    path = _save(src.state_dict(), form, tmp_path / "resnet56.th")
    loaded = load_model(str(path), "resnet56", 10, dataset="cifar10")
    assert loaded.model.layout == "option_a"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), src(x))


def test_old_authors_files_without_batch_counters_load(tmp_path: Path) -> None:
    authors = _randomise_bn(AuthorsCifarResNet(), seed=3)
    sd = {k: v for k, v in authors.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load_model(str(_save(sd, "module", tmp_path / "old.pt")), "resnet56", 10, dataset="cifar10")
    torch.testing.assert_close(loaded.model.layer3[0].downsample[1].running_var,
                               authors.layer3[0].downsample[1].running_var)


def test_a_checkpoint_of_neither_layout_gets_the_one_line_error(tmp_path: Path) -> None:
    sd = AuthorsCifarResNet().state_dict()
    hybrid = {("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in sd.items()}  # projection + `linear`
    for name, bad in (("hybrid.pt", hybrid), ("r18.pt", build_model("resnet18", 10).state_dict())):
        torch.save(bad, tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_model(str(tmp_path / name), "resnet56", 10, dataset="cifar10")
        msg = str(e.value)
        assert "\n" not in msg and f"{name} does not fit model 'resnet56'" in msg, msg
    assert "looks like a 'resnet18' checkpoint" in msg
    # ... and the authors' file under another --arch is recognised as a ResNet-56
    torch.save(sd, tmp_path / "authors.pt")
    with pytest.raises(CheckpointError, match="looks like a 'resnet56' checkpoint"):
        load_model(str(tmp_path / "authors.pt"), "resnet18", 10, dataset="cifar10")


def test_run_eval_loads_the_authors_dataparallel_file_and_warns_near_chance(
        tmp_path: Path, cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _save(_randomise_bn(AuthorsCifarResNet(), seed=4).state_dict(), "module", tmp_path / "resnet56.pt")
    code = eval_cli.main([str(path), "--arch", "resnet56", "--attacks", "clean", "--n-examples", "100",
                          "--device", "cpu", "--data-root", str(cifar_root), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "eval" / "resnet56_test.json").is_file()
    # Random weights classify at chance: the warning says so and names the flags that fix a wrong normalisation.
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "near chance" in warnings[0] and "--mean/--std" in warnings[0], err


def test_near_chance_rule() -> None:
    assert near_chance(10.0, 10) and near_chance(20.0, 10) and not near_chance(21.0, 10)
    assert near_chance(1.5, 100) and not near_chance(39.7, 10)  # the cpu preset's weak robust teacher is fine
    assert chance_warning("m", 55.0, 256, 10, "hint") is None
    assert chance_warning("m", 9.0, 0, 10, "hint") is None  # nothing probed, nothing claimed
    msg = chance_warning("the clean teacher m.pt", 9.8, 256, 10, "pass --mean/--std")
    assert msg is not None and "9.8 % of 256 validation images" in msg and "(10 %)" in msg and "--mean/--std" in msg


def test_loading_teachers_probes_them_and_warns_only_for_the_one_near_chance(
        tmp_path: Path, cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "PROBE_EXAMPLES", 100)  # the standard ResNet-18 on the CPU: keep it short
    torch.manual_seed(0)
    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "random.pt")
    cfg = build_config("smoke", overrides=[f"data.root={cifar_root}", "device=cpu", "method.name=bmtard",
                                           "teachers.clean.checkpoint=pyautoattack",
                                           f"teachers.robust.checkpoint={tmp_path / 'random.pt'}"])
    data = prepare_data(cfg)
    warnings: list[str] = []
    check_given_teachers(cfg, data.info, data.val, warn=warnings.append)
    assert len(warnings) == 1, warnings  # the standard ResNet-18 (~94 %) passes
    assert warnings[0].startswith(f"the robust teacher {tmp_path / 'random.pt'} classifies ")
    assert "of 100 validation images" in warnings[0] and "teachers.robust.mean/std" in warnings[0]
    assert "--mean/--std" in warnings[0]
    # Without a split to probe on, loading still checks the files but claims nothing.
    check_given_teachers(cfg, data.info, warn=warnings.append)
    assert len(warnings) == 1
    # Our own model files record their normalisation: a weak one is not suspected of a wrong one.
    record = {"format": "bmtard_ray.model/1", "arch": "tiny_cnn", "num_classes": 10, "dataset": "cifar10",
              "mean": None, "std": None, "state_dict": build_model("tiny_cnn", 10).state_dict(), "config": {}}
    torch.save(record, tmp_path / "ours.pt")
    cfg.teachers.robust.checkpoint = str(tmp_path / "ours.pt")
    check_given_teachers(cfg, data.info, data.val, warn=warnings.append)
    assert len(warnings) == 1
