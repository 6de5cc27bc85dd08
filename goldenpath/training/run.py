"""A run being trained: everything the loop works on (:class:`Run`, made by :func:`start`: a new run, a resumed
one or a fork), with its counters and step statistics (:mod:`goldenpath.training.state`).

:mod:`goldenpath.training.trainer` holds the loop itself; this module builds what it needs and writes what it
reports (status.json, metrics.jsonl, the resume state).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from goldenpath.store import files, rundir as ckpt
from goldenpath.config import (Config, ConfigError, OptimConfig, accumulation_steps, auto_precision, require,
                               to_dict)
from goldenpath.data import build_stream
from goldenpath.seeding import Purpose, stream_key
from goldenpath.training.fork import ancestry, fork_start
from goldenpath.models import build_model
from goldenpath.dp.mechanisms import mechanism
from goldenpath.dp.privacy import privacy_spent
from goldenpath.config.identity import flat
from goldenpath.training.runtime import cpu_threads
from goldenpath.training.state import RunState, Window

# ----------------------------------------------------------------------------- small pure pieces


def optimizer_kwargs(device: torch.device, dtypes) -> dict:
    """Extra optimizer arguments for parameters of ``dtypes`` on ``device``: the fused kernel on a CUDA GPU (one
    launch per step for all parameters, and step counters kept on the device, so the update never waits for
    the host or makes the host wait); nothing elsewhere (the CPU keeps torch's default implementation)."""
    return {"fused": True} if device.type == "cuda" and all(d.is_floating_point for d in dtypes) else {}


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    extra = optimizer_kwargs(params[0].device, {p.dtype for p in params}) if params else {}
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay, **extra)
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                             **extra)


