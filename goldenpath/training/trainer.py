"""The training loop: one function, ``train(config)``, under ``accelerate``.

    goldenpath train configs/teacher-cnn.yaml optim.lr=0.1
    accelerate launch --multi_gpu --num_processes 2 -m goldenpath train configs/teacher-cnn.yaml cpu=true

Per optimizer step (:func:`optimizer_step`): take this process's micro-batches from the stream, let the
noise mechanism (``goldenpath.dp.mechanisms``: SGD, Noisy-SGD, DP-SGD) accumulate each one's gradient of ``sum of
per-sample losses / loss units in the whole logical batch`` (images, or predicted tokens), end the step's
gradient once (the all-reduce, then Noisy-SGD's or DP-SGD's noise, drawn once per step), set the learning
rate, step. Around it, two eval schedules on the fixed eval set: the target search's, denser as the loss
nears the next target, saves a checkpoint at the first step whose eval loss reaches each target
(``goldenpath.training.targets`` replays the steps since the search's previous eval to find it); the logged evals,
every ``checkpoint.eval_every`` steps, never look for targets, so how often a run logs never moves a
checkpoint. Then the resume state in ``checkpoints/last`` (always at the search's last eval while a target
remains), and the run's final state: completed, diverged (the train loss is not finite or exploded), or
stalled (no better than chance). Re-running the same command resumes; on CPU the checkpoints, the weights
and metrics.jsonl (all but its wall-clock ``seconds``) are bit-identical to an uninterrupted run's.

A step reads no value from the device, so the host queues step after step while a GPU works: its losses,
norms and DP-SGD counts are summed on the device (:class:`goldenpath.training.run.Window`) and read once per logged
line, where a diverged train loss is noticed; evals and saves read at their own cadence, and an eval that
finds a non-finite loss ends the run diverged before anything is saved. (A text step counts its predicted
tokens on the host batches, before they move; with several processes their sum over processes is the one
value it reads, for the loss scale and the token counter.)
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from pathlib import Path

import torch

from goldenpath.config import Config, ConfigError
from goldenpath.data import StreamExhausted
from goldenpath.gradnoise.estimators import noise_scale
from goldenpath.store import files, rundir as ckpt
from goldenpath.training import step
from goldenpath.training.fork import fork_config
from goldenpath.training.run import Run, start
from goldenpath.training.runtime import Interrupts, signal_name
from goldenpath.training.targets import Snapshot, Targets

def _train_record(run: Run, sums: dict, lr: float, units: float) -> dict:
    """The metrics.jsonl line of a logged step, from the window's sums over all processes (``units``: the
    loss units of the last step's logical batch)."""
    st, config = run.state, run.config
    record = {"step": st.step, "samples": st.samples, "tokens": st.tokens, "lr": lr,
              "train_loss": sums["loss"] / sums["units"], "seconds": round(sum(st.seconds.values()), 3)}
    if sums["norm_steps"] > 0:  # norms: every process added the same value
        record["grad_norm"] = sums["grad_norm"] / sums["norm_steps"]
        if run.mechanism.injects:
            record["noise_norm"] = sums["noise_norm"] / sums["norm_steps"]
    if config.log.noise_scale and sums["scale_steps"] > 0:  # McCandlish et al.: average, then combine
        n = sums["scale_steps"]
        _, grad_sq, b_simple = noise_scale(sums["micro_sq"] / n, sums["batch_sq"] / n, sums["micro_units"] / n, units)
        record.update(b_simple=b_simple, grad_sq=grad_sq)
    if sums["samples"] > 0:
        record["clip_fraction"] = sums["clipped"] / sums["samples"]
        record["per_sample_norm"] = sums["sample_norm"] / sums["samples"]
    return record


# ----------------------------------------------------------------------------- evaluation and checkpoints


