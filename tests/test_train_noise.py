"""Noise in the training loop: Noisy-SGD and DP-SGD steps against updates computed by hand (float64)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from goldenpath.dp import privacy
from goldenpath.store.rundir import read_metrics
from goldenpath.config import load_config
from goldenpath.data import build_stream
from goldenpath.models import build_model, sample_losses
from goldenpath.dp.mechanisms import add_noise
from goldenpath.seeding import Purpose, stream_key
from goldenpath.training.fork import fork_config
from goldenpath.training.trainer import train

from .conftest import status_of, trained_model

LR = 0.1


def first_batch(config):
    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=config.optim.batch_size,
                          micro_batch_size=config.optim.batch_size)
    return {k: v.double() if v.is_floating_point() else v for k, v in stream.next_step()[0].items() if k != "ids"}


def initial_params(config):
    return {n: p.detach() for n, p in build_model(config.model, config.data.build().info, seed=config.seed)
            .double().named_parameters()}


def noise_of(params: dict, std: float, seed: int, step: int = 0) -> dict:
    """The noise the trainer must have added at ``step``: add_noise on zeros, in parameter order."""
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    add_noise(list(zeros.values()), std, seed=seed, step=step)
    return zeros


def hand_per_sample(config, batch) -> list[list[torch.Tensor]]:
    """g_i from one backward per sample: a sequence's summed token losses divided by its label positions
    (padded or not: a factor no other sample changes)."""
    model = build_model(config.model, config.data.build().info, seed=config.seed).double()
    positions = batch["labels"].shape[1] if "labels" in batch else 1
    return [torch.autograd.grad(sample_losses(model, {k: v[i : i + 1] for k, v in batch.items()})[0] / positions,
                                list(model.parameters())) for i in range(len(next(iter(batch.values()))))]


def hand_clipped_mean(config, batch, clip):
    """(1/B) sum_i clip_C(g_i), the g_i of hand_per_sample."""
    names = [n for n, _ in build_model(config.model, config.data.build().info, seed=config.seed).named_parameters()]
    per_sample = hand_per_sample(config, batch)
    total = {n: torch.zeros_like(g) for n, g in zip(names, per_sample[0])}
    for grads in per_sample:
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        for n, g in zip(total, grads):
            total[n] += g * min(1.0, clip / float(norm))
    return {n: g / len(per_sample) for n, g in total.items()}


def assert_step(config, run_dir, expected_update: dict):
    start = initial_params(config)
    got = dict(trained_model(config, run_dir).named_parameters())
    worst = max(float((got[n] - (start[n] - LR * expected_update[n])).abs().max()) for n in start)
    assert worst < 1e-10


@pytest.mark.parametrize("micro", [8, 32])
def test_gaussian_noise_is_drawn_once_per_step_with_std_sigma_over_b(tiny_teacher, micro):
    common = [*tiny_teacher, "precision=fp64", "optim.batch_size=32", f"optim.lr={LR}", "budget.steps=1",
              f"optim.micro_batch_size={micro}"]
    plain = load_config(None, [*common, "name=plain"])
    noisy = load_config(None, [*common, "name=noisy", "noise.kind=gaussian", "noise.sigma=3"])
    a, b = dict(trained_model(plain, train(plain)).named_parameters()), \
        dict(trained_model(noisy, train(noisy)).named_parameters())
    xi = noise_of(a, 3 / 32, seed=noisy.seed)
    assert max(float((b[n] - (a[n] - LR * xi[n])).abs().max()) for n in a) < 1e-12
    record = [r for r in read_metrics(noisy.out + "/noisy") if "noise_norm" in r][-1]
    assert record["noise_norm"] == pytest.approx(float(torch.cat([x.flatten() for x in xi.values()]).norm()))


def test_a_fork_draws_its_own_noise_at_any_fork_step(tiny_teacher):
    """A fork's noise comes from a key of (seed, fork step), made non-negative: at step 4 of seed 0 the raw key
    is negative (a fork there used to fail at its first noise draw)."""
    assert stream_key(0, Purpose.FORK, 4) < 0
    common = [*tiny_teacher, "precision=fp64", "optim.batch_size=32", f"optim.lr={LR}", "seed=0"]
    parent = load_config(None, [*common, "name=parent", "budget.steps=4", "checkpoint.steps=[4]",
                                "noise.kind=gaussian", "noise.sigma=1"])
    train(parent)
    runs = {}
    for name, noise in (("quiet", ["noise.kind=none", "noise.sigma=0"]), ("loud", ["noise.sigma=3"])):
        child = fork_config(Path(parent.out) / "parent", at_step=4, overrides=[*noise, "budget.steps=5"])
        child = dataclasses.replace(child, name=name)
        assert status_of(train(child))["state"] == "completed"
        runs[name] = dict(trained_model(child, Path(child.out) / name).named_parameters())
    a, b = runs["quiet"], runs["loud"]
    xi = noise_of(a, 3 / 32, seed=stream_key(0, Purpose.FORK, 4) & (2**63 - 1), step=4)
    assert max(float((b[n] - (a[n] - LR * xi[n])).abs().max()) for n in a) < 1e-12


@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_dp_step_is_the_clipped_mean_plus_sigma_c_over_b_noise(tiny_teacher, method):
    sigma, clip = 2.0, 0.5
    config = load_config(None, [*tiny_teacher, "model.norm=group", "precision=fp64", "optim.batch_size=32",
                                f"optim.lr={LR}", "budget.steps=1", "optim.micro_batch_size=8", "noise.kind=dp",
                                f"noise.sigma={sigma}", f"noise.clip={clip}", f"noise.method={method}",
                                "log.every=1"])
    run_dir = train(config)
    clipped = hand_clipped_mean(config, first_batch(config), clip)
    xi = noise_of(clipped, sigma * clip / 32, seed=config.seed)
    assert_step(config, run_dir, {n: clipped[n] + xi[n] for n in clipped})

    status = status_of(run_dir)
    assert status["epsilon"] == pytest.approx(privacy.epsilon(sigma, 1e-5)) and status["delta"] == 1e-5
    record = [r for r in read_metrics(run_dir) if "clip_fraction" in r][-1]
    assert 0 < record["clip_fraction"] <= 1 and record["per_sample_norm"] > 0
    assert record["grad_norm"] == pytest.approx(float(torch.cat([g.flatten() for g in clipped.values()]).norm()))


def test_dp_on_a_language_model_clips_whole_padded_sequences(tmp_path):
    """Sequences of many lengths, the clip at the median of their norms: the clipped and the unclipped ones are
    each scaled by 1 / (label positions), a factor no other sequence changes."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "ab" * (2 + (7 * i) % 11)}) + "\n" for i in range(60)))
    common = [
        "data.source=hf_text", "data.path=json", f"data.data_files={docs}", "data.pack=false", "data.seq_len=24",
        "data.eval_size=4", "data.probe_size=2", "data.shuffle_buffer=8", "model.name=gpt2", "model.width=16",
        "model.heads=2", "model.depth=1", "precision=fp64", f"optim.lr={LR}", "optim.batch_size=8",
        "optim.micro_batch_size=4", "budget.steps=1", "noise.kind=dp", "noise.sigma=0", "log.progress=false",
        f"out={tmp_path}", "name=lm"]
    probe = load_config(None, [*common, "noise.clip=1"])
    batch = first_batch(probe)
    assert len(set((batch["labels"] != -100).sum(1).tolist())) > 2
    norms = [float(torch.sqrt(sum(g.square().sum() for g in gs))) for gs in hand_per_sample(probe, batch)]
    clip = sorted(norms)[len(norms) // 2]
    config = load_config(None, [*common, f"noise.clip={clip}"])
    assert_step(config, train(config), hand_clipped_mean(config, batch, clip))


def test_one_sequence_moves_a_dp_language_model_s_clipped_sum_by_at_most_c():
    """Neighbouring batches: sample 0 replaced by one that predicts no token. Every sequence's loss is scaled
    by the same constant, so the clipped sums differ by sample 0's clipped gradient alone, at most C (with the
    scale from the batch's predicted tokens they differed by 2.4 C here)."""
    from goldenpath.config.sections import NoiseConfig
    from goldenpath.data import SourceInfo
    from goldenpath.dp.mechanisms import DPSGD, per_sample_clip

    b, t, vocab = 16, 32, 11
    config = load_config(None, ["data.source=markov", "model.name=gpt2", "model.width=16", "model.depth=1",
                                "model.heads=2", "model.attention=eager", "budget.steps=1"])
    model = build_model(config.model, SourceInfo("lm", (t,), vocab), seed=0).double()
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1:, 3:] = -100  # short sequences; sample 0 predicts every position
    neighbour = labels.clone()
    neighbour[0] = -100
    batches = [{"input_ids": ids, "labels": lab} for lab in (labels, neighbour)]

    def scale(batch):  # as optimizer_step computes it (one process)
        return DPSGD(NoiseConfig(kind="dp", sigma=0.0, clip=1.0), batch_size=b, seed=0).loss_scale(
            float((batch["labels"] != -100).sum()), 1, t)

    # C just above the neighbour's largest norm: sample 0 alone is clipped in the first batch
    clip = 1.01 * float(per_sample_clip(model, lambda m, x: sample_losses(m, x) * scale(batches[1]), batches[1],
                                        math.inf).norms.max())
    sums = []
    for batch in batches:
        mech = DPSGD(NoiseConfig(kind="dp", sigma=0.0, clip=clip, method="fast"), batch_size=b, seed=0)
        model.zero_grad(set_to_none=True)
        mech.micro_batch(model, batch, scale(batch), None)
        sums.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float((sums[0] - sums[1]).norm()) <= clip * (1 + 1e-9)


