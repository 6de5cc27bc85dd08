"""Per-sample clipping for DP-SGD: ``sum_i clip_C(g_i)``, the norm of g_i over all trained parameters.

Two methods, the same answer:

- ``method="vmap"``, the reference: per-sample gradients of every parameter with ``torch.func``
  (``functional_call`` + ``vmap(grad)``), ``chunk`` samples at a time so memory stays bounded; models that
  torch.func cannot batch (``nn.RNNBase``: LSTM, GRU, RNN) get a plain loop over samples.
- ``method="fast"``: one forward with hooks recording every call of the modules that own trained
  parameters, one backward to those calls' outputs only (no parameter gradients), then per-sample norms
  and the clipped sum from each layer's rule (:mod:`goldenpath.dp.layer_rules`: ghost norms and one weighted
  product per layer, no second backward). A module without a rule gets per-sample gradients from
  ``torch.func`` on that module alone, from its recorded inputs and output gradients.

The fast path never guesses. After the forward it walks the autograd graph (:mod:`goldenpath.dp.tape`) and
finds, for every use of every trained parameter, the recorded call that accounts for it: the innermost
call, enclosing the use, of a module holding the parameter, whose output is the only way the call's work
reaches the loss. A
parameter with any use no such call accounts for (read directly by a parent's forward, used outside every
module, inside a call whose output is a tuple with unbatched parts, ...) goes to the reference path, so no
parameter ever gets a partial or zero gradient. The first time a model meets a batch shape, the fast path
also checks its per-parameter, per-sample norms on two samples against a loop over those samples, and
sends any parameter that disagrees (e.g. a sequence-first layer whose sequence length equals the batch
size, which no shape can tell apart) to the reference path for that shape, with a warning.

Under a bf16 autocast (a GPU run's default precision) the forward and backward run in bf16, but the layer
rules, the norms, the clip factors and the clipped sum do not (:func:`exact`): they take the recorded
activations and output gradients up to float32 and compute in float32 without TF32. In bf16 the norms came out
up to 0.07% off the norm of the clipped sum they set the factor of, so a clipped gradient could exceed C by
that much, the sensitivity the privacy accounting assumes.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from goldenpath.dp import layer_rules as lr
from goldenpath.dp.tape import Call, Tape, attribute, batched, leaves_of, parameters_of
from goldenpath.training.runtime import free_memory_bytes, strict_float32

Batch = dict | tuple | list
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> per-sample losses [B]


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
        if isinstance(m, nn.Embedding) and m.max_norm is not None:
            raise ValueError("an Embedding with max_norm rescales its rows in place in the forward, by what the "
                             "whole batch looks up, so DP-SGD has no per-sample gradients of it; use max_norm=None")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if method == "vmap":
        grads, losses = reference_grads(model, loss_fn, batch, list(trained), chunk)
        parts = {n: [g] for n, g in grads.items()}
        return _clip(parts, trained, losses, clip, ())
    if method != "fast":
        raise ValueError(f"method {method!r} is not one of ['fast', 'vmap']")
    forced = _checked_routes(model, loss_fn, batch, trained, chunk)
    parts, losses, reference = _fast_parts(model, loss_fn, batch, trained, chunk, forced)
    return _clip(parts, trained, losses, clip, tuple(sorted(reference)))


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """min(1, C / ||g_i||), with a zero gradient left as it is."""
    return (clip / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)


@contextmanager
def exact(device: torch.device):
    """Float32 arithmetic proper for a block inside a run's autocast: no bf16 autocast, no TF32 (the clip
    factors and the clipped sum must agree to float32 roundings, whatever precision the model runs in)."""
    with torch.autocast(device.type, enabled=False), strict_float32():
        yield


def _exact_step(device: torch.device):
    """:func:`exact` where it switches anything: not on a CPU outside an autocast, where TF32 does not apply (its
    context managers cost a step of the CNN of bench/dp_step.py about 1.5%)."""
    return nullcontext() if device.type == "cpu" and not torch.is_autocast_enabled("cpu") else exact(device)


def _clip(parts: dict[str, list], trained: dict, losses: torch.Tensor, clip: float, reference: tuple) -> ClipResult:
    """Norms over all parameters, clip factors, and each parameter's weighted sum of its contributions, in
    float32 or better whatever the autocast (:func:`exact`)."""
    with _exact_step(losses.device):
        return _clip_exact({n: [lr.as_float_part(p) for p in ps] for n, ps in parts.items()}, trained, losses, clip,
                           reference)


def _clip_exact(parts: dict[str, list], trained: dict, losses: torch.Tensor, clip: float,
                reference: tuple) -> ClipResult:
    b = losses.shape[0]
    parts = lr.keep_formed(parts, _formed_budget(losses.device))
    sq = [lr.sq_norms(ps) for ps in parts.values() if ps]
    norms = torch.stack(sq).sum(0, dtype=torch.float64).sqrt() if sq else losses.new_zeros(b, dtype=torch.float64)
    factors = clip_factors(norms, clip)
    c = {dtype: factors.to(dtype) for dtype in {lr.dtype_of(part) for ps in parts.values() for part in ps}}
    grads = {}
    for n, p in trained.items():
        sums = [lr.weighted_sum(part, c[lr.dtype_of(part)], p.shape) for part in parts.get(n, ())]
        grads[n] = (sum(sums[1:], sums[0]) if sums else torch.zeros_like(p)).to(p.dtype)
    return ClipResult(grads, norms, losses.detach(), reference)


FORMED_SHARE = 0.25  # of the device's free memory, for per-sample gradients kept between norm and sum


def _formed_budget(device: torch.device) -> float:
    """Bytes the per-sample gradients kept by :func:`layer_rules.keep_formed` may take: a share of what this
    process may still allocate on the device (CUDA: within its cap; CPU: MemAvailable)."""
    return FORMED_SHARE * free_memory_bytes(device)


# ----------------------------------------------------------------------------- batches


def _leaves(batch: Batch) -> list[torch.Tensor]:
    return [x for x in tree_flatten(batch)[0] if torch.is_tensor(x)]


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([x[lo:hi] if torch.is_tensor(x) else x for x in leaves], spec)


def _unsqueeze(sample: Batch) -> Batch:
    leaves, spec = tree_flatten(sample)
    return tree_unflatten([x.unsqueeze(0) if torch.is_tensor(x) else x for x in leaves], spec)


class _Functional:
    """Calls ``model`` with the given parameter and buffer tensors (what ``loss_fn`` sees under vmap)."""

    def __init__(self, model: nn.Module, tensors: dict):
        self._model, self._tensors = model, tensors

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._tensors, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


# ----------------------------------------------------------------------------- reference path


def reference_grads(model: nn.Module, loss_fn: LossFn, batch: Batch, names: list[str],
                    chunk: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: per-sample gradients [B, *shape]}, losses [B]): vmap(grad) ``chunk`` samples at a time, or a
    loop over samples for models torch.func cannot batch."""
    b = _leaves(batch)[0].shape[0]
    rnn = next((m for m in model.modules() if isinstance(m, nn.RNNBase)), None)
    if rnn is not None:
        _warn_once(model, "loop", f"{type(rnn).__name__} cannot run under torch.func.vmap, so its model's per-sample "
                   "gradients come from a loop over samples (exact, slower)")
        step, one = 1, _loop_grads
    else:
        step, one = chunk, _vmap_grads
    def run():
        return [one(model, loss_fn, _slice(batch, lo, min(b, lo + step)), names) for lo in range(0, b, step)]

    device = _leaves(batch)[0].device
    try:
        pieces = run()
    except RuntimeError as e:  # torch.func under a bf16 autocast can meet mixed dtypes (a LayerNorm fed bf16)
        if not torch.is_autocast_enabled(device.type):
            raise
        _warn_once(model, "vmap-autocast", f"torch.func could not differentiate this model per sample under the "
                   f"bf16 autocast ({str(e).splitlines()[0][:120]}); its per-sample gradients are taken in float32")
        with exact(device):
            pieces = run()
    grads = {n: torch.cat([g[n] for g, _ in pieces]) for n in names}
    return grads, torch.cat([loss.detach() for _, loss in pieces])


