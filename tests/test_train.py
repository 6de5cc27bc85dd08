"""The training loop: schedules, gradient accumulation, loss-target checkpoints, resume, divergence."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from goldenpath.store import files, rundir as ckpt
from goldenpath import cli
from goldenpath.config import OptimConfig, load_config
from goldenpath.data import build_stream
from goldenpath.models import build_model
from goldenpath.training.schedule import get_lr, next_eval_gap
from goldenpath.training.trainer import train

from .conftest import status_of, trained_model


def metrics_but_seconds(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock ``seconds`` (the one field a resumed run cannot repeat)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in ckpt.read_metrics(run_dir)]


# ----------------------------------------------------------------------------- schedules


def test_learning_rate_schedules_match_their_closed_forms():
    const = OptimConfig(lr=0.2, warmup=4)
    assert [get_lr(s, const, None) for s in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    cos = OptimConfig(lr=1.0, schedule="cosine", warmup=0, min_lr_ratio=0.1)
    total = 100
    assert get_lr(0, cos, total) == pytest.approx(1.0)
    assert get_lr(50, cos, total) == pytest.approx(0.1 + 0.9 * 0.5)
    assert get_lr(100, cos, total) == pytest.approx(0.1)
    assert get_lr(25, cos, total) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_evals_are_log_spaced_early():
    evals, steps = [(0, 5.0)], [0]
    while steps[-1] < 300:
        steps.append(steps[-1] + next_eval_gap(evals, None, max_gap=100, min_gap=1))
        evals.append((steps[-1], 5.0))
    assert steps[:9] == [0, 1, 2, 4, 8, 16, 32, 64, 128] and steps[9] == 228


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1e-4, 0.05), target=st.floats(0.5, 4.0), min_gap=st.integers(1, 5),
       max_gap=st.integers(20, 400))
def test_evals_close_in_on_a_target(rate, target, min_gap, max_gap):
    """On a steadily falling loss, the first eval at or below the target overshoots by <= min_gap steps."""
    def loss(s):
        return 5.0 - rate * s

    evals = [(0, loss(0))]
    while evals[-1][1] > target:
        s = evals[-1][0] + next_eval_gap(evals, target, max_gap=max_gap, min_gap=min_gap)
        evals.append((s, loss(s)))
    overshoot_steps = (target - evals[-1][1]) / rate
    assert overshoot_steps <= min_gap + 1e-6
    assert len(evals) < 30 + 5.0 / rate / max_gap  # and it does not evaluate every step to get there


def test_a_jittery_loss_near_a_target_is_evaluated_every_step():
    # 0.02 above the target, jumping by about 0.01 about its trend: it may dip below between evals
    evals = [(100, 2.05), (110, 2.03), (120, 2.04), (130, 2.02)]
    assert next_eval_gap(evals, 2.0, max_gap=100, min_gap=1) == 1
    smooth = [(100, 2.05), (110, 2.04), (120, 2.03), (130, 2.02)]  # the same distance, steadily falling
    assert next_eval_gap(smooth, 2.0, max_gap=100, min_gap=1) == 10
    assert next_eval_gap(evals, 1.5, max_gap=100, min_gap=1) > 1  # far from the target: no need


# ----------------------------------------------------------------------------- gradient accumulation


def test_accumulated_micro_batches_give_the_full_batch_update(tiny_teacher, tmp_path):
    """4 micro-batches of 8 through the trainer == one plain batch of 32 by hand (float64)."""
    common = [*tiny_teacher, "precision=fp64", "optim.batch_size=32", "optim.lr=0.1", "budget.steps=1"]
    config = load_config(None, [*common, "optim.micro_batch_size=8"])
    run_dir = train(config)

    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=32, micro_batch_size=32)
    batch = stream.next_step()[0]
    model = build_model(config.model, source.info, seed=config.seed).double()
    loss = F.cross_entropy(model(batch["x"].double()), batch["y"])  # the plain mean over 32 images
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = [(p - 0.1 * g).detach() for p, g in zip(model.parameters(), grads)]
    got = list(trained_model(config, run_dir).parameters())
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) < 1e-12


def test_accumulation_over_several_momentum_steps(tiny_teacher, tmp_path):
    def run(micro, name):
        cfg = load_config(None, [*tiny_teacher, "precision=fp64", "optim.batch_size=32", "optim.momentum=0.9",
                                 f"optim.micro_batch_size={micro}", "budget.steps=4", f"name={name}"])
        return list(trained_model(cfg, train(cfg)).parameters())

    a, b = run(8, "micro8"), run(32, "micro32")
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) < 1e-12


def test_lm_accumulation_with_padding_normalises_by_all_tokens(tmp_path):
    """Unequal-length documents: the update is the mean over every real token of the logical batch."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "x" * (3 + (7 * i) % 20)}) + "\n" for i in range(80)))
    common = ["data.source=hf_text", "data.path=json", f"data.data_files={docs}", "data.pack=false",
              "data.seq_len=24", "data.eval_size=4", "data.probe_size=2", "data.shuffle_buffer=8",
              "model.name=gpt2", "model.width=16", "model.heads=2", "model.depth=1", "precision=fp64",
              "optim.lr=0.5", "optim.batch_size=16", "budget.steps=1", "log.progress=false",
              f"out={tmp_path}", "name=lm"]
    config = load_config(None, [*common, "optim.micro_batch_size=4"])
    run_dir = train(config)

    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=16, micro_batch_size=16)
    batch = stream.next_step()[0]
    assert len(set((batch["labels"] != -100).sum(1).tolist())) > 3  # really unequal lengths
    model = build_model(config.model, source.info, seed=config.seed).double()
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = [(p - 0.5 * g).detach() for p, g in zip(model.parameters(), grads)]
    got = list(trained_model(config, run_dir).parameters())
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) < 1e-12
    assert status_of(run_dir)["tokens"] == int((batch["labels"] != -100).sum())


