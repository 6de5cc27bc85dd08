"""Loss-matched functional distances across a sweep: ``goldenpath compare SWEEP_DIR``.

For every loss target, the runs that reached it are compared pairwise on the fixed probe set. Each
model's forward runs once per probe chunk: the N models' outputs for one chunk are held, all pairs are
computed, and the next chunk follows, so N checkpoints cost N forwards and memory stays bounded for
language-model vocabularies. Pairs are marked ``floor`` (same knobs, another seed), ``reference``
(against the least-noisy online run: no injected noise, then the smallest lr / batch) or ``pair``.
The golden-path ratio of a run is d(run, reference) / d(seed floor), with a bootstrap interval over
probe units (sequences for language models) resampled jointly for both distances.

Writes ``compare/distances.parquet`` (one row per target, pair and metric), ``compare/summary.csv``
(one row per target, run and metric: the ratio) and, by default, heatmaps under ``figures/``.
Per-pair results are cached under ``compare/cache/`` (one file per target and metric set) keyed by both
checkpoint files' size and mtime and by the probe set, so a re-run recomputes only pairs whose
checkpoints changed or are new.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from goldenpath import checkpoints as ckpt
from goldenpath.config import Config, ConfigError, load_config, to_dict
from goldenpath.distances import (FUNCTIONS, METRICS, ON_DISTS, Dist, bootstrap, bootstrap_rows, bootstrap_weights,
                                  unit_sums)
from goldenpath.models import build_model, logits

COLUMNS = ["target", "run_a", "run_b", "metric", "value", "ci_low", "ci_high", "loss_a", "loss_b", "kind",
           "overshoot_a", "overshoot_b", "flagged"]


@dataclass(frozen=True)
class Checkpoint:
    run: str
    path: Path
    target: float
    eval_loss: float
    knobs: tuple       # the run's config minus seed, name and output place: equal knobs = seed siblings
    noise_key: tuple   # sorts runs from least to most noisy (online first)
    fingerprint: str


def _knobs(config: Config) -> tuple:
    d = to_dict(config)
    for k in ("seed", "name", "out", "goldenpath", "threads"):
        d.pop(k, None)
    d["log"].pop("progress", None)
    d.get("fork", {}).pop("parent", None)  # forks of seed siblings are siblings
    return (json.dumps(d, sort_keys=True),)


def _noise_key(config: Config) -> tuple:
    return (config.regime == "offline", config.fork.parent is not None, config.injected_sigma,
            config.optim.lr / config.optim.batch_size, config.optim.lr, config.seed)


def collect(sweep_dir: Path) -> tuple[dict[float, list[Checkpoint]], dict[str, Config]]:
    """Every loss-target checkpoint of the sweep's runs, by target; and each run's config."""
    by_target: dict[float, list[Checkpoint]] = {}
    configs = {}
    for run_dir in sorted(p.parent for p in sweep_dir.glob("*/config.yaml")):
        config = load_config(run_dir / "config.yaml")
        configs[run_dir.name] = config
        for target_dir in sorted(run_dir.glob("checkpoints/target-*")):
            weights = target_dir / "model.safetensors"
            if not weights.exists():
                continue
            meta = ckpt.read_json(target_dir / "meta.json")
            stat = weights.stat()
            by_target.setdefault(float(meta["target"]), []).append(Checkpoint(
                run_dir.name, target_dir, float(meta["target"]), float(meta["eval_loss"]), _knobs(config),
                _noise_key(config), f"{stat.st_size}-{stat.st_mtime_ns}"))
    return by_target, configs


def _probe_fingerprint(configs: dict[str, Config]) -> tuple[dict, str]:
    """The data section shared by every run (the probe set depends on it), minus the regime keys."""
    sections = set()
    for config in configs.values():
        d = to_dict(config)["data"]
        for k in ("epochs", "train_size"):
            d.pop(k, None)
        sections.add(json.dumps(d, sort_keys=True))
    if len(sections) > 1:
        raise ConfigError("compare", "the runs of this directory use different data sources or probe sets",
                          "compare runs of one sweep (one data source)")
    text = sections.pop()
    return json.loads(text), hashlib.sha1(text.encode()).hexdigest()[:16]


class _Slots:
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


class _Swapped:
    """A checkpoint's model without a module of its own: its weights, copied into the architecture's shared
    module just before each forward (copying weights costs far less than copying a module)."""

    def __init__(self, slots: _Slots, path: Path):
        self.slots, self.weights = slots, slots.read(path)

    def __call__(self, *args):
        with torch.no_grad():
            if self.weights:
                torch._foreach_copy_(self.slots.tensors, self.weights)
        return self.slots.module(*args)


def _load(ck: Checkpoint, config: Config, info, device, dtype, modules: dict) -> _Swapped:
    """The checkpoint's model, sharing one built module per architecture with the other checkpoints."""
    key = repr(config.model)  # the frozen dataclass's fields, nested sections included
    if key not in modules:
        modules[key] = _Slots(build_model(config.model, info, seed=config.seed).to(device, dtype).eval())
    return _Swapped(modules[key], ck.path)


