"""The model zoo: shapes, gradients, normalisation, public-checkpoint layouts and checkpoint errors."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import one_line

from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.models import (
    MODEL_NAMES,
    DMWideResNet,
    WideResNet,
    build_model,
    count_parameters,
    load_weights,
    pyautoattack_resnet18_path,
    read_state_dict,
)
from bmtard_ray.models import files as ckpt_mod
from bmtard_ray.models.resnet import OptionABlock
from bmtard_ray.models.wideresnet import DMBlock, WRNBlock

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
# Everything but WRN-70-16 (267 M parameters, ~40 G multiply-adds per image) runs a real-size forward.
FORWARD_NAMES = [n for n in MODEL_NAMES if n != "wrn70_16"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _build(name: str, k: int = 10, **kw: object) -> nn.Module:
    if name == "wrn70_16":  # same code path, tiny depth and width
        return DMWideResNet(10, 1, k, **kw)  # type: ignore[arg-type]
    return build_model(name, k, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- build_model
def test_model_names_are_the_public_list() -> None:
    assert MODEL_NAMES == ("resnet18", "mobilenetv2", "resnet56", "wrn34_10", "wrn70_16", "small_cnn", "tiny_cnn")


def test_unknown_model_and_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'; choose one of: resnet18, mobilenetv2"):
        build_model("resnet19", 10)
    for bad in (1, 0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="num_classes"):
            build_model("tiny_cnn", bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="both mean and std"):
        build_model("tiny_cnn", 10, mean=MEAN)
    with pytest.raises(ConfigError, match="3 finite numbers"):
        build_model("tiny_cnn", 10, mean=(0.5, 0.5), std=(0.2, 0.2))
    with pytest.raises(ConfigError, match="std must be positive"):
        build_model("tiny_cnn", 10, mean=MEAN, std=(0.2, 0.0, 0.2))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape_and_input_gradient(name: str) -> None:
    model = _build(name, 7)
    # Attacks differentiate w.r.t. the input, in train mode too (BN batch statistics): no in-place trouble.
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model.train()(x)
    assert out.shape == (2, 7)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(out, torch.tensor([3, 5])), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.eval()
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(model(x)[:, 3].sum(), x)
    assert grad.abs().sum() > 0
    with torch.no_grad():  # channels_last input gives the same logits
        plain = model(x)
        cl = model(x.contiguous(memory_format=torch.channels_last))
    assert plain.shape == (2, 7)
    torch.testing.assert_close(cl, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "small_cnn"])
def test_forward_on_64x64_tiny_imagenet_inputs(name: str) -> None:
    model = build_model(name, 200).eval()
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 200)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_mean_std_are_non_persistent_and_normalise_the_input(name: str) -> None:
    if name == "wrn34_10":  # same code path at WRN-10-1 size
        plain, normed = WideResNet(10, 1, 10).eval(), WideResNet(10, 1, 10, mean=MEAN, std=STD).eval()
    else:
        plain, normed = _build(name).eval(), _build(name, mean=MEAN, std=STD).eval()
    assert list(normed.state_dict()) == list(plain.state_dict())  # same keys as the public checkpoints
    assert not any("normalize" in k for k in normed.state_dict())
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    first_inputs: list[torch.Tensor] = []
    for model in (plain, normed):  # what the first convolution sees
        conv = next(mod for mod in model.modules() if isinstance(mod, nn.Conv2d))
        conv.register_forward_pre_hook(lambda mod, inp: first_inputs.append(inp[0]))
    with torch.no_grad():
        unnormalised = plain(x)
        got = normed(x)
        expected = plain((x - m) / s)  # normalising by hand, then the same weights
    torch.testing.assert_close(first_inputs[0], x, rtol=0, atol=0)
    torch.testing.assert_close(first_inputs[1], (x - m) / s)
    scale = expected.abs().max().item()  # untrained deep nets in eval mode have large logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert not torch.equal(got, unnormalised)


def test_count_parameters_matches_hand_counts_and_published_sizes() -> None:
    # tiny_cnn by hand: conv 3->8 (216) + BN (16) + conv 8->16 (1152) + BN (32) + linear 16->10 (170)
    assert count_parameters(build_model("tiny_cnn", 10)) == 216 + 16 + 1152 + 32 + 170
    with torch.device("meta"):
        sizes = {n: count_parameters(build_model(n, 10)) for n in MODEL_NAMES}
        trades_wrn = build_model("wrn34_10", 10)
    assert sizes["resnet18"] == 11_173_962  # kuangliu's CIFAR ResNet-18
    assert sizes["resnet56"] == 853_018  # "ResNet56 0.85M" (akamaster's table)
    assert sizes["mobilenetv2"] == 2_296_922  # kuangliu's CIFAR MobileNetV2
    # TRADES' WRN-34-10 has 46.16 M parameters in forward, plus its unused sub_block1
    assert sizes["wrn34_10"] - count_parameters(trades_wrn.sub_block1) == 46_160_474
    assert round(sizes["wrn70_16"] / 1e6) == 267  # Gowal et al. 2020: WRN-70-16, 267 M


def _conv_macs(model: nn.Module, size: int) -> int:
    macs = 0

    def hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            macs += out[0].numel() * k
        elif isinstance(m, nn.Linear):
            macs += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, size, size))
    for h in handles:
        h.remove()
    return macs


def test_small_cnn_costs_about_15_mflops_and_tiny_cnn_is_tiny() -> None:
    macs = _conv_macs(build_model("small_cnn", 10), 32)
    # by hand: 3*9*32*32^2 + 32*9*64*16^2 + 64*9*128*8^2 + 128*9*256*4^2 + 256*10
    assert macs == 884_736 + 4_718_592 + 4_718_592 + 4_718_592 + 2_560
    assert macs <= 15.1e6
    tiny = build_model("tiny_cnn", 10)
    assert _conv_macs(tiny, 32) < 0.2e6
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())


def test_eval_mode_batchnorm_makes_outputs_independent_of_the_batch() -> None:
    model = build_model("tiny_cnn", 10)
    model.train()(torch.rand(16, 3, 32, 32))  # move running statistics away from their init
    x = torch.rand(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]))
    model.train()
    with torch.no_grad():
        assert (model(x)[:1] - model(x[:1])).abs().max() > 1e-4


# --------------------------------------------------------------------------------------- public layouts
def test_pyautoattack_resnet18_loads_strictly_and_classifies_cifar10(cifar_root: Path) -> None:
    path = pyautoattack_resnet18_path()
    assert path.name == "model_test.pt" and path.is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("resnet18", 10)
    assert set(model.state_dict()) == set(sd)  # exactly the same keys, nothing tolerated
    load_weights(model, path)
    torch.testing.assert_close(model.linear.weight, sd["linear.weight"])
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    x = torch.tensor(np.asarray(batch["data"][:100])).view(-1, 3, 32, 32).float() / 255
    y = torch.tensor(batch["labels"][:100])
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.88, acc  # a standard ResNet-18 (~95% clean); a layout error gives ~10%


def test_missing_pyautoattack_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ckpt_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError) as e:
        pyautoattack_resnet18_path()
    one_line(e, "pyautoattack", "pip install pyautoattack")


def test_resnet56_has_akamaster_keys_and_option_a_shortcuts(tmp_path: Path) -> None:
    model = build_model("resnet56", 10)
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["linear.weight", "linear.bias"]
    assert "layer3.8.conv2.weight" in keys and "layer4.0.conv1.weight" not in keys
    assert not any("shortcut" in k for k in keys)
    # akamaster's files: {"state_dict": {"module.conv1.weight": ...}, "best_prec1": ...}
    src = build_model("resnet56", 10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "best_prec1": 93.39},
               tmp_path / "resnet56.th")
    load_weights(model, tmp_path / "resnet56.th")
    torch.testing.assert_close(model.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    # Option A by hand: with zero convs and default BN, a 16->32 block returns relu(pad(x[::2, ::2])).
    block = OptionABlock(16, 32, stride=2).eval()
    for conv in (block.conv1, block.conv2):
        nn.init.zeros_(conv.weight)
    x = torch.randn(2, 16, 8, 8)
    out = block(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], torch.relu(x[:, :, ::2, ::2]))
    assert out[:, :8].abs().max() == 0 and out[:, 24:].abs().max() == 0


def _wrn_block_keys(prefix: str, convshortcut: bool) -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = [f"{prefix}.bn1.{b}" for b in bn] + [f"{prefix}.conv1.weight"]
    keys += [f"{prefix}.bn2.{b}" for b in bn] + [f"{prefix}.conv2.weight"]
    return keys + ([f"{prefix}.convShortcut.weight"] if convshortcut else [])


def test_trades_wideresnet_layout_and_unused_sub_block(tmp_path: Path) -> None:
    wrn = WideResNet(10, 1, 10)  # WRN-10-1: one block per group, same code path as WRN-34-10
    expected = ["conv1.weight"]
    expected += _wrn_block_keys("block1.layer.0", False)  # 16 -> 16: identity shortcut
    expected += _wrn_block_keys("sub_block1.layer.0", False)
    expected += _wrn_block_keys("block2.layer.0", True) + _wrn_block_keys("block3.layer.0", True)
    expected += [f"bn1.{b}" for b in ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]]
    expected += ["fc.weight", "fc.bias"]
    assert sorted(wrn.state_dict()) == sorted(expected)
    with torch.device("meta"):
        big = build_model("wrn34_10", 10)
    big_keys = set(big.state_dict())
    assert {"block1.layer.0.convShortcut.weight", "sub_block1.layer.4.conv2.weight", "block3.layer.4.bn2.running_var",
            "fc.weight"} <= big_keys
    assert big.block1.layer[0].convShortcut.weight.shape == (160, 16, 1, 1)
    # sub_block1 takes no part in forward ...
    wrn.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = wrn(x)
        for p in wrn.sub_block1.parameters():
            p.add_(1.0)
        torch.testing.assert_close(wrn(x), before)
    # ... so a WRN checkpoint without it (other repositories) loads too; the keys it has must all match
    sd = {k: v for k, v in WideResNet(10, 1, 10).state_dict().items() if not k.startswith("sub_block1.")}
    torch.save(sd, tmp_path / "no_sub_block.pt")
    load_weights(wrn, tmp_path / "no_sub_block.pt")
    torch.testing.assert_close(wrn.fc.weight, sd["fc.weight"])


def test_trades_block_shortcut_uses_the_activated_input_when_widening() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    widen = WRNBlock(4, 8, stride=1).eval()
    same = WRNBlock(4, 4, stride=1).eval()
    for block in (widen, same):
        nn.init.zeros_(block.conv2.weight)  # kills the residual branch: only the shortcut is left
    with torch.no_grad():
        torch.testing.assert_close(same(x), x)  # identity on the raw input
        expected = nn.functional.conv2d(torch.relu(x), widen.convShortcut.weight)  # BN at init is the identity
        torch.testing.assert_close(widen(x), expected)


def test_deepmind_wideresnet_layout_and_robustbench_mean_std(tmp_path: Path) -> None:
    dm = DMWideResNet(10, 1, 100)
    keys = set(dm.state_dict())
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for g, shortcut in ((0, False), (1, True), (2, True)):
        p = f"layer.{g}.block.0"
        assert {f"{p}.conv_0.weight",
                f"{p}.conv_1.weight"} | {f"{p}.batchnorm_{i}.{b}" for i in (0, 1) for b in bn} <= keys
        assert (f"{p}.shortcut.weight" in keys) == shortcut
    assert {"init_conv.weight", "logits.weight", "logits.bias"} | {f"batchnorm.{b}" for b in bn} <= keys
    assert "mean" not in keys and "std" not in keys
    with torch.device("meta"):
        big = build_model("wrn70_16", 100)
    keys = big.state_dict()
    assert "layer.2.block.10.conv_1.weight" in keys and "layer.2.block.11.conv_1.weight" not in keys
    assert big.logits.weight.shape == (100, 1024)
    # RobustBench checkpoints hold mean/std as persistent (3, 1, 1) buffers: they load into the normaliser.
    src = DMWideResNet(10, 1, 100)
    mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
    torch.save({"module." + k: v for k, v in src.state_dict().items()} | {"module.mean": mean.view(3, 1, 1),
                                                                          "module.std": std.view(3, 1, 1)},
               tmp_path / "rb.pt")
    load_weights(dm, tmp_path / "rb.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dm.eval()(x), src.eval()((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))


def test_deepmind_strided_conv_pads_like_tensorflow_same() -> None:
    # TF "SAME" with stride 2 on an even size pads 0 before and 1 after: output (i, j) starts at input (2i, 2j).
    block = DMBlock(2, 4, stride=2).eval()
    with torch.no_grad():
        block.conv_0.weight.zero_()
        block.conv_0.weight[:, :, 0, 0] = 1.0  # the top-left tap only
    seen = {}
    block.conv_0.register_forward_hook(lambda m, i, o: seen.update(out=o))
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        block(x)
    act = nn.functional.silu(x)  # batchnorm_0 at init is the identity
    expected = act[:, :, ::2, ::2].sum(1, keepdim=True).expand(1, 4, 4, 4)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- save / load / wrappers
def test_round_trip_save_and_load_keeps_outputs(tmp_path: Path) -> None:
    model = build_model("small_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 3, 32, 32)
    nn.functional.cross_entropy(model.train()(x), torch.arange(8)).backward()
    opt.step()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = build_model("small_cnn", 10)
    load_weights(fresh, tmp_path / "m.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert fresh.block1[1].num_batches_tracked.item() == 1  # BN counters and running stats came along


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "net", "model_state_dict", "nested", "module",
                                  "compiled", "record"])
def test_wrappers_and_prefixes_are_unwrapped(tmp_path: Path, wrap: str) -> None:
    src = build_model("tiny_cnn", 10)
    sd = src.state_dict()
    obj: object = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 7},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "net": {"net": sd, "acc": 91.2},
        "model_state_dict": {"model_state_dict": sd, "epoch": 3},
        "nested": {"model": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}},
        "module": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        # this package's own model record (bmtard_ray.models.files.model_record)
        "record": {"format": "bmtard_ray.model/1", "arch": "tiny_cnn", "num_classes": 10, "mean": None,
                   "state_dict": sd, "config": {"seed": 0, "optim": {"lr": 0.1}}},
    }[wrap]
    torch.save(obj, tmp_path / "c.pt")
    got = read_state_dict(tmp_path / "c.pt")
    assert list(got) == list(sd)
    model = build_model("tiny_cnn", 10)
    load_weights(model, str(tmp_path / "c.pt"))
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)


def test_key_picks_one_entry(tmp_path: Path) -> None:
    a, b = build_model("tiny_cnn", 10), build_model("tiny_cnn", 10)
    torch.save({"model": a.state_dict(), "ema": b.state_dict()}, tmp_path / "c.pt")
    model = build_model("tiny_cnn", 10)
    load_weights(model, tmp_path / "c.pt", key="ema")
    torch.testing.assert_close(model.fc.weight, b.fc.weight)
    load_weights(model, tmp_path / "c.pt")  # default unwrapping takes "model"
    torch.testing.assert_close(model.fc.weight, a.fc.weight)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "c.pt", key="swa")
    one_line(e, "no entry 'swa'", "ema", "model")


def test_old_checkpoints_without_num_batches_tracked_load(tmp_path: Path) -> None:
    src = build_model("resnet56", 10)
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old.pt")
    model = build_model("resnet56", 10)
    load_weights(model, tmp_path / "old.pt")
    torch.testing.assert_close(model.bn1.running_var, src.bn1.running_var)


# ------------------------------------------------------------------------------------------ bad checkpoints
def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_truncated_checkpoints(tmp_path: Path) -> None:
    data = pyautoattack_resnet18_path().read_bytes()  # PyTorch's legacy (pickle) format
    (tmp_path / "legacy.pt").write_bytes(data[: len(data) // 2])
    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "full.pt")  # zip format
    full = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "zip.pt").write_bytes(full[: len(full) - 100])
    for name, arch in (("legacy.pt", "resnet18"), ("zip.pt", "tiny_cnn")):
        model = build_model(arch, 10)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError) as e:
            load_weights(model, tmp_path / name)
        one_line(e, str(tmp_path / name), "truncated or corrupt")
        assert _unchanged(model, before)


@pytest.mark.parametrize("page", [
    "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>...</body></html>",
    "\n  <html lang='en'><body>Sign in to continue</body></html>\n",
])
def test_html_page_saved_as_checkpoint(tmp_path: Path, page: str) -> None:
    (tmp_path / "model.pt").write_text(page)
    with pytest.raises(CheckpointError) as e:
        load_weights(build_model("tiny_cnn", 10), tmp_path / "model.pt")
    one_line(e, "is a web page (HTML), not a checkpoint", "login/confirm page")


@pytest.mark.parametrize("content, needle", [
    (bytes(random.Random(0).randrange(256) for _ in range(4096)), "not a PyTorch checkpoint"),
    (b"", "is empty"),
    (b"epoch,acc\n1,0.5\n", "is a text file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "Git LFS pointer"),
])
def test_files_that_are_not_checkpoints(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "x.pt")
    one_line(e, needle)


def test_wrong_class_count_names_both_counts(tmp_path: Path) -> None:
    torch.save(build_model("resnet18", 100).state_dict(), tmp_path / "c100.pt")
    model = build_model("resnet18", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "c100.pt")
    one_line(e, "c100.pt has 100 classes, model 'resnet18' has 10")
    assert _unchanged(model, before)


def test_other_architecture_says_what_it_looks_like(tmp_path: Path) -> None:
    torch.save(build_model("resnet18", 10).state_dict(), tmp_path / "r18.pt")
    model = build_model("mobilenetv2", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "r18.pt")
    msg = one_line(e, "does not fit model 'mobilenetv2'", "looks like a 'resnet18' checkpoint",
                          "missing keys, e.g. ", "unexpected keys, e.g. ")
    assert "layers.0.conv1.weight" in msg and "layer1.0.conv1.weight" in msg
    assert _unchanged(model, before)
    # same layout, other width: the first mismatching shape is named
    torch.save(WideResNet(10, 3, 10).state_dict(), tmp_path / "wrn10_3.pt")
    with pytest.raises(CheckpointError) as e:
        load_weights(WideResNet(10, 2, 10), tmp_path / "wrn10_3.pt")
    one_line(e, "block1.layer.0.conv1.weight has shape (48, 16, 3, 3) in the checkpoint, (32, 16, 3, 3) "
                       "in the model")


def test_missing_path_directory_pickled_model_and_nan(tmp_path: Path) -> None:
    model = build_model("tiny_cnn", 10)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "nope.pt")
    one_line(e, "nope.pt not found")
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path)
    one_line(e, "is a directory")
    torch.save(build_model("tiny_cnn", 10), tmp_path / "whole.pt")  # a pickled nn.Module, not a state dict
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "whole.pt")
    one_line(e, "pickled Python objects", "model.state_dict()")
    torch.save({"epoch": 3, "best_acc": 0.9}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "meta.pt")
    one_line(e, "holds no state dict", "best_acc, epoch")
    sd = build_model("tiny_cnn", 10).state_dict()
    sd["fc.bias"][3] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / "nan.pt")
    one_line(e, "NaN or infinite values in fc.bias")
