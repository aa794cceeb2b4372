"""Reading checkpoints safely and loading them strictly, with one-line errors a user can act on.

Public checkpoints come wrapped in many ways (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's
``module.`` prefix) and downloads fail in many ways (an HTML login page saved as ``.pt``, a cut-off file, a
Git LFS pointer). Every such case raises :class:`CheckpointError` naming the file and the problem; a
checkpoint of another architecture or class count says so instead of dumping PyTorch's key lists.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from bmtard_ray.config import RunConfig, to_dict
from bmtard_ray.errors import CheckpointError, ConfigError
from bmtard_ray.models.formats import SUFFIX as SAFETENSORS_SUFFIX
from bmtard_ray.models.formats import is_safetensors, read_safetensors
from bmtard_ray.models.refs import normalization_of, pretrained_stats
from bmtard_ray.models.robustbench import RobustBenchModel, resolve_robustbench
from bmtard_ray.models.small import InputNormalization
from bmtard_ray.models.zoo import LAYOUTS, build_model, layout_for_keys
from bmtard_ray.names import MODEL_NAMES, ROBUSTBENCH_MODEL_DIR, is_model_ref, is_robustbench, is_timm_ref
from bmtard_ray.storage import checkpoints

if TYPE_CHECKING:
    from bmtard_ray.data import DatasetInfo

Stats = tuple[tuple[float, ...], tuple[float, ...]]
PYAUTOATTACK = "pyautoattack"  # the alias a teacher config also accepts
MODEL_FORMAT = "bmtard_ray.model/1"  # format tag of our model files (students and trained teachers)

# Wrappers that training scripts put around the state dict, unwrapped in this order (nested ones too).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_ZIP_MAGIC = b"PK\x03\x04"  # PyTorch >= 1.6 saves zip archives; older ones pickles (PROTO opcode 0x80, 2..5)
_SHOW = 3  # how many example keys an error message lists


def _one_line(text: object, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _examples(keys: list[str]) -> str:
    """The first few keys, in the given order but weights first: BatchNorm statistics and biases say
    little about which architecture a checkpoint is."""
    keys = sorted(keys, key=lambda k: (k.endswith(("num_batches_tracked", "running_mean", "running_var")),
                                       not k.endswith(".weight")))
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def _as_text(data: bytes) -> str | None:
    """``data`` decoded as UTF-8, or None for binary data (a cut-off last character is allowed)."""
    for cut in range(4):  # the 512-byte head may end inside a multi-byte character
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _check_not_text(path: Path, head: bytes) -> None:
    """Downloads that failed often leave a web page or pointer file behind under the checkpoint's name."""
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start:
        raise CheckpointError(f"checkpoint {path} is empty (no data)")
    text = _as_text(start)
    lower = start.lower()
    if lower.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or (
            lower.startswith(b"<") and text is not None):
        raise CheckpointError(f"checkpoint {path} is a web page (HTML), not a checkpoint: the download link "
                              f"probably returned a login/confirm page")
    if lower.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"checkpoint {path} is a Git LFS pointer file, not the checkpoint: fetch the real "
                              f"file (git lfs pull)")
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        raise CheckpointError(f"checkpoint {path} is a text file, not a checkpoint (it starts with "
                              f"{_one_line(text, 40)!r})")


