"""Run configuration: dataclasses, YAML presets, dotted overrides, and validation.

A configuration is resolved once (preset YAML -> user YAML -> ``--set a.b=value`` overrides), validated
before anything runs, and written next to the outputs. Every constant of REFERENCE.md has a field here,
with the released value as its default.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from bmtard_ray.errors import ConfigError
from bmtard_ray.names import (ATTACK_NAMES, DATASET_DEFAULTS, DATASET_NAMES, DEVICES, METHOD_NAMES, MODEL_NAMES,
                              ROBUSTBENCH_MODEL_DIR, TEACHER_TRAIN_METHODS, apply_checkpoint_archs,
                              check_robustbench_dataset, is_robustbench, robustbench_name)

CONFIG_FORMAT = "bmtard_ray.config/1"  # written at the top of every run's config.yaml
REDUCTIONS = ("elementwise_mean", "batchmean", "sum")
ENTROPY_TARGET_MODES = ("absolute", "fraction")
EBB_MODES = ("step", "solve")


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str = "data"
    download: bool = False          # fetch with torchvision when online; offline copies need none
    val_size: int = 5000            # carved (stratified) from the training set; tuning never sees test
    split_seed: int = 0
    train_subset: int | None = None  # train on a stratified subset of this many images (CPU presets)
    test_subset: int | None = None   # evaluate on a stratified subset of the test split
    augment: bool = True             # random crop (pad 4) + horizontal flip
    loader: str = "device"           # "device": uint8 split resident on the device; "reference": DataLoader
    num_workers: int = 2             # only for loader="reference"


@dataclass
class AttackConfig:
    """Training-time PGD against the student (REFERENCE §1.1)."""
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    init_std: float = 0.001         # Gaussian start x + init_std * N(0, 1)


@dataclass
class LossConfig:
    """How the distillation KLs are reduced (REFERENCE §1.3)."""
    reduction: str = "elementwise_mean"  # released: mean over all B*K elements (= batch-mean KL / K)
    log_eps: float = 1e-5                # added inside the teacher's log, as released
    scale: float = 1.0                   # dataset-dependent default: 10 for CIFAR-100 (DATASET_DEFAULTS)


@dataclass
class EBBConfig:
    """Entropy-Based Balance (REFERENCE §1.4), its searchable generalisation (§3) and our exact variant (§3b).

    ``mode: step`` is the paper's sign step of ``eta_tau`` per iteration from the initial temperatures.
    ``mode: solve`` (this project's extension, not the paper's) solves every iteration, on the global batch,
    for the temperatures that meet the target (or equalise the teachers, anchored at ``tau_min``); the
    losses of that iteration use them. In solve mode ``tau_*_init`` and ``eta_tau`` play no part.
    """
    enabled: bool = True
    mode: str = "step"                   # "step" (the paper) or "solve" (exact, ours)
    tau_adv_init: float = 1.0            # step mode only
    tau_nat_init: float = 1.0            # step mode only
    tau_min: float = 1.0
    tau_max: float = 10.0
    eta_tau: float = 0.001               # step mode only
    target_entropy: float | None = None  # None: the paper's equalisation of the two teachers
    target_mode: str = "absolute"        # "absolute" (nats) or "fraction" (of log K)
    smoothing: float = 0.0               # solve mode: tau <- s * tau_prev + (1 - s) * tau_solved; 0 = exact


@dataclass
class NLBConfig:
    """Normalization Loss Balance (REFERENCE §1.5) and its generalisation (§3)."""
    enabled: bool = True
    w_adv_init: float = 0.5
    beta: float = 1.0
    rho: float = 0.025
    # L_i(0): mean over the first N iterations (1 = released). For N > 1 the weights stay at w_adv_init
    # until the window is complete; iteration N takes the first update, against the full mean.
    ref_window: int = 1


@dataclass
class MethodConfig:
    name: str = "bmtard"
    trades_beta: float = 6.0
    trades_step_size: float = 0.007
    ard_alpha: float = 1.0           # ARD's released CIFAR-10 setting
    ard_temperature: float = 30.0
    rslad_nat_weight: float = 1 / 6
    rslad_adv_weight: float = 5 / 6


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    batch_size: int = 128            # global batch (split over Ray workers)
    epochs: int = 300
    # lr, eta_tau and rho are multiplied by gamma AFTER the training of each milestone epoch, as the
    # released loop does: with (215, 260, 285) epoch 215 runs at lr 0.1 and epoch 216 is the first at 0.01.
    milestones: tuple[int, ...] = (215, 260, 285)
    gamma: float = 0.1


@dataclass
class TeacherConfig:
    """A frozen teacher: loaded from ``checkpoint`` or trained once by the toolkit and cached."""
    arch: str = "resnet56"
    checkpoint: str | None = None    # a path, "pyautoattack" or robustbench:<Name> (see names.ROBUSTBENCH_KNOWN)
    # Used when no checkpoint: natural (clean) / sat / trades (robust), at that method's defaults (never the student's).
    train_method: str = "natural"
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 128
    milestones: tuple[int, ...] = ()  # lr x optim.gamma after these epochs (the rule of optim.milestones)
    mean: tuple[float, float, float] | None = None  # normalisation carried inside the model
    std: tuple[float, float, float] | None = None


@dataclass
class TeachersConfig:
    clean: TeacherConfig = field(default_factory=lambda: TeacherConfig(arch="resnet56", train_method="natural"))
    robust: TeacherConfig = field(default_factory=lambda: TeacherConfig(arch="wrn34_10", train_method="trades"))
    cache_dir: str = ""               # "" = <output_dir>/teachers, so teachers follow --output-dir
    model_dir: str = ROBUSTBENCH_MODEL_DIR  # robustbench:<Name> is <model_dir>/<dataset>/Linf/<Name>.pt
    logit_cache: str = ""             # clean teacher's logits shared by a seed's runs (logit_cache.py); "" = off


@dataclass
class EvalConfig:
    attacks: tuple[str, ...] = ("clean", "pgd_sat")
    eps: float = 8 / 255
    n_examples: int | None = None    # None: the whole split; else a stratified, seeded subset
    batch_size: int = 256
    seed: int = 0
    headline: str = "pgd_sat"        # attack whose W-Robust is the run's objective
    square_queries: int = 1000
    autoattack_version: str = "standard"


@dataclass
class RunConfig:
    name: str = "bmtard"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"
    student: str = "resnet18"
    fast: bool = True                # channels_last (CPU and GPU) + bf16 autocast (GPU only)
    compile: bool = False            # torch.compile the student and teachers (GPU)
    sync_every_step: bool = False    # reference mode: .item() every step like the released code
    val_every: int = 1               # validate (clean + headline attack) every N epochs; 0 = only at end
    val_examples: int | None = 1000  # validation subset used during training
    checkpoint_every: int = 1        # checkpoint every N epochs (and after the last)
    checkpoint_every_iters: int = 0  # also every N iterations inside an epoch (0 = off): what a restart redoes
    trace: bool = True               # per-iteration balance trace (Parquet)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ebb: EBBConfig = field(default_factory=EBBConfig)
    nlb: NLBConfig = field(default_factory=NLBConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------------
# Building a config from nested dicts (YAML) and dotted overrides.


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{path} must not be null")
    try:
        if text.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            inner = float if "float" in text else int if "int" in text else str
            return tuple(_scalar(v, inner, path) for v in value)
        if "bool" in text:
            return _scalar(value, bool, path)
        if "int" in text and "float" not in text:
            return _scalar(value, int, path)
        if "float" in text:
            return _scalar(value, float, path)
        if "str" in text:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read {value!r} as {text}") from exc
    return value


def _scalar(value: Any, kind: type, path: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(float(value)) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, str) and "/" in value:  # "8/255" is how eps is usually written
            num, den = value.split("/", 1)
            return float(num) / float(den)
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    return kind(value)


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section; give it a mapping, not {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def preset_names() -> list[str]:
    folder = resources.files("bmtard_ray") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    # A run's config.yaml carries its format; any version-1 file reads as overrides (others refuse).
    found = data.pop("format", CONFIG_FORMAT)
    if found != CONFIG_FORMAT:
        raise ConfigError(f"{path}: config format {found!r} is not one this version reads ({CONFIG_FORMAT})")
    return data


def preset_dict(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(names)}")
    text = (resources.files("bmtard_ray") / "presets" / f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", parsed YAML scalar)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a (nested) layer sets."""
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def apply_dataset_defaults(cfg: RunConfig, explicit: set[str]) -> RunConfig:
    """Give every dataset-dependent key not in ``explicit`` its value for ``cfg``'s dataset (in place)."""
    for key, by_dataset in DATASET_DEFAULTS.items():
        if key not in explicit and cfg.data.dataset in by_dataset:
            _apply(cfg, nest({key: by_dataset[cfg.data.dataset]}))
    return cfg


