"""Per-sample gradients of single layers from their inputs and output gradients (the DP-SGD fast path).

One rule per layer type, registered with ``@rule(nn.Linear)`` and looked up by the module's *exact* type
(a subclass may compute something else in its forward, so it gets torch.func instead). A rule takes the
layer, its input ``a`` [B, ...] and the gradient ``g`` [B, ...] of the loss with respect to its output,
and returns each parameter's per-sample gradient contribution, either dense [B, *shape] or factored:

A weight gradient ``sum_t u_t v_t^T`` (Linear, Conv2d via its patches, transformers' Conv1D, Embedding
with one-hot u) is kept as the factors (:class:`Factored`). Its per-sample squared norm is
``sum_{t,s} (u_t.u_s)(v_t.v_s)`` (the ghost norm, cost ~T^2), or, when cheaper, the per-sample gradient
of that one layer is formed and dropped at once. A parameter shared by several layers (GPT-2's tied
token embedding and output layer) sums all its uses before the norm, cross terms included.
LayerNorm and GroupNorm have closed forms, from the per-sample statistics their forward computed
(:func:`forward_saved`) where the autograd graph holds them.
"""

from __future__ import annotations

import sys
from math import prod as math_prod
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from goldenpath.training.runtime import free_memory_bytes

_GHOST_CHUNK = 1 << 24  # elements of a [b, T, T] Gram block held at once on a CPU
GHOST_MEMORY_SHARE = 0.125  # of a GPU's free memory, for the [b, T, T] blocks of one ghost-norm product


class Factored(NamedTuple):
    """A per-sample weight gradient sum_t u_t v_t^T of shape [rows, v.shape[-1]], viewed as ``shape``.

    ``u`` is [B, T, rows], or [B, T] integer rows of a one-hot u (an embedding lookup); ``v`` is [B, T, n].
    """

    u: torch.Tensor
    v: torch.Tensor
    rows: int
    shape: torch.Size


Part = Factored | torch.Tensor  # one use's per-sample gradient contribution: factored or dense [B, *shape]
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], "dict[str, Part] | None"]

RULES: dict[type, Rule] = {}


def rule(*types: type):
    """Register ``fn(module, a, g, saved=None) -> {attribute: Part} | None`` for modules of exactly these types
    (None: this configuration of the layer is not covered, e.g. a grouped convolution); ``saved`` is what
    :func:`forward_saved` read from the call's output as its forward returned (None: nothing)."""
    def register(fn: Rule) -> Rule:
        for t in types:
            RULES[t] = fn
        return fn
    return register


def rule_of(module: nn.Module) -> Rule | None:
    """The rule for this module's exact type, or None."""
    if "transformers" in sys.modules and _conv1d_type() not in RULES:
        RULES[_conv1d_type()] = _conv1d
    return RULES.get(type(module))


# the autograd node a norm layer's forward ends in, which holds its per-sample mean and 1/std
_STATS_NODES = {nn.LayerNorm: "NativeLayerNormBackward0", nn.GroupNorm: "NativeGroupNormBackward0"}


