"""The chunked lm-head + cross-entropy against the plain F.cross_entropy over the full float32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from goldenpath.models.lm_loss import lm_head_losses


def _inputs(n=37, d=16, vocab=101, seed=0, ignored=(3, 20, 21)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, d, generator=g) / d**0.5).requires_grad_()
    labels = torch.randint(vocab, (n,), generator=g)
    labels[list(ignored)] = -100
    return hidden, weight, labels


def _plain(hidden, weight, labels):
    logits = hidden @ weight.T
    losses = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=-100)
    errors = (logits.argmax(-1) != labels) & (labels != -100)
    return losses, errors


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_losses_errors_and_gradients_equal_the_full_logits_path(chunk, grad_in_forward):
    hidden, weight, labels = _inputs()
    # the recomputing backward takes any incoming gradient per token; the other one a constant
    weights_out = torch.full((len(labels),), 0.37) if grad_in_forward else torch.linspace(0.5, 2.0, len(labels))
    ref_losses, ref_errors = _plain(hidden, weight, labels)
    ref = torch.autograd.grad((ref_losses * weights_out).sum(), (hidden, weight))
    losses, errors = lm_head_losses(hidden, weight, labels, chunk_tokens=chunk, grad_in_forward=grad_in_forward)
    got = torch.autograd.grad((losses * weights_out).sum(), (hidden, weight))
    assert losses.dtype == torch.float32 and errors.dtype == torch.bool
    assert _rel(losses, ref_losses) < 1e-6 and torch.equal(errors, ref_errors)
    assert losses[[3, 20, 21]].abs().sum() == 0
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-6
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


def test_batched_shapes_and_a_tied_weight_accumulate_like_the_plain_path():
    hidden, weight, labels = _inputs(n=24, ignored=(0,))
    h3, y2 = hidden.view(4, 6, -1), labels.view(4, 6)
    ref = torch.autograd.grad(_plain(hidden, weight, labels)[0].sum() + weight.square().sum(), (hidden, weight))
    losses, _ = lm_head_losses(h3, weight, y2, chunk_tokens=5)
    assert losses.shape == (4, 6)
    got = torch.autograd.grad(losses.sum() + weight.square().sum(), (hidden, weight))
    for a, b in zip(got, ref):
        assert _rel(a, b) < 1e-6


def test_a_wrong_gradient_would_be_caught():
    # the check above is sharp: dropping the one-hot term moves the gradient far beyond 1e-6
    hidden, weight, labels = _inputs()
    ref = torch.autograd.grad(_plain(hidden, weight, labels)[0].sum(), hidden)[0]
    wrong = torch.autograd.grad(torch.logsumexp(hidden @ weight.T, -1)[labels != -100].sum(), hidden)[0]
    assert _rel(wrong, ref) > 1e-2


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="torch without get_autocast_dtype")
def test_under_bf16_autocast_the_logits_are_bf16_and_the_loss_float32_as_in_the_plain_path():
    hidden, weight, labels = _inputs(n=16, ignored=())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none")
        losses, _ = lm_head_losses(hidden, weight, labels, chunk_tokens=4)
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, ref, rtol=1e-6, atol=1e-6)
    ref_g = torch.autograd.grad(ref.sum(), weight)[0]
    got_g = torch.autograd.grad(losses.sum(), weight)[0]
    assert got_g.dtype == torch.float32 and _rel(got_g, ref_g) < 2e-2  # bf16 products, summed per chunk


def test_a_gpt2_model_gives_the_loss_and_gradients_of_its_full_logits():
    from goldenpath.config import load_config
    from goldenpath.data import SourceInfo
    from goldenpath.models.lm_loss import causal_lm_losses
    from goldenpath.models import build_model, sample_losses

    config = load_config(None, ["model.name=gpt2", "model.width=32", "model.depth=2", "model.heads=4",
                                "budget.steps=1"]).model
    model = build_model(config, SourceInfo("lm", (12,), 97), seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(97, (3, 12), generator=g)
    labels = torch.randint(97, (3, 12), generator=g)
    labels[0, :4] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    ref_loss = sample_losses(model, {"input_ids": ids, "labels": labels}).sum()
    ref = torch.autograd.grad(ref_loss, params)
    for grad_in_forward in (False, True):
        losses, _ = causal_lm_losses(model, ids, labels, chunk_tokens=7, grad_in_forward=grad_in_forward)
        got = torch.autograd.grad(losses.sum() / 30, params)  # goldenpath's loss: a sum over tokens, scaled
        assert abs(float(losses.sum() - ref_loss)) < 1e-6 * float(ref_loss)
        for (name, _), a, b in zip(model.named_parameters(), got, ref):
            assert _rel(a * 30, b) < 1e-6, (name, grad_in_forward)


def test_gradients_from_the_forward_refuse_an_uneven_weighting_of_the_tokens():
    hidden, weight, labels = _inputs()
    losses, _ = lm_head_losses(hidden, weight, labels, chunk_tokens=8, grad_in_forward=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad((losses * torch.linspace(0.5, 2.0, len(labels))).sum(), weight)
    # the hidden states' gradient scales row by row: any weighting is exact for them (a frozen weight)
    weight = weight.detach()
    losses, _ = lm_head_losses(hidden, weight, labels, chunk_tokens=8, grad_in_forward=True)
    w = torch.linspace(0.5, 2.0, len(labels))
    ref = torch.autograd.grad((_plain(hidden, weight, labels)[0] * w).sum(), hidden)[0]
    assert _rel(torch.autograd.grad((losses * w).sum(), hidden)[0], ref) < 1e-6


def test_a_run_with_the_chunked_head_trains_as_the_full_logits_run_and_dp_refuses_it(tmp_path):
    """model.loss_chunk_tokens: the trainer's losses, errors and updates come through the chunked head, the
    same run as with the full logits (fp64: within 1e-9 over every logged value, eval included)."""
    import json
    from pathlib import Path

    from goldenpath.config import ConfigError, load_config
    from goldenpath.training.trainer import train

    base = Path(__file__).resolve().parents[1] / "configs" / "markov-gpt2.yaml"
    common = [f"out={tmp_path}", "budget.samples=256", "optim.batch_size=32", "checkpoint.targets=[]",
              "checkpoint.eval_every=4", "log.every=2", "log.progress=false", "precision=fp64"]
    logs = {}
    for name, chunk in (("full", "null"), ("chunked", "7")):
        train(load_config(base, [*common, f"name={name}", f"model.loss_chunk_tokens={chunk}"]))
        logs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(logs["full"]) == len(logs["chunked"]) > 4
    for full, chunked in zip(logs["full"], logs["chunked"]):
        for key in ("train_loss", "grad_norm", "eval_loss", "eval_error"):
            if key in full:
                assert chunked[key] == pytest.approx(full[key], rel=1e-9, abs=1e-12), key
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens: per-sample clipping"):
        load_config(base, [*common, "model.loss_chunk_tokens=7", "noise.kind=dp", "noise.sigma=1", "noise.clip=1"])
    with pytest.raises(ConfigError, match="model.loss_chunk_tokens: got 0"):
        load_config(base, [*common, "model.loss_chunk_tokens=0"])
