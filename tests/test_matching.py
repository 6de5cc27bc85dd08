"""Exact loss matching: a target's checkpoint is at the first step whose eval loss reaches it, whatever the
target search's schedule, found by replaying steps that recompute the trajectory bit for bit; how often a
run logs its eval loss never moves a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from goldenpath.store.rundir import read_metrics

from goldenpath.store.files import read_json
from goldenpath.config import load_config
from goldenpath.training.schedule import next_eval_gap
from goldenpath.training.trainer import train

TARGETS = [2.28, 2.26, 2.24, 2.22]
SCHEDULES = {  # the target search's
    "every-step": ["checkpoint.target_eval_every=1", "checkpoint.eval_every=1"],  # the ground truth, all logged
    "default": ["checkpoint.target_eval_every=100"],                               # adaptive, near targets
    "coarse": ["checkpoint.target_eval_every=40", "checkpoint.eval_min_every=40"],  # several targets per gap
}


def search_evals(run_dir: Path) -> list[list]:
    """[step, eval loss] of every eval of a finished run's target search (its resume state keeps them)."""
    return read_json(run_dir / "checkpoints" / "last" / "state.json")["train"]["evals"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from .conftest import TINY_TEACHER

    out = tmp_path_factory.mktemp("matching")
    base = [*TINY_TEACHER, "data.eval_size=512", "optim.lr=0.05", "budget.samples=4800",
            f"checkpoint.targets={TARGETS}", "budget.stop_at_last_target=false", f"out={out}"]
    return {name: train(load_config(None, [*base, f"name={name}", *extra])) for name, extra in SCHEDULES.items()}


def test_checkpoint_steps_and_weights_do_not_depend_on_the_eval_schedule(runs):
    truth = runs["every-step"]
    losses = {r["step"]: r["eval_loss"] for r in read_metrics(truth) if "eval_loss" in r}
    for target in TARGETS:
        want = read_json(truth / "checkpoints" / f"target-{target:g}" / "meta.json")
        # the ground truth is the first crossing: every earlier step's eval loss lies above the target
        assert want["eval_loss"] <= target and all(losses[s] > target for s in range(want["step"]))
        weights = load_file(str(truth / "checkpoints" / f"target-{target:g}" / "model.safetensors"))
        for name in ("default", "coarse"):
            meta = read_json(runs[name] / "checkpoints" / f"target-{target:g}" / "meta.json")
            assert (meta["step"], meta["eval_loss"]) == (want["step"], want["eval_loss"]), (name, target)
            assert meta["previous_eval"] == [want["step"] - 1, losses[want["step"] - 1]]
            assert meta["loss_minus_target"] == pytest.approx(meta["eval_loss"] - target)
            got = load_file(str(runs[name] / "checkpoints" / f"target-{target:g}" / "model.safetensors"))
            assert all(torch.equal(got[k], weights[k]) for k in weights)  # the replay recomputed the same model


def test_a_replay_leaves_the_trajectory_and_the_stream_as_they_were(runs):
    last = {n: load_file(str(d / "checkpoints" / "last" / "model.safetensors")) for n, d in runs.items()}
    for name in ("default", "coarse"):
        assert all(torch.equal(last[name][k], last["every-step"][k]) for k in last[name])
        train_losses = lambda d: [(r["step"], r["train_loss"]) for r in read_metrics(d) if "train_loss" in r]
        assert train_losses(runs[name]) == train_losses(runs["every-step"])
        status = read_json(runs[name] / "status.json")
        assert status["samples"] == 4800 and status["state"] == "completed"


def test_several_targets_crossed_between_two_evals_each_get_their_own_step(runs):
    coarse = runs["coarse"]
    evals = [s for s, _ in search_evals(coarse)]
    steps = [read_json(coarse / "checkpoints" / f"target-{t:g}" / "meta.json")["step"] for t in TARGETS]
    metas = [read_json(coarse / "checkpoints" / f"target-{t:g}" / "meta.json") for t in TARGETS]
    assert len(set(steps)) == len(TARGETS) and steps == sorted(steps)
    between = [s for s in steps if s not in evals]
    assert len(between) >= 2 and all(m["replayed"] for m, s in zip(metas, steps) if s in between)
    gaps = [(a, b) for a, b in zip(evals, evals[1:]) if sum(a < s <= b for s in steps) >= 2]
    assert gaps  # at least two targets fell between the same two evals


# ----------------------------------------------------------------------------- logging never moves a checkpoint

# configs/teacher-cnn.yaml, cut short (and a quarter of its eval set, so an eval per step is cheap) at a
# target the loss hovers near: when logged evals also looked for targets, logging every 20 steps put the
# checkpoint at step 117 and every 100 steps at step 124
TEACHER_CNN = Path(__file__).parents[1] / "configs" / "teacher-cnn.yaml"
TARGET = 1.96
HOVERING = [f"checkpoint.targets=[{TARGET}]", "budget.samples=8960", "data.eval_size=256", "threads=1",
            "log.progress=false"]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    out = tmp_path_factory.mktemp("logged")
    return {every: train(load_config(TEACHER_CNN, [*HOVERING, f"checkpoint.eval_every={every}", f"out={out}",
                                                   f"name=every-{every}"])) for every in (1, 20, 100)}


def test_how_often_a_run_logs_never_moves_a_checkpoint(logged):
    config = load_config(TEACHER_CNN, HOVERING)
    name = f"target-{TARGET:g}"
    metas = {every: read_json(run_dir / "checkpoints" / name / "meta.json") for every, run_dir in logged.items()}
    assert len({(m["step"], m["eval_loss"]) for m in metas.values()}) == 1, \
        {every: m["step"] for every, m in metas.items()}  # logging every 1, 20 or 100 steps: one checkpoint
    # the reference: the target search replayed by a naive loop over the every-step curve, each gap from the
    # search's own evals; the checkpoint is the first step at or below the target after its last eval above
    curve = {r["step"]: r["eval_loss"] for r in read_metrics(logged[1]) if "eval_loss" in r}
    assert sorted(curve) == list(range(max(curve) + 1))
    search = [[0, curve[0]]]
    while search[-1][1] > TARGET:
        step = search[-1][0] + next_eval_gap(search, TARGET, max_gap=100, min_gap=1)
        search.append([step, curve[step]])
    want = next(s for s in range(search[-2][0] + 1, search[-1][0] + 1) if curve[s] <= TARGET)
    weights = load_file(str(logged[1] / "checkpoints" / name / "model.safetensors"))
    for every, run_dir in logged.items():
        assert (metas[every]["step"], metas[every]["eval_loss"]) == (want, curve[want]), every
        assert search_evals(run_dir) == search, every  # the search saw none of the logged evals
        got = load_file(str(run_dir / "checkpoints" / name / "model.safetensors"))
        assert all(torch.equal(got[k], weights[k]) for k in weights)
        evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
        assert {s for s, _ in search} | set(range(0, want, every)) <= {r["step"] for r in evals}  # both logged
        assert all(curve[r["step"]] == r["eval_loss"] for r in evals)
    # the saved model's loss, recomputed with torch's own cross-entropy
    from .conftest import trained_model

    model = trained_model(config, logged[1], name).eval()
    batch = config.data.build().heldout("eval")
    with torch.no_grad():
        assert float(F.cross_entropy(model(batch["x"]), batch["y"])) == pytest.approx(curve[want], abs=1e-5)