def _torch_load(path: Path) -> object:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(e.strerror or str(e))}") from None
    _check_not_text(path, head)
    if is_safetensors(path, head):
        return read_safetensors(path)
    looks_like_torch = head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03",
                                                                                               b"\x04", b"\x05"))
    err: Exception
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if looks_like_torch and "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} stores pickled Python objects (e.g. a whole model), which are not loaded for "
                f"safety (weights_only=True): re-save it with torch.save(model.state_dict(), path)") from None
        err = e
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        err = e
    if looks_like_torch:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (an incomplete download?): "
                              f"{_one_line(str(err))}") from None
    raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (unrecognised file format)") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def read_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, on the CPU, with wrappers and ``module.`` prefixes removed.

    ``key`` picks one entry of a dict-shaped checkpoint first (e.g. ``"ema"``); without it the usual
    wrappers (``state_dict``, ``model_state_dict``, ``model``, ``net``) are unwrapped.
    """
    path = Path(path)
    obj = _torch_load(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = _examples(sorted(str(k) for k in obj)) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"checkpoint {path} has no entry '{key}' (it holds: {keys})")
        obj = obj[key]
    for _ in range(4):  # wrappers nest at most a few levels ({"model": {"state_dict": ...}})
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        what = f"top-level keys: {_examples(sorted(str(k) for k in obj))}" if isinstance(obj, dict) and obj \
            else f"a {type(obj).__name__}"
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors ({what})")
    sd: dict[str, torch.Tensor] = dict(obj)  # type: ignore[call-overload]  # _is_state_dict checked it
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def _classifier_key(model: nn.Module) -> str | None:
    """The weight key of the model's last Linear layer: its first dimension is the class count."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return None if name is None else f"{name}.weight"


def _guess_arch(keys: set[str]) -> str | None:
    """The model name whose parameter names these are (built on the meta device: no memory, no time)."""
    wanted = {k for k in keys if not k.endswith("num_batches_tracked")} - {"mean", "std"}  # RobustBench buffers
    for name in MODEL_NAMES:
        for layout in LAYOUTS.get(name) or [None]:  # every layout of an architecture counts as that architecture
            with torch.device("meta"):
                candidate = build_model(name, 10, layout=layout)
            have = {k for k in candidate.state_dict() if not k.endswith("num_batches_tracked")}
            optional = tuple(getattr(candidate, "optional_checkpoint_prefixes", ()))
            if wanted <= have and all(k.startswith(optional) for k in have - wanted):
                return name
    return None


def _arch_message(path: Path, arch: str, keys: list[str], missing: list[str], unexpected: list[str]) -> str:
    guess = _guess_arch(set(keys))
    like = f"it looks like a '{guess}' checkpoint" if guess else "its keys belong to another architecture"
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {_examples(unexpected)}")
    return f"checkpoint {path} does not fit model '{arch}': {like} ({'; '.join(parts)})"


def load_weights(model: nn.Module, path: str | os.PathLike, *, key: str | None = None) -> None:
    """Load a checkpoint into ``model`` strictly: every key present, no extra key, every shape equal.

    Tolerated, because they do not change what the model computes: missing ``num_batches_tracked``
    (checkpoints from PyTorch < 0.4.1), missing keys under the model's ``optional_checkpoint_prefixes``
    (TRADES' unused ``sub_block1``), and top-level ``mean``/``std`` (RobustBench's persistent normalisation
    buffers), which are moved into the model's input normalisation because the weights were trained with them.
    """
    path = Path(path)
    arch = getattr(model, "arch_name", type(model).__name__)
    sd = read_state_dict(path, key=key)
    target = model.state_dict()
    norm_stats = None
    normalize = getattr(model, "normalize", None)
    if {"mean", "std"} <= sd.keys() and "mean" not in target and isinstance(normalize, InputNormalization):
        mean, std = sd.pop("mean"), sd.pop("std")
        if mean.numel() != normalize.mean.numel() or std.numel() != normalize.std.numel():
            raise CheckpointError(f"checkpoint {path} has normalisation statistics for {mean.numel()} channels, "
                                  f"model '{arch}' takes {normalize.mean.numel()}")
        norm_stats = (mean, std)
    optional = tuple(getattr(model, "optional_checkpoint_prefixes", ()))
    missing = {k for k in target.keys() - sd.keys()
               if not k.endswith("num_batches_tracked") and not k.startswith(optional)}
    unexpected = sd.keys() - target.keys()
    if missing or unexpected:
        # in definition / file order, where the first differences are the telling ones
        raise CheckpointError(_arch_message(path, arch, list(sd), [k for k in target if k in missing],
                                            [k for k in sd if k in unexpected]))
    head = _classifier_key(model)
    if head is not None and sd[head].shape != target[head].shape:
        if sd[head].shape[1:] == target[head].shape[1:]:
            raise CheckpointError(f"checkpoint {path} has {sd[head].shape[0]} classes, model '{arch}' has "
                                  f"{target[head].shape[0]}")
    for k, v in sd.items():
        if v.shape != target[k].shape:
            raise CheckpointError(f"checkpoint {path} does not fit model '{arch}': {k} has shape "
                                  f"{tuple(v.shape)} in the checkpoint, {tuple(target[k].shape)} in the model "
                                  f"(another depth or width?)")
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"checkpoint {path} has NaN or infinite values in {k} (a diverged run?)")
    full = {k: sd.get(k, target[k]) for k in target}  # tolerated absentees keep the model's own values
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied: still one line
        raise CheckpointError(f"checkpoint {path} does not load into model '{arch}': {_one_line(str(e))}") from None
    if norm_stats is not None and isinstance(normalize, InputNormalization):
        normalize.set(*norm_stats)