def run_eval(run: Run, previous: Snapshot | None, *, search: bool) -> tuple[float, float]:
    """Evaluate; save the step and best checkpoints. With ``search`` (an eval of the target search), also save
    every target crossed since the search's previous eval and plan its next eval (:class:`Targets`).

    A logged eval (``checkpoint.eval_every``, ``checkpoint.steps``) never looks for targets, so how often a
    run logs never moves a checkpoint; the search's schedule depends only on its own evals.
    """
    config, st = run.config, run.state
    loss, error = step.eval_run(run)
    prev_latest, st.latest, st.eval_error = st.latest, [st.step, loss], error
    t0 = time.perf_counter()
    if search:
        Targets(run).search(previous, loss, error)
    keep = run.optimizer if config.checkpoint.optimizer else None
    meta = step.checkpoint_meta(run, loss, error, prev_latest)
    if st.step in config.checkpoint.steps and run.main and math.isfinite(loss):  # a diverged model is never saved
        ckpt.save_checkpoint(run.files.checkpoint(at_step=st.step), run.model, meta, keep)
    if st.best is None or loss < st.best[1]:
        st.best = [st.step, loss]
        if config.checkpoint.best and run.main:
            ckpt.save_checkpoint(run.files.best, run.model, meta, keep)
    st.seconds["checkpoint"] += time.perf_counter() - t0
    spent = run.privacy()
    run.bar.set_postfix_str(f"eval {loss:.4f}" + (f" floor {run.floor:.4f}" if run.floor is not None else "")
                            + (f" eps {spent['epsilon']:.3g}" if spent else ""), refresh=False)
    return loss, error


# ----------------------------------------------------------------------------- the loop


def train(config: Config) -> Path:
    """Train one run; returns its directory. Resumes from ``checkpoints/last`` when it exists."""
    with _only_trainer(config):
        run = start(config)
        if isinstance(run, Path):
            return run  # finished before: nothing to do
        try:
            with Interrupts() as signals:
                _finish(run, *_loop(run, signals))
        except KeyboardInterrupt:  # a second Ctrl-C: no save, the resume point is the last one written
            run.status(state="interrupted", reason="Ctrl-C twice (stopped at once; resumes from the last saved state)")
            raise
        except BaseException as e:
            run.status(state="failed", reason=f"{type(e).__name__}: {e}"[:500])
            raise
        finally:
            run.close()
        return run.dir


@contextlib.contextmanager
def _only_trainer(config: Config):
    """Hold ``<out>/.locks/<name>.train.lock`` while this process trains the run (the main process of a
    multi-process run): a second trainer of the same run directory (a sweep started again while the run a
    killed sweep started still trains) stops with a one-line error instead of training it twice at once."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    path = Path(config.out) / ".locks" / f"{config.name}.train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("name", f"{Path(config.out) / config.name} is being trained by another process",
                              "let it finish or stop it, then run this again") from None
        yield


def fork(run_dir: str | Path, at_loss: float | None = None, at_step: int | None = None, overrides=()) -> Path:
    """Train a child run from the parent's checkpoint with changed knobs (``key=x4``, ``key=/4``, ``key=v``);
    returns the child's directory."""
    return train(fork_config(run_dir, at_loss, at_step, overrides))


