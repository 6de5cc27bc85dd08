"""Loss-matched checkpoints as models that share one module per architecture, and what is measured on each
pair of them over the probe set (``goldenpath compare``'s inner loop).

- :func:`pair_table` (:func:`pair_sums`, pair by pair): the pointwise distances (tv, kl, js, top1, sq) as
  per-probe-unit sums in one [pairs, units] tensor per metric (:class:`PairTable`), measured in groups
  of pairs (kl and sq from inner products of every two models, :class:`_Gram`), and 1 - linear CKA
  of the penultimate features (``cka``), each model's forward once per probe chunk: the N models' outputs
  for one chunk are held, all pairs are computed, the next chunk follows. The features are the input of
  the output layer (:func:`goldenpath.models.output_layer`), read by a pre-hook in the same forward.
- :func:`pair_barriers`: the loss barrier on each pair's linear path (:mod:`goldenpath.comparison.lmc`), written
  straight into the shared module's weight tensors.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from goldenpath.comparison import lmc
from goldenpath.config import Config
from goldenpath.comparison.distances import ON_DISTS, Dist, cka_from_moments, unit_sums
from goldenpath.models import build_model, logits, output_layer
from goldenpath.training.runtime import free_memory_bytes, strict_float32


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


class PairTable:
    """Per-unit sums of each metric for a list of pairs, one [pairs, units] tensor per name (row k: pair
    ``keys[k]``); a name every pair shares (``count``: the probe's points per unit) is one [units] row. compare's
    statistics, pair rows and cache read a metric's rows as one tensor, never pair by pair."""

    def __init__(self, keys: list, values: dict[str, torch.Tensor], shared=()):
        self.keys, self.values, self.shared = list(keys), values, set(shared)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, name: str) -> torch.Tensor:
        """[pairs, units] of ``name`` (a shared row expanded: a view)."""
        v = self.values[name]
        return v.expand(len(self.keys), *v.shape) if name in self.shared else v

    def rekeyed(self, keys: list) -> PairTable:
        return PairTable(keys, self.values, self.shared)

    @staticmethod
    def select(keys: list, tables: list[PairTable]) -> PairTable:
        """The rows of ``keys``, in that order, from ``tables`` (each key in one of them; a later table's row wins):
        one new tensor per name, written once (a table that already is those rows: itself). A name every table
        shares with one equal row stays shared."""
        tables = [t for t in tables if len(t)]
        if len(tables) == 1 and tables[0].keys == list(keys):
            return tables[0]
        if not tables:
            return PairTable([], {})
        where = {k: (i, r) for i, t in enumerate(tables) for r, k in enumerate(t.keys)}
        picks: list[tuple[list[int], list[int]]] = [([], []) for _ in tables]  # per table: positions, its rows
        for pos, k in enumerate(keys):
            i, r = where[k]
            picks[i][0].append(pos)
            picks[i][1].append(r)
        first = tables[0]
        shared = {n for n in first.values if all(n in t.shared and torch.equal(t.values[n], first.values[n])
                                                 for t in tables)}
        values = {}
        for n in first.values:
            if n in shared:
                values[n] = first.values[n]
                continue
            out = first.rows(n).new_empty((len(keys), *first.rows(n).shape[1:]))
            for t, (pos, rows) in zip(tables, picks):
                if pos:
                    out.index_copy_(0, torch.tensor(pos), t.rows(n).index_select(0, torch.tensor(rows)))
            values[n] = out
        return PairTable(keys, values, shared)

    def as_dict(self) -> dict:
        """{key: {name: [units]}}: the form of :func:`pair_sums`."""
        rows = {n: self.rows(n).unbind(0) for n in self.values}
        return {k: {n: rows[n][i] for n in self.values} for i, k in enumerate(self.keys)}