def pyautoattack_resnet18_path() -> Path:
    """The standard (non-robust) CIFAR-10 ResNet-18 that the pyautoattack wheel ships as an example.

    Found without importing the package, so a broken optional dependency of pyautoattack does not matter.
    """
    hint = "install it with `pip install pyautoattack` (its wheel ships examples/model_test.pt)"
    try:
        spec = importlib.util.find_spec("pyautoattack")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the pyautoattack package is not installed: {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "examples" / "model_test.pt"
        if path.is_file():
            return path
    raise CheckpointError(f"pyautoattack is installed but has no examples/model_test.pt: re-{hint}")


# ---------------------------------------------------------------------------------------------------------
# Model files: what a file is, and the model it holds.


def model_record(model: nn.Module, arch: str, info: DatasetInfo, cfg: RunConfig, extra: dict[str, Any] | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """The format every saved model (student or teacher) uses, readable with ``weights_only=True``.

    A referenced model (``timm:<name>``) records the normalisation it was built with unless ``mean``/``std`` say."""
    if mean is None and std is None and (attached := normalization_of(model)) is not None:
        mean, std = tuple(attached[0]), tuple(attached[1])
    return {"format": MODEL_FORMAT, "arch": arch, "num_classes": info.num_classes, "dataset": info.name,
            "mean": list(mean) if mean else None, "std": list(std) if std else None,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": to_dict(cfg), **(extra or {})}


@dataclass
class Inspected:
    path: Path
    record: dict[str, Any] | None  # our file's metadata (arch, num_classes, dataset, mean, std, teachers, config)
    key: str | None = None         # entry holding the weights when it is not the usual wrapper


@dataclass
class LoadedModel:
    model: nn.Module
    arch: str
    path: Path
    record: dict[str, Any] | None  # None for a public checkpoint


def _resolve_path(spec: str) -> Path:
    if spec == PYAUTOATTACK:
        return pyautoattack_resnet18_path()
    return Path(spec)


def inspect_checkpoint(spec: str) -> Inspected:
    """What a checkpoint file is: our model file, our training checkpoint, or a plain/public state dict.

    Damaged files (an HTML page, a Git LFS pointer, a cut-off download) raise a one-line CheckpointError.
    """
    path = _resolve_path(spec)
    try:
        read_state_dict(path)  # the thorough checks: HTML page, LFS pointer, truncated, empty, no tensors
        problem = None
    except CheckpointError as exc:
        problem = exc  # fatal unless the file is one of our training checkpoints (weights under "student")
    if problem is None and path.suffix.lower() == SAFETENSORS_SUFFIX:
        return Inspected(path, None)  # tensors only: the architecture comes from --arch / teachers.<role>.arch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged: read_state_dict has already said how, in one line
        if problem is not None:
            raise problem from None
        raise
    found = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(found, str) and found.startswith("bmtard_ray.") and found not in (MODEL_FORMAT, checkpoints.FORMAT):
        raise CheckpointError(f"checkpoint {path} has format {found}; this version reads {MODEL_FORMAT} and "
                              f"{checkpoints.FORMAT}")
    if checkpoints.is_checkpoint(obj):
        # A training checkpoint (saved every epoch): the student's weights under "student", no normalisation.
        cfg = obj["config"]
        record = {"arch": cfg.get("student"), "num_classes": None, "dataset": (cfg.get("data") or {}).get("dataset"),
                  "mean": None, "std": None, "config": cfg, "epoch": obj.get("epoch")}
        return Inspected(path, record, key="student")
    if problem is not None:
        raise problem
    if isinstance(obj, dict) and isinstance(obj.get("arch"), str) and isinstance(obj.get("state_dict"), dict):
        return Inspected(path, {k: v for k, v in obj.items() if k != "state_dict"})
    return Inspected(path, None)


def load_pretrained(name: str, num_classes: int, path: str | os.PathLike, *,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    key: str | None = None, default_stats: Stats | None = None) -> nn.Module:
    """``name`` in the layout the checkpoint's keys say (``LAYOUTS``), with its weights loaded strictly.

    A checkpoint of none of the layouts is loaded into the default one, so that load_weights' one-line error
    says what does not fit.
    """
    layout = layout_for_keys(name, set(read_state_dict(path, key=key))) if name in LAYOUTS else None
    model = build_model(name, num_classes, mean=mean, std=std, layout=layout, default_stats=default_stats)
    load_weights(model, path, key=key)
    return model


def _arch_flag(role: str) -> str:
    """How the user names the architecture of ``role``: a run_eval flag or a teacher's config key."""
    if role.endswith(" teacher"):
        return f"teachers.{role.split()[0]}.arch"
    return "--arch" if role == "checkpoint" else "--source-arch"


def load_model(spec: str, arch: str | None, num_classes: int, *, dataset: str,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
               role: str = "checkpoint", inspected: Inspected | None = None,
               model_dir: str | os.PathLike = ROBUSTBENCH_MODEL_DIR, default_stats: Stats | None = None) -> LoadedModel:
    """Build the architecture (in the layout the file's keys say) and load the weights strictly (one-line
    CheckpointError otherwise). ``robustbench:<Name>`` is looked up under ``model_dir`` (models.robustbench).
    ``default_stats``: the dataset's mean/std, which normalise a ``timm:<name>`` model that ``mean``/``std`` and
    the file leave without statistics (as a run trains it). Pretrained weights are never fetched here."""
    flag = _arch_flag(role)
    if is_robustbench(spec):
        found_rb = resolve_robustbench(spec, arch, dataset=dataset, model_dir=Path(model_dir), mean=mean, std=std,
                                       arch_flag=flag)
        if isinstance(found_rb, RobustBenchModel):
            return LoadedModel(found_rb.model, found_rb.arch, found_rb.path, None)
        model = load_pretrained(found_rb.arch, num_classes, found_rb.path, mean=found_rb.mean, std=found_rb.std)
        return LoadedModel(model, found_rb.arch, found_rb.path, None)
    found = inspected if inspected is not None else inspect_checkpoint(spec)
    path, record = found.path, found.record
    if record is not None:  # our own file: it says what it is
        if arch is not None and arch != record["arch"]:
            raise ConfigError(f"{role} {path} is a '{record['arch']}' model; {flag} {arch} contradicts it")
        arch = record["arch"]
        if record.get("num_classes") is not None and int(record["num_classes"]) != num_classes:
            raise CheckpointError(f"{role} {path} has {record['num_classes']} classes but dataset {dataset} has "
                                  f"{num_classes}")
        mean = tuple(record["mean"]) if record.get("mean") else mean
        std = tuple(record["std"]) if record.get("std") else std
        if mean is None and is_timm_ref(arch) and (record.get("config") or {}).get("student_pretrained"):
            stats = pretrained_stats(arch)  # a training checkpoint of a pretrained timm student
            mean, std = tuple(stats[0]), tuple(stats[1])
    elif spec == PYAUTOATTACK:
        arch = arch or "resnet18"  # kuangliu layout, no normalisation
    if arch is None:
        raise ConfigError(f"{role} {path} is a plain state dict: say which architecture it is with {flag}")
    model = load_pretrained(arch, num_classes, path, mean=mean, std=std, key=found.key,
                            default_stats=default_stats if is_model_ref(arch) else None)
    return LoadedModel(model, arch, path, record)
