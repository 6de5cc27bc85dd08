"""One optimizer step and one eval of a run: what training and a target's replay both run.

:func:`optimizer_step` depends only on the run's state and its micro-batches, so a replay
(:mod:`goldenpath.training.targets`) recomputes the same step; :func:`evaluate` gives the mean loss and top-1
error over a held-out batch, its rows shared out across processes.
"""

from __future__ import annotations

import contextlib
import time

import torch

from goldenpath.models import count, sample_losses_and_errors
from goldenpath.training.run import Run
from goldenpath.training.state import Window
from goldenpath.training.schedule import get_lr


def to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Move a batch to the device without its sample ids (read on the host alone: a copy per micro-batch to a
    GPU for nothing); floating inputs take the model's dtype."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in batch.items() if k != "ids"}


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
    for start_row in range(lo, hi, chunk):
        part = {k: v[start_row : min(hi, start_row + chunk)] for k, v in batch.items()}
        total[1] += count(part)  # from the host rows, before they move
        part = to_device(part, accelerator.device, dtype)
        with autocast():
            losses, errors = sample_losses_and_errors(model, part)
        total[0] += losses.sum().double()
        total[2] += errors.sum()
    model.train(was_training)
    total = accelerator.reduce(total, "sum") if world > 1 else total
    return float(total[0] / total[1]), float(total[2] / total[1])


def _all_reduce_sum(tensors: list[torch.Tensor], accelerator) -> None:
    """Sum tensors across processes in place, as one flat buffer."""
    flat = accelerator.reduce(torch.cat([t.flatten() for t in tensors]), "sum")
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def optimizer_step(run: Run, micro_batches: list[dict], window: Window) -> tuple[float, float]:
    """One optimizer step over the logical batch (this process's micro-batches); returns its learning rate
    and the loss units (images or predicted tokens) of the whole logical batch.

    The same function trains and replays (goldenpath.training.targets): everything it does depends only on the
    run's state and the micro-batches, so a replay recomputes the same step.
    """
    config, st, mech, acc = run.config, run.state, run.mechanism, run.accelerator
    world, trained = run.world, run.trained
    counts = [count(b) for b in micro_batches]  # read from the host batches: the device is never waited for
    units = sum(counts)
    if world > 1 and "labels" in micro_batches[0]:
        total_units = float(acc.reduce(torch.tensor(float(units), device=acc.device)))
    else:
        total_units = float(units * world)  # images: every process holds the same number
    positions = micro_batches[0]["labels"].shape[-1] if "labels" in micro_batches[0] else 1  # of a whole sample
    scale = mech.loss_scale(total_units, world, positions)
    module = run.model if mech.per_sample else run.ddp_model
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, acc.device, run.dtype)
        last = i == len(micro_batches) - 1
        no_sync = acc.no_sync(run.ddp_model) if not (last or mech.per_sample) else contextlib.nullcontext()
        with no_sync, run.autocast():
            stats = mech.micro_batch(module, batch, scale, acc.backward)
        for name, value in stats.items():
            window.add(name, value)
        if config.log.noise_scale and i == 0:  # this micro-batch's own mean gradient, squared (no host sync)
            sq = torch.stack(torch._foreach_norm([p.grad for p in trained if p.grad is not None])).double()
            window.add("micro_sq", sq.square().sum() * (total_units / (world * counts[i])) ** 2)
            window.add("micro_units", counts[i])
    window.add("units", units)
    grads = [p.grad for p in trained if p.grad is not None]
    log_due = (st.step + 1) % config.log.every == 0 or st.step + 1 == run.total_steps
    norm, noise = mech.step(grads, step=st.step, measure=log_due or config.log.noise_scale,
                            all_reduce=(lambda g: _all_reduce_sum(g, acc)) if world > 1 else None)
    if norm is not None:
        window.add("grad_norm", norm)
        window.add("norm_steps", 1)
        if config.log.noise_scale:
            window.add("batch_sq", norm**2)
            window.add("scale_steps", 1)
    window.add("noise_norm", noise)
    lr = get_lr(st.step, config.optim, run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    st.samples += config.optim.batch_size
    st.tokens += int(total_units) if "labels" in micro_batches[0] else 0
    return lr, total_units


def eval_run(run: Run) -> tuple[float, float]:
    """The run's eval loss and error on its eval set now (the time spent counts as eval; the steps still queued
    on a GPU finish first, in the train time)."""
    run.state.seconds["train"] += drain(run.accelerator.device)
    t0 = time.perf_counter()
    loss, error = evaluate(run.model, run.eval_batch, accelerator=run.accelerator,
                           chunk=run.config.checkpoint.eval_batch_size, dtype=run.dtype, autocast=run.autocast)
    run.state.seconds["eval"] += time.perf_counter() - t0
    return loss, error


def drain(device: torch.device) -> float:
    """Seconds spent waiting for the work queued on a CUDA device: a step returns once its kernels are queued,
    so the time they take shows at the next read (0 on a CPU, where a step's work is done when it returns)."""
    if device.type != "cuda":
        return 0.0
    t0 = time.perf_counter()
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def checkpoint_meta(run: Run, loss: float, error: float, previous) -> dict:
    """A checkpoint's meta.json at the run's current step (``previous``: [step, loss] of the eval before)."""
    st = run.state
    return {"step": st.step, "samples": st.samples, "tokens": st.tokens, "eval_loss": loss, "eval_error": error,
            "optimizer": run.config.optim.name, "previous_eval": previous}