def _vmap_grads(model: nn.Module, loss_fn: LossFn, batch: Batch, names: list[str]):
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in names}
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def one(ps, sample):
        return loss_fn(_Functional(model, {**fixed, **ps}), _unsqueeze(sample))[0]

    leaves, spec = tree_flatten(batch)
    dims = tree_unflatten([0 if torch.is_tensor(x) else None for x in leaves], spec)
    return vmap(grad_and_value(one), in_dims=(None, dims))(params, batch)


def _loop_grads(model: nn.Module, loss_fn: LossFn, batch: Batch, names: list[str]):
    """One sample's gradients (a batch of one) by a plain backward."""
    params = dict(model.named_parameters())
    loss = loss_fn(model, batch)[0]
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return ({n: (torch.zeros_like(params[n]) if g is None else g)[None] for n, g in zip(names, grads)},
            loss.detach()[None])


_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _warn_once(model: nn.Module, key: str, text: str) -> None:
    seen = _WARNED.setdefault(model, set())
    if key not in seen:
        seen.add(key)
        warnings.warn(f"DP-SGD: {text}", stacklevel=3)


# ----------------------------------------------------------------------------- fast path


def _fast_parts(model, loss_fn, batch, trained, chunk, forced=frozenset()):
    """({name: [per-sample contributions]}, losses, names given to the reference path)."""
    name_of = {id(p): n for n, p in trained.items()}
    # the modules owning a trained parameter themselves (their own _parameters: parameters(recurse=False) reads the
    # same dict through named_parameters' generators, ~15 us a module every step)
    owners = [m for m in model.modules() if any(p is not None and id(p) in name_of for p in m._parameters.values())]
    b = _leaves(batch)[0].shape[0]
    with Tape(owners, capture=lr.forward_saved) as tape:
        losses = loss_fn(model, batch)
    calls = tape.calls
    if losses.requires_grad:
        accounts, reference = attribute(losses, calls, [batched(c, b) for c in calls], name_of)
    else:
        accounts, reference = {}, set()
    reference |= set(forced) & set(trained)
    active = [(i, names - reference) for i, names in accounts.items() if names - reference]
    edges = [e for i, _ in active for _, e in calls[i].edges]
    outs = iter(torch.autograd.grad(losses.sum(), edges, allow_unused=True) if edges else ())

    parts: dict[str, list] = {n: [] for n in trained}
    for i, names in active:
        call = calls[i]
        leaves = leaves_of(call.output)
        grads = [g if g is not None else torch.zeros_like(leaves[j]) for (j, _), g in zip(call.edges, outs)]
        local = {}  # the call's module's own name for each parameter it accounts for
        for rel, p in parameters_of(call.module):
            if name_of.get(id(p)) in names:
                local.setdefault(name_of[id(p)], rel)
        rule = lr.rule_of(call.module)
        single = len(call.args) == 1 and not call.kwargs and torch.is_tensor(call.args[0]) and len(leaves) == 1
        with _exact_step(losses.device):  # the rules' products in float32, as the norms and sums of them
            found = (rule(call.module, call.args[0].detach(), lr.as_float(grads[0]), call.saved)
                     if rule and single else None)
        for attr, part in (found or {}).items():
            p = getattr(call.module, attr, None)
            if p is not None and name_of.get(id(p)) in names and attr == local.get(name_of[id(p)]):
                parts[name_of[id(p)]].append(part)
                del local[name_of[id(p)]]
        if local:
            try:
                per_sample = _module_grads(call, grads, {rel: trained[n] for n, rel in local.items()}, b)
            except RuntimeError as e:  # torch.func cannot split this call per sample (e.g. another layout)
                _warn_once(model, f"module-{type(call.module).__name__}", f"torch.func on {type(call.module).__name__} "
                           f"alone failed ({str(e).splitlines()[0][:120]}); its parameters use the whole model")
                reference |= set(local)
                continue
            for n, rel in local.items():
                parts[n].append(per_sample[rel])
    if reference:
        grads, _ = reference_grads(model, loss_fn, batch, sorted(reference), chunk)
        for n, g in grads.items():
            parts[n] = [g]
    return parts, losses, reference