def _loop(run: Run, signals: Interrupts) -> tuple[str, str, Snapshot | None]:
    """Train until a stopping rule; returns (state, reason, the snapshot at the target search's last eval):
    state is completed, diverged or interrupted."""
    config, st = run.config, run.state
    window = run.window
    data_end = "all epochs done" if config.data.epochs > 1 else "data exhausted"
    if st.step == 0 and not st.evals:
        loss, error = run_eval(run, None, search=True)
        run.log({"step": 0, "samples": 0, "tokens": 0, "eval_loss": loss, "eval_error": error})
        st.initial_eval = loss
    elif run.forked and not run.resumed:  # the child's curve starts at the parent's checkpoint
        run.log({"step": st.step, "samples": st.samples, "tokens": st.tokens, "eval_loss": st.evals[0][1],
                 "forked_from": config.fork.parent})
    # the state at the target search's last eval, for the replay that locates a target crossed before its
    # next one (while a target remains, the resume state is saved only at such an eval: a resumed run starts
    # from one)
    targets = Targets(run)
    previous = targets.snapshot()
    last_save, save_due = time.monotonic(), False
    while True:
        # -------- stopping rules
        if run.total_steps is not None and st.step >= run.total_steps:
            return "completed", data_end if run.total_steps == run.stream_steps else "budget", previous
        if config.budget.stop_at_last_target and targets.values and not targets.left:
            return "completed", "last target reached", previous
        t0 = time.perf_counter()
        try:
            micro_batches = run.stream.next_step()
        except StreamExhausted:
            micro_batches = None
        if run.share_group is not None and not _everyone(run.share_group, micro_batches is not None):
            micro_batches = None  # another process's share ran out: every process stops before this step
        if micro_batches is None:
            return "completed", data_end, previous
        if previous is not None and previous.batches is not None:  # what a replay from it will read
            previous.batches.append(micro_batches)
        if run.ids_file is not None:
            for batch in micro_batches:
                run.ids_file.write(batch["ids"].numpy().astype("<i8").tobytes())
        # -------- one optimizer step over the logical batch
        lr, units = step.optimizer_step(run, micro_batches, window)
        st.seconds["train"] += time.perf_counter() - t0
        run.bar.update(config.optim.batch_size)
        # -------- logging, divergence, evaluation, checkpoints
        record, stop = None, False
        if st.step % config.log.every == 0 or st.step == run.total_steps:
            t0 = time.perf_counter()  # the first read since the last log: on a GPU it waits for the queued steps
            sums = window.collect(run.accelerator, stop=signals.requested is not None,
                                  save=time.monotonic() - last_save >= config.checkpoint.last_every_seconds)
            st.seconds["train"] += time.perf_counter() - t0
            record = _train_record(run, sums, lr, units)
            st.train_loss = record["train_loss"]
            run.bar.set_postfix_str(f"loss {st.train_loss:.4f}", refresh=False)
            stop, save_due = sums["stop"] > 0, save_due or sums["save"] > 0
            if not math.isfinite(st.train_loss) or st.train_loss > config.budget.diverge_factor * st.initial_eval:
                run.log(record)
                return "diverged", f"train loss {st.train_loss:.4g} at step {st.step}", None
        stop = stop or (run.world == 1 and signals.requested is not None)  # one process: at once
        # two schedules: the target search's (a function of its own evals) and the logged evals (a fixed grid)
        search = st.next_eval is not None and st.step >= st.next_eval
        if search or st.step % config.checkpoint.eval_every == 0 or st.step in config.checkpoint.steps:
            loss, error = run_eval(run, previous, search=search)
            record = record or {"step": st.step, "samples": st.samples, "tokens": st.tokens}
            record.update(eval_loss=loss, eval_error=error)
            if not math.isfinite(loss):
                run.log(record)
                return "diverged", f"eval loss {loss} at step {st.step}", None
            if search:
                previous = targets.snapshot()
            run.status(state="running")
        if record is not None:
            run.log(record)
        # the resume state is the state at the search's last eval while a target remains (what a replay starts
        # from), so neither a stop nor a timed save ever moves an eval or a checkpoint
        at_rest = previous is None or previous.step == st.step
        if stop:  # Ctrl-C or SIGTERM: back to the search's last eval (the steps since are redone on resume)
            if not at_rest:
                seconds = dict(st.seconds)
                previous.restore(run)
                st.seconds = seconds  # the time spent is spent
            run.save_last()
            return "interrupted", signal_name(signals.requested) or "a signal to another process", None
        if save_due and at_rest:
            run.save_last()
            last_save, save_due = time.monotonic(), False


# ----------------------------------------------------------------------------- how a run ended

OVERFIT = 0.02  # an eval loss this far above its best, with a train loss this far below it: overfitting


def _everyone(group, ok: bool) -> bool:
    """Whether every process of ``group`` (gloo: host memory, the device is not waited for) says ``ok``."""
    flag = torch.tensor([int(ok)], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag[0])