def forward_saved(module: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a layer's rule reads from its forward, taken as the layer returns (the backward frees it): a layer
    norm's or group norm's per-sample mean and 1/std, from its output's autograd node, so that the rule does
    not compute them again (detached: a group norm's are differentiable outputs, and would carry the graph into
    the clipped gradients). None for other layers, when the output did not come from that node, when its
    statistics are not float32 or float64, or under saved-tensor hooks (activation checkpointing: reading them
    would run the forward again); the rule then normalises the input itself."""
    node = _STATS_NODES.get(type(module))
    fn = output.grad_fn if node is not None and torch.is_tensor(output) else None
    if fn is None or type(fn).__name__ != node or torch._C._autograd._top_saved_tensors_default_hooks(False):
        return None
    mean, rstd = getattr(fn, "_saved_result1", None), getattr(fn, "_saved_result2", None)
    if mean is None or rstd is None or mean.dtype not in (torch.float32, torch.float64) or rstd.dtype != mean.dtype:
        return None
    return mean.detach(), rstd.detach()


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _seq(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] (T = 1 for a plain [B, d])."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def as_float_part(part: "Part") -> "Part":
    """A contribution with its half-precision floats in float32 (a one-hot ``u``'s indices stay as they are)."""
    if isinstance(part, Factored):
        return part._replace(u=as_float(part.u) if part.u.is_floating_point() else part.u, v=as_float(part.v))
    return as_float(part)


# ----------------------------------------------------------------------------- the rules


def _bias(m: nn.Module, grads: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"bias": grads()}`` for a layer with a bias; nothing for one without (GPT-2's output layer, a
    convolution before a norm layer), whose per-sample output sums would cost a pass over ``g`` for nothing."""
    return {"bias": grads()} if getattr(m, "bias", None) is not None else {}


@rule(nn.Linear)
def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part]:
    a, g = _seq(as_float(a)), _seq(g)
    return {"weight": Factored(g, a, m.out_features, m.weight.shape), **_bias(m, lambda: g.sum(1))}


def _conv1d(m: nn.Module, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part]:
    """transformers' Conv1D: a linear layer storing its weight transposed, [in, out]."""
    a, g = _seq(as_float(a)), _seq(g)
    return {"weight": Factored(a, g, m.weight.shape[0], m.weight.shape), **_bias(m, lambda: g.sum(1))}


@rule(nn.Conv2d)
def _conv2d(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part] | None:
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) or a.dim() != 4:
        return None
    a, t, n = as_float(a), g.shape[2] * g.shape[3], m.weight[0].numel()
    if not per_sample_cheaper(t, m.out_channels, n):
        weight = Factored(g.flatten(2).transpose(1, 2), _patches(a, m, g.shape[2:]).transpose(1, 2),
                          m.out_channels, m.weight.shape)
    elif n <= _FEW_PATCH_VALUES or _patch_products(a):  # one batched product of the patches
        weight = _patch_product(a, g, m)
    else:
        b, c = a.shape[:2]
        # one grouped convolution: group i is sample i (conv2d_weight's expanded stand-in weight costs 10% more)
        weight = torch.ops.aten.convolution_backward(
            g.reshape(1, -1, *g.shape[2:]), a.reshape(1, b * c, *a.shape[2:]),
            g.new_empty(b * m.out_channels, *m.weight.shape[1:]), None, m.stride, m.padding, m.dilation, False,
            (0, 0), b, (False, True, False))[1].view(b, *m.weight.shape)
    return {"weight": weight, **_bias(m, lambda: g.sum((2, 3)))}


@rule(nn.Embedding)
def _embedding(m: nn.Embedding, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part] | None:
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        return None
    ids, g = a.reshape(a.shape[0], -1), _seq(g)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx).unsqueeze(-1)
    return {"weight": Factored(ids, g, m.num_embeddings, m.weight.shape)}


@rule(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part]:
    k = a.dim() - len(m.normalized_shape)
    dims, a = tuple(range(1, k)), as_float(a)
    if saved is not None and saved[0].shape == (*a.shape[:k], *[1] * (a.dim() - k)):
        mean, rstd = saved  # the forward's statistics: xhat = (a - mean) / std
        return _affine_grads(m, lambda s: (a[s] - mean[s]).mul_(rstd[s]), a, g, dims)
    return _affine_grads(m, lambda s: F.layer_norm(a[s], m.normalized_shape, eps=m.eps), a, g, dims)


