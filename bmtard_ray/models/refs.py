"""Architectures by reference: ``timm:<name>`` (any timm model) and ``<module>:<callable>`` (a user's factory).

Their syntax is checked at the floor (:func:`bmtard_ray.names.check_arch`); here they are imported and built.
timm is imported only when a ``timm:`` model is built, so ``import bmtard_ray`` stays light.

Inputs: every model of the toolkit takes images in [0, 1] and normalises inside, because attacks work in pixel
units. timm models do not normalise, so :func:`attach_normalization` gives the timm module itself an
:class:`InputNormalization` child (non-persistent buffers: not in ``state_dict()``) and a forward pre-hook that
applies it. The model stays timm's own class with timm's own state-dict keys, so a plain timm state dict loads
strictly, and so does one saved from a model built here. Statistics: ``mean``/``std`` when given, else timm's
pretrained ones when its weights are used, else the dataset's. A user's factory normalises as it likes (it gets
[0, 1] inputs); given ``mean``/``std`` are attached the same way.

Pretrained weights are never fetched silently: only ``pretrained=True`` asks for them, and when they are not in
the local cache and the hub does not answer within :data:`HUB_TIMEOUT_S`, one line says so at once.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import socket
import sys
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bmtard_ray.errors import ModelError
from bmtard_ray.models.small import InputNormalization
from bmtard_ray.names import TIMM_PREFIX, is_timm_ref

NORMALIZE_ATTR = "bmtard_normalize"  # the InputNormalization child a referenced model gets
HUB_TIMEOUT_S = 3.0                  # how long the hub may take to accept a connection before it counts as down
TIMM_PIN = "timm==1.0.31"
Stats = tuple[Sequence[float], Sequence[float]]


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Input normalisation on a module that has none


def _normalize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (getattr(module, NORMALIZE_ATTR)(args[0]), *args[1:])


def attach_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` normalising its [0, 1] inputs with ``mean``/``std`` first; its state-dict keys unchanged."""
    if hasattr(model, NORMALIZE_ATTR):
        getattr(model, NORMALIZE_ATTR).set(mean, std)
        return model
    model.add_module(NORMALIZE_ATTR, InputNormalization(mean, std))
    model.register_forward_pre_hook(_normalize_input)
    return model


def normalization_of(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """The statistics :func:`attach_normalization` gave ``model``, or None."""
    norm = getattr(model, NORMALIZE_ATTR, None)
    if isinstance(norm, InputNormalization) and norm.enabled:
        return norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    return None


# ---------------------------------------------------------------------------------------------------------
# timm


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ModelError(f"timm:<name> models need the timm package: pip install {TIMM_PIN}") from None
    return timm


def timm_name(ref: str) -> str:
    """The timm model name of ``timm:<name>``, checked against timm's registry (closest name suggested)."""
    timm = _timm()
    name = ref[len(TIMM_PREFIX):]
    arch, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.5)
        hint = f"; did you mean timm:{close[0]}?" if close else " (see timm.list_models())"
        raise ModelError(f"unknown timm model '{name}' in timm {timm.__version__}{hint}")
    return str(name)


def _pretrained_cfg(ref: str) -> Any:
    cfg = _timm().models.get_pretrained_cfg(timm_name(ref))
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelError(f"{ref}: timm has no pretrained weights for this model (set its pretrained option to false)")
    return cfg


def pretrained_stats(ref: str) -> Stats:
    """The normalisation timm's pretrained weights of ``ref`` expect (from timm's registry: no download)."""
    cfg = _pretrained_cfg(ref)
    return tuple(cfg.mean), tuple(cfg.std)


def _hf_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