def judge(state, *, chance: float, min_progress: float | None, offline: bool) -> tuple[str, str, dict]:
    """A finished run's state (completed or stalled), the reason's addition, and status fields.

    Stalled: its best eval loss never got ``min_progress`` below chance (the lower of the label marginal's
    entropy and the initial eval loss), or it fell back to chance in eval and train loss alike (``min_progress``
    None: never stalled). Overfitting, for an ``offline`` run only (the run completes): the last eval loss rose
    above the best and the train loss lies below it. An online run never sees a sample twice, so its train
    loss estimates the eval loss and a gap between them is noise, not overfitting.
    """
    base = min(chance, state.initial_eval) if state.initial_eval is not None else chance
    threshold = base * (1 - min_progress) if min_progress is not None else math.inf
    best_step, best = state.best
    last, train = state.last_eval, state.train_loss
    if best > threshold:
        return "stalled", f"the best eval loss {best:.4g} never got {min_progress:.0%} below chance ({base:.4g})", {}
    if last > threshold and (train is None or train > threshold):
        return "stalled", (f"fell back to chance: eval loss {last:.4g} (chance {base:.4g}) after {best:.4g} at step "
                           f"{best_step}"), {}
    if offline and last > best * (1 + OVERFIT) and train is not None and train < last * (1 - OVERFIT):
        rise = last / best - 1
        return "completed", (f"overfitting: the eval loss rose {rise:.1%} above its best ({best:.4g} at step "
                             f"{best_step}) while the train loss is {train:.4g}"), \
            {"overfit": {"best_step": best_step, "best_eval_loss": best, "last_eval_loss": last,
                         "last_train_loss": train}}
    return "completed", "", {}


def _finish(run: Run, state: str, reason: str, previous: Snapshot | None) -> None:
    """The final eval and resume state of a completed run, its verdict, and the final status. A run whose
    final eval loss is not finite or exploded (as the train loss's rule) diverged in its last update; a
    diverged run saves where each process's stream stopped (``checkpoints/stream-end/``, no model), so that a
    fork from a checkpoint before the divergence reads the stream from there."""
    st = run.state
    if state == "completed":
        run.bar.total = run.bar.n  # stopped before the budget (the last target, the data's end): the bar ends full
        run.bar.refresh()
        # the last step is one of the target search's (a target crossed since its previous eval is found)
        search = st.next_eval is not None and st.evals[-1][0] != st.step
        logged = st.latest is not None and st.latest[0] == st.step
        if search or not logged:
            loss, error = run_eval(run, previous, search=search)
            if not logged:
                run.log({"step": st.step, "samples": st.samples, "tokens": st.tokens, "eval_loss": loss,
                         "eval_error": error})
        final, start = st.last_eval, st.initial_eval
        if final is not None and (not math.isfinite(final) or start is not None and
                                  final > run.config.budget.diverge_factor * start):  # its last update blew up
            state, reason = "diverged", f"eval loss {final:.4g} after the last step ({st.step})"
    if state == "completed":
        run.save_last()
        verdict, why, fields = judge(st, chance=run.chance, min_progress=run.config.budget.min_progress,
                                     offline=run.config.regime == "offline")
        reason = f"{reason}; {why}" if why else reason
        run.status(state=verdict, reason=reason, replicas_in_sync=_replicas_in_sync(run.model, run.accelerator),
                   **fields)
        run.accelerator.wait_for_everyone()  # every process returns after the final status is written
        return
    if state == "diverged":  # where its stream stopped (no model is saved), for a fork from an earlier checkpoint
        run.files.stream_end.mkdir(parents=True, exist_ok=True)
        files.write_json(run.files.stream_end / f"rank{run.accelerator.process_index}.json",
                         {"stream": run.stream.state_dict()})
    if state == "diverged" and st.reached:  # its checkpoints predate the divergence: kept, and said so
        run.status(state=state, reason=f"{reason}, after reaching {', '.join(st.reached)} (those checkpoints are "
                                       "kept)", diverged_after_targets=dict(st.reached))
    else:
        run.status(state=state, reason=reason)
    run.accelerator.wait_for_everyone()  # every process returns after the final status is written


def _replicas_in_sync(model: torch.nn.Module, accelerator) -> bool:
    """Whether every process holds bit-identical weights (one gathered checksum per process)."""
    if accelerator.num_processes == 1:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        check = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 9973).sum()])
    gathered = accelerator.gather(check[None]).cpu()
    return bool((gathered == gathered[0]).all())
