"""The chunked lm-head + cross-entropy against the plain F.cross_entropy over the full float32 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from goldenpath.lm_loss import lm_head_losses


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


@pytest.mark.parametrize("chunk", [1, 8, 37, 64])
def test_losses_errors_and_gradients_equal_the_full_logits_path(chunk):
    hidden, weight, labels = _inputs()
    weights_out = torch.linspace(0.5, 2.0, len(labels))  # a non-uniform incoming gradient per token
    ref_losses, ref_errors = _plain(hidden, weight, labels)
    ref = torch.autograd.grad((ref_losses * weights_out).sum(), (hidden, weight))
    losses, errors = lm_head_losses(hidden, weight, labels, chunk_tokens=chunk)
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
