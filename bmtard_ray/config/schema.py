"""What a run is: the configuration's dataclasses, every key with its default.

Every constant of docs/algorithm.md (the table of its §4.6) has a field here, with the released value as its
default. Building a configuration from presets, files and overrides is :mod:`bmtard_ray.config.build`; its
checks are :mod:`bmtard_ray.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bmtard_ray.names import ROBUSTBENCH_MODEL_DIR

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
    # imagefolder / npz only (README, "Your own models and data"):
    image_size: int | None = None    # square resize (PIL bilinear, antialiased); None: images keep their size
    memory_budget_mb: int = 2048     # a dataset (train + test, uint8) up to this stays in memory; larger streams
    cache_dir: str = ""              # the streamed datasets' decoded memory maps; "" = <output_dir>/data_cache


@dataclass
class AttackConfig:
    """Training-time PGD against the student (docs/algorithm.md §2.1)."""
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    init_std: float = 0.001         # Gaussian start x + init_std * N(0, 1)


@dataclass
class LossConfig:
    """How the distillation KLs are reduced (docs/algorithm.md §2.3)."""
    reduction: str = "elementwise_mean"  # released: mean over all B*K elements (= batch-mean KL / K)
    log_eps: float = 1e-5                # added inside the teacher's log, as released
    scale: float = 1.0                   # dataset-dependent default: 10 for CIFAR-100 (DATASET_DEFAULTS)


@dataclass
class EBBConfig:
    """Entropy-Based Balance (docs/algorithm.md §2.4), its searchable generalisation (§5) and our exact variant (§6).

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
    """Normalization Loss Balance (docs/algorithm.md §2.5) and its generalisation (§5.3)."""
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
    arch: str = "resnet56"           # a MODEL_NAMES entry, timm:<name> or <module>:<callable>
    pretrained: bool = False         # timm:<name> only: a teacher the toolkit trains starts from timm's weights
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
    student: str = "resnet18"        # a MODEL_NAMES entry, timm:<name> or <module>:<callable>
    student_pretrained: bool = False  # timm:<name> only: start from timm's pretrained weights (fetched, never silently)
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


def data_cache_dir(cfg: RunConfig) -> str:
    """Where streamed datasets are decoded to: ``data.cache_dir``, else ``<output_dir>/data_cache``."""
    return cfg.data.cache_dir or f"{cfg.output_dir.rstrip('/')}/data_cache"


def teacher_cache_dir(cfg: RunConfig) -> str:
    """Where cached teachers live: ``teachers.cache_dir``, else ``<output_dir>/teachers``."""
    return cfg.teachers.cache_dir or f"{cfg.output_dir.rstrip('/')}/teachers"