def test_offline_dp_reports_rdp_epsilon_at_delta_one_over_n(tiny_teacher):
    config = load_config(None, [*tiny_teacher, "model.norm=group", "data.epochs=2", "data.train_size=128",
                                "optim.batch_size=32", "noise.kind=dp", "noise.sigma=1", "noise.clip=1"])
    status = status_of(train(config))
    assert status["step"] == 8 and status["accountant"].startswith("rdp")
    assert status["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1 / 128, steps=8, sample_rate=32 / 128))


def test_logged_noise_scale_matches_the_micro_and_full_batch_gradients(tiny_teacher):
    config = load_config(None, [*tiny_teacher, "precision=fp64", "optim.batch_size=32", "optim.micro_batch_size=8",
                                "budget.steps=1", "log.every=1", "log.noise_scale=true"])
    run_dir = train(config)
    record = [r for r in read_metrics(run_dir) if "b_simple" in r][-1]
    batch = first_batch(config)
    model = build_model(config.model, config.data.build().info, seed=config.seed).double()

    def sq_norm(part):
        loss = sample_losses(model, part).mean()
        return float(sum(g.square().sum() for g in torch.autograd.grad(loss, list(model.parameters()))))

    small = sq_norm({k: v[:8] for k, v in batch.items()})
    big = sq_norm(batch)
    from goldenpath.gradnoise import noise_scale

    trace, grad_sq, b_simple = noise_scale(small, big, 8, 32)
    assert record["b_simple"] == pytest.approx(b_simple, rel=1e-9) and record["grad_sq"] == pytest.approx(grad_sq)


def test_offline_dp_refuses_batches_that_would_cross_an_epoch(tiny_teacher):
    """A batch across two epochs (each its own shuffle) can hold a sample twice: under dp its clipped gradient
    would count twice in one noised sum. The config refuses a batch size that does not divide the train size,
    and a fork refuses one that would not start where an epoch's batches tile."""
    from goldenpath.config import ConfigError

    dp = ["model.norm=group", "data.epochs=4", "noise.kind=dp", "noise.sigma=1", "noise.clip=1"]
    with pytest.raises(ConfigError, match="optim.batch_size: 32 does not divide data.train_size=100"):
        load_config(None, [*tiny_teacher, *dp, "data.train_size=100", "optim.batch_size=32"])
    parent = load_config(None, [*tiny_teacher, *dp, "data.train_size=128", "optim.batch_size=32", "name=parent",
                                "budget.steps=3", "checkpoint.steps=[3]"])
    train(parent)  # stops 96 samples into the first epoch
    for size, refused in ((64, True), (32, False)):
        child = fork_config(Path(parent.out) / "parent", at_step=3, overrides=[f"optim.batch_size={size}",
                                                                                "budget.steps=5"])
        if refused:
            with pytest.raises(ConfigError, match="stopped 96 samples into an epoch of 128, not a multiple of 64"):
                train(child)
            assert not (Path(child.out) / child.name).exists()
        else:
            assert status_of(train(child))["state"] == "completed"


def test_a_fork_s_epsilon_counts_its_parent_s_steps(tiny_teacher):
    """A fork's weights carry its parent's steps: online, epsilon is the least noisy part's (each sample in one
    noised sum); a non-private parent leaves no guarantee; offline the parts' RDP adds up (against opacus)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    common = [*tiny_teacher, "model.norm=group", "optim.batch_size=32", "checkpoint.steps=[2]", "budget.steps=2"]
    dp = ["noise.kind=dp", "noise.clip=1"]
    cases = {"open": (["noise.kind=none"], [*dp, "noise.sigma=5"]),
             "weak": ([*dp, "noise.sigma=0.5"], ["noise.sigma=5"]),
             "strong": ([*dp, "noise.sigma=5"], ["noise.sigma=0.5"])}
    got = {}
    for name, (mine, theirs) in cases.items():
        train(load_config(None, [*common, *mine, f"name={name}"]))
        child = fork_config(Path(load_config(None, common).out) / name, at_step=2,
                            overrides=[*theirs, "budget.steps=4"])
        got[name] = status_of(train(child))
    assert got["open"]["epsilon"] == math.inf and got["open"]["accountant"].startswith("none: 2 steps of open")
    assert got["weak"]["epsilon"] == pytest.approx(privacy.epsilon(0.5, 1e-5))  # where it reported epsilon(5)
    assert got["strong"]["epsilon"] == pytest.approx(privacy.epsilon(0.5, 1e-5))
    assert "over the fork's parts" in got["weak"]["accountant"]

    offline = [*common, *dp, "data.epochs=4", "data.train_size=128", "name=offline"]
    train(load_config(None, [*offline, "noise.sigma=2"]))
    child = fork_config(Path(load_config(None, common).out) / "offline", at_step=2,
                        overrides=["noise.sigma=1", "optim.batch_size=64", "budget.steps=3"])
    status = status_of(train(child))  # 2 steps at sigma 2, q = 1/4, then 1 step at sigma 1, q = 1/2
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.25, noise_multiplier=2.0, steps=2, orders=orders) + \
        compute_rdp(q=0.5, noise_multiplier=1.0, steps=1, orders=orders)
    assert status["step"] == 3
    assert status["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1 / 128)[0], rel=1e-9)
