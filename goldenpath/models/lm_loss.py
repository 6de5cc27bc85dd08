"""The language-model head and cross-entropy in token chunks, never holding the full [tokens, vocab] logits.

``lm_head_losses(hidden, weight, labels, chunk_tokens=...)`` returns what
``F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none", ignore_index=-100)`` returns, and each
token's top-1 error, with the same gradients for ``hidden`` and ``weight``. The plain path holds the logits
(bf16 under autocast), their float32 copy and its log-softmax, and the backward adds [N, V] gradients (GPT-2
small at 16 x 1024 tokens: 16,384 x 50,257, 3.3 GB per float32 copy); this one holds one chunk's worth at a
time. Its backward either recomputes each chunk's logits (one more head matmul, a third of the head's
FLOPs again), or, with ``grad_in_forward``, the gradients are summed in the forward while the logits are at
hand, which needs a loss that weighs every predicted token alike (a sum or mean of the token losses times a
constant, as goldenpath's training loss).

The logits are computed in the compute dtype (autocast's when it is on, as the plain path's ``hidden @
weight.T`` is) and the log-softmax in float32 (float64 in a float64 run), exactly as ``goldenpath.models``
computes the loss. A language model uses it when ``model.loss_chunk_tokens`` is set (not under DP-SGD).
"""

from __future__ import annotations

import torch

IGNORE = -100  # labels that are not predicted (as in F.cross_entropy)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in here: autocast's when it is enabled for ``t``'s device."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def _logit_grad(probs: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """d loss_i / d z_i = softmax(z_i) - onehot(y_i) for the predicted tokens (zero rows for the others), in
    place of ``probs`` = softmax(z); no boolean indexing, so nothing here waits for the device."""
    probs.scatter_add_(1, y.clamp_min(0)[:, None], -torch.ones_like(probs[:, :1]))
    return probs.mul_(keep[:, None])


class _ChunkedHeadLoss(torch.autograd.Function):
    """Per-token losses of ``hidden @ weight.T`` a chunk of tokens at a time.

    ``grad_in_forward``: each chunk's gradients for a unit incoming gradient are summed in the forward, while
    its logits are at hand (no second head matmul in the backward); the backward then scales them, which is
    exact for ``hidden`` and, for ``weight``, when every predicted token's loss has the same incoming gradient
    (a sum or a mean of the losses, times a constant: goldenpath's training loss). A different weighting fails
    a device-side check. Otherwise the backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, dtype: torch.dtype, grad_in_forward: bool):
        n = hidden.shape[0]
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # log-softmax in float32, or float64 in a float64 run
        losses = torch.empty(n, dtype=acc, device=hidden.device)
        errors = torch.empty(n, dtype=torch.bool, device=hidden.device)
        unit_hidden = torch.empty_like(hidden) if grad_in_forward else None
        unit_weight = torch.zeros_like(weight, dtype=acc) if grad_in_forward else None
        for s in range(0, n, chunk):
            h = hidden[s : s + chunk].to(dtype)
            z = (h @ w.T).to(acc)
            y = labels[s : s + chunk]
            keep = y != IGNORE
            logp = torch.log_softmax(z, -1)
            losses[s : s + chunk] = -logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * keep
            errors[s : s + chunk] = (z.argmax(-1) != y) & keep
            if grad_in_forward:
                g = _logit_grad(logp.exp_(), y, keep).to(dtype)  # exp(log-softmax), as its backward uses
                unit_hidden[s : s + chunk] = (g @ w).to(hidden.dtype)
                _add_weight_grad(unit_weight, g, h)
        ctx.save_for_backward(hidden, weight, labels, unit_hidden, unit_weight)
        ctx.chunk, ctx.dtype, ctx.grad_in_forward = chunk, dtype, grad_in_forward
        ctx.mark_non_differentiable(errors)
        return losses, errors

    @staticmethod
    def backward(ctx, grad_losses, _grad_errors):
        hidden, weight, labels, unit_hidden, unit_weight = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.grad_in_forward:
            keep = labels != IGNORE
            grad_hidden = unit_hidden * grad_losses[:, None].to(unit_hidden.dtype) if want_hidden else None
            grad_weight = None
            if want_weight:
                c = grad_losses.gather(0, keep.int().argmax().view(1))  # a predicted token's gradient
                torch._assert_async(((grad_losses == c) | ~keep).all())  # on the device: no host read
                grad_weight = (unit_weight * c).to(weight.dtype)
            return grad_hidden, grad_weight, None, None, None, None
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            y = labels[s : s + chunk]
            g = _logit_grad(torch.softmax((h @ w.T).to(acc), -1), y, y != IGNORE)
            g = g.mul_(grad_losses[s : s + chunk, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                _add_weight_grad(grad_weight, g, h)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def _add_weight_grad(total: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    if g.dtype == total.dtype:
        total.addmm_(g.T, h)  # in place: no [vocab, d] temporary per chunk
    else:
        total += (g.T @ h).float()


def lm_head_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 2048,
                   grad_in_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (float32; float64 for float64 inputs) and top-1 errors (bool) of the logits
    ``hidden @ weight.T``.

    Args:
        hidden: final hidden states [..., d] (after the last norm).
        weight: the output layer's weight [vocab, d] (no bias; GPT-2 and Llama have none).
        labels: token ids [...]; ``-100`` is not predicted (loss 0, no error).
        chunk_tokens: tokens whose logits are held at once.
        grad_in_forward: compute the gradients in the forward (no second head matmul); only for a loss that
            weighs every predicted token alike, as goldenpath's training loss does (checked on the device).

    Returns:
        losses and errors shaped like ``labels``.
    """
    shape = labels.shape
    losses, errors = _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                            chunk_tokens, compute_dtype(hidden),
                                            grad_in_forward and torch.is_grad_enabled()
                                            and (hidden.requires_grad or weight.requires_grad))
    return losses.view(shape), errors.view(shape)


def causal_lm_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 2048,
                     grad_in_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and top-1 errors [B, T] of a ``goldenpath.models.CausalLM`` without its logits:
    the transformer's final hidden states, then :func:`lm_head_losses` with the output layer's weight."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # as CausalLM
    hidden = model.lm.base_model(input_ids=input_ids, position_ids=positions, use_cache=False).last_hidden_state
    return lm_head_losses(hidden, model.lm.get_output_embeddings().weight, labels, chunk_tokens=chunk_tokens,
                          grad_in_forward=grad_in_forward)