def pair_sums(models, probe: dict, pairs: list[tuple[int, int]], metrics, *, chunk: int,
              device, dtype) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Per probe unit sums of each metric for each pair, each model's forward once per chunk.

    ``models[i]`` is a module or any callable with a module's call signature.

    Returns {(i, j): {metric: [units] sums, "count": [units] points}}.
    """
    n = len(probe["ids"])
    lm = "labels" in probe
    sums = {p: [] for p in pairs}
    counts = []
    needed = sorted({i for p in pairs for i in p})
    with torch.no_grad():
        for lo in range(0, n, chunk):
            part = {k: v[lo : lo + chunk].to(device) for k, v in probe.items() if k != "ids"}
            part = {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}
            outs = {i: Dist(logits(models[i], part)) for i in needed}  # N forwards for this chunk
            mask = part["labels"] != -100 if lm else None
            for (i, j) in pairs:
                values = torch.stack([ON_DISTS[m](outs[i], outs[j]) for m in metrics])  # [metrics, units(, T)]
                s, c = unit_sums(values, mask)
                sums[(i, j)].append(s.cpu())
            counts.append(c.cpu())
    if not pairs:
        return {}
    count = torch.cat(counts)
    return {p: {**dict(zip(metrics, torch.cat(v, dim=1))), "count": count} for p, v in sums.items()}


def compare(sweep_dir: str | Path, metrics=METRICS, *, chunk: int = 256, device: str | None = None,
            tolerance: float = 0.02, n_boot: int = 1000, figures: bool = True):
    """Compare every pair of runs at every loss target; writes the tables (and heatmaps); returns the pairs."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in FUNCTIONS]
    if unknown:
        raise ConfigError("--metrics", f"unknown metric {unknown[0]!r}", f"use some of {list(METRICS)}")
    by_target, configs = collect(sweep_dir)
    if not by_target:
        raise ConfigError("compare", f"no loss-target checkpoints under {sweep_dir}",
                          "run a sweep whose runs reach checkpoint.targets first")
    _, probe_key = _probe_fingerprint(configs)
    first = next(iter(configs.values()))
    source = first.data.build()
    probe = source.heldout("probe")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float64 if first.precision == "fp64" else torch.float32
    cache_dir = sweep_dir / "compare" / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)

    rows, summary = [], []
    weights = bootstrap_weights(len(probe["ids"]), n_boot=n_boot)  # the same resamples for every statistic
    for target in sorted(by_target, reverse=True):
        cks = sorted(by_target[target], key=lambda c: c.run)
        reference = min(range(len(cks)), key=lambda i: cks[i].noise_key)
        pairs = list(itertools.combinations(range(len(cks)), 2))
        keys = {(i, j): f"{cks[i].run}|{cks[i].fingerprint}|{cks[j].run}|{cks[j].fingerprint}" for i, j in pairs}
        path = cache_dir / f"{hashlib.sha1(f'{probe_key}|{target!r}|{metrics}'.encode()).hexdigest()}.pt"
        cached = _read_cache(path)
        results = {p: cached[k] for p, k in keys.items() if k in cached}
        todo = [p for p in pairs if p not in results]
        if todo:
            models, modules = {}, {}
            for idx in sorted({k for t in todo for k in t}):
                models[idx] = _load(cks[idx], configs[cks[idx].run], source.info, device, dtype, modules)
            results.update(pair_sums(models, probe, todo, metrics, chunk=chunk, device=device, dtype=dtype))
            del models
            current = {keys[p]: results[p] for p in pairs}  # pairs of checkpoints gone or changed drop out
            ckpt.atomic_write(path, lambda tmp: torch.save(_pack(current), tmp), durable=False)
        kind = {}
        for i, j in pairs:
            same = cks[i].knobs == cks[j].knobs
            kind[(i, j)] = "floor" if same else "reference" if reference in (i, j) else "pair"
        cells = [(p, m) for p in results for m in metrics]  # every pair and metric in one resampling
        stats = bootstrap_rows(torch.stack([results[p][m] for p, m in cells]),
                               torch.stack([results[p]["count"] for p, _ in cells]), weights=weights)
        for ((i, j), m), value, low, high in zip(cells, *(x.tolist() for x in stats)):
            a, b = cks[i], cks[j]
            over_a, over_b = a.target - a.eval_loss, b.target - b.eval_loss
            rows.append({"target": target, "run_a": a.run, "run_b": b.run, "metric": m, "value": value,
                         "ci_low": low, "ci_high": high, "loss_a": a.eval_loss, "loss_b": b.eval_loss,
                         "kind": kind[(i, j)], "overshoot_a": over_a, "overshoot_b": over_b,
                         "flagged": max(over_a, over_b) > tolerance * target})
        summary += _ratios(target, cks, reference, results, metrics, weights)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    out_dir = sweep_dir / "compare"
    ckpt.atomic_write(out_dir / "distances.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    ratio_frame = pd.DataFrame(summary)
    ckpt.atomic_write(out_dir / "summary.csv", lambda tmp: ratio_frame.to_csv(tmp, index=False))
    if figures:
        write_heatmaps(frame, sweep_dir / "figures", configs)
    return frame


def _pack(results: dict[str, dict[str, torch.Tensor]]) -> dict:
    """{pair key: {name: [units]}} as one [pairs, units] tensor per name (one small file per target)."""
    keys = list(results)
    names = list(next(iter(results.values()))) if keys else []
    return {"keys": keys, "values": {n: torch.stack([results[k][n] for k in keys]) for n in names}}


def _read_cache(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A target's cached pair results by pair key; empty when missing or unreadable (written without fsync)."""
    try:
        packed = torch.load(path, weights_only=True)
        return {k: {n: v[i] for n, v in packed["values"].items()} for i, k in enumerate(packed["keys"])}
    except Exception:  # noqa: BLE001 - missing, torn or foreign: recompute the target's pairs
        return {}


def _pair(results: dict, i: int, j: int):
    return results[(i, j)] if (i, j) in results else results[(j, i)]


def _ratios(target, cks, reference, results, metrics, weights) -> list[dict]:
    """The golden-path ratio of every run at this target (its seed floor, else the reference's)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cks):
        groups.setdefault(c.knobs, []).append(i)

    def floor_of(i):
        members = groups[cks[i].knobs]
        return [(a, b) for a, b in itertools.combinations(members, 2)]

    out = []
    for i, c in enumerate(cks):
        floor_pairs, floor_from = floor_of(i), "own seeds"
        if not floor_pairs:
            floor_pairs, floor_from = floor_of(reference), "reference's seeds"
        ref_runs = [k for k in groups[cks[reference].knobs] if k != i]
        for m in metrics:
            row = {"target": target, "run": c.run, "metric": m, "eval_loss": c.eval_loss,
                   "reference": cks[reference].run, "floor_from": floor_from if floor_pairs else None}
            if i in groups[cks[reference].knobs] or not floor_pairs or not ref_runs:
                out.append({**row, "d_reference": math.nan, "d_floor": math.nan, "ratio": math.nan,
                            "ci_low": math.nan, "ci_high": math.nan})
                continue
            ref = _pair(results, i, reference)
            floor = [_pair(results, a, b) for a, b in floor_pairs]
            floor_sums = torch.stack([f[m] for f in floor]).mean(0)
            d_ref = float(ref[m].sum() / ref["count"].sum())
            d_floor = float(floor_sums.sum() / floor[0]["count"].sum())
            ratio, low, high = bootstrap(ref[m], ref["count"], denominator=(floor_sums, floor[0]["count"]),
                                         weights=weights)
            out.append({**row, "d_reference": d_ref, "d_floor": d_floor, "ratio": ratio, "ci_low": low,
                        "ci_high": high})
    return out


def write_heatmaps(frame, fig_dir: Path, configs: dict[str, Config]) -> list[Path]:
    """One PNG per target and metric: the run-by-run distance matrix (see plots.distance_heatmap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goldenpath.plots import distance_heatmap, run_order

    fig_dir.mkdir(parents=True, exist_ok=True)
    order = run_order(configs)
    paths = []
    for (target, metric), part in frame.groupby(["target", "metric"]):
        n = len(set(part["run_a"]) | set(part["run_b"]))
        fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n, 2 + 0.4 * n))
        distance_heatmap(part, order=order, ax=ax)
        ax.set_title(f"{metric} at eval loss {target:g}")
        path = fig_dir / f"heatmap-{metric}-target-{target:g}.png"
        fig.tight_layout()
        ckpt.atomic_write(path, lambda tmp, f=fig: f.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)
    return paths