@rule(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, saved=None) -> dict[str, Part]:
    dims, a = tuple(range(2, a.dim())), as_float(a)
    if saved is None or not dims or getattr(m, "weight", None) is None or \
            saved[0].shape != (a.shape[0], m.num_groups):
        return _affine_grads(m, lambda s: F.group_norm(a[s], m.num_groups, eps=m.eps), a, g, dims)
    # the forward's statistics, per sample and group: sum xhat g = (sum a g - mean sum g) / std, two passes over
    # a and g instead of normalising a (on the CNN's first group norm, 1.2 instead of 2.2 ms). PyTorch's own
    # group-norm backward takes this form too. In float32 with mean / std = 100 (1000) it is 1.5e-5 (1.4e-4) from
    # float64, PyTorch's per-sample gradients 3.3e-5 (3.3e-4), normalising the input 4.6e-6 (3.2e-5), relative
    mean, rstd = (x.unsqueeze(-1) for x in saved)  # [B, groups, 1] against [B, groups, channels per group]
    shift, cross = g.sum(dims), (a * g).sum(dims)
    by_group = (a.shape[0], m.num_groups, -1)
    scale = (cross.view(by_group) - shift.view(by_group) * mean).mul_(rstd)
    return {"weight": scale.view_as(shift), **_bias(m, lambda: shift)}


# A convolution whose patches hold at most this many values (input channels x kernel area, e.g. 3 x 3 x 3)
# gets its per-sample weight gradients as one batched matrix product of its patches; above it, one grouped
# convolution is faster (measured on CPU, batch 64: 0.9 vs 2.5 ms for 3 -> 32 channels at 32 x 32, but
# 2.7 vs 1.8 ms for 8 -> 32 channels).
_FEW_PATCH_VALUES = 32


def _patch_products(a: torch.Tensor) -> bool:
    """Whether every convolution's per-sample weight gradients come from batched products of its patches:
    on a GPU, as Opacus' hooks do (the first GPU measurement had goldenpath's grouped-convolution route at
    6.2x a non-private ResNet-18 step, Opacus' hooks at 3.9x; this route is not measured on a GPU yet). On a
    CPU only for a first layer (``_FEW_PATCH_VALUES``): past it a grouped convolution is faster there."""
    return a.device.type == "cuda"


PATCH_MEMORY_SHARE = 0.125  # of the device's free memory, for the patches of one batched product