def dataset_settings(cfg: RunConfig) -> str:
    """The resolved dataset-dependent keys, for the line a run prints when it starts."""
    flat = flat_keys(cfg)
    return ", ".join(f"{key}={flat[key]:g}" if isinstance(flat[key], float) else f"{key}={flat[key]}"
                     for key in DATASET_DEFAULTS)


def build_config(preset: str | None = None, files: list[str | Path] = (), overrides: list[str] = (),
                 extra: dict[str, Any] | None = None) -> RunConfig:
    """Resolve preset -> files -> ``extra`` (nested dict) -> dotted overrides, then the dataset-dependent
    defaults of keys none of them set, then validate."""
    cfg = RunConfig()
    layers: list[dict[str, Any]] = []
    if preset:
        layers.append(preset_dict(preset))
    layers += [read_yaml(f) for f in files]
    if extra:
        layers.append(extra)
    if overrides:
        layers.append(nest(dict(parse_override(o) for o in overrides)))
    explicit: set[str] = set()
    for layer in layers:
        _apply(cfg, layer)
        explicit |= _leaf_keys(layer)
    apply_dataset_defaults(cfg, explicit)
    # A preset's teacher arch is a default that a RobustBench name may replace; the user's own is not.
    user = set().union(*(_leaf_keys(layer) for layer in layers[1 if preset else 0:]))
    apply_checkpoint_archs(cfg, user)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON/YAML-able dict (tuples become lists)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(asdict(cfg))


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, data)
    return cfg


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A deep copy with dotted-key changes applied (``replace(cfg, **{"optim.lr": 0.05})``)."""
    new = from_dict(to_dict(cfg))
    _apply(new, nest(changes))
    return new


def flat_keys(cfg: Any = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf as ``section.key -> value``; the search spaces use these names."""
    cfg = RunConfig() if cfg is None else cfg
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flat_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Validation: every impossible value is caught here, before a worker or a file exists.


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: RunConfig) -> RunConfig:
    c = cfg
    _check(c.method.name in METHOD_NAMES,
           f"unknown method '{c.method.name}'; choose one of: {', '.join(METHOD_NAMES)}")
    _check(c.student in MODEL_NAMES, f"unknown student model '{c.student}'; choose one of: {', '.join(MODEL_NAMES)}")
    _check(c.data.dataset in DATASET_NAMES,
           f"unknown dataset '{c.data.dataset}'; choose one of: {', '.join(DATASET_NAMES)}")
    _check(c.device in DEVICES, f"unknown device '{c.device}'; choose one of: {', '.join(DEVICES)}")
    _check(c.data.loader in ("device", "reference"), f"data.loader must be 'device' or 'reference', got '{c.data.loader}'")
    _check(c.data.val_size >= 0, f"data.val_size must be >= 0, got {c.data.val_size}")
    _check(c.data.num_workers >= 0, f"data.num_workers must be >= 0, got {c.data.num_workers}")
    for key in ("train_subset", "test_subset"):
        v = getattr(c.data, key)
        _check(v is None or v > 0, f"data.{key} must be a positive count or null, got {v}")
    _check(_finite(c.attack.eps) and c.attack.eps >= 0, f"attack.eps must be >= 0, got {c.attack.eps}")
    _check(_finite(c.attack.step_size) and c.attack.step_size >= 0,
           f"attack.step_size must be >= 0, got {c.attack.step_size}")
    _check(c.attack.steps >= 0, f"attack.steps must be >= 0, got {c.attack.steps}")
    _check(_finite(c.attack.init_std) and c.attack.init_std >= 0, f"attack.init_std must be >= 0, got {c.attack.init_std}")
    _check(c.loss.reduction in REDUCTIONS,
           f"unknown loss.reduction '{c.loss.reduction}'; choose one of: {', '.join(REDUCTIONS)}")
    _check(_finite(c.loss.scale) and c.loss.scale > 0, f"loss.scale must be > 0, got {c.loss.scale}")
    _check(_finite(c.loss.log_eps) and c.loss.log_eps >= 0, f"loss.log_eps must be >= 0, got {c.loss.log_eps}")
    e = c.ebb
    _check(e.mode in EBB_MODES, f"unknown ebb.mode '{e.mode}'; choose one of: {', '.join(EBB_MODES)}")
    _check(_finite(e.smoothing) and 0 <= e.smoothing < 1, f"ebb.smoothing must be in [0, 1), got {e.smoothing}")
    _check(_finite(e.tau_min) and e.tau_min > 0, f"ebb.tau_min must be > 0, got {e.tau_min}")
    _check(_finite(e.tau_max) and e.tau_min <= e.tau_max, f"ebb.tau_min ({e.tau_min}) must be <= ebb.tau_max ({e.tau_max})")
    for key in ("tau_adv_init", "tau_nat_init"):
        v = getattr(e, key)
        # Solve mode never uses the initial temperatures, so their range is only checked where they act.
        _check(_finite(v) and (e.mode == "solve" or e.tau_min <= v <= e.tau_max),
               f"ebb.{key} must lie in [tau_min, tau_max] = [{e.tau_min}, {e.tau_max}], got {v}")
    _check(_finite(e.eta_tau) and e.eta_tau >= 0, f"ebb.eta_tau must be >= 0, got {e.eta_tau}")
    _check(e.target_mode in ENTROPY_TARGET_MODES,
           f"unknown ebb.target_mode '{e.target_mode}'; choose one of: {', '.join(ENTROPY_TARGET_MODES)}")
    if e.target_entropy is not None:
        _check(_finite(e.target_entropy) and e.target_entropy > 0,
               f"ebb.target_entropy must be > 0 (or null), got {e.target_entropy}")
        if e.target_mode == "fraction":
            _check(e.target_entropy <= 1, f"ebb.target_entropy as a fraction of log K must be in (0, 1], got {e.target_entropy}")
    n = c.nlb
    _check(_finite(n.rho) and 0 < n.rho <= 1, f"nlb.rho must be in (0, 1], got {n.rho}")
    _check(_finite(n.beta) and n.beta >= 0, f"nlb.beta must be >= 0, got {n.beta}")
    _check(_finite(n.w_adv_init) and 0 <= n.w_adv_init <= 1, f"nlb.w_adv_init must be in [0, 1], got {n.w_adv_init}")
    _check(n.ref_window >= 1, f"nlb.ref_window must be >= 1, got {n.ref_window}")
    m = c.method
    _check(_finite(m.trades_beta) and m.trades_beta >= 0, f"method.trades_beta must be >= 0, got {m.trades_beta}")
    _check(_finite(m.ard_alpha) and 0 <= m.ard_alpha <= 1, f"method.ard_alpha must be in [0, 1], got {m.ard_alpha}")
    _check(_finite(m.ard_temperature) and m.ard_temperature > 0, f"method.ard_temperature must be > 0, got {m.ard_temperature}")
    o = c.optim
    _check(o.batch_size >= 1, f"optim.batch_size must be >= 1, got {o.batch_size}")
    _check(o.epochs >= 1, f"optim.epochs must be >= 1, got {o.epochs}")
    _check(_finite(o.lr) and o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(_finite(o.momentum) and 0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(_finite(o.gamma) and 0 < o.gamma <= 1, f"optim.gamma must be in (0, 1], got {o.gamma}")
    _check(list(o.milestones) == sorted(set(o.milestones)) and all(m_ > 0 for m_ in o.milestones),
           f"optim.milestones must be increasing positive epochs, got {list(o.milestones)}")
    for role in ("clean", "robust"):
        t: TeacherConfig = getattr(c.teachers, role)
        _check(t.arch in MODEL_NAMES, f"unknown teachers.{role}.arch '{t.arch}'; choose one of: {', '.join(MODEL_NAMES)}")
        _check(t.train_method in TEACHER_TRAIN_METHODS,
               f"teachers.{role}.train_method must be natural, sat or trades, got '{t.train_method}'")
        _check(t.epochs >= 1 and t.batch_size >= 1 and t.lr > 0,
               f"teachers.{role}: epochs, batch_size and lr must be positive")
        if is_robustbench(t.checkpoint):  # resolved when loaded: the file may still be downloaded then
            robustbench_name(t.checkpoint)
            check_robustbench_dataset(t.checkpoint, c.data.dataset)
        elif t.checkpoint and t.checkpoint != "pyautoattack":
            _check(Path(t.checkpoint).is_file(), f"teachers.{role}.checkpoint {t.checkpoint} does not exist")
    v = c.eval
    for a in v.attacks:
        _check(a in ATTACK_NAMES, f"unknown eval attack '{a}'; choose from: {', '.join(ATTACK_NAMES)}")
    _check(v.headline in ATTACK_NAMES and v.headline != "clean",
           f"eval.headline must be a non-clean attack from: {', '.join(a for a in ATTACK_NAMES if a != 'clean')}")
    _check(_finite(v.eps) and v.eps >= 0, f"eval.eps must be >= 0, got {v.eps}")
    _check(v.batch_size >= 1, f"eval.batch_size must be >= 1, got {v.batch_size}")
    _check(v.n_examples is None or v.n_examples > 0, f"eval.n_examples must be positive or null, got {v.n_examples}")
    _check(min(c.val_every, c.checkpoint_every, c.checkpoint_every_iters) >= 0, "val_every and checkpoint_every(_iters) must be >= 0")
    _check(c.val_examples is None or c.val_examples > 0, f"val_examples must be positive or null, got {c.val_examples}")
    if c.val_every and c.data.val_size == 0:
        raise ConfigError("val_every > 0 needs a validation split: set data.val_size > 0 (or val_every=0)")
    return cfg


def field_names(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def teacher_cache_dir(cfg: RunConfig) -> str:
    """Where cached teachers live: ``teachers.cache_dir``, else ``<output_dir>/teachers``."""
    return cfg.teachers.cache_dir or f"{cfg.output_dir.rstrip('/')}/teachers"
