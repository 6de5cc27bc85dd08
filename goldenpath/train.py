"""The training loop: one function, ``train(config)``, under ``accelerate``.

    goldenpath train configs/teacher-cnn.yaml optim.lr=0.1
    accelerate launch --multi_gpu --num_processes 2 -m goldenpath train configs/teacher-cnn.yaml cpu=true

Per optimizer step: take this process's micro-batches from the stream, accumulate gradients of
``sum of per-sample losses / loss units in the whole logical batch`` (images, or predicted tokens), let DDP
average across processes at the last micro-batch, add the step's noise (Noisy-SGD), set the learning
rate, step. Under DP-SGD each micro-batch gives ``sum_i clip_C(g_i)`` instead (``noise.per_sample_clip``),
summed over micro-batches and processes, then noised once and divided by the logical batch. Around it: evaluation on
the fixed eval set (denser as the loss nears the next target), a checkpoint the first time each loss target
is reached, the resume state in ``checkpoints/last`` every ``checkpoint.last_every_seconds``, and
divergence detection. Re-running the same command resumes; on CPU the result is bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from goldenpath import checkpoints as ckpt
from goldenpath.config import Config, ConfigError, OptimConfig, config_from_dict, read_yaml, to_dict
from goldenpath.data import StreamExhausted, build_stream
from goldenpath.data.synthetic import stream_key
from goldenpath.models import build_model, count, sample_losses, sample_losses_and_errors
from goldenpath.gradnoise import noise_scale
from goldenpath.noise import add_noise, per_sample_clip
from goldenpath.privacy import epsilon
from goldenpath.runtime import Interrupts, cpu_threads, signal_name

# ----------------------------------------------------------------------------- small pure pieces


def get_lr(step: int, optim: OptimConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    # 1) linear warmup from 0
    if step < optim.warmup:
        return optim.lr * (step + 1) / optim.warmup
    # 2) constant
    if optim.schedule == "constant":
        return optim.lr
    # 3) cosine from lr down to lr * min_lr_ratio at the last step
    progress = (step - optim.warmup) / max(1, total_steps - optim.warmup)
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_eval_gap(evals: list[tuple[int, float]], target: float | None, *, max_gap: int, min_gap: int) -> int:
    """Steps until the next eval: log-spaced early, then ``max_gap``, shrinking to ``min_gap`` near a target.

    Near a target the gap is half the steps the last two evals predict are needed to reach it, so the
    overshoot past the target is at most about ``min_gap`` steps of progress.
    """
    step = evals[-1][0]
    gap = min(max_gap, max(min_gap, step))
    if target is not None and len(evals) >= 2:
        # The fastest recent descent (against any of the last few evals) is robust to a noisy last pair.
        s1, l1 = evals[-1]
        rate = max((l0 - l1) / (s1 - s0) for s0, l0 in evals[-4:-1])
        if rate > 0:
            gap = min(gap, int((l1 - target) / rate / 2))
        else:  # flat or rising near a target: widen the gap gradually, not back to max_gap at once
            gap = min(gap, 2 * (s1 - evals[-2][0]))
    return max(min_gap, gap)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


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
        raise ConfigError("budget.samples", f"allows no step of optim.batch_size={b}",
                          "raise budget.samples (or data.train_size x data.epochs) above one batch")
    if steps is None and config.optim.schedule == "cosine":
        raise ConfigError("optim.schedule", "cosine needs a known number of steps",
                          "set budget.samples or budget.steps")
    return steps


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a batch to the device; floating inputs take the model's dtype."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in batch.items()}


def bf16_autocast(device: torch.device, enabled: bool):
    """A factory of autocast contexts: bf16 on ``device`` when enabled, else nothing."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: dict, *, accelerator, chunk: int, dtype: torch.dtype,
             autocast=contextlib.nullcontext) -> tuple[float, float]:
    """Mean loss and top-1 error (per image, or per predicted token) over a held-out batch, the rows shared
    out across processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    n = len(batch["ids"])
    lo, hi = rank * n // world, (rank + 1) * n // world
    total = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, units, errors
    was_training = model.training
    model.eval()
    for start in range(lo, hi, chunk):
        part = to_device({k: v[start : min(hi, start + chunk)] for k, v in batch.items()}, accelerator.device, dtype)
        with autocast():
            losses, errors = sample_losses_and_errors(model, part)
        total[0] += losses.sum().double()
        total[1] += count(part)
        total[2] += errors.sum()
    model.train(was_training)
    total = accelerator.reduce(total, "sum") if world > 1 else total
    return float(total[0] / total[1]), float(total[2] / total[1])


def privacy_spent(config: Config, steps: int) -> dict:
    """epsilon, delta and the accountant of a DP-SGD run after ``steps`` optimizer steps (else {})."""
    noise, data = config.noise, config.data
    if noise.kind != "dp":
        return {}
    offline = data.epochs > 1
    delta = noise.delta if noise.delta is not None else (1 / data.train_size if offline else 1e-5)
    if offline:  # a sample enters one noised sum per epoch: subsampled Gaussian, RDP
        eps = epsilon(noise.sigma, delta, steps=steps, sample_rate=config.optim.batch_size / data.train_size)
        accountant = "rdp (opacus; assumes Poisson sampling, batches are shuffled)"
    else:  # every sample enters exactly one noised sum: one Gaussian mechanism
        eps = epsilon(noise.sigma, delta) if steps else 0.0
        accountant = "analytic gaussian (each sample in one step)"
    return {"epsilon": eps, "delta": delta, "accountant": accountant}


def _all_reduce_sum(tensors: list[torch.Tensor], accelerator) -> None:
    """Sum tensors across processes in place, as one flat buffer."""
    flat = accelerator.reduce(torch.cat([t.flatten() for t in tensors]), "sum")
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def fork_start(config: Config, rank: int) -> dict | None:
    """Where a fork begins: the parent's checkpoint, its meta, the parent's final stream position."""
    fork = config.fork
    if fork.parent is None:
        return None
    parent = Path(fork.parent)
    name = ckpt.target_name(fork.at_loss) if fork.at_loss is not None else f"step-{fork.at_step}"
    src = parent / "checkpoints" / name
    field = "fork.at_loss" if fork.at_loss is not None else "fork.at_step"
    if not (src / "model.safetensors").exists():
        raise ConfigError(field, f"{parent} has no checkpoint {name}",
                          "fork at a loss target the parent reached (status.json targets_reached) or a step "
                          "listed in its checkpoint.steps")
    parent_status = ckpt.read_json(parent / "status.json")
    if parent_status.get("state") == "running":
        raise ConfigError("fork.parent", f"{parent} is still running",
                          "fork once the parent has stopped: the child reads the stream from where it ended")
    world = parent_status.get("processes", 1)
    state = ckpt.read_json(parent / "checkpoints" / "last" / f"rank{min(rank, world - 1)}.json")["stream"]
    meta = ckpt.read_json(src / "meta.json")
    first = next(r for r in ckpt.read_metrics(parent) if "eval_loss" in r)
    return {"dir": src, "meta": meta, "stream": state, "parent_processes": world,
            "start": {"step": meta["step"], "samples": meta["samples"], "position": state["position"]},
            "initial_eval": first["eval_loss"]}


def pd_flat(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted.key: scalar}; lists and None as strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(pd_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Keys that do not change what a run computes: a run may be resumed with other values.
NOT_IDENTITY = ("log.progress", "threads")


def prepare_run_dir(config: Config) -> Path:
    """Create ``<out>/<name>`` with config.yaml, or check that an existing one holds the same config."""
    run_dir = Path(config.out) / config.name
    path = run_dir / "config.yaml"
    mine = to_dict(config)
    if path.exists():
        theirs = to_dict(config_from_dict(read_yaml(path)))
        diff = sorted(k for k in _diff(mine, theirs) if k not in NOT_IDENTITY)
        if diff:
            raise ConfigError("name", f"{run_dir} holds a run with another config (differs in {', '.join(diff)})",
                              "use another name= or out=, or delete that directory")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(path, ckpt.config_text(mine))
    return run_dir


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(prefix + k)
    return out


# ----------------------------------------------------------------------------- the loop


def train(config: Config) -> Path:
    """Train one run; returns its directory. Resumes from ``checkpoints/last`` when it exists."""
    from accelerate import Accelerator

    # bf16 autocast is ours, not the Accelerator's: accelerate keeps its mixed-precision setting in a
    # process-wide singleton, which would refuse a second run with another precision in the same process.
    run_dir = Path(config.out) / config.name
    trackers = list(config.log.trackers)
    accelerator = Accelerator(cpu=config.cpu, log_with=trackers or None, project_dir=str(run_dir))
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.threads))
    autocast = bf16_autocast(accelerator.device, config.precision == "bf16")
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    status_path = run_dir / "status.json"

    # Data, model, optimizer
    optim = config.optim
    micro = optim.micro_batch_size or optim.batch_size // world
    if optim.batch_size % (micro * world):
        raise ConfigError("optim.batch_size", f"{optim.batch_size} is not divisible by micro_batch_size {micro} x "
                          f"{world} processes", "make batch_size a multiple of micro_batch_size x processes")
    if config.log.noise_scale and optim.batch_size // (micro * world) < 2:
        raise ConfigError("log.noise_scale", f"needs two micro-batches per process and step, got "
                          f"{optim.batch_size // (micro * world)}", "lower optim.micro_batch_size")
    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=optim.batch_size,
                          micro_batch_size=micro, rank=rank, world=world)
    forked = fork_start(config, rank)
    if forked and "iterator" in forked["stream"] and forked["parent_processes"] != world:
        raise ConfigError("fork.parent", f"the parent read its sequential stream with {forked['parent_processes']} "
                          f"processes, this run has {world}", "fork with the parent's number of processes")
    planned_steps(config, stream.limit, forked and forked["start"])  # budget errors before a run directory exists
    dtype = torch.float64 if config.precision == "fp64" else torch.float32
    model = build_model(config.model, source.info, seed=config.seed).to(accelerator.device, dtype)
    noise = config.noise
    if noise.kind == "dp" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("model", f"{config.model.name} has batch norm, which mixes the samples of a batch, so "
                          "DP-SGD has no per-sample gradients", "use a model with group norm (model.norm=group)")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(model, optim)
    eval_batch = source.heldout("eval")
    if main:  # only now: a config that fails to build leaves no run directory behind
        prepare_run_dir(config)
    accelerator.wait_for_everyone()
    if status_path.exists() and ckpt.read_json(status_path).get("state") in ("completed", "diverged"):
        return run_dir  # finished before: nothing to do
    targets = config.checkpoint.targets

    st = {"step": 0, "samples": 0, "tokens": 0, "target_index": 0, "evals": [], "next_eval": 0,
          "reached": {}, "seconds": {"train": 0.0, "eval": 0.0, "checkpoint": 0.0}}
    last_dir = run_dir / "checkpoints" / "last"
    if main:
        ckpt.resolve_dir(last_dir)  # finish a swap a kill interrupted
    accelerator.wait_for_everyone()
    resumed = last_dir.is_dir()
    if resumed:
        st, stream_state = ckpt.load_resume_state(last_dir, rank, model, optimizer)
        stream.load_state_dict(stream_state)
        if main:
            print(f"goldenpath: {run_dir}: resuming from step {st['step']} ({st['samples']} samples)", file=sys.stderr,
                  flush=True)
    elif forked:  # the parent's model (and optimizer state) at the fork point; its stream from where it ended
        meta = forked["meta"]
        ckpt.load_weights(model, forked["dir"])
        if meta.get("optimizer") == optim.name:
            mine = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            if ckpt.load_optimizer(optimizer, forked["dir"]):
                for group, settings in zip(optimizer.param_groups, mine):  # keep the child's hyperparameters
                    group.update(settings)
        stream.load_state_dict(forked["stream"])
        st.update(step=meta["step"], samples=meta["samples"], tokens=meta["tokens"],
                  evals=[(meta["step"], meta["eval_loss"])], initial_eval=forked["initial_eval"],
                  target_index=sum(t >= meta["eval_loss"] for t in targets), next_eval=meta["step"] + 1,
                  fork_start=forked["start"])
    start = st.get("fork_start", {"step": 0, "samples": 0, "position": 0})
    total_steps = planned_steps(config, stream.limit, start)
    stream_steps = None if stream.limit is None else \
        start["step"] + (stream.limit - start["position"]) // optim.batch_size  # when the stream runs out
    ddp_model = accelerator.prepare(model)  # DDP when world > 1; the same module otherwise

    # a fork draws its own noise: not the parent's sequence again from the fork step
    noise_seed = config.seed if config.fork.parent is None else stream_key(config.seed, 0x666F726B, start["step"])
    floor = source.loss_floor()
    metrics = ckpt.MetricsLog(run_dir / "metrics.jsonl", resume_step=st["step"] if last_dir.is_dir() else None) \
        if main else None
    ids_file = None
    if config.log.sample_ids:
        (run_dir / "samples").mkdir(exist_ok=True)
        ids_file = open(run_dir / "samples" / f"rank{rank}.i64", "ab")
        ids_file.truncate((st["samples"] - start["samples"]) // world * 8)  # drop ids after the resumed state
    if main:
        ckpt.update_status(run_dir, state="running", reason=None, loss_floor=floor, planned_steps=total_steps,
                           processes=world, device=str(accelerator.device),
                           threads=torch.get_num_threads() if accelerator.device.type == "cpu" else None,
                           started=ckpt.read_json(status_path).get("started", _now()) if status_path.exists()
                           else _now(), resumed_from_step=st["step"] if last_dir.is_dir() else None,
                           **privacy_spent(config, st["step"]))
    bar = tqdm(total=total_steps * optim.batch_size if total_steps else None, initial=st["samples"], unit="sample",
               unit_scale=True, dynamic_ncols=True, disable=True if not (main and config.log.progress) else None,
               desc=config.name)

    def status(**fields) -> None:
        if main:
            ckpt.update_status(run_dir, step=st["step"], samples=st["samples"], tokens=st["tokens"],
                               eval_loss=st["evals"][-1][1] if st["evals"] else None,
                               best_eval_loss=min((l for _, l in st["evals"]), default=None),
                               eval_error=st.get("eval_error"),
                               targets_reached=st["reached"], seconds=st["seconds"], updated=_now(),
                               **privacy_spent(config, st["step"]), **fields)

    def save_last() -> None:
        t0 = time.perf_counter()
        tmp = last_dir.with_name("last.tmp")
        if main:
            ckpt.staging_dir(last_dir)
        accelerator.wait_for_everyone()
        if ids_file is not None:  # every id up to this state is on disk before the state is
            ids_file.flush()
            os.fsync(ids_file.fileno())
        ckpt.write_rank_state(tmp, rank, stream.state_dict())
        accelerator.wait_for_everyone()
        if main:
            ckpt.write_shared_state(tmp, model, optimizer, st)
            ckpt.commit_dir(tmp, last_dir)
        accelerator.wait_for_everyone()
        st["seconds"]["checkpoint"] += time.perf_counter() - t0

    keep_optimizer = optimizer if config.checkpoint.optimizer else None

    def run_eval() -> float:
        t0 = time.perf_counter()
        loss, error = evaluate(model, eval_batch, accelerator=accelerator, chunk=config.checkpoint.eval_batch_size,
                               dtype=dtype, autocast=autocast)
        st["eval_error"] = error
        st["evals"].append((st["step"], loss))
        st["seconds"]["eval"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        meta = {"step": st["step"], "samples": st["samples"], "tokens": st["tokens"], "eval_loss": loss,
                "eval_error": error,
                "optimizer": optim.name,
                "previous_eval": st["evals"][-2] if len(st["evals"]) > 1 else None}
        while st["target_index"] < len(targets) and loss <= targets[st["target_index"]]:
            target = targets[st["target_index"]]
            if main:
                ckpt.save_checkpoint(run_dir / "checkpoints" / ckpt.target_name(target), model,
                                     {"target": target, "loss_minus_target": loss - target, **meta}, keep_optimizer)
            st["reached"][f"{target:g}"] = st["step"]
            st["target_index"] += 1
        if st["step"] in config.checkpoint.steps and main:
            ckpt.save_checkpoint(run_dir / "checkpoints" / f"step-{st['step']}", model, meta, keep_optimizer)
        st["seconds"]["checkpoint"] += time.perf_counter() - t0
        nxt = targets[st["target_index"]] if st["target_index"] < len(targets) else None
        st["next_eval"] = st["step"] + next_eval_gap(st["evals"], nxt, max_gap=config.checkpoint.eval_every,
                                                     min_gap=config.checkpoint.eval_min_every)
        st["next_eval"] = min([st["next_eval"], *(s for s in config.checkpoint.steps if s > st["step"])])
        spent = privacy_spent(config, st["step"])
        bar.set_postfix_str(f"eval {loss:.4f}" + (f" floor {floor:.4f}" if floor is not None else "")
                            + (f" eps {spent['epsilon']:.3g}" if spent else ""), refresh=False)
        return loss

    if trackers:  # hyperparameters as flat scalars (what TensorBoard's hparams accept)
        flat = pd_flat(to_dict(config))
        accelerator.init_trackers(trackers[0] if len(trackers) == 1 else "trackers", config=flat)

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(record)
        if trackers:
            accelerator.log({k: v for k, v in record.items() if k not in ("step", "samples", "tokens")
                             and isinstance(v, (int, float)) and not isinstance(v, bool)}, step=record["step"])

    # since the last log: train loss sum, loss units, grad norm sum, noise norm sum, steps, clipped samples,
    # per-sample norm sum, samples (the norms are the same on every process; the dp counts are per process)
    # then for log.noise_scale: |G_micro|^2 sum, micro units sum, |G_batch|^2 sum, steps
    window = torch.zeros(12, dtype=torch.float64, device=accelerator.device)
    last_save = time.monotonic()
    state, reason = "completed", "budget"
    data_end = "all epochs done" if config.data.epochs > 1 else "data exhausted"
    try:
        with Interrupts() as signals:
            if st["step"] == 0 and not st["evals"]:
                loss = run_eval()
                log({"step": 0, "samples": 0, "tokens": 0, "eval_loss": loss, "eval_error": st["eval_error"]})
                st["initial_eval"] = loss
            elif forked and not resumed:  # the child's curve starts at the parent's checkpoint
                log({"step": st["step"], "samples": st["samples"], "tokens": st["tokens"],
                     "eval_loss": st["evals"][0][1], "forked_from": config.fork.parent})
            while True:
                # -------- stopping rules
                if total_steps is not None and st["step"] >= total_steps:
                    if total_steps == stream_steps:
                        reason = data_end
                    break
                if config.budget.stop_at_last_target and targets and st["target_index"] == len(targets):
                    reason = "last target reached"
                    break
                t0 = time.perf_counter()
                try:
                    micro_batches = stream.next_step()
                except StreamExhausted:
                    reason = data_end
                    break
                # -------- one optimizer step over the logical batch
                units = sum(count(b) for b in micro_batches)
                if world > 1 and "labels" in micro_batches[0]:
                    total_units = float(accelerator.reduce(torch.tensor(float(units), device=accelerator.device)))
                else:
                    total_units = float(units * world)  # images: every process holds the same number
                scale = world / total_units  # DDP averages over processes; undo it to get a plain sum
                if noise.kind == "dp":  # per-sample losses scaled so that (1/B) sum_i g_i is the mean gradient
                    dp_scale = optim.batch_size / total_units

                    def loss_fn(m, b):
                        return sample_losses(m, b) * dp_scale

                for i, batch in enumerate(micro_batches):
                    if ids_file is not None:
                        ids_file.write(batch["ids"].numpy().astype("<i8").tobytes())
                    batch = to_device(batch, accelerator.device, dtype)
                    if noise.kind == "dp":
                        with autocast():
                            clipped = per_sample_clip(model, loss_fn, batch, noise.clip, method=noise.method,
                                                      chunk=noise.vmap_chunk)
                        for n, p in trained:
                            p.grad = clipped.grads[n] if p.grad is None else p.grad.add_(clipped.grads[n])
                        window[0] += clipped.losses.double().sum() / dp_scale
                        window[5] += (clipped.norms > noise.clip).sum()
                        window[6] += clipped.norms.sum()
                        window[7] += len(clipped.norms)
                        continue
                    sync = i == len(micro_batches) - 1
                    with (contextlib.nullcontext() if sync else accelerator.no_sync(ddp_model)), autocast():
                        losses = sample_losses(ddp_model, batch)
                        accelerator.backward(losses.sum() * scale)
                    window[0] += losses.detach().sum()
                    if config.log.noise_scale and i == 0:  # this micro-batch's own mean gradient, squared
                        first = [p.grad for _, p in trained if p.grad is not None]
                        sq = torch.stack(torch._foreach_norm(first)).double().square().sum()
                        window[8] += sq * (total_units / (world * count(batch))) ** 2  # (no host sync)
                        window[9] += count(batch)
                window[1] += units
                # -------- the step's noise: once, after the all-reduce, the same on every process
                grads = [p.grad for _, p in trained if p.grad is not None]
                if noise.kind == "dp" and world > 1:
                    _all_reduce_sum(grads, accelerator)
                log_due = (st["step"] + 1) % config.log.every == 0 or st["step"] + 1 == total_steps
                if noise.kind != "none" or log_due or config.log.noise_scale:
                    divide = optim.batch_size if noise.kind == "dp" else 1
                    norm = torch.stack(torch._foreach_norm(grads)).double().norm() / divide
                    window[2] += norm
                    window[4] += 1
                    if config.log.noise_scale:
                        window[10] += norm**2
                        window[11] += 1
                if noise.kind == "gaussian":
                    window[3] += add_noise(grads, noise.sigma / optim.batch_size, seed=noise_seed, step=st["step"])
                elif noise.kind == "dp":
                    window[3] += add_noise(grads, noise.sigma * noise.clip, seed=noise_seed,
                                           step=st["step"]) / optim.batch_size
                    torch._foreach_div_(grads, optim.batch_size)
                lr = get_lr(st["step"], optim, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                st["step"] += 1
                st["samples"] += optim.batch_size
                st["tokens"] += int(total_units) if "labels" in micro_batches[0] else 0
                st["seconds"]["train"] += time.perf_counter() - t0
                bar.update(optim.batch_size)

                # -------- logging, evaluation, checkpoints
                record, stop_requested, save_due = None, False, False
                if st["step"] % config.log.every == 0 or (total_steps and st["step"] == total_steps):
                    flags = torch.tensor([float(signals.requested is not None), float(time.monotonic() - last_save
                                                                      >= config.checkpoint.last_every_seconds)],
                                         dtype=torch.float64, device=accelerator.device)
                    packed = torch.cat([window, flags])
                    packed = accelerator.reduce(packed, "sum") if world > 1 else packed
                    train_loss = float(packed[0] / packed[1])
                    window.zero_()
                    record = {"step": st["step"], "samples": st["samples"], "tokens": st["tokens"], "lr": lr,
                              "train_loss": train_loss, "seconds": round(sum(st["seconds"].values()), 3)}
                    if packed[4] > 0:  # norms: every process added the same value
                        record["grad_norm"] = float(packed[2] / packed[4])
                        if noise.kind != "none":
                            record["noise_norm"] = float(packed[3] / packed[4])
                    if config.log.noise_scale and packed[11] > 0:  # McCandlish et al.: average, then combine
                        b_small = float(packed[9] / packed[11])
                        units_big = total_units
                        _, grad_sq, b_simple = noise_scale(float(packed[8] / packed[11]), float(packed[10] / packed[11]),
                                                           b_small, units_big)
                        record.update(b_simple=b_simple, grad_sq=grad_sq)
                    if noise.kind == "dp":
                        record["clip_fraction"] = float(packed[5] / packed[7])
                        record["per_sample_norm"] = float(packed[6] / packed[7])
                    bar.set_postfix_str(f"loss {train_loss:.4f}", refresh=False)
                    if not math.isfinite(train_loss):
                        log(record)
                        state, reason = "diverged", f"train loss {train_loss} at step {st['step']}"
                        break
                    stop_requested, save_due = bool(packed[-2]), bool(packed[-1])
                if st["step"] >= st["next_eval"]:
                    loss = run_eval()
                    record = record or {"step": st["step"], "samples": st["samples"], "tokens": st["tokens"]}
                    record["eval_loss"] = loss
                    record["eval_error"] = st["eval_error"]
                    if not math.isfinite(loss) or loss > config.budget.diverge_factor * st["initial_eval"]:
                        log(record)
                        state, reason = "diverged", f"eval loss {loss:.4g} at step {st['step']}"
                        break
                    status(state="running")
                if record is not None:
                    log(record)
                if stop_requested or (world == 1 and signals.requested is not None):  # Ctrl-C or SIGTERM
                    save_last()
                    state, reason = "interrupted", signal_name(signals.requested) or "a signal to another process"
                    break
                if save_due:
                    save_last()
                    last_save = time.monotonic()
            if state == "completed":
                if not st["evals"] or st["evals"][-1][0] != st["step"]:
                    loss = run_eval()
                    log({"step": st["step"], "samples": st["samples"], "tokens": st["tokens"],
                         "eval_loss": loss, "eval_error": st["eval_error"]})
                save_last()
                in_sync = _replicas_in_sync(model, accelerator)
                status(state="completed", reason=reason, replicas_in_sync=in_sync)
            elif state == "interrupted":
                status(state="interrupted", reason=reason)
            else:
                status(state="diverged", reason=reason)
            accelerator.wait_for_everyone()  # every process returns after the final status is written
    except KeyboardInterrupt:  # a second Ctrl-C: no save, the resume point is the last one written
        status(state="interrupted", reason="Ctrl-C twice (stopped at once; resumes from the last saved state)")
        raise
    except BaseException as e:
        status(state="failed", reason=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        if trackers:
            accelerator.end_training()
        bar.close()
        if metrics:
            metrics.close()
        if ids_file:
            ids_file.close()
    return run_dir


def _replicas_in_sync(model: torch.nn.Module, accelerator) -> bool:
    """Whether every process holds bit-identical weights (one gathered checksum per process)."""
    if accelerator.num_processes == 1:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        check = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 9973).sum()])
    gathered = accelerator.gather(check[None]).cpu()
    return bool((gathered == gathered[0]).all())