def _cached(cfg: Any) -> bool:
    if cfg.file:
        return Path(cfg.file).is_file()
    if cfg.hf_hub_id and _hf_cached(cfg.hf_hub_id.split("@")[0]):
        return True
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(cfg.url).path)
                ).is_file()
    return False


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unreachable(url: str) -> str | None:
    """Why ``url``'s host does not accept a connection within HUB_TIMEOUT_S, or None when it does."""
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=HUB_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def check_pretrained(ref: str) -> bool:
    """Whether the pretrained weights of ``ref`` are in the local cache (True) or can be fetched (False);
    a one-line ModelError at once when neither."""
    cfg = _pretrained_cfg(ref)
    if _cached(cfg):
        return True
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    advice = ("fetch them on a machine with network access (they are cached in ~/.cache/huggingface or "
              "~/.cache/torch/hub; copy that folder) or set the pretrained option to false")
    if _offline_env():
        raise ModelError(f"{ref}: the pretrained weights could not be fetched: the hub is unreachable (HF_HUB_OFFLINE "
                         f"is set) and they are not in the local cache; {advice}")
    why = _unreachable(hub)
    if why is not None:
        host = urllib.parse.urlparse(hub).netloc
        raise ModelError(f"{ref}: the pretrained weights could not be fetched: the hub {host} is unreachable "
                         f"({why}) and they are not in the local cache; {advice}")
    return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub without network calls (it would otherwise ask the hub about a cached file first)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _build_timm(ref: str, num_classes: int, pretrained: bool, stats: Stats | None,
                default_stats: Stats | None) -> nn.Module:
    name = timm_name(ref)
    timm = _timm()
    cached = check_pretrained(ref) if pretrained else False
    try:
        with _hub_offline(cached):
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{ref}: timm.create_model('{name}', num_classes={num_classes}"
                         f"{', pretrained=True' if pretrained else ''}) failed: {first_line(exc)}") from None
    if stats is None:
        stats = pretrained_stats(ref) if pretrained else default_stats
    return attach_normalization(model, *stats) if stats is not None else model


# ---------------------------------------------------------------------------------------------------------
# <module>:<callable>


def import_factory(ref: str) -> Any:
    """The callable ``ref`` names, its module imported from the working directory or the installed packages."""
    module_name, _, attr = ref.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as `python -m` does: a module beside the user is found first
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelError(f"model {ref}: no module named '{module_name}' (looked in the working directory {cwd} "
                             f"and the installed packages)") from None
        raise ModelError(f"model {ref}: importing module '{module_name}' failed: {first_line(exc)}") from None
    except Exception as exc:
        raise ModelError(f"model {ref}: importing module '{module_name}' failed: {first_line(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise ModelError(f"model {ref}: module '{module_name}' ({where}) has no '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {ref}: '{attr}' is a {type(obj).__name__}, not a callable returning a model")
    return obj


def _build_factory(ref: str, num_classes: int, pretrained: bool, stats: Stats | None) -> nn.Module:
    if pretrained:
        raise ModelError(f"model {ref}: pretrained weights are for timm:<name> models only")
    factory = import_factory(ref)
    try:
        model = factory(num_classes=num_classes)
    except Exception as exc:
        raise ModelError(f"model {ref}: {ref.partition(':')[2]}(num_classes={num_classes}) raised "
                         f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {ref}: {ref.partition(':')[2]}(num_classes={num_classes}) returned a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return attach_normalization(model, *stats) if stats is not None else model


def build_ref(ref: str, num_classes: int, *, stats: Stats | None = None, pretrained: bool = False,
              default_stats: Stats | None = None) -> nn.Module:
    """The model ``ref`` names with ``num_classes`` outputs (``stats``: checked mean/std, or None).

    ``default_stats`` (the dataset's) normalise a timm model when neither ``stats`` nor pretrained weights say
    otherwise."""
    if is_timm_ref(ref):
        return _build_timm(ref, num_classes, pretrained, stats, default_stats)
    return _build_factory(ref, num_classes, pretrained, stats)


def check_outputs(model: nn.Module, num_classes: int, image_size: int, what: str) -> None:
    """One forward of a single random ``image_size`` image (eval mode, no gradient): the model must take the
    dataset's images and give ``num_classes`` logits."""
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.rand(1, 3, image_size, image_size, device=param.device if param is not None else "cpu")
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(f"{what} cannot take the dataset's {image_size}x{image_size} images: "
                         f"{first_line(exc)}") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (1, num_classes):
        raise ModelError(f"{what} gives outputs of shape {shape} for one {image_size}x{image_size} image, but the "
                         f"dataset has {num_classes} classes (expected (1, {num_classes}))")
