"""Gradient transforms for one optimizer step: SGD, Noisy-SGD and DP-SGD (MISSION.md, "Noise knobs").

    gaussian: g = mean gradient + (sigma / B) xi
    dp:       g = (sum_i clip_C(g_i) + sigma C xi) / B,   clip_C(v) = v min(1, C / ||v||)

``per_sample_clip`` computes ``sum_i clip_C(g_i)`` (the norm over all trained parameters) two ways:

- ``method="vmap"``, the reference: per-sample gradients of every parameter with ``torch.func``
  (``functional_call`` + ``vmap(grad)``), ``chunk`` samples at a time so memory stays bounded.
- ``method="fast"``: one forward with hooks recording each layer's input, one backward to the layer
  outputs only (no parameter gradients), then per-sample norms from (input, output gradient) pairs and
  the clipped sum as one weighted product per layer ("book-keeping"): no second backward.
  A weight gradient ``sum_t u_t v_t^T`` (Linear, Conv2d via unfold, transformers' Conv1D, Embedding
  with one-hot u) has the per-sample squared norm ``sum_{t,s} (u_t.u_s)(v_t.v_s)`` (ghost norm, cost
  ~T^2) or, when cheaper, its per-sample gradient is formed for that one layer and dropped at once.
  A parameter shared by several layers (GPT-2's tied token embedding and output layer) sums all
  uses before the norm, cross terms included. LayerNorm/GroupNorm have closed forms. Any other module
  owning parameters gets per-sample gradients from ``torch.func`` on that module alone (its recorded
  inputs and output gradients); a parameter whose module does not see per-sample inputs falls back to
  the reference path. Assumes a parameter is used only inside the forward of the modules that own it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from goldenpath.data.synthetic import stream_key

Batch = dict | tuple | list
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> per-sample losses [B]

_GHOST_CHUNK = 1 << 24  # elements of a [b, T, T] Gram block held at once


@dataclass
class ClipResult:
    grads: dict[str, torch.Tensor]  # sum_i clip_C(g_i), by parameter name (no noise, not divided by B)
    norms: torch.Tensor             # [B] per-sample gradient norms before clipping
    losses: torch.Tensor            # [B] per-sample losses (detached)
    reference: tuple[str, ...] = () # parameters the fast path handed to the reference path


def clipped_grad_sum(model: nn.Module, loss_fn: LossFn, batch: Batch, clip: float) -> dict[str, torch.Tensor]:
    """``{parameter name: sum_i clip_C(g_i)}`` over the trained parameters (fast path; no noise)."""
    return per_sample_clip(model, loss_fn, batch, clip).grads


def per_sample_clip(model: nn.Module, loss_fn: LossFn, batch: Batch, clip: float, *, method: str = "fast",
                    chunk: int = 32) -> ClipResult:
    """Per-sample clipping of the gradients of ``loss_fn(model, batch)`` (one loss per sample)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(f"{type(m).__name__} mixes the samples of a batch, so DP-SGD has no per-sample "
                             "gradients; use group norm (model.norm=group)")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if method == "vmap":
        return _vmap_path(model, loss_fn, batch, clip, trained, chunk)
    if method == "fast":
        return _fast_path(model, loss_fn, batch, clip, trained, chunk)
    raise ValueError(f"method {method!r} is not one of ['fast', 'vmap']")


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / ||g_i||), with a zero gradient left as it is."""
    return (clip / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)


# ----------------------------------------------------------------------------- noise


def add_noise(grads: list[torch.Tensor], std: float, *, seed: int, step: int) -> torch.Tensor | float:
    """``grads += std * xi`` with xi ~ N(0, I); returns ``||std * xi||`` (a tensor on the gradients' device,
    so that the step loop never waits for the device).

    xi comes from a generator seeded by (seed, step) on the gradients' device: the same on every
    process, drawn once per optimizer step, and reproduced exactly on resume without saved state.
    """
    if std == 0 or not grads:
        return 0.0
    gen = torch.Generator(device=grads[0].device).manual_seed(stream_key(seed, 0x6E6F697365, step) & (2**63 - 1))
    norms = []
    for g in grads:  # one noise tensor at a time: no second copy of the model's gradients
        xi = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
        g.add_(xi, alpha=std)
        norms.append(torch.linalg.vector_norm(xi, dtype=torch.float64))
    return torch.linalg.vector_norm(torch.stack(norms)) * std


# ----------------------------------------------------------------------------- batches


def _batch_size(batch: Batch) -> int:
    leaves = [x for x in tree_flatten(batch)[0] if torch.is_tensor(x)]
    return leaves[0].shape[0]


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([x[lo:hi] if torch.is_tensor(x) else x for x in leaves], spec)


class _Functional:
    """Calls ``model`` with the given parameter and buffer tensors (what ``loss_fn`` sees under vmap)."""

    def __init__(self, model: nn.Module, tensors: dict):
        self._model, self._tensors = model, tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._tensors, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


# ----------------------------------------------------------------------------- reference path


def _per_sample_grads(model: nn.Module, loss_fn: LossFn, batch: Batch, names: list[str]):
    """({name: [b, *shape]}, losses [b]) for the given parameters, by vmap(grad) over single samples."""
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in names}
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def one(ps, sample):
        single = _slice_unsqueeze(sample)
        return loss_fn(_Functional(model, {**fixed, **ps}), single)[0]

    leaves, spec = tree_flatten(batch)
    dims = tree_unflatten([0 if torch.is_tensor(x) else None for x in leaves], spec)
    return vmap(grad_and_value(one), in_dims=(None, dims))(params, batch)


def _slice_unsqueeze(sample: Batch) -> Batch:
    leaves, spec = tree_flatten(sample)
    return tree_unflatten([x.unsqueeze(0) if torch.is_tensor(x) else x for x in leaves], spec)


def _vmap_path(model, loss_fn, batch, clip, trained, chunk) -> ClipResult:
    names = list(trained)
    sums = {n: torch.zeros_like(p) for n, p in trained.items()}
    norms, losses = [], []
    b = _batch_size(batch)
    for lo in range(0, b, chunk):
        grads, loss = _per_sample_grads(model, loss_fn, _slice(batch, lo, min(b, lo + chunk)), names)
        norm = torch.stack([g.flatten(1).double().square().sum(1) for g in grads.values()]).sum(0).sqrt()
        c = clip_factors(norm, clip)
        for n, g in grads.items():
            sums[n] += torch.einsum("b,b...->...", c.to(g.dtype), g)
        norms.append(norm)
        losses.append(loss.detach())
    return ClipResult(sums, torch.cat(norms), torch.cat(losses))


# ----------------------------------------------------------------------------- fast path


class _Factored(NamedTuple):
    """A per-sample weight gradient sum_t u_t v_t^T of shape [rows, v.shape[-1]], viewed as ``shape``.

    ``u`` is [B, T, rows], or [B, T] integer rows of a one-hot u (an embedding lookup); ``v`` is [B, T, n].
    """

    u: torch.Tensor
    v: torch.Tensor
    rows: int
    shape: torch.Size


class _Call(NamedTuple):
    module: nn.Module
    args: tuple
    kwargs: dict
    output: torch.Tensor


class _Tape:
    """Forward hooks recording every call of the modules that own trained parameters."""

    def __init__(self, modules: list[nn.Module]):
        self.calls: list[_Call] = []
        self.modules = modules

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def _hook(self, module, args, kwargs, output):
        self.calls.append(_Call(module, args, kwargs, output))

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers absent: no GPT-2 layers to handle
        return ()


def _seq(x: torch.Tensor) -> torch.Tensor:
    """[B, ..., d] -> [B, T, d] (T = 1 for a plain [B, d])."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rule(call: _Call, g: torch.Tensor) -> dict[str, list] | None:
    """Per-parameter gradient contributions (attribute name -> _Factored | dense [B, *shape]) of one call."""
    m, g = call.module, _float(g)
    a = call.args[0].detach() if call.args and torch.is_tensor(call.args[0]) else None
    if a is None or call.kwargs or len(call.args) != 1:
        return None
    out: dict[str, list] = {}
    if isinstance(m, nn.Linear):
        a, g = _seq(_float(a)), _seq(g)
        out["weight"] = _Factored(g, a, m.out_features, m.weight.shape)
        out["bias"] = g.sum(1)
    elif isinstance(m, _conv1d_type()):
        a, g = _seq(_float(a)), _seq(g)
        out["weight"] = _Factored(a, g, m.weight.shape[0], m.weight.shape)
        out["bias"] = g.sum(1)
    elif isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) or a.dim() != 4:
            return None
        a, t, n = _float(a), g.shape[2] * g.shape[3], m.weight[0].numel()
        if not _per_sample_cheaper(t, m.out_channels, n):
            out["weight"] = _Factored(g.flatten(2).transpose(1, 2), _patches(a, m, g.shape[2:]).transpose(1, 2),
                                      m.out_channels, m.weight.shape)
        elif n <= _FEW_PATCH_VALUES:  # a first layer (RGB or grey input): one batched product of the patches
            cols = _patches(a, m, g.shape[2:])
            out["weight"] = torch.bmm(cols, g.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(-1, *m.weight.shape)
        else:
            b, c = a.shape[:2]
            out["weight"] = torch.nn.grad.conv2d_weight(  # one grouped convolution: group i is sample i
                a.reshape(1, b * c, *a.shape[2:]), (b * m.out_channels, *m.weight.shape[1:]),
                g.reshape(1, -1, *g.shape[2:]), m.stride, m.padding, m.dilation, groups=b).view(b, *m.weight.shape)
        out["bias"] = g.sum((2, 3))
    elif isinstance(m, nn.Embedding):
        if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
            return None
        ids, g = a.reshape(a.shape[0], -1), _seq(g)
        if m.padding_idx is not None:
            g = g * (ids != m.padding_idx).unsqueeze(-1)
        out["weight"] = _Factored(ids, g, m.num_embeddings, m.weight.shape)
    elif isinstance(m, nn.LayerNorm):
        dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
        out["weight"], out["bias"] = _affine_grads(
            lambda x: F.layer_norm(x, m.normalized_shape, eps=m.eps), _float(a), g, dims)
    elif isinstance(m, nn.GroupNorm):
        out["weight"], out["bias"] = _affine_grads(
            lambda x: F.group_norm(x, m.num_groups, eps=m.eps), _float(a), g, tuple(range(2, a.dim())))
    else:
        return None
    return out


# A convolution whose patches hold at most this many values (input channels x kernel area, e.g. 3 x 3 x 3)
# gets its per-sample weight gradients as one batched matrix product of its patches; above it, one grouped
# convolution is faster (measured on CPU, batch 64: 0.9 vs 2.5 ms for 3 -> 32 channels at 32 x 32, but
# 2.7 vs 1.8 ms for 8 -> 32 channels).
_FEW_PATCH_VALUES = 32


def _patches(a: torch.Tensor, m: nn.Conv2d, out_hw) -> torch.Tensor:
    """``F.unfold(a)`` for the convolution ``m``: [B, C kh kw, L] with the same ordering (copies of strided
    slices of the padded input, cheaper than unfold's kernel)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    ho, wo = out_hw
    a = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    views = [a[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
             for i in range(kh) for j in range(kw)]
    return torch.stack(views, 2).reshape(a.shape[0], -1, ho * wo)


_CACHE_ELEMENTS = 1 << 18  # activations normalised at once by _affine_grads (1 MB in float32)


def _affine_grads(normalise, a: torch.Tensor, g: torch.Tensor, dims: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a norm layer's scale and shift: sum over ``dims`` of xhat g, and of g.

    On a CPU xhat is recomputed from the layer's input a few samples at a time, so that it is still in cache
    when it meets g (on the CNN's first group norm, 0.55 instead of 0.95 ms); a GPU takes the whole batch.
    """
    step = max(1, _CACHE_ELEMENTS // max(1, a[0].numel())) if a.device.type == "cpu" else a.shape[0]
    scale = []
    for lo in range(0, a.shape[0], step):
        xhat = normalise(a[lo : lo + step]).mul_(g[lo : lo + step])  # in place: one chunk-sized buffer
        scale.append(xhat.sum(dims) if dims else xhat)
    return torch.cat(scale), (g.sum(dims) if dims else g)


def _module_grads(call: _Call, g: torch.Tensor, own: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients [B, *shape] of a module's own parameters, by torch.func on that module alone."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [x.detach() if torch.is_tensor(x) else x for x in leaves]
    batched = [i for i, x in enumerate(leaves) if torch.is_tensor(x) and x.dim() and x.shape[0] == b]
    params = {n: p.detach() for n, p in own.items()}

    def one(g_i, *xs):
        vals = list(leaves)
        for i, x in zip(batched, xs):
            vals[i] = x.unsqueeze(0)
        args, kwargs = tree_unflatten(vals, spec)
        _, back = vjp(lambda ps: functional_call(call.module, ps, tuple(args), kwargs), params)
        return back(g_i.unsqueeze(0).to(call.output.dtype))[0]

    return vmap(one)(g, *[leaves[i] for i in batched])


def _per_sample_cheaper(t: int, rows: int, cols: int) -> bool:
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


def _factored_dot(p: _Factored, q: _Factored) -> torch.Tensor:
    """[B] per-sample <sum_t u_t v_t^T, sum_s u'_s v'_s^T>, in batch chunks bounding the [b, T, T] blocks."""
    b, tp, tq = p.v.shape[0], p.v.shape[1], q.v.shape[1]
    step = max(1, _GHOST_CHUNK // max(1, tp * tq))
    out = []
    for lo in range(0, b, step):
        s = slice(lo, lo + step)
        gu = _gram(p.u[s], q.u[s]).to(p.v.dtype)
        out.append((gu * torch.bmm(p.v[s], q.v[s].transpose(1, 2))).sum((1, 2)))
    return torch.cat(out)


def _dense(f: _Factored) -> torch.Tensor:
    """The per-sample gradients [B, *shape] of a factored contribution."""
    if f.u.is_floating_point():
        return torch.einsum("btm,btn->bmn", f.u, f.v).reshape(-1, *f.shape)
    b, n = f.v.shape[0], f.v.shape[-1]
    out = f.v.new_zeros(b, f.rows, n)
    return out.scatter_add_(1, f.u.unsqueeze(-1).expand(-1, -1, n), f.v).reshape(-1, *f.shape)


def _sq_norms(parts: list) -> torch.Tensor:
    """[B] squared norms of the per-sample gradient of one parameter, summed over its uses."""
    if all(isinstance(p, _Factored) for p in parts):
        if len(parts) == 1:
            f = parts[0]
            t, n = f.v.shape[1], f.v.shape[-1]
            if f.u.is_floating_point() and _per_sample_cheaper(t, f.rows, n):
                return torch.einsum("btm,btn->bmn", f.u, f.v).flatten(1).square().sum(1)
        total = 0
        for i, p in enumerate(parts):
            for q in parts[i:]:
                total = total + (1 if p is q else 2) * _factored_dot(p, q)
        return total
    dense = sum(_dense(p) if isinstance(p, _Factored) else p for p in parts)
    return dense.flatten(1).square().sum(1)


def _dtype(part) -> torch.dtype:
    return part.v.dtype if isinstance(part, _Factored) else part.dtype


def _weighted_sum(part, c: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum_i c_i (per-sample gradient i) of one contribution (``c`` in the contribution's dtype)."""
    if isinstance(part, _Factored):
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


def _fast_path(model, loss_fn, batch, clip, trained, chunk) -> ClipResult:
    name_of = {id(p): n for n, p in trained.items()}
    owners = [m for m in model.modules() if any(id(p) in name_of for p in m.parameters(recurse=False))]
    b = _batch_size(batch)
    with _Tape(owners) as tape:
        losses = loss_fn(model, batch)
    calls = [c for c in tape.calls if torch.is_tensor(c.output) and c.output.requires_grad]
    outs = torch.autograd.grad(losses.sum(), [c.output for c in calls], allow_unused=True)

    parts: dict[str, list] = {n: [] for n in trained}
    reference: set[str] = set()
    for call, g in zip(calls, outs):
        if g is None:
            continue
        local = {k: p for k, p in call.module.named_parameters(recurse=False) if id(p) in name_of}
        if g.shape[0] != b:  # the module saw no per-sample inputs (e.g. broadcast positions)
            reference |= {name_of[id(p)] for p in local.values()}
            continue
        rule = _rule(call, g)
        if rule is not None:
            for attr, part in rule.items():
                p = getattr(call.module, attr, None)
                if p is not None and id(p) in name_of:
                    parts[name_of[id(p)]].append(part)
            continue
        for k, grads in _module_grads(call, g, local, b).items():
            parts[name_of[id(local[k])]].append(grads)
    if reference:
        grads = [_per_sample_grads(model, loss_fn, _slice(batch, lo, min(b, lo + chunk)), sorted(reference))[0]
                 for lo in range(0, b, chunk)]
        for n in reference:
            parts[n] = [torch.cat([g[n] for g in grads])]

    sq = [_sq_norms(ps) for ps in parts.values() if ps]
    norms = torch.stack(sq).sum(0, dtype=torch.float64).sqrt() if sq else losses.new_zeros(b, dtype=torch.float64)
    factors = clip_factors(norms, clip)
    c = {dtype: factors.to(dtype) for dtype in {_dtype(part) for ps in parts.values() for part in ps}}
    grads = {}
    for n, p in trained.items():
        sums = [_weighted_sum(part, c[_dtype(part)], p.shape) for part in parts[n]]
        grads[n] = (sum(sums[1:], sums[0]) if sums else torch.zeros_like(p)).to(p.dtype)
    return ClipResult(grads, norms, losses.detach(), tuple(sorted(reference)))