# ----------------------------------------------------------------------------- loss-target checkpoints


def test_target_checkpoints_are_first_crossings(tiny_teacher):
    targets = [2.2, 2.1, 2.0]
    config = load_config(None, [*tiny_teacher, f"checkpoint.targets={targets}", "checkpoint.eval_every=20",
                                "budget.samples=40000", "checkpoint.steps=[7]"])
    run_dir = train(config)
    status = status_of(run_dir)
    assert status["state"] == "completed" and status["reason"] == "last target reached"
    assert 0 < status["loss_floor"] < 2.0
    eval_batch = config.data.build().heldout("eval")
    # the target search's evals (logged ones, checkpoint.eval_every, never look for targets)
    evals = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["train"]["evals"]
    for target in targets:
        directory = run_dir / "checkpoints" / f"target-{target:g}"
        meta = json.loads((directory / "meta.json").read_text())
        model = trained_model(config, run_dir, f"target-{target:g}").eval()
        with torch.no_grad():  # recomputed from the file, with torch's own mean cross-entropy
            loss = float(F.cross_entropy(model(eval_batch["x"]), eval_batch["y"]))
        assert loss <= target and loss == pytest.approx(meta["eval_loss"], abs=1e-5)
        assert meta["loss_minus_target"] == pytest.approx(meta["eval_loss"] - target)
        before = [l for s, l in evals if s < meta["step"]]
        assert before and all(l > target for l in before)  # never reached before this step
        if meta["replayed"]:  # located by replaying the steps since the last eval: the step before, evaluated
            assert meta["previous_eval"][0] == meta["step"] - 1 and meta["previous_eval"][1] > target
        else:
            assert meta["previous_eval"][1] == pytest.approx(before[-1]) and meta["previous_eval"][1] > target
        assert meta["samples"] == meta["step"] * 32
    assert json.loads((run_dir / "checkpoints" / "step-7" / "meta.json").read_text())["step"] == 7
    assert status["targets_reached"] == {f"{t:g}": json.loads((run_dir / "checkpoints" / f"target-{t:g}" /
                                                               "meta.json").read_text())["step"] for t in targets}