def _module_grads(call: Call, grads: list[torch.Tensor], params: dict[str, torch.Tensor],
                  b: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients [B, *shape] of some of a module's parameters, by torch.func on that module alone
    (its recorded inputs, its outputs' gradients)."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    leaves = [x.detach() if torch.is_tensor(x) else x for x in leaves]
    batched = [i for i, x in enumerate(leaves) if torch.is_tensor(x) and x.dim() and x.shape[0] == b]
    params = {n: p.detach() for n, p in params.items()}
    out_leaves = tree_flatten(call.output)[0]
    wanted = [j for j, _ in call.edges]
    dtypes = [out_leaves[j].dtype for j in wanted]

    def one(gs, *xs):
        vals = list(leaves)
        for i, x in zip(batched, xs):
            vals[i] = x.unsqueeze(0)
        args, kwargs = tree_unflatten(vals, spec)

        def outputs(ps):
            flat = tree_flatten(functional_call(call.module, ps, tuple(args), kwargs))[0]
            return tuple(flat[j] for j in wanted)

        _, back = vjp(outputs, params)
        return back(tuple(g.unsqueeze(0).to(dt) for g, dt in zip(gs, dtypes)))[0]

    # torch.func differentiates inside no_grad; outside it, the module's other weights (those its own calls
    # account for) would leave a graph on these gradients, and through the clip factors on every clipped sum
    with torch.no_grad():
        return vmap(one)(tuple(grads), *[leaves[i] for i in batched])


# ----------------------------------------------------------------------------- the first-batch check

_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {batch signature: forced names}
_CHECK_SAMPLES = 2


def _checked_routes(model, loss_fn, batch, trained, chunk) -> frozenset:
    """Parameters the fast path gets wrong for this model and batch shape (usually none), checked once:
    per-parameter, per-sample squared norms of the first samples against a loop over those samples."""
    leaves = _leaves(batch)
    key = (tuple((tuple(x.shape), x.dtype, x.device.type) for x in leaves), model.training, tuple(trained))
    routes = _ROUTES.setdefault(model, {})
    if key in routes:
        return routes[key]
    with exact(leaves[0].device):  # the two ways compared, not their roundings (the norms too: under a bf16
        parts, _, _ = _fast_parts(model, loss_fn, batch, trained, chunk)  # autocast they sent layers astray)
        k = min(_CHECK_SAMPLES, leaves[0].shape[0])
        want = [_loop_grads(model, loss_fn, _slice(batch, i, i + 1), list(trained))[0] for i in range(k)]
        rtol = 1e-7 if next(iter(trained.values())).dtype == torch.float64 else 1e-3
        ref = {n: torch.stack([w[n][0].double().square().sum() for w in want]) for n in trained}
        total = sum(ref.values())
        bad = set()
        for n, ps in parts.items():
            got = lr.sq_norms(ps)[:k].double() if ps else torch.zeros_like(ref[n])
            if ((got - ref[n]).abs() > rtol * (ref[n] + 1e-6 * total)).any():
                bad.add(n)
    if bad:
        warnings.warn(f"DP-SGD: the fast path's per-sample norms of {sorted(bad)} disagree with a loop over samples "
                      "(a layer that sees the batch in another layout, e.g. sequence-first with as many positions as "
                      "samples); they use torch.func for this batch shape", stacklevel=3)
    routes[key] = frozenset(bad)
    return routes[key]
