"""The language-model head and cross-entropy in token chunks, never holding the full [tokens, vocab] logits.

``lm_head_losses(hidden, weight, labels, chunk_tokens=...)`` returns what
``F.cross_entropy((hidden @ weight.T).float(), labels, reduction="none", ignore_index=-100)`` returns, and each
token's top-1 error, with the same gradients for ``hidden`` and ``weight``. The plain path stores the logits,
their float32 copy and the log-softmax for the backward (three [N, V] tensors; GPT-2 small at 16 x 1024
tokens: 16,384 x 50,257, 3.3 GB each in float32); this one keeps one chunk's worth at a time and recomputes a
chunk's logits in the backward (one more lm-head matmul, a third of the head's FLOPs again).

The logits are computed in the compute dtype (autocast's when it is on, as the plain path's ``hidden @
weight.T`` is) and the log-softmax in float32, exactly as ``goldenpath.models`` computes the loss.
"""

from __future__ import annotations

import torch

IGNORE = -100  # labels that are not predicted (as in F.cross_entropy)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in here: autocast's when it is enabled for ``t``'s device."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, dtype: torch.dtype):
        n = hidden.shape[0]
        w = weight.to(dtype)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        errors = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for s in range(0, n, chunk):
            z = (hidden[s : s + chunk].to(dtype) @ w.T).float()
            y = labels[s : s + chunk]
            keep = y != IGNORE
            logp = torch.log_softmax(z, -1)
            losses[s : s + chunk] = -logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1) * keep
            errors[s : s + chunk] = (z.argmax(-1) != y) & keep
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk, ctx.dtype = chunk, dtype
        ctx.mark_non_differentiable(errors)
        return losses, errors

    @staticmethod
    def backward(ctx, grad_losses, _grad_errors):
        hidden, weight, labels = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            y = labels[s : s + chunk]
            keep = y != IGNORE
            # d loss_i / d z_i = softmax(z_i) - onehot(y_i), scaled by loss_i's incoming gradient
            g = torch.softmax((h @ w.T).float(), -1)
            rows = keep.nonzero().squeeze(1)
            g[rows, y[rows]] -= 1
            g = (g * (grad_losses[s : s + chunk] * keep)[:, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (g @ w).to(hidden.dtype)
            if grad_weight is not None and dtype == torch.float32:
                grad_weight.addmm_(g.T, h)  # in place: no [vocab, d] temporary per chunk
            elif grad_weight is not None:
                grad_weight += (g.T @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None


def lm_head_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   chunk_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (float32) and top-1 errors (bool) of the logits ``hidden @ weight.T``.

    Args:
        hidden: final hidden states [..., d] (after the last norm).
        weight: the output layer's weight [vocab, d] (no bias; GPT-2 and Llama have none).
        labels: token ids [...]; ``-100`` is not predicted (loss 0, no error).
        chunk_tokens: tokens whose logits are held at once.

    Returns:
        losses and errors shaped like ``labels``.
    """
    shape = labels.shape
    losses, errors = _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                            chunk_tokens, compute_dtype(hidden))
    return losses.view(shape), errors.view(shape)
