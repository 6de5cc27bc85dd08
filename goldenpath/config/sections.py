"""The sections of a run's configuration: one frozen dataclass tree (:class:`Config`), each section checking
its own fields (``check``), and the registries of the ``data`` and ``model`` families.

Every field is typed; out-of-range values and contradictory settings raise :class:`ConfigError`, which the
CLI prints as one line (``goldenpath: <field>: <problem>; <fix>``) with exit code 2. Reading YAML and
overrides into this tree is :mod:`goldenpath.config`'s part.

The ``data`` and ``model`` sections are families: ``data.source`` and ``model.name`` pick a registered
subclass that adds its own fields (``@data_source("teacher")``, ``@model_family("cnn")``), so adding a
source or a model is one small dataclass next to its implementation. This module imports none of them: it
names the module that implements each built-in family (:data:`FAMILY_MODULES`) and imports that module the
first time the name is looked up, as a plugin (a family registered by another package works the same).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from typing import Literal

class ConfigError(ValueError):
    """Bad input, reported as one line: ``<field>: <problem>; <fix>``."""

    def __init__(self, field_name: str, problem: str, fix: str):
        super().__init__(f"{field_name}: {problem}; {fix}")
        self.field = field_name


def require(ok: bool, field_name: str, problem: str, fix: str) -> None:
    """Raise ConfigError(field_name, problem, fix) unless ok."""
    if not ok:
        raise ConfigError(field_name, problem, fix)


def accumulation_steps(batch_size: int, micro_batch_size: int, world: int = 1) -> int:
    """Micro-batches per process and optimizer step: the logical batch split over processes and micro-batches
    (the one place the split is checked)."""
    require(batch_size % (micro_batch_size * world) == 0, "optim.batch_size",
            f"{batch_size} is not divisible by micro_batch_size {micro_batch_size}"
            + (f" x {world} processes" if world > 1 else ""),
            "make batch_size a multiple of micro_batch_size" + (" x processes" if world > 1 else ""))
    return batch_size // (micro_batch_size * world)


# ----------------------------------------------------------------------------- families

DATA_SOURCES: dict[str, type[DataConfig]] = {}
MODEL_FAMILIES: dict[str, type[ModelConfig]] = {}


def data_source(name: str):
    """Class decorator registering a DataConfig subclass under ``data.source: name``."""
    def register(cls):
        DATA_SOURCES[name] = cls
        return cls
    return register


def model_family(name: str):
    """Class decorator registering a ModelConfig subclass under ``model.name: name``."""
    def register(cls):
        MODEL_FAMILIES[name] = cls
        return cls
    return register


# Where each built-in family is implemented: importing the module registers its config class.
FAMILY_MODULES = {
    "data": {"teacher": "goldenpath.data.synthetic", "markov": "goldenpath.data.synthetic",
             "fashion_mnist": "goldenpath.data.sources", "cifar5m": "goldenpath.data.sources",
             "hf_text": "goldenpath.data.hub", "hf_image": "goldenpath.data.hub",
             "shakespeare": "goldenpath.data.text"},
    "model": {name: "goldenpath.models" for name in ("cnn", "mlp", "resnet18", "vit", "gpt2", "llama")},
}


def _family(section: str, name: str) -> type | None:
    """The config class registered under ``name`` in ``section`` (data or model), importing its module on
    first use; None for an unknown name."""
    registry = DATA_SOURCES if section == "data" else MODEL_FAMILIES
    if name not in registry and name in FAMILY_MODULES[section]:
        importlib.import_module(FAMILY_MODULES[section][name])
    return registry.get(name)


def _names(section: str) -> list[str]:
    return sorted({*FAMILY_MODULES[section], *(DATA_SOURCES if section == "data" else MODEL_FAMILIES)})


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class DataConfig:
    """Fields shared by every data source; ``source`` picks the subclass with the source's own fields."""

    source: str = "teacher"
    seed: int = 0                   # seeds the data distribution, eval set and probe set (shared by a sweep)
    epochs: int = 1                 # 1: online (each sample once); > 1: offline, train_size samples reshuffled
    train_size: int | None = None   # samples in the fixed offline subset; None: the whole (maybe infinite) pool
    subset: int = 0                 # offline: which of the disjoint blocks of train_size samples is the subset
    eval_size: int = 2048           # held-out samples (sequences for text) that define the eval loss
    probe_size: int = 1024          # disjoint held-out samples on which functions are compared
    prefetch: int = 2               # optimizer steps of batches made ahead in a background thread; 0: in the step

    def check(self) -> None:
        """Validate fields that depend on each other (subclasses extend)."""
        require(self.epochs >= 1, "data.epochs", f"got {self.epochs}", "use 1 (online) or more (offline)")
        require(self.epochs == 1 or self.train_size is not None, "data.train_size",
                f"must be set when data.epochs={self.epochs} > 1 (offline)",
                "set data.train_size=N, the size of the fixed subset reshuffled each epoch")
        require(self.train_size is None or self.train_size > 0, "data.train_size",
                f"got {self.train_size}", "use a positive number of samples")
        require(self.subset >= 0, "data.subset", f"got {self.subset}", "use 0, 1, ... (a block of train_size samples)")
        require(self.subset == 0 or self.train_size is not None, "data.subset", "is set without data.train_size",
                "set data.train_size (the block size), or drop data.subset")
        require(self.eval_size > 0, "data.eval_size", f"got {self.eval_size}", "use a positive size")
        require(self.probe_size > 0, "data.probe_size", f"got {self.probe_size}", "use a positive size")
        require(0 <= self.seed < 2**31, "data.seed", f"got {self.seed}", "use 0 <= seed < 2**31")
        require(self.prefetch >= 0, "data.prefetch", f"got {self.prefetch}",
                "use 0 (batches made in the step) or the steps to make ahead, e.g. 2")

    def build(self):
        """Return the source (goldenpath.data.Source) this section describes."""
        raise NotImplementedError(f"data source {self.source!r} has no build()")


@dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every model; ``name`` picks the subclass with the family's size fields."""

    name: str = "cnn"

    def check(self) -> None:
        """Validate fields that depend on each other (subclasses extend)."""

    def build(self, info):
        """Return the nn.Module for a source described by ``info`` (goldenpath.data.SourceInfo)."""
        raise NotImplementedError(f"model {self.name!r} has no build()")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05                     # peak learning rate per optimizer step
    momentum: float = 0.0                # sgd only
    nesterov: bool = False               # sgd only
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)   # adamw only
    eps: float = 1e-8                    # adamw only
    batch_size: int = 64                 # samples per optimizer step (logical batch, all processes)
    micro_batch_size: int | None = None  # samples per forward/backward on one process; None: no accumulation
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = 0                      # optimizer steps of linear warmup from 0
    min_lr_ratio: float = 0.0            # cosine ends at lr * min_lr_ratio

    def check(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}", "use a positive learning rate")
        require(0 <= self.momentum < 1, "optim.momentum", f"got {self.momentum}", "use 0 <= momentum < 1")
        require(not self.nesterov or self.momentum > 0, "optim.nesterov", "needs momentum > 0",
                "set optim.momentum or optim.nesterov=false")
        require(self.weight_decay >= 0, "optim.weight_decay", f"got {self.weight_decay}", "use >= 0")
        require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"got {list(self.betas)}",
                "use two values in [0, 1)")
        require(self.eps > 0, "optim.eps", f"got {self.eps}", "use a small positive number")
        require(self.batch_size > 0, "optim.batch_size", f"got {self.batch_size}", "use a positive batch size")
        mb = self.micro_batch_size
        require(mb is None or mb > 0, "optim.micro_batch_size", f"got {mb}", "use a positive size or null")
        if mb is not None:
            accumulation_steps(self.batch_size, mb)
        require(self.warmup >= 0, "optim.warmup", f"got {self.warmup}", "use a number of steps >= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"got {self.min_lr_ratio}", "use a value in [0, 1]")


@dataclass(frozen=True)
class BudgetConfig:
    samples: int | None = None       # stop after this many training samples (whichever of samples/steps first)
    steps: int | None = None         # stop after this many optimizer steps
    stop_at_last_target: bool = True # stop once the eval loss reaches the last checkpoint target
    diverge_factor: float = 3.0      # diverged when the train loss exceeds this multiple of the initial eval loss
    min_progress: float | None = 0.05  # stalled unless the eval loss gets this fraction below chance; null: never

    def check(self) -> None:
        require(self.samples is None or self.samples > 0, "budget.samples", f"got {self.samples}",
                "use a positive number of samples or null")
        require(self.steps is None or self.steps > 0, "budget.steps", f"got {self.steps}",
                "use a positive number of steps or null")
        require(self.diverge_factor > 1, "budget.diverge_factor", f"got {self.diverge_factor}", "use a value > 1")
        require(self.min_progress is None or 0 <= self.min_progress < 1, "budget.min_progress",
                f"got {self.min_progress}", "use a fraction in [0, 1), e.g. 0.05, or null to never judge a run stalled")


@dataclass(frozen=True)
class CheckpointConfig:
    targets: tuple[float, ...] = ()  # eval losses, decreasing: save the model the first time each is reached
    eval_every: int = 100            # log the eval loss every this many optimizer steps (never moves a checkpoint)
    target_eval_every: int = 100     # the target search: optimizer steps between its evals far from a target
    eval_min_every: int = 1          # the target search's smallest gap, used right before a target
    eval_batch_size: int = 512       # samples per eval forward
    steps: tuple[int, ...] = ()      # also save the model at these optimizer steps
    last_every_seconds: float = 120.0  # save the resume state this often, at the next scheduled eval (a kill
    #                                    loses at most this much plus one eval gap; the schedule never moves)
    optimizer: bool = True           # target/step checkpoints also keep the optimizer state (forks continue it)
    best: bool = False               # also keep checkpoints/best: the model at the lowest eval loss

    def check(self) -> None:
        t = self.targets
        require(all(x > 0 for x in t), "checkpoint.targets", f"got {list(t)}", "use positive losses")
        require(all(a > b for a, b in zip(t, t[1:])), "checkpoint.targets", f"not decreasing: {list(t)}",
                "list targets from the highest loss to the lowest")
        require(self.eval_every >= 1, "checkpoint.eval_every", f"got {self.eval_every}", "use >= 1 step")
        require(self.target_eval_every >= 1, "checkpoint.target_eval_every", f"got {self.target_eval_every}",
                "use >= 1 step")
        require(1 <= self.eval_min_every <= self.target_eval_every, "checkpoint.eval_min_every",
                f"got {self.eval_min_every}", f"use 1 <= eval_min_every <= target_eval_every={self.target_eval_every}")
        require(self.eval_batch_size > 0, "checkpoint.eval_batch_size", f"got {self.eval_batch_size}",
                "use a positive size")
        require(all(s > 0 for s in self.steps), "checkpoint.steps", f"got {list(self.steps)}",
                "use positive step numbers")
        require(self.last_every_seconds >= 0, "checkpoint.last_every_seconds", f"got {self.last_every_seconds}",
                "use seconds >= 0 (0 saves after every step)")


@dataclass(frozen=True)
class NoiseConfig:
    """Gradient noise (docs/science.md, "Noise knobs"); B is the logical batch, xi ~ N(0, I).

    gaussian (Noisy-SGD): g = mean gradient + (sigma / B) xi
    dp (DP-SGD):          g = (sum_i clip_C(g_i) + sigma C xi) / B, the norm over all trained parameters
    """

    kind: Literal["none", "gaussian", "dp"] = "none"
    sigma: float = 0.0          # noise multiplier (std of the noise on the summed gradient, in units of C for dp)
    clip: float | None = None   # dp: per-sample clipping norm C
    delta: float | None = None  # dp: epsilon is reported for this delta (default 1/N offline, 1e-5 online)
    method: Literal["fast", "vmap"] = "fast"  # dp per-sample norms: ghost norms + book-keeping, or torch.func vmap
    vmap_chunk: int = 32        # samples per vmap call (bounds the per-sample gradients held at once)

    def check(self) -> None:
        require(self.sigma >= 0 and math.isfinite(self.sigma), "noise.sigma", f"got {self.sigma}",
                "use a finite value >= 0")
        require(self.kind != "none" or self.sigma == 0, "noise.sigma", f"is {self.sigma} but noise.kind is none",
                "set noise.kind=gaussian (or dp), or drop noise.sigma")
        require(self.kind != "dp" or (self.clip is not None and self.clip > 0), "noise.clip",
                f"dp needs a positive clipping norm, got {self.clip}", "set noise.clip, e.g. noise.clip=1.0")
        require(self.kind == "dp" or self.clip is None, "noise.clip", f"is set but noise.kind is {self.kind}",
                "set noise.kind=dp, or drop noise.clip")
        require(self.delta is None or 0 < self.delta < 1, "noise.delta", f"got {self.delta}",
                "use 0 < delta < 1, e.g. 1e-5")
        require(self.vmap_chunk > 0, "noise.vmap_chunk", f"got {self.vmap_chunk}", "use a positive size")


@dataclass(frozen=True)
class ForkConfig:
    """Set by ``goldenpath fork``: this run continues another one from one of its checkpoints."""

    parent: str | None = None        # the parent's run directory
    at_loss: float | None = None     # fork from the parent's loss-target checkpoint ...
    at_step: int | None = None       # ... or from its checkpoint at this step (checkpoint.steps)
    changed: tuple[str, ...] = ()    # the keys that differ from the parent's config

    def check(self) -> None:
        if self.parent is None:
            require(self.at_loss is None and self.at_step is None and not self.changed, "fork.parent",
                    "fork.at_loss/at_step/changed are set without a parent", "use goldenpath fork RUN_DIR ...")
        else:
            require((self.at_loss is None) != (self.at_step is None), "fork.at_loss",
                    "a fork needs exactly one of at_loss and at_step", "give --at-loss L or --at-step S")


@dataclass(frozen=True)
class LogConfig:
    every: int = 10            # optimizer steps between metrics.jsonl lines
    progress: bool = True      # tqdm progress bar on the main process (hidden when stderr is not a terminal)
    sample_ids: bool = False   # append every consumed sample id to samples/rank<r>.i64 (audit of the stream)
    noise_scale: bool = False  # log B_simple from the first micro-batch's and the logical batch's gradients
    trackers: tuple[str, ...] = ()  # also log to accelerate trackers: tensorboard (<run>/tensorboard/), wandb

    def check(self) -> None:
        require(self.every >= 1, "log.every", f"got {self.every}", "use >= 1 step")
        bad = [t for t in self.trackers if t not in ("tensorboard", "wandb")]
        require(not bad, "log.trackers", f"unknown tracker {bad[0] if bad else ''!r}", "use tensorboard and/or wandb")
        for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if name in self.trackers:
                require(importlib.util.find_spec(module) is not None, "log.trackers", f"{name} is not installed",
                        f"pip install {name}, or drop it from log.trackers")


def _default_data() -> DataConfig:
    return _family("data", "teacher")()


def _default_model() -> ModelConfig:
    return _family("model", "cnn")()


@dataclass(frozen=True)
class Config:
    """The whole description of one run."""

    name: str = "run"                                 # run directory: <out>/<name>/
    out: str = "runs"
    seed: int = 0                                     # model init, stream order and noise draws
    replicate: int | None = None                      # which replicate of its setting (a sweep sets it)
    design: Literal["independent", "paired"] | None = None  # how its sweep seeded settings (None: a lone run)
    cpu: bool = False                                 # force CPU even where a GPU is present
    threads: int | None = None                        # CPU threads; None: $OMP_NUM_THREADS, else cores / 2 (1-4)
    precision: Literal["auto", "fp32", "bf16", "fp64"] = "auto"  # auto: bf16 on a CUDA GPU, else fp32 (resolved
    # when the config loads); bf16: autocast (+ TF32 on a GPU); fp32: strict float32; fp64: for numerical checks
    compile: bool = False                             # torch.compile the model's forward (fused kernels on a GPU)
    data: DataConfig = field(default_factory=_default_data)
    model: ModelConfig = field(default_factory=_default_model)
    optim: OptimConfig = field(default_factory=OptimConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    fork: ForkConfig = field(default_factory=ForkConfig)

    @property
    def regime(self) -> str:
        """online (each sample seen at most once) or offline (epochs over a fixed subset)."""
        return "offline" if self.data.epochs > 1 else "online"

    @property
    def injected_sigma(self) -> float:
        """The injected noise multiplier (0 without injected noise)."""
        return self.noise.sigma if self.noise.kind != "none" else 0.0

    def check(self) -> None:
        require(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*(/[A-Za-z0-9][A-Za-z0-9._=+-]*)*", self.name)),
                "name", f"{self.name!r} is not a safe directory name", "use letters, digits and . _ - = +")
        require(0 <= self.seed < 2**20, "seed", f"got {self.seed}", "use 0 <= seed < 2**20")
        require(self.replicate is None or self.replicate >= 0, "replicate", f"got {self.replicate}",
                "use 0, 1, ... (a sweep numbers each setting's replicates)")
        require(self.threads is None or self.threads >= 1, "threads", f"got {self.threads}",
                "use a positive number of CPU threads, or null for the default")
        require(not self.compile or self.noise.kind != "dp", "compile",
                "per-sample clipping runs the model eagerly (hooks and torch.func)", "set compile=false under dp")
        require(not self.log.noise_scale or self.noise.kind != "dp", "log.noise_scale",
                "under dp the trainer forms only clipped gradients", "use goldenpath noise on a checkpoint")
        require(not self.log.noise_scale or (self.optim.micro_batch_size or self.optim.batch_size)
                < self.optim.batch_size, "log.noise_scale", "needs two batch sizes: a micro-batch and the batch",
                "set optim.micro_batch_size below optim.batch_size")
        require(self.noise.kind != "dp" or getattr(self.model, "loss_chunk_tokens", None) is None,
                "model.loss_chunk_tokens", "per-sample clipping needs the output layer's own forward",
                "set model.loss_chunk_tokens=null with noise.kind=dp")
        require(self.noise.kind != "dp" or getattr(self.model, "norm", None) != "batch", "model.norm",
                "batch norm mixes the samples of a batch, so DP-SGD has no per-sample gradients",
                "use model.norm=group with noise.kind=dp")
        n, b = self.data.train_size, self.optim.batch_size
        require(self.noise.kind != "dp" or self.data.epochs == 1 or n is None or n % b == 0, "optim.batch_size",
                f"{b} does not divide data.train_size={n}: under dp a batch across two epochs could hold a sample "
                "twice (its clipped gradient counted twice)", f"use a batch size that divides {n}, or a train_size "
                f"that is a multiple of {b}")
        for section in (self.data, self.model, self.optim, self.noise, self.budget, self.checkpoint, self.log,
                        self.fork):
            section.check()