def _patch_product(a: torch.Tensor, g: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """[B, *weight shape] per-sample weight gradients: the patches of a few samples at a time (as many as
    fit in PATCH_MEMORY_SHARE of the free memory on a GPU; all at once on a CPU) times their output gradients."""
    b, out_hw = a.shape[0], g.shape[2:]
    step = _samples_per_product(a, m.weight[0].numel() * out_hw[0] * out_hw[1] * a.element_size())
    out = []
    for lo in range(0, b, step):
        cols = _patches(a[lo : lo + step], m, out_hw)  # [b, C kh kw, L]
        # [b, C kh kw, out], then viewed [b, out, C kh kw] (this order: 1.4x the other on a CPU's first layer)
        out.append(torch.bmm(cols, g[lo : lo + step].flatten(2).transpose(1, 2)).transpose(1, 2))
    return (out[0] if len(out) == 1 else torch.cat(out)).reshape(-1, *m.weight.shape)


def _samples_per_product(a: torch.Tensor, patch_bytes: int) -> int:
    """Samples whose patches (``patch_bytes`` each) one product takes: all on a CPU; on a GPU as many as fit
    in PATCH_MEMORY_SHARE of its free memory."""
    if a.device.type != "cuda":
        return a.shape[0]
    return max(1, min(a.shape[0], int(PATCH_MEMORY_SHARE * free_memory_bytes(a.device) // max(1, patch_bytes))))


def _patches(a: torch.Tensor, m: nn.Conv2d, out_hw) -> torch.Tensor:
    """``F.unfold(a)`` for the convolution ``m``: [B, C kh kw, L] with the same ordering (copies of strided
    slices of the padded input, cheaper than unfold's kernel). A channels-last input is first copied
    channels-first: the slices then copy whole rows (the CNN's first layer on a CPU: 1.3 instead of 1.7 ms)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    ho, wo = out_hw
    a = a.contiguous()
    a = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    views = [a[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
             for i in range(kh) for j in range(kw)]
    return torch.stack(views, 2).reshape(a.shape[0], -1, ho * wo)


_CACHE_ELEMENTS = 1 << 18  # activations normalised at once by _affine_grads (1 MB in float32)


def _affine_grads(m: nn.Module, normalise, a: torch.Tensor, g: torch.Tensor, dims: tuple) -> dict[str, Part]:
    """Per-sample gradients of a norm layer's scale and shift (those it has): sum over ``dims`` of xhat g, and of g;
    ``normalise(s)`` is xhat of the samples in slice ``s``, a new tensor.

    On a CPU xhat is computed a few samples at a time, so that it is still in cache when it meets g (on the
    CNN's first group norm, normalised from its input: 0.55 instead of 0.95 ms); a GPU takes the whole batch.
    """
    out = _bias(m, lambda: g.sum(dims) if dims else g)
    if getattr(m, "weight", None) is None:
        return out
    step = max(1, _CACHE_ELEMENTS // max(1, a[0].numel())) if a.device.type == "cpu" else a.shape[0]
    scale = []
    for lo in range(0, a.shape[0], step):
        xhat = normalise(slice(lo, lo + step)).mul_(g[lo : lo + step])  # in place: one chunk-sized buffer
        scale.append(xhat.sum(dims) if dims else xhat)
    return {"weight": torch.cat(scale), **out}


# ----------------------------------------------------------------------------- norms and weighted sums


def per_sample_cheaper(t: int, rows: int, cols: int) -> bool:
    """Whether forming a layer's [rows, cols] per-sample gradients (~T rows cols) beats ghost norms (~T^2)."""
    return t * (rows + cols) > rows * cols


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, Tx, Ty] inner products of the rows of u-factors (dense [B, T, m] or one-hot indices [B, T])."""
    if x.is_floating_point() and y.is_floating_point():
        return torch.bmm(x, y.transpose(1, 2))
    if not x.is_floating_point() and not y.is_floating_point():
        return (x.unsqueeze(2) == y.unsqueeze(1)).to(torch.get_default_dtype())
    if x.is_floating_point():
        return _gram(y, x).transpose(1, 2)
    return y.gather(2, x.unsqueeze(1).expand(-1, y.shape[1], -1)).transpose(1, 2)  # x indices, y dense


def _ghost_samples(x: torch.Tensor, tp: int, tq: int) -> int:
    """Samples per ghost-norm product of [b, tp, tq] blocks: on a CPU as many as keep a block within _GHOST_CHUNK
    elements; on a GPU as many as fit in GHOST_MEMORY_SHARE of its free memory (the two Gram blocks and their
    product), at most the batch."""
    block = max(1, tp * tq)
    if x.device.type != "cuda":
        return max(1, _GHOST_CHUNK // block)
    fit = GHOST_MEMORY_SHARE * free_memory_bytes(x.device) // (3 * block * x.element_size())
    return max(1, min(x.shape[0], int(fit)))


def _factored_dot(p: Factored, q: Factored) -> torch.Tensor:
    """[B] per-sample <sum_t u_t v_t^T, sum_s u'_s v'_s^T>, in batch chunks bounding the [b, T, T] blocks."""
    b, tp, tq = p.v.shape[0], p.v.shape[1], q.v.shape[1]
    step = _ghost_samples(p.v, tp, tq)
    out = []
    for lo in range(0, b, step):
        s = slice(lo, lo + step)
        gu = _gram(p.u[s], q.u[s]).to(p.v.dtype)
        out.append((gu * torch.bmm(p.v[s], q.v[s].transpose(1, 2))).sum((1, 2)))
    return torch.cat(out)


def dense(f: Part) -> torch.Tensor:
    """The per-sample gradients [B, *shape] of a contribution."""
    if not isinstance(f, Factored):
        return f
    if f.u.is_floating_point():  # bmm of the transposed view: 0.8x einsum's time on a CPU (GPT-2's block layers)
        return torch.bmm(f.u.transpose(1, 2), f.v).reshape(-1, *f.shape)
    b, n = f.v.shape[0], f.v.shape[-1]
    out = f.v.new_zeros(b, f.rows, n)
    return out.scatter_add_(1, f.u.unsqueeze(-1).expand(-1, -1, n), f.v).reshape(-1, *f.shape)


def formed_saving(parts: list[Part]) -> float:
    """Multiply-adds per sample and per gradient entry saved by forming this parameter's per-sample
    gradients once (book-keeping), for the norm and the clipped sum alike; 0: not formed.

    Left factored, a use costs its norm (ghost: T^2 (rows + cols); or, where cheaper, forming and dropping the
    gradients: T rows cols) and then its clipped sum, one product over positions (T rows cols). Formed, it
    costs T rows cols once, and the sum is a weighted sum over samples. Only a parameter with one use, a
    factored one with a dense ``u``: an embedding keeps its cheap one-hot ghost norm, and a tied weight
    (GPT-2's embedding and output layer) its ghost norms with cross terms, since forming the [B, vocab, d]
    gradients of an output layer costs about twice its product over positions (measured on a CPU: 100 ms
    against 55 at batch 16 x 128 tokens, vocabulary 8192, d 256), while the blocks' layers form as fast as
    their product (about 7 ms each)."""
    if len(parts) != 1 or not isinstance(parts[0], Factored) or not parts[0].u.is_floating_point():
        return 0.0
    f = parts[0]
    t, rows, cols = f.v.shape[1], f.rows, f.v.shape[-1]
    return min(t * rows * cols, t * t * (rows + cols)) / (rows * cols)


def keep_formed(parts: dict[str, list[Part]], budget_bytes: float) -> dict[str, list[Part]]:
    """``parts`` with the per-sample gradients of parameters formed once (dense [B, *shape]), the largest
    saving per byte first (:func:`formed_saving`), as many as fit in ``budget_bytes``: the norm reads them
    and the clipped sum is a weighted sum over samples (B x size) instead of a product over positions
    (B x T x size). The others stay factored."""
    out = dict(parts)
    ranked = sorted(((formed_saving(ps), n) for n, ps in parts.items()), reverse=True)
    for saving, n in ranked:
        if saving <= 0:
            break
        f = parts[n][0]
        size = f.v.shape[0] * math_prod(f.shape) * f.v.element_size()
        if size <= budget_bytes:
            out[n], budget_bytes = [dense(f)], budget_bytes - size
    return out


def sq_norms(parts: list[Part]) -> torch.Tensor:
    """[B] squared norms of the per-sample gradient of one parameter, summed over its uses."""
    if all(isinstance(p, Factored) for p in parts):
        if len(parts) == 1 and parts[0].u.is_floating_point() and \
                per_sample_cheaper(parts[0].v.shape[1], parts[0].rows, parts[0].v.shape[-1]):
            return _sq_rows(dense(parts[0]))  # formed and dropped (not kept: memory)
        total = 0
        for i, p in enumerate(parts):
            for q in parts[i:]:
                total = total + (1 if p is q else 2) * _factored_dot(p, q)
        return total
    return _sq_rows(dense(parts[0]) if len(parts) == 1 else sum(dense(p) for p in parts))


def _sq_rows(x: torch.Tensor) -> torch.Tensor:
    """[B] squared norms of the rows of ``x`` [B, ...] (no squared copy)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).square()  # 10x vecdot(x, x) on a CPU


def dtype_of(part: Part) -> torch.dtype:
    return part.v.dtype if isinstance(part, Factored) else part.dtype


def weighted_sum(part: Part, c: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum_i c_i (per-sample gradient i) of one contribution (``c`` in the contribution's dtype)."""
    if isinstance(part, Factored):
        if part.u.is_floating_point():  # weight the smaller factor
            u, v = part.u, part.v
            if u.numel() <= v.numel():
                u = u * c[:, None, None]
            else:
                v = v * c[:, None, None]
            return (u.flatten(0, 1).T @ v.flatten(0, 1)).reshape(shape)
        v = (part.v * c[:, None, None]).flatten(0, 1)
        return v.new_zeros(part.rows, v.shape[-1]).index_add_(0, part.u.flatten(), v).reshape(shape)
    return (c @ part.flatten(1)).reshape(shape)
