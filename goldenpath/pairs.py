"""Loss-matched checkpoints as models that share one module per architecture, and what is measured on each
pair of them over the probe set (``goldenpath compare``'s inner loop).

- :func:`pair_sums`: the pointwise distances (tv, kl, js, top1) as per-probe-unit sums, and 1 - linear CKA
  of the penultimate features (``cka``), each model's forward once per probe chunk: the N models' outputs
  for one chunk are held, all pairs are computed, the next chunk follows. The features are the input of
  the output layer (:func:`goldenpath.models.output_layer`), read by a pre-hook in the same forward.
- :func:`pair_barriers`: the loss barrier on each pair's linear path (:mod:`goldenpath.lmc`), written
  straight into the shared module's weight tensors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from goldenpath import lmc
from goldenpath.config import Config
from goldenpath.distances import ON_DISTS, Dist, cka_from_moments, unit_sums
from goldenpath.models import build_model, logits, output_layer


class Slots:
    """One built module per architecture, shared by every checkpoint of that architecture: its weight
    tensors (tied weights once) and the state-dict names that reach each."""

    def __init__(self, module: torch.nn.Module):
        by_id: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            by_id.setdefault(id(t), (t, []))[1].append(name)
        self.module = module
        self.tensors = [t for t, _ in by_id.values()]
        self.names = [names for _, names in by_id.values()]
        self.known = {n for names in self.names for n in names}

    def read(self, path: Path) -> list[torch.Tensor]:
        """A checkpoint's weights in slot order, checked strictly: each weight present once with its shape,
        nothing unknown (a tied weight may be stored under any of its names)."""
        file = path / "model.safetensors"
        state = load_file(str(file), device=str(self.tensors[0].device) if self.tensors else "cpu")
        unknown = sorted(set(state) - self.known)
        if unknown:
            raise RuntimeError(f"{file}: weights {unknown[:3]} are not in the model its config builds")
        out = []
        for t, names in zip(self.tensors, self.names):
            stored = [state[n] for n in names if n in state]
            if not stored:
                raise RuntimeError(f"{file}: weight {names[0]} is missing")
            if stored[0].shape != t.shape:
                raise RuntimeError(f"{file}: weight {names[0]} has shape {tuple(stored[0].shape)}, "
                                   f"the model its config builds {tuple(t.shape)}")
            if any(not torch.equal(x, stored[0]) for x in stored[1:]):
                raise RuntimeError(f"{file}: the tied weights {names} are stored with different values")
            out.append(stored[0].to(t.dtype))
        return out


class Swapped:
    """A checkpoint's model without a module of its own: its weights, copied into the architecture's shared
    module just before each forward (copying weights costs far less than copying a module)."""

    def __init__(self, slots: Slots, path: Path):
        self.slots, self.weights = slots, slots.read(path)

    def __call__(self, *args):
        with torch.no_grad():
            if self.weights:
                torch._foreach_copy_(self.slots.tensors, self.weights)
        return self.slots.module(*args)


def load_shared(ck, config: Config, info, device, dtype, modules: dict) -> Swapped:
    """The model of checkpoint ``ck`` (its ``path``), sharing one built module per architecture (``modules``,
    keyed by the model section) with the other checkpoints."""
    key = repr(config.model)  # the frozen dataclass's fields, nested sections included
    if key not in modules:
        modules[key] = Slots(build_model(config.model, info, seed=config.seed).to(device, dtype).eval())
    return Swapped(modules[key], ck.path)


def pair_sums(models, probe: dict, pairs: list[tuple[int, int]], metrics, *, chunk: int,
              device, dtype, progress: str | None = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Per probe unit sums of each pointwise metric for each pair, and 1 - linear CKA of the penultimate
    features where ``metrics`` holds ``cka``; each model's forward once per chunk.

    ``models[i]`` is a module or a checkpoint's :class:`Swapped` model (``cka`` hooks its output layer).
    ``progress``: the label of a progress bar over the probe chunks (on a terminal; None: no bar).

    Returns {(i, j): {metric: [units] sums, "count": [units] points, "cka": [1]}}.
    """
    n = len(probe["ids"])
    lm = "labels" in probe
    unit = [m for m in metrics if m in ON_DISTS]
    moments = _Moments(pairs) if "cka" in metrics else None
    sums = {p: [] for p in pairs}
    counts = []
    needed = sorted({i for p in pairs for i in p})
    bar = tqdm(total=math.ceil(n / chunk), desc=progress, unit="chunk", leave=False,
               disable=None if progress and pairs else True)
    with bar, torch.no_grad(), _hooked(models, needed, active=moments is not None) as features:
        for lo in range(0, n, chunk):
            part = _to(probe, lo, chunk, device, dtype)
            mask = part["labels"] != -100 if lm else None
            outs, feats = [], {}
            for i in needed:  # N forwards for this chunk
                out = logits(models[i], part)
                if unit:
                    outs.append(out)
                if moments is not None:
                    f = features(i)
                    feats[i] = f[mask] if lm else f.flatten(1)  # one row per predicted token, or per image
            if moments is not None:
                moments.add(feats)
            if unit and pairs:
                slot = {i: k for k, i in enumerate(needed)}
                for group, s in _pair_groups(Dist(torch.stack(outs)), [(slot[i], slot[j]) for i, j in pairs],
                                             unit, mask):
                    for p, row in zip(group, s.cpu().unbind(1)):  # s: [metrics, pairs, units]
                        sums[pairs[p]].append(row)
            counts.append(mask.sum(-1, dtype=torch.float64).cpu() if lm else
                          torch.ones(min(chunk, n - lo), dtype=torch.float64))
            bar.update()
    if not pairs:
        return {}
    count = torch.cat(counts)
    out = {p: {**dict(zip(unit, torch.cat(v, dim=1))), "count": count} if unit else {"count": count}
           for p, v in sums.items()}
    if moments is not None:
        for p, d in moments.distances().items():
            out[p]["cka"] = d
    return out