def pair_sums(models, probe: dict, pairs: list[tuple[int, int]], metrics, *, chunk: int,
              device, dtype, progress: str | None = None) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Per probe unit sums of each pointwise metric for each pair, and 1 - linear CKA of the penultimate
    features where ``metrics`` holds ``cka``: {(i, j): {metric: [units] sums, "count": [units] points, "cka": [1]}}
    (:func:`pair_table`'s rows pair by pair)."""
    return pair_table(models, probe, pairs, metrics, chunk=chunk, device=device, dtype=dtype,
                      progress=progress).as_dict()


def pair_table(models, probe: dict, pairs: list[tuple[int, int]], metrics, *, chunk: int,
               device, dtype, progress: str | None = None) -> PairTable:
    """Per probe unit sums of each pointwise metric for each pair, and 1 - linear CKA of the penultimate
    features where ``metrics`` holds ``cka``; each model's forward once per chunk.

    ``models[i]`` is a module or a checkpoint's :class:`Swapped` model (``cka`` hooks its output layer).
    ``progress``: the label of a progress bar over the probe chunks (on a terminal; None: no bar).

    Returns a :class:`PairTable` keyed by the pairs: each metric's float64 sums [pairs, units], ``count`` (the
    points of each unit, shared) and ``cka`` [pairs, 1].
    """
    n = len(probe["ids"])
    lm = "labels" in probe
    unit = [m for m in metrics if m in ON_DISTS]
    moments = _Moments(pairs) if "cka" in metrics else None
    # [metrics, pairs, units] sums and each unit's points on the device until every chunk is in, and the probe set
    # moved there once (a GPU is not waited for chunk by chunk); on the host, chunk by chunk, where they would take
    # more than RESIDENT_MEMORY_SHARE of the device's free memory
    resident_bytes = len(unit) * len(pairs) * n * 8 + sum(v.numel() * v.element_size() for v in probe.values())
    resident = resident_bytes <= RESIDENT_MEMORY_SHARE * free_memory_bytes(device)
    table = torch.empty(len(unit), len(pairs), n, dtype=torch.float64, device=device if resident else "cpu")
    counts = []
    if resident:
        probe = _to(probe, 0, n, device, dtype)
    needed = sorted({i for p in pairs for i in p})
    slot = {i: k for k, i in enumerate(needed)}  # each pair's models as rows of a chunk's stacked distributions
    slotted = [(slot[i], slot[j]) for i, j in pairs]
    index = pair_index(slotted, device)
    bar = tqdm(total=math.ceil(n / chunk), desc=progress, unit="chunk", leave=False,
               disable=None if progress and pairs else True)
    with bar, torch.no_grad(), strict_float32(), _hooked(models, needed, active=moments is not None) as features:
        for lo in range(0, n, chunk):
            part = {k: v[lo : lo + chunk] for k, v in probe.items()} if resident else \
                _to(probe, lo, chunk, device, dtype)
            hi = min(lo + chunk, n)
            mask = part["labels"] != -100 if lm else None
            dist, feats = None, {}
            for k, i in enumerate(needed):  # N forwards for this chunk
                out = logits(models[i], part)
                if unit:  # each model's distributions into one stack (the logits are not kept)
                    dist = Dist.stack_into(dist, k, len(needed), Dist(out))
                if moments is not None:
                    f = features(i)
                    feats[i] = f[mask] if lm else f.flatten(1)  # one row per predicted token, or per image
            if moments is not None:
                moments.add(feats)
            if unit and pairs:
                for group, s in _pair_groups(dist, slotted, unit, mask,
                                             _Gram(dist) if set(unit) & set(_Gram.METRICS) else None, index):
                    table[:, positions(group, table.device), lo:hi] = s.to(table.device)  # [metrics, pairs, units]
            counts.append(mask.sum(-1, dtype=torch.float64).to(table.device) if lm else
                          torch.ones(hi - lo, dtype=torch.float64))
            bar.update()
    if not pairs:
        return PairTable([], {})
    values = {**dict(zip(unit, table.cpu().unbind(0))), "count": torch.cat(counts).cpu()}
    if moments is not None:
        got = moments.distances()
        values["cka"] = torch.stack([got[p] for p in pairs])
    return PairTable(pairs, values, shared=("count",))


PROBE_MEMORY_SHARE = 0.5  # of the memory free on the device, for one probe chunk's outputs
RESIDENT_MEMORY_SHARE = 0.1  # of it, for the pair sums of every chunk and the probe set kept on the device
MOST_UNITS = 256  # probe units per chunk at most (a CPU gains nothing from larger chunks)


def probe_chunk(models: int, info, device, dtype: torch.dtype) -> int:
    """Probe units (images, sequences) per chunk: as many as keep one chunk's outputs within PROBE_MEMORY_SHARE
    of the memory this process may still take on ``device``, at most MOST_UNITS, at least 1.

    A chunk holds the stacked log-probabilities and probabilities of ``models`` models (0: forwards alone, as on
    a loss-barrier path) and one forward's logits with its log-softmax and exp: (2 models + 4) outputs of
    positions x classes each. GPT-2's vocabulary at 1,024 tokens is 206 MB per sequence and output in float32,
    so 16 models on a GPU take a few sequences per chunk; an image classifier's chunks stay at MOST_UNITS."""
    per_unit = (info.input_shape[0] if info.task == "lm" else 1) * info.num_classes
    unit_bytes = per_unit * max(4, torch.finfo(dtype).bits // 8) * (2 * models + 4)
    return max(1, min(MOST_UNITS, int(PROBE_MEMORY_SHARE * free_memory_bytes(device) // unit_bytes)))


# The pairs of a probe chunk are measured in groups of about this many bytes: fewer, larger operations than the
# 8 MB before (the tiny Markov GPT-2 at 64 runs, 2,016 pairs: 2.7 s of pair metrics on 2 CPU cores with 8 MB
# groups, 2.1-2.3 s with 32 MB, no less with 64 or 128 MB)
PAIR_GROUP_BYTES = 32 * 2**20
# Pairs of small outputs beyond one group are gathered in blocks of PAIR_GROUP_BYTES / 2 (when a block holds at least
# this many pairs) rather than measured one first model at a time: 80 teacher CNNs (3,160 pairs of 256 images x 10
# classes), 89 instead of 119 ms a probe chunk on 2 CPU cores (blocks of 1,024 pairs: 108; 128: 108)
GATHERED_PAIRS = 32


def _pair_groups(dist: Dist, pairs: list[tuple[int, int]], unit: list[str], mask, gram: _Gram | None,
                 index: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Yield (indices into ``pairs``, per-unit sums [metrics, len(group), units]) for groups of pairs, each
    metric a few tensor operations over a whole group instead of a few per pair (the same values,
    elementwise and per row). On a CUDA GPU with Triton, tv and js from one kernel (:func:`use_kernel`), as
    many pairs at once as a share of its memory holds. Else, small outputs (an image classifier's): all pairs
    of the chunk in one group, their distributions gathered (in blocks of pairs where there are many,
    GATHERED_PAIRS); large ones (a language model's): the pairs that share their first model, that model a view
    broadcast against the others, a view too where their indices run consecutively (all pairs), in groups whose
    temporaries take about PAIR_GROUP_BYTES. ``gram``: kl and sq (:class:`_Gram`). ``index``: ``pairs``' first and
    second models as tensors on the device (:func:`pair_index`; made here when not given: a copy to a GPU waits
    for it, so pair_table makes them once for every chunk)."""
    by_gram = {m for m in unit if gram is not None and gram.has(m)}
    lead = dist.log_p.shape[1:-1]
    device = dist.log_p.device
    index = pair_index(pairs, device) if index is None else index
    done = 0  # pairs the kernel measured
    if use_kernel(dist) and set(unit) <= {"tv", "js", "top1"} | by_gram:  # no gathered copies
        # each pair's values at every point, about 10 floats a point for every metric and step: a share of memory
        size = max(1, int(_copy_bytes(device) // (10 * 4 * max(1, math.prod(lead)))))
        for lo in range(0, len(pairs), size):
            group = range(lo, min(lo + size, len(pairs)))
            first, second = index[0][lo : group.stop], index[1][lo : group.stop]
            fused = _kernel_tv_js(dist, first, second) if {"tv", "js"} & set(unit) else {}
            if fused is None:  # the kernel failed (warned): the eager forms measure the pairs left
                break
            yield group, unit_sums(torch.stack([
                fused[m] if m in fused else gram(m, first, second) if m in by_gram else
                (dist.top[first] != dist.top[second]).to(dist.log_p.dtype) for m in unit]), mask)[0]
            done = group.stop
    for group, sums in _eager_groups(dist, pairs[done:], unit, mask, gram, by_gram, (index[0][done:], index[1][done:])):
        yield [done + k for k in group], sums


def pair_index(pairs: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and the second model of each pair, as two index tensors on ``device``."""
    both = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.contiguous().to(device)
    return both[0], both[1]


def positions(group: list[int] | range, device) -> slice | torch.Tensor:
    """``group`` (indices, e.g. of pairs) as a slice where they run consecutively (no copy to the device), else as
    an index tensor on ``device``."""
    if len(group) and list(group) == list(range(group[0], group[0] + len(group))):
        return slice(group[0], group[0] + len(group))
    return torch.tensor(list(group), dtype=torch.long, device=device)


def _eager_groups(dist: Dist, pairs: list[tuple[int, int]], unit: list[str], mask, gram: _Gram | None,
                  by_gram: set[str], index: tuple[torch.Tensor, torch.Tensor]):
    """:func:`_pair_groups` by the eager forms (every metric a few tensor operations a group)."""
    if not pairs:
        return
    per_pair = dist.log_p[0].numel() * dist.log_p.element_size() * 2  # a pair's temporaries, about
    lead = dist.log_p.shape[1:-1]
    device = dist.log_p.device

    def measured(first, second):
        a, b = (dist.take(first), dist.take(second)) if set(unit) - by_gram else (None, None)
        n = len(second) if torch.is_tensor(second) else second.stop - second.start
        return unit_sums(torch.stack([gram(m, first, second) if m in by_gram else ON_DISTS[m](a, b).expand(n, *lead)
                                      for m in unit]), mask)[0]  # [metrics, pairs, units]

    if 2 * per_pair * len(pairs) <= PAIR_GROUP_BYTES:  # gathering every pair costs little: one group
        yield range(len(pairs)), measured(*index)
        return
    block = int(PAIR_GROUP_BYTES // 2 // (2 * per_pair))
    if block >= GATHERED_PAIRS:  # many pairs of small outputs: gathered in blocks that stay in cache
        for lo in range(0, len(pairs), block):
            hi = min(lo + block, len(pairs))
            yield range(lo, hi), measured(index[0][lo:hi], index[1][lo:hi])
        return
    size = _pairs_per_group(per_pair)
    by_first: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(pairs):
        by_first.setdefault(i, []).append(k)
    for i, ks in by_first.items():
        for lo in range(0, len(ks), size):
            group = ks[lo : lo + size]
            js, at = [pairs[k][1] for k in group], positions(group, device)
            # the second models: a view where they run consecutively, else read from index (no copy to the device)
            others = slice(js[0], js[-1] + 1) if js == list(range(js[0], js[0] + len(js))) else \
                index[1][at] if isinstance(at, slice) else torch.tensor(js, device=device)
            yield group, measured(slice(i, i + 1), others)


KERNEL_FAILED: list[str] = []  # why the Triton kernel failed in this process (then it is not tried again)


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernel (:mod:`goldenpath.comparison.pair_kernels`) can run on ``device``: a CUDA device,
    Triton installed (it comes with PyTorch's CUDA builds) and not failed in this process."""
    return device.type == "cuda" and not KERNEL_FAILED and importlib.util.find_spec("triton") is not None


def use_kernel(dist: Dist) -> bool:
    """Whether tv and js of every pair come from the Triton kernel: float32 distributions where it can run."""
    return dist.log_p.dtype == torch.float32 and kernel_available(dist.log_p.device)


def _kernel_tv_js(dist: Dist, first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """{"tv": [pairs, *lead], "js": ...} from the kernel; None, with a warning, where it cannot run (Triton could
    not compile it, e.g. no C compiler for its launcher): the eager forms then measure every pair."""
    try:
        from goldenpath.comparison.pair_kernels import tv_js

        return dict(zip(("tv", "js"), tv_js(dist.log_p, first, second)))
    except Exception as e:  # noqa: BLE001 - any failure of Triton's toolchain: the eager forms are exact too
        KERNEL_FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        warnings.warn(f"compare: the Triton kernel for tv and js failed ({KERNEL_FAILED[-1]}); every pair is measured "
                      "by the eager forms instead (slower on a GPU, the same values to float32 roundings)",
                      stacklevel=2)
        return None


GRAM_MEMORY_SHARE = 0.125  # of a GPU's free memory, for the copies of one batched product of _Gram


def _copy_bytes(device: torch.device) -> float:
    """Bytes the copies of one of _Gram's batched products may take: PAIR_GROUP_BYTES on a CPU; on a GPU a share
    of its free memory (GPT-2's vocabulary with 16 models: 32 MB holds 5 points, so a chunk of 9,216 points took
    some 1,800 small products where a few large ones do)."""
    if device.type != "cuda":
        return PAIR_GROUP_BYTES
    return max(PAIR_GROUP_BYTES, GRAM_MEMORY_SHARE * free_memory_bytes(device))


def _pairs_per_group(per_pair: int) -> int:
    """How many pairs of ``per_pair`` bytes of temporaries a group takes (at least one)."""
    return max(1, int(PAIR_GROUP_BYTES // max(1, per_pair)))


class _Gram:
    """kl and sq of every pair at every point from inner products over the classes, one batched product for
    all models at once (tensor cores on a GPU) instead of a pass over each pair's distributions:

        KL(i || j) = sum_k p_ik log p_ik - sum_k p_ik log p_jk,   sq(i, j) = (|p_i|^2 + |p_j|^2) / 2 - p_i . p_j

    (compare's kl: the mean of KL(i || j) and KL(j || i), both from the same product)

    in float32 with float32 sums (TF32 off: built inside :func:`pair_sums`), within about 1e-6 of the pointwise
    forms (tested against float64; compare's tolerance for kl: 1e-4 relative). Not for distributions with a
    token ruled out (-inf logits: 0 * log 0), which keep the pointwise forms."""

    METRICS = ("kl", "sq")

    def __init__(self, dist: Dist):
        self.dist, self.lead = dist, dist.log_p.shape[1:-1]
        self.usable = not dist.masked
        self._products: dict[str, torch.Tensor] = {}

    def has(self, metric: str) -> bool:
        return self.usable and metric in self.METRICS

    def _product(self, name: str) -> torch.Tensor:
        """[points, models, models]: p_i . log p_j ("pl") or p_i . p_j ("pp") at every point."""
        if name not in self._products:
            p = self.dist.p.flatten(1, -2)  # [models, points, classes]
            other = p if name == "pp" else self.dist.log_p.flatten(1, -2)
            models, points, classes = p.shape
            step = max(1, int(_copy_bytes(p.device) // (2 * models * classes * p.element_size())))  # bounds the copies
            self._products[name] = torch.cat([  # within pair_sums' strict_float32: no TF32
                torch.bmm(p[:, lo : lo + step].transpose(0, 1), other[:, lo : lo + step].permute(1, 2, 0))
                for lo in range(0, points, step)])  # [points, models, models]
        return self._products[name]

    def __call__(self, metric: str, first: slice | torch.Tensor, second: slice | torch.Tensor) -> torch.Tensor:
        """[pairs, *lead]: ``metric`` of the pairs of models (first[k], second[k]); ``first`` may be one model
        (a slice of length 1) against several."""
        name = "pl" if metric == "kl" else "pp"
        product = self._product(name)
        own = torch.diagonal(product, dim1=1, dim2=2)  # [points, models]: p_i . log p_i or |p_i|^2
        i = first.start if isinstance(first, slice) else first  # one model against several, or pair by pair
        cross = product[:, i, second]  # [points, pairs]
        if metric == "kl":  # 1/2 [KL(i || j) + KL(j || i)], each clamped at 0 as the pointwise form
            back = product[:, second, i]
            value = (own[:, first] - cross).clamp_min_(0.0).add_((own[:, second] - back).clamp_min_(0.0)).mul_(0.5)
        else:
            value = ((own[:, first] + own[:, second]).mul_(0.5) - cross).clamp_min_(0.0)
        return value.T.reshape(value.shape[1], *self.lead)


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
    """The loss barrier of each pair on the probe set at ``k`` points (:func:`goldenpath.comparison.lmc.barrier`).

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
              disable=None if progress else True) as bar, strict_float32():
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
