"""Exact loss matching: a target's checkpoint is at the first step whose eval loss reaches it, whatever the
eval schedule, found by replaying steps that recompute the trajectory bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from goldenpath.checkpoints import read_json, read_metrics
from goldenpath.config import load_config
from goldenpath.train import train

TARGETS = [2.28, 2.26, 2.24, 2.22]
SCHEDULES = {
    "every-step": ["checkpoint.eval_every=1"],                                       # the ground truth
    "default": ["checkpoint.eval_every=100"],                                        # adaptive, near targets
    "coarse": ["checkpoint.eval_every=40", "checkpoint.eval_min_every=40"],          # several targets per gap
}


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
    evals = [r["step"] for r in read_metrics(coarse) if "eval_loss" in r]
    steps = [read_json(coarse / "checkpoints" / f"target-{t:g}" / "meta.json")["step"] for t in TARGETS]
    metas = [read_json(coarse / "checkpoints" / f"target-{t:g}" / "meta.json") for t in TARGETS]
    assert len(set(steps)) == len(TARGETS) and steps == sorted(steps)
    between = [s for s in steps if s not in evals]
    assert len(between) >= 2 and all(m["replayed"] for m, s in zip(metas, steps) if s in between)
    gaps = [(a, b) for a, b in zip(evals, evals[1:]) if sum(a < s <= b for s in steps) >= 2]
    assert gaps  # at least two targets fell between the same two evals