PAIR_GROUP_BYTES = 8 * 2**20  # the pairs of one probe chunk are measured in groups of about this many bytes


def _pair_groups(dist: Dist, pairs: list[tuple[int, int]], unit: list[str], mask):
    """Yield (indices into ``pairs``, per-unit sums [metrics, len(group), units]) for groups of pairs whose
    gathered distributions take about PAIR_GROUP_BYTES: each metric is then a few large tensor operations
    over a whole group instead of a few small ones per pair (the same values, elementwise and per row)."""
    per_pair = 2 * dist.log_p[0].numel() * dist.log_p.element_size() * 2  # log_p and p of both models
    size = max(1, int(PAIR_GROUP_BYTES // max(1, per_pair)))
    for lo in range(0, len(pairs), size):
        group = range(lo, min(len(pairs), lo + size))
        first = torch.tensor([pairs[k][0] for k in group], device=dist.log_p.device)
        second = torch.tensor([pairs[k][1] for k in group], device=dist.log_p.device)
        a, b = dist.take(first), dist.take(second)
        values = torch.stack([ON_DISTS[m](a, b) for m in unit])  # [metrics, pairs, units(, T)]
        yield group, unit_sums(values, mask)[0]


def _to(batch: dict, lo: int, chunk: int, device, dtype) -> dict:
    """Rows [lo, lo + chunk) of a held-out set, without ids, on ``device``, floats in ``dtype``."""
    part = {k: v[lo : lo + chunk].to(device) for k, v in batch.items() if k != "ids"}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}


class _Moments:
    """Float64 sums over the probe chunks from which every pair's linear CKA follows (cka_from_moments).

    Each model's features are shifted by their mean on the first chunk, so the sums of products do not
    cancel against the squared mean (ReLU features have means far from 0)."""

    def __init__(self, pairs):
        self.pairs, self.n = pairs, 0
        self.shift, self.sum, self.gram, self.cross = {}, {}, {}, {}

    def add(self, feats: dict[int, torch.Tensor]) -> None:
        rows = len(next(iter(feats.values()))) if feats else 0
        if not rows:
            return
        shifted = {}
        for i, f in feats.items():
            f = f.double()
            if i not in self.shift:
                self.shift[i] = f.mean(0)
            f = shifted[i] = f - self.shift[i]
            self.sum[i] = self.sum.get(i, 0) + f.sum(0)
            self.gram[i] = self.gram.get(i, 0) + f.T @ f
        for i, j in self.pairs:
            self.cross[(i, j)] = self.cross.get((i, j), 0) + shifted[i].T @ shifted[j]
        self.n += rows

    def distances(self) -> dict[tuple[int, int], torch.Tensor]:
        """{pair: [1] float64 1 - linear CKA} (nan where a model's features do not vary)."""
        out = {}
        for i, j in self.pairs:
            cka = (cka_from_moments(self.n, self.sum[i], self.sum[j], self.gram[i], self.gram[j], self.cross[(i, j)])
                   if self.n else math.nan)
            out[(i, j)] = torch.tensor([1.0 - cka], dtype=torch.float64).clamp_(0.0, 1.0)  # nan stays nan
        return out


@contextmanager
def _hooked(models, needed, *, active: bool):
    """``features(i)``: the input of model i's output layer in its last forward (a pre-hook per module)."""
    store, handles = {}, []

    def module_of(i):
        return models[i].slots.module if isinstance(models[i], Swapped) else models[i]

    if active:
        for module in {id(module_of(i)): module_of(i) for i in needed}.values():
            handles.append(output_layer(module).register_forward_pre_hook(
                lambda _, args, key=id(module): store.__setitem__(key, args[0])))
    try:
        yield lambda i: store.pop(id(module_of(i)))
    finally:
        for h in handles:
            h.remove()


def pair_barriers(models, probe: dict, heldout: dict, pairs: list[tuple[int, int]], *, k: int, chunk: int,
                  device, dtype, progress: str | None = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """The loss barrier of each pair on the probe set at ``k`` points (:func:`goldenpath.lmc.barrier`).

    ``models[i]``: a checkpoint's :class:`Swapped` model. Batch-norm statistics are recomputed at every
    point from ``heldout`` (the eval set, disjoint from the probe set). Each model's end loss is computed
    once; a pair costs its k - 2 inner points. nan between two architectures. ``progress``: the label of a
    progress bar over those points (on a terminal; None: no bar).

    Returns {(i, j): {"lmc": [1] float64}}.
    """
    batches = [_to(probe, lo, chunk, device, dtype) for lo in range(0, len(probe["ids"]), chunk)]
    resets: dict[int, list | None] = {}

    def path(i, j, ts):
        slots = models[i].slots
        if id(slots) not in resets:
            resets[id(slots)] = ([_to(heldout, lo, chunk, device, dtype) for lo in range(0, len(heldout["ids"]), chunk)]
                                 if lmc.norm_layers(slots.module) else None)
        return lmc.path_losses(slots.module, slots.tensors, models[i].weights, models[j].weights, ts, batches,
                               reset_batches=resets[id(slots)])

    ts = torch.linspace(0.0, 1.0, k, dtype=torch.float64)
    models_in = sorted({i for p in pairs for i in p})
    same = [(i, j) for i, j in pairs if models[i].slots is models[j].slots]
    with tqdm(total=len(models_in) + len(same) * (k - 2), desc=progress, unit="point", leave=False,
              disable=None if progress else True) as bar:
        ends = {}
        for i in models_in:
            ends[i] = path(i, i, [0.0])[0]
            bar.update()
        out = {p: {"lmc": torch.tensor([math.nan], dtype=torch.float64)} for p in pairs}
        for i, j in same:
            losses = torch.tensor([ends[i], *path(i, j, ts[1:-1].tolist()), ends[j]], dtype=torch.float64)
            out[(i, j)]["lmc"][0] = lmc.barrier_of(ts, losses)
            bar.update(k - 2)
    return out