def planned_steps(config: Config, stream_limit: int | None, start: dict | None = None) -> int | None:
    """The step count at which the budget stops the run (None: until the last loss target).

    ``start``: a fork's step, samples and stream position at its first step (budgets count the parent's).
    """
    b = config.optim.batch_size
    start = start or {"step": 0, "samples": 0, "position": 0}
    bounds = [config.budget.steps] if config.budget.steps else []
    if config.budget.samples:
        bounds.append(start["step"] + max(0, config.budget.samples - start["samples"]) // b)
    if stream_limit is not None:
        bounds.append(start["step"] + max(0, stream_limit - start["position"]) // b)
    steps = min(bounds) if bounds else None
    if steps is None and not (config.checkpoint.targets and config.budget.stop_at_last_target):
        raise ConfigError("budget", "the stream is unbounded and nothing stops the run",
                          "set budget.samples or budget.steps (or loss targets with budget.stop_at_last_target)")
    if steps is not None and steps <= start["step"]:
        if config.fork.parent is not None and stream_limit is not None and \
                start["step"] + max(0, stream_limit - start["position"]) // b <= start["step"]:
            raise ConfigError("fork.parent", f"{config.fork.parent} read its whole stream ({stream_limit} samples, "
                              f"data.train_size x data.epochs): none is left for a fork, which reads on from where "
                              f"its parent stopped", "fork a run whose budget.samples stops it before its data "
                              "runs out")
        raise ConfigError("budget.samples", f"allows no step of optim.batch_size={b}",
                          "raise budget.samples (or data.train_size x data.epochs) above one batch")
    if steps is None and config.optim.schedule == "cosine":
        raise ConfigError("optim.schedule", "cosine needs a known number of steps",
                          "set budget.samples or budget.steps")
    return steps


def tf32_allowed(device: torch.device, precision: str) -> bool | None:
    """Whether float32 matmuls and convolutions on ``device`` may use TF32 tensor cores: on a CUDA GPU, yes under
    bf16 (what autocast leaves in float32) and no under fp32 (strict float32, as asked); None elsewhere (no such
    setting: the CPU computes as it always did)."""
    return precision == "bf16" if device.type == "cuda" else None


def bf16_autocast(device: torch.device, enabled: bool):
    """A factory of autocast contexts: bf16 on ``device`` when enabled, else nothing."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def chance_loss(batch: dict) -> float:
    """The loss of predicting the label marginal of a held-out batch (its entropy, in nats): what a model
    that learned nothing about the inputs gets."""
    labels = batch["y"] if "y" in batch else batch["labels"][batch["labels"] != -100]
    p = torch.bincount(labels.flatten()).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def _scalar(value):
    """A tracker's hyperparameter: a scalar as it is, anything else (lists, None) as text."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



# ----------------------------------------------------------------------------- the run


FINISHED = ckpt.FINISHED


@dataclass
class Run:
    """Everything the loop works on; made by :func:`start`."""

    config: Config
    dir: Path
    accelerator: Any
    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: Any
    source: Any
    mechanism: Any
    eval_batch: dict
    state: RunState
    autocast: Callable
    dtype: torch.dtype
    total_steps: int | None
    stream_steps: int | None
    floor: float | None
    chance: float
    resumed: bool
    forked: bool
    ancestry: list = field(default_factory=list)  # a fork's parents' parts (fork.ancestry): its privacy counts them
    # several processes reading shares that may run out apart (a streaming dataset): a gloo group on which they
    # agree each step whether every one has its share, host to host (no device sync)
    share_group: Any = None
    window: Window | None = None
    metrics: Any = None
    ids_file: Any = None
    bar: Any = None

    @property
    def files(self) -> ckpt.RunDir:
        """The paths of this run's directory."""
        return ckpt.RunDir(self.dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def trained(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def status(self, **fields) -> None:
        """Merge the counters and ``fields`` into status.json (main process)."""
        if self.main:
            st = self.state
            ckpt.update_status(self.dir, step=st.step, samples=st.samples, tokens=st.tokens,
                               eval_loss=st.last_eval, best_eval_loss=st.best[1] if st.best else None,
                               eval_error=st.eval_error, targets_reached=st.reached, seconds=st.seconds,
                               updated=_now(), **self.privacy(), **fields)

    def privacy(self) -> dict:
        """epsilon, delta and the accountant after the steps taken, a fork's parents' included ({} without dp)."""
        return privacy_spent(self.config, self.state.step, self.ancestry)

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (and the trackers')."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.config.log.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k not in ("step", "samples", "tokens")
                                  and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=record["step"])

    def save_last(self) -> None:
        """The resume state, as one directory swapped in atomically (every process writes its part)."""
        t0 = time.perf_counter()
        last_dir = self.files.last
        tmp = last_dir.with_name("last.tmp")
        if self.main:
            files.staging_dir(last_dir)
        self.accelerator.wait_for_everyone()
        if self.ids_file is not None:  # every id up to this state is on disk before the state is
            self.ids_file.flush()
            os.fsync(self.ids_file.fileno())
        ckpt.write_rank_state(tmp, self.accelerator.process_index, self.stream.state_dict(),
                              sums=self.window.sums.tolist())
        self.accelerator.wait_for_everyone()
        if self.main:
            ckpt.write_shared_state(tmp, self.model, self.optimizer, self.state.as_dict())
            files.commit_dir(tmp, last_dir)
        self.accelerator.wait_for_everyone()
        self.state.seconds["checkpoint"] += time.perf_counter() - t0

    def close(self) -> None:
        if self.config.log.trackers:
            self.accelerator.end_training()
        for thing in (self.bar, self.metrics, self.ids_file, self.stream):  # the stream: its prefetch thread
            if thing is not None:
                thing.close()


def start(config: Config) -> Run | Path:
    """Build the run of ``config``: a new one, the resumed one in its directory, or a fork of its parent.

    Returns the run directory instead when the run finished before (nothing to do). Bad input raises
    ConfigError before a run directory is made.
    """
    from accelerate import Accelerator

    # bf16 autocast is ours, not the Accelerator's: accelerate keeps its mixed-precision setting in a
    # process-wide singleton, which would refuse a second run with another precision in the same process.
    run_dir = Path(config.out) / config.name
    trackers = list(config.log.trackers)
    accelerator = Accelerator(cpu=config.cpu, log_with=trackers or None, project_dir=str(run_dir))
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.threads))
    if config.precision == "auto":  # a Config built in code (load_config resolves it)
        config = dataclasses.replace(config, precision=auto_precision(cuda=accelerator.device.type == "cuda"))
    tf32 = tf32_allowed(accelerator.device, config.precision)
    if tf32 is not None:  # process-wide switches: set both ways, whatever a run before in this process chose
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        require(config.precision != "bf16" or torch.cuda.is_bf16_supported(), "precision",
                f"bf16 but {torch.cuda.get_device_name(accelerator.device)} has no bfloat16", "set precision=fp32")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    optim = config.optim
    micro = optim.micro_batch_size or optim.batch_size // world
    accumulation = accumulation_steps(optim.batch_size, max(1, micro), world)
    if config.log.noise_scale and accumulation < 2:
        raise ConfigError("log.noise_scale", f"needs two micro-batches per process and step, got {accumulation}",
                          "lower optim.micro_batch_size")
    source = config.data.build()
    if getattr(config.data, "generate", "cpu") == "device":  # embedded sources: training batches made on the device
        source.place(accelerator.device)
    stream = build_stream(source, config.data, seed=config.seed, batch_size=optim.batch_size,
                          micro_batch_size=micro, rank=rank, world=world, device=accelerator.device)
    forked = fork_start(config, rank)
    if forked and "iterator" in forked["stream"] and forked["parent_processes"] != world:
        raise ConfigError("fork.parent", f"the parent read its sequential stream with {forked['parent_processes']} "
                          f"processes, this run has {world}", "fork with the parent's number of processes")
    planned_steps(config, stream.limit, forked and forked["start"])  # budget errors before a run directory exists
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    model = build_model(config.model, source.info, seed=config.seed).to(accelerator.device, dtype)
    if config.compile:
        model.compile()  # in place: parameter names, checkpoints and per-step maths stay those of the module
    optimizer = make_optimizer(model, optim)
    eval_batch = source.heldout("eval")
    if main:  # only now: a config that fails to build leaves no run directory behind
        ckpt.RunDir(Path(config.out) / config.name).prepare(config)
    accelerator.wait_for_everyone()
    directory = ckpt.RunDir(run_dir)
    if directory.state() in FINISHED:
        return run_dir

    state, resumed = _restore(config, directory, model, optimizer, stream, forked, accelerator)
    begin = state.fork_start or {"step": 0, "samples": 0, "position": 0}
    total_steps = planned_steps(config, stream.limit, begin)
    stream_steps = None if stream.limit is None else \
        begin["step"] + (stream.limit - begin["position"]) // optim.batch_size  # when the stream runs out
    ddp_model = accelerator.prepare(model)  # DDP when world > 1; the same module otherwise
    # a fork draws its own noise: not the parent's sequence again from the fork step (a non-negative key: the
    # noise key takes it as a seed)
    noise_seed = config.seed if config.fork.parent is None else \
        stream_key(config.seed, Purpose.FORK, begin["step"]) & (2**63 - 1)
    run = Run(config=config, dir=run_dir, accelerator=accelerator, model=model, ddp_model=ddp_model,
              optimizer=optimizer, stream=stream, source=source,
              mechanism=mechanism(config.noise, batch_size=optim.batch_size, seed=noise_seed),
              eval_batch=eval_batch, state=state,
              autocast=bf16_autocast(accelerator.device, config.precision == "bf16"),
              dtype=dtype, total_steps=total_steps, stream_steps=stream_steps, floor=source.loss_floor(),
              chance=chance_loss(eval_batch), resumed=resumed, forked=forked is not None,
              ancestry=ancestry(config) if forked and config.noise.kind == "dp" else [],
              window=Window(accelerator.device),
              share_group=torch.distributed.new_group(backend="gloo")
              if world > 1 and getattr(stream, "ends_apart", False) else None)
    if resumed:  # a partly filled log window goes on where it stopped: the next logged line averages every step
        run.window.load(directory.resume_sums(rank))
    _open_outputs(run, begin)
    return run


def _restore(config: Config, directory: ckpt.RunDir, model, optimizer, stream, forked: dict | None,
             accelerator) -> tuple[RunState, bool]:
    """The run's counters, with model, optimizer and stream put where the run stands: from the resume state
    when there is one, else from the parent's checkpoint (a fork), else new; and whether it resumed."""
    state, rank, main = RunState(), accelerator.process_index, accelerator.is_main_process
    if main:
        files.resolve_dir(directory.last)  # finish a swap a kill interrupted
    accelerator.wait_for_everyone()
    if directory.last.is_dir():
        saved, stream_state = ckpt.load_resume_state(directory.last, rank, model, optimizer)
        state.load(saved)
        stream.load_state_dict(stream_state)
        if main:
            print(f"goldenpath: {directory.path}: resuming from step {state.step} ({state.samples} samples)",
                  file=sys.stderr, flush=True)
        return state, True
    if forked:  # the parent's model (and optimizer state) at the fork point; its stream from where it ended
        meta = forked["meta"]
        ckpt.load_weights(model, forked["dir"])
        if meta.get("optimizer") == config.optim.name:
            mine = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if ckpt.load_optimizer(optimizer, forked["dir"]):
                for group, settings in zip(optimizer.param_groups, mine):  # keep the child's hyperparameters
                    group.update(settings)
        stream.load_state_dict(forked["stream"])
        state.load(dict(step=meta["step"], samples=meta["samples"], tokens=meta["tokens"],
                        evals=[[meta["step"], meta["eval_loss"]]], latest=[meta["step"], meta["eval_loss"]],
                        initial_eval=forked["initial_eval"],
                        best=[meta["step"], meta["eval_loss"]],
                        target_index=sum(t >= meta["eval_loss"] for t in config.checkpoint.targets),
                        next_eval=meta["step"] + 1, fork_start=forked["start"]))
    return state, False


def _open_outputs(run: Run, begin: dict) -> None:
    """metrics.jsonl, the sample-id log, status.json's running state, the progress bar and the trackers."""
    config, st, main = run.config, run.state, run.main
    if main:
        run.metrics = ckpt.MetricsLog(run.files.metrics, resume_step=st.step if run.resumed else None)
    if config.log.sample_ids:
        ids = run.files.samples_file(run.accelerator.process_index)
        ids.parent.mkdir(exist_ok=True)
        run.ids_file = open(ids, "ab")
        run.ids_file.truncate((st.samples - begin["samples"]) // run.world * 8)  # drop ids after the resumed state
    if main:
        cpu = run.accelerator.device.type == "cpu"
        ckpt.update_status(run.dir, state="running", reason=None, loss_floor=run.floor, chance_loss=run.chance,
                           planned_steps=run.total_steps, processes=run.world, device=str(run.accelerator.device),
                           threads=torch.get_num_threads() if cpu else None,
                           started=run.files.status().get("started", _now()),
                           resumed_from_step=st.step if run.resumed else None,
                           **run.privacy())
    b = config.optim.batch_size
    run.bar = tqdm(total=run.total_steps * b if run.total_steps else None, initial=st.samples, unit="sample",
                   unit_scale=True, dynamic_ncols=True, disable=True if not (main and config.log.progress) else None,
                   desc=config.name)
    if config.log.trackers:  # hyperparameters as flat scalars (what TensorBoard's hparams accept)
        trackers = list(config.log.trackers)
        run.accelerator.init_trackers(trackers[0] if len(trackers) == 1 else "trackers",
                                      config=flat(to_dict(config), leaf=_scalar))