def test_targets_never_change_training_on_a_streaming_dataset_with_a_shuffle_buffer(tmp_path):
    """``datasets`` refills a shuffle buffer when a state is loaded, so a replay that put the stream back read
    other documents, saved a target at a step the run never took and left the run on another stream (some
    documents trained on twice). The replay reads the micro-batches kept since its snapshot instead: the run
    with targets trains exactly as the run without."""
    rng = np.random.default_rng(0)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc{i} " + " ".join(f"w{rng.integers(8)}.{j}" for j in
                                                                      range(2 + i % 11))}) + "\n" for i in range(400)))
    common = ["data.source=hf_text", "data.path=json", f"data.data_files={docs}", "data.seq_len=24",
              "data.eval_size=4", "data.probe_size=2", "data.shuffle_buffer=8", "model.name=gpt2", "model.width=16",
              "model.heads=2", "model.depth=1", "precision=fp64", "optim.lr=0.05", "optim.batch_size=8",
              "log.progress=false", "budget.min_progress=null", f"out={tmp_path}", "log.every=1",
              "checkpoint.eval_every=1000", "budget.stop_at_last_target=false", "budget.samples=800",
              "checkpoint.target_eval_every=20", "checkpoint.eval_min_every=5"]
    runs = {}
    for name, targets in (("plain", []), ("targets", [5.0, 4.0, 3.5, 3.2])):
        config = load_config(None, [*common, f"name={name}", f"checkpoint.targets={targets}"])
        runs[name] = (config, train(config))
    (plain, plain_dir), (with_targets, targets_dir) = runs["plain"], runs["targets"]
    metas = [json.loads(p.read_text()) for p in sorted(targets_dir.glob("checkpoints/target-*/meta.json"))]
    assert any(m["replayed"] for m in metas)  # the replay ran
    losses = [[r["train_loss"] for r in ckpt.read_metrics(d) if "train_loss" in r] for d in (plain_dir, targets_dir)]
    assert len(losses[0]) > 50 and losses[0] == losses[1]
    a, b = trained_model(plain, plain_dir).parameters(), trained_model(with_targets, targets_dir).parameters()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_stopped_run_on_a_shuffle_buffered_streaming_dataset_resumes_as_if_never_stopped(tmp_path, monkeypatch):
    """A Ctrl-C mid-run on a Hugging Face stream with a shuffle buffer, then the same command: the same samples
    in the same order (the buffer's contents are part of the resume state), the same weights, metrics and
    target checkpoints as a run never stopped."""
    import goldenpath.training.trainer as trainer

    rng = np.random.default_rng(1)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc{i} " + " ".join(f"w{rng.integers(8)}.{j}" for j in
                                                                      range(2 + i % 11))}) + "\n" for i in range(300)))
    args = ["data.source=hf_text", "data.path=json", f"data.data_files={docs}", "data.seq_len=24", "data.eval_size=4",
            "data.probe_size=2", "data.shuffle_buffer=16", "model.name=gpt2", "model.width=16", "model.heads=2",
            "model.depth=1", "precision=fp64", "optim.lr=0.05", "optim.batch_size=8", "log.progress=false",
            "budget.min_progress=null", f"out={tmp_path}", "log.every=3", "checkpoint.eval_every=1000",
            "budget.stop_at_last_target=false", "budget.samples=480", "checkpoint.target_eval_every=20",
            "checkpoint.eval_min_every=5", "checkpoint.targets=[5.0, 4.0]", "checkpoint.last_every_seconds=1000",
            "log.sample_ids=true"]
    reference = train(load_config(None, [*args, "name=reference"]))
    real_step = trainer.step.optimizer_step

    def stop_at_step_25(run, *a, **k):
        out = real_step(run, *a, **k)
        if run.state.step == 25 and run.state.evals[-1][0] < 25:  # the loop's step, not a replay's
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(trainer.step, "optimizer_step", stop_at_step_25)
    config = load_config(None, [*args, "name=stopped"])
    stopped = train(config)
    assert status_of(stopped)["state"] == "interrupted"
    monkeypatch.setattr(trainer.step, "optimizer_step", real_step)
    assert train(config) == stopped and status_of(stopped)["state"] == "completed"
    ids = lambda d: (d / "samples" / "rank0.i64").read_bytes()
    assert ids(stopped) == ids(reference)
    assert metrics_but_seconds(stopped) == metrics_but_seconds(reference)
    a = load_file(str(reference / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(stopped / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    targets = lambda d: [(p.name, ckpt.read_meta(p)) for p in ckpt.RunDir(d).target_dirs()]
    assert len(targets(stopped)) == 2 and targets(stopped) == targets(reference)


def test_timed_resume_saves_never_move_an_eval_and_wait_for_the_target_search(tiny_teacher, monkeypatch):
    from goldenpath.training.run import Run

    saved = []
    save_last = Run.save_last
    monkeypatch.setattr(Run, "save_last", lambda self: (saved.append(self.state.step), save_last(self))[1])
    common = [*tiny_teacher, "checkpoint.targets=[2.25]", "checkpoint.eval_every=10", "log.every=1",
              "budget.samples=1600", "budget.stop_at_last_target=false"]
    quiet = train(load_config(None, [*common, "checkpoint.last_every_seconds=1e9", "name=quiet"]))
    assert saved == [50]  # the final save only
    saved.clear()
    eager = train(load_config(None, [*common, "checkpoint.last_every_seconds=0", "name=eager"]))
    assert metrics_but_seconds(eager) == metrics_but_seconds(quiet)  # a save due at every step moved nothing
    # while the target remains, a due save waits for the target search's next eval (what a replay starts
    # from); once it is reached, every step will do
    search = [s for s, _ in json.loads((quiet / "checkpoints" / "last" / "state.json").read_text())["train"]["evals"]]
    reached = status_of(quiet)["targets_reached"]["2.25"]
    assert reached <= search[-1] < 50
    assert saved == [s for s in range(1, 51) if s in search or s > search[-1]] + [50]


# ----------------------------------------------------------------------------- resume, kills, signals


def launch(config_path: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "goldenpath", "train", str(config_path), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        try:
            if any(r.get("step", 0) >= step for r in ckpt.read_metrics(run_dir)):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def resumable(tmp_path):
    from tests.conftest import TINY_TEACHER

    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(f"# {o}" for o in TINY_TEACHER) + "\nbudget: {samples: 3200}\n")
    return path, [*TINY_TEACHER, "optim.momentum=0.9", "checkpoint.last_every_seconds=0", "log.every=1",
                  "checkpoint.eval_every=10", "checkpoint.targets=[2.2]", "budget.stop_at_last_target=false",
                  "log.sample_ids=true"]


def test_kill_9_at_any_time_then_resume_is_bit_identical(resumable, tmp_path):
    path, overrides = resumable
    reference = launch(path, *overrides, f"out={tmp_path}", "name=reference")
    assert reference.wait(120) == 0, reference.stderr.read()
    ref_dir = tmp_path / "reference"

    run_dir = tmp_path / "killed"
    args = [*overrides, f"out={tmp_path}", "name=killed"]
    for i, step in enumerate([5, 30, 31, 60]):
        proc = launch(path, *args)
        wait_for_step(run_dir, step, proc)
        time.sleep(0.013 * i)  # land somewhere inside a step, an eval or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # whatever the moment of the kill, the resume state is whole and loads
        last = files.resolve_dir(run_dir / "checkpoints" / "last")
        assert last is not None
        config = load_config(None, args + ["budget.samples=3200"])
        model = build_model(config.model, config.data.build().info, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ckpt.load_resume_state(last, 0, model, opt)
    proc = launch(path, *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == str(run_dir)  # the run directory is the last stdout line

    a = load_file(str(ref_dir / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [(r["step"], r["train_loss"]) for r in ckpt.read_metrics(d) if "train_loss" in r]
    assert losses(run_dir) == losses(ref_dir)  # one line per step, same values: nothing lost or repeated
    assert metrics_but_seconds(run_dir) == metrics_but_seconds(ref_dir)  # every logged eval too
    ids = lambda d: (d / "samples" / "rank0.i64").read_bytes()
    assert ids(run_dir) == ids(ref_dir) and len(ids(run_dir)) == 3200 * 8
    assert status_of(run_dir)["resumed_from_step"] > 0 and status_of(run_dir)["state"] == "completed"


def test_sigterm_saves_and_marks_the_run_interrupted(resumable, tmp_path):
    path, overrides = resumable
    args = [*overrides, "checkpoint.last_every_seconds=1000", f"out={tmp_path}", "name=term"]
    proc = launch(path, *args)
    wait_for_step(tmp_path / "term", 10, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    status = status_of(tmp_path / "term")
    assert status["state"] == "interrupted" and status["reason"] == "SIGTERM"
    state = json.loads((tmp_path / "term" / "checkpoints" / "last" / "state.json").read_text())
    assert state["train"]["step"] == status["step"] > 0
    proc = launch(path, *args)
    assert proc.wait(120) == 0
    assert status_of(tmp_path / "term")["state"] == "completed" and status_of(tmp_path / "term")["step"] == 100


def test_ctrl_c_exits_130_and_the_rerun_logs_and_saves_as_if_never_stopped(resumable, tmp_path):
    path, overrides = resumable
    # no periodic resume state, a train-loss line every 7 steps and logged evals every 10: a stop lands
    # inside a log window, between evals, with 2.1 still to reach (2.2 is reached at step 17)
    args = [*overrides, "checkpoint.last_every_seconds=1000", "log.every=7", "checkpoint.targets=[2.2, 2.1]",
            f"out={tmp_path}"]
    reference = launch(path, *args, "name=reference")
    assert reference.wait(120) == 0, reference.stderr.read()
    proc = launch(path, *args, "name=ctrl-c")
    run_dir = tmp_path / "ctrl-c"
    wait_for_step(run_dir, 20, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[-1] == str(run_dir)
    status = status_of(run_dir)
    assert status["state"] == "interrupted" and status["reason"] == "Ctrl-C"
    assert f"at step {status['step']}," in lines[0] and "run the same command" in lines[0]
    state = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())
    assert state["train"]["step"] == status["step"] > 0
    assert state["train"]["evals"][-1][0] == status["step"]  # a target remains: saved at the search's last eval

    proc = launch(path, *args, "name=ctrl-c")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resuming from step {status['step']} " in err
    a = load_file(str(tmp_path / "reference" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = lambda d: (d / "samples" / "rank0.i64").read_bytes()
    assert ids(run_dir) == ids(tmp_path / "reference")
    # the same lines: evals at the same steps, train losses over whole windows, the same values
    assert metrics_but_seconds(run_dir) == metrics_but_seconds(tmp_path / "reference")
    targets = lambda d: [(p.name, ckpt.read_meta(p)) for p in ckpt.RunDir(d).target_dirs()]
    assert targets(run_dir) == targets(tmp_path / "reference")


def test_ctrl_c_outside_a_run_s_loop_exits_130_with_one_line(tiny_teacher, tmp_path, monkeypatch, capsys):
    import goldenpath.training.trainer

    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(goldenpath.training.trainer, "train", interrupted)
    config = tmp_path / "c.yaml"
    config.write_text("budget: {samples: 6400}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config), *tiny_teacher])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Ctrl-C" in err[0] and "resume" in err[0]


# ----------------------------------------------------------------------------- divergence and re-runs


def test_divergence_is_recorded_and_exits_1(tiny_teacher, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("budget: {samples: 6400}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config), *tiny_teacher, "optim.lr=1000", "checkpoint.targets=[2.2]"])
    assert exit_info.value.code == 1
    run_dir = tmp_path / "run"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir)
    status = status_of(run_dir)
    assert status["state"] == "diverged" and "step" in status["reason"] and status["step"] < 200
    assert ckpt.read_metrics(run_dir)[-1]["step"] == status["step"]  # the diverging step is logged
    # a diverged run is left alone when the command is run again
    with pytest.raises(SystemExit):
        cli.main(["train", str(config), *tiny_teacher, "optim.lr=1000", "checkpoint.targets=[2.2]"])
    assert status_of(run_dir) == status


def test_a_run_that_diverges_between_logged_steps_saves_no_checkpoint_of_the_diverged_model(tiny_teacher):
    # the train loss is read every 50 steps only; the eval at step 2 (checkpoint.steps) sees the divergence
    run_dir = train(load_config(None, [*tiny_teacher, "optim.lr=1e8", "log.every=50", "checkpoint.eval_every=50",
                                       "checkpoint.steps=[2, 4]", "checkpoint.targets=[]", "budget.steps=40"]))
    status = status_of(run_dir)
    assert status["state"] == "diverged" and status["reason"] == "eval loss nan at step 2"
    assert not (run_dir / "checkpoints" / "step-2").exists() and not (run_dir / "checkpoints" / "last").exists()


def test_a_run_that_diverges_after_a_target_keeps_its_checkpoint_and_says_so(tiny_teacher):
    # the learning rate warms up to 1000: the run reaches 2.28 within a few steps, then explodes
    run_dir = train(load_config(None, [*tiny_teacher, "optim.lr=1000", "optim.warmup=1000", "budget.samples=6400",
                                       "checkpoint.targets=[2.28]", "budget.stop_at_last_target=false"]))
    status, meta = status_of(run_dir), ckpt.read_meta(run_dir / "checkpoints" / "target-2.28")
    assert status["state"] == "diverged" and meta["step"] < status["step"]
    assert status["diverged_after_targets"] == {"2.28": meta["step"]}
    assert status["reason"].endswith("after reaching 2.28 (those checkpoints are kept)")


def test_a_run_whose_last_update_blows_up_is_recorded_as_diverged(tiny_teacher):
    """One step at a huge learning rate: its train loss (before the update) is fine, the final eval after it is
    not; the run was recorded as completed."""
    status = status_of(train(load_config(None, [*tiny_teacher, "optim.lr=1000", "optim.warmup=0", "budget.steps=1",
                                                "budget.min_progress=null"])))
    assert status["state"] == "diverged" and status["reason"].endswith("after the last step (1)")


def test_a_fork_of_a_run_that_diverged_reads_its_stream_from_where_it_stopped(tiny_teacher):
    """A diverged run saves where its stream stopped: a fork from a checkpoint before the divergence reads no
    sample the parent trained on (it failed, or read the stream from an older resume state)."""
    from goldenpath.training.fork import fork_config

    parent = load_config(None, [*tiny_teacher, "optim.lr=1000", "optim.warmup=1000", "budget.samples=6400",
                                "checkpoint.targets=[2.28]", "budget.stop_at_last_target=false",
                                "log.sample_ids=true", "name=blowup"])
    parent_dir = train(parent)
    assert status_of(parent_dir)["state"] == "diverged"
    child = fork_config(parent_dir, at_loss=2.28, overrides=["optim.lr=0.01", "budget.steps=+3"], name="calm")
    child_dir = train(child)
    assert status_of(child_dir)["state"] == "completed"

    def ids(run_dir):
        return set(torch.frombuffer(bytearray((run_dir / "samples" / "rank0.i64").read_bytes()),
                                    dtype=torch.int64).tolist())

    assert ids(child_dir) and not ids(child_dir) & ids(parent_dir)


def test_a_second_trainer_of_a_run_in_training_stops_with_one_line(tiny_teacher):
    """A sweep killed hard leaves its train child running; started again, the sweep started a second trainer on
    the same directory, and both trained it (duplicated sample ids). The trainer now holds a lock of its own."""
    import fcntl

    from goldenpath.config import ConfigError

    config = load_config(None, [*tiny_teacher, "budget.steps=2"])
    lock = Path(config.out) / ".locks" / f"{config.name}.train.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as held:  # another trainer
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="is being trained by another process"):
            train(config)
    assert status_of(train(config))["state"] == "completed"  # released: it trains


def test_a_finished_run_is_not_redone_and_a_changed_config_is_refused(tiny_teacher, capsys):
    config = load_config(None, [*tiny_teacher, "budget.steps=3"])
    run_dir = train(config)
    before = status_of(run_dir)
    assert train(config) == run_dir and status_of(run_dir) == before
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(run_dir / "config.yaml"), "optim.lr=0.3", f"name={run_dir.name}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("goldenpath: name: ") and "differs in optim.lr" in err


def test_offline_regime_visits_the_subset_epochs_times(tiny_teacher):
    config = load_config(None, [*tiny_teacher, "data.epochs=3", "data.train_size=96", "log.sample_ids=true"])
    run_dir = train(config)
    status = status_of(run_dir)
    assert status["reason"].startswith("all epochs done") and status["samples"] == 288
    ids = torch.frombuffer(bytearray((run_dir / "samples" / "rank0.i64").read_bytes()), dtype=torch.int64)
    assert torch.bincount(ids).unique().tolist() == [0, 3] or torch.bincount(ids).unique().tolist() == [3]
    assert len(ids.unique()) == 96


def test_eval_error_is_the_top1_error_of_the_saved_model(tiny_teacher):
    config = load_config(None, [*tiny_teacher, "budget.samples=320"])
    run_dir = train(config)
    last = [r for r in ckpt.read_metrics(run_dir) if "eval_error" in r][-1]
    model = trained_model(config, run_dir)
    batch = config.data.build().heldout("eval")
    with torch.no_grad():
        wrong = (model(batch["x"]).argmax(-1) != batch["y"]).double().mean()
    assert last["eval_error"] == pytest.approx(float(wrong), abs=1e-12)
    assert status_of(run_dir)["eval_error"] == last["eval_error"]


def test_tensorboard_tracker_holds_the_logged_scalars(tiny_teacher):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, [*tiny_teacher, "budget.samples=640", "log.every=5", "log.trackers=[tensorboard]"])
    run_dir = train(config)
    files = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    records = ckpt.read_metrics(run_dir)
    for tag in ("train_loss", "eval_loss", "lr", "grad_norm"):
        assert tag in events.Tags()["scalars"], tag
        logged = {e.step: e.value for e in events.Scalars(tag)}
        want = {r["step"]: r[tag] for r in records if tag in r}
        assert logged.keys() == want.keys()
        assert all(abs(logged[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want)


# ----------------------------------------------------------------------------- how a run ended


def state_of(initial, best, last, train_loss):
    from goldenpath.training.state import RunState

    return RunState(initial_eval=initial, best=list(best), evals=[[0, initial], [99, last]], train_loss=train_loss)


@pytest.mark.parametrize("best, last, train_loss, offline, verdict, says", [
    ((40, 1.9), 1.95, 1.96, True, "completed", None),                 # learned (the last eval a little above its best)
    ((3, 2.26), 2.27, 2.26, True, "stalled", "never got 5% below"),  # 2.26 > 0.95 x 2.3
    ((40, 1.9), 2.29, 2.28, True, "stalled", "fell back to chance"),  # eval and train loss back at chance
    ((40, 1.9), 2.29, 1.2, True, "completed", "overfitting"),         # eval back up, train far below: overfitting
    ((40, 1.9), 1.92, 1.2, True, "completed", None),                  # within 2% of its best: not overfitting
    ((40, 1.9), 2.2, 1.2, False, "completed", None),                  # online: every sample new, never overfitting
])
def test_a_finished_run_is_judged_by_stated_rules(best, last, train_loss, offline, verdict, says):
    from goldenpath.training.trainer import judge

    state, why, fields = judge(state_of(2.3, best, last, train_loss), chance=2.4, min_progress=0.05, offline=offline)
    assert state == verdict
    assert (says in why) if says else why == ""
    assert ("overfit" in fields) == (says == "overfitting")


def test_an_online_run_is_never_called_overfitting(tiny_teacher):
    # this seed ends with its eval loss 13% above its best and its last train loss below it: the pattern the
    # offline rule calls overfitting, here the noise of a stream whose every sample is new
    run_dir = train(load_config(None, [*tiny_teacher, "optim.lr=0.1", "optim.momentum=0.99", "optim.batch_size=16",
                                       "budget.samples=3200", "checkpoint.eval_every=20", "log.every=1", "seed=3"]))
    rows = ckpt.read_metrics(run_dir)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    last_train = [r["train_loss"] for r in rows if "train_loss" in r][-1]
    assert evals[-1] > min(evals) * 1.02 and last_train < evals[-1] * 0.98
    status = status_of(run_dir)
    assert (status["state"], status["reason"]) == ("completed", "budget") and "overfit" not in status


def test_a_run_that_never_learns_is_stalled_not_completed_and_a_sweep_leaves_it(tiny_teacher):
    overrides = [o for o in tiny_teacher if not o.startswith("budget.min_progress")]
    config = load_config(None, [*overrides, "budget.samples=640", "optim.lr=1e-5"])
    run_dir = train(config)
    status = status_of(run_dir)
    assert status["state"] == "stalled" and "never got 5% below chance" in status["reason"]
    from scipy.stats import entropy

    labels = config.data.build().heldout("eval")["y"]
    assert status["chance_loss"] == pytest.approx(entropy(torch.bincount(labels).numpy()))  # the label marginal
    assert train(config) == run_dir and status_of(run_dir) == status  # finished: not run again


def test_best_checkpoint_holds_the_lowest_eval_loss(tiny_teacher):
    run_dir = train(load_config(None, [*tiny_teacher, "budget.samples=1600", "checkpoint.best=true",
                                       "checkpoint.eval_every=5"]))
    evals = [(r["step"], r["eval_loss"]) for r in ckpt.read_metrics(run_dir) if "eval_loss" in r]
    step, loss = min(evals, key=lambda e: e[1])
    meta = json.loads((run_dir / "checkpoints" / "best" / "meta.json").read_text())
    assert (meta["step"], meta["eval_loss"]) == (step, loss)
    assert status_of(run_dir)["best_eval_loss"] == loss


def test_the_progress_bar_ends_full_when_the_last_target_stops_the_run(tiny_teacher, bars, monkeypatch):
    from goldenpath.training import run as run_module

    monkeypatch.setattr(run_module, "tqdm", bars)
    run_dir = train(load_config(None, [*tiny_teacher, "log.progress=true", "checkpoint.targets=[2.28]",
                                       "budget.samples=12800"]))
    status = status_of(run_dir)
    assert status["reason"].startswith("last target reached") and status["samples"] < 12800  # stopped early
    (bar,) = [b for b in bars.closed if b["unit"] == "sample"]
    assert bar["n"] == bar["total"] == status["samples"]
    assert "100%" in [line for line in bar["text"].split("\r") if line.strip()][-1]  # as the terminal shows it last


@pytest.mark.parametrize("tiny", ["tiny_teacher", "tiny_markov"])
def test_batches_made_on_the_device_train_the_run_made_on_the_cpu(tmp_path, tiny, request):
    """data.generate=device on a CPU run takes the code path a GPU takes (source.place(run device), a float64
    teacher): the run's metrics are the CPU stream's, and a run directory refuses the other setting."""
    base = [*request.getfixturevalue(tiny), "budget.steps=6", "checkpoint.eval_every=3"]
    cpu = train(load_config(None, [*base, "name=cpu"]))
    dev = train(load_config(None, [*base, "name=dev", "data.generate=device"]))
    assert metrics_but_seconds(cpu) == metrics_but_seconds(dev)
    with pytest.raises(Exception, match="data.generate"):
        train(load_config(None, [*base, "name=cpu", "data.generate=device", "budget.steps=8"]))


def test_a_batch_goes_to_the_device_without_its_sample_ids():
    """The ids are read on the host alone (the sample-id audit, the eval's row count): on a GPU their copy per
    micro-batch was for nothing."""
    from goldenpath.training.step import to_device

    batch = {"ids": torch.arange(4), "x": torch.ones(4, 3, dtype=torch.float64), "y": torch.zeros(4, dtype=torch.long)}
    moved = to_device(batch, torch.device("cpu"), torch.float32)
    assert set(moved) == {"x", "y"} and moved["x"].dtype == torch.float32 and moved["y"].dtype == torch.long
