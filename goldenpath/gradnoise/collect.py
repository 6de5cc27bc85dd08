"""Gradient noise of a trained checkpoint (docs/science.md, "Gradient noise at fixed parameters"): what the
``goldenpath noise`` verb runs. It loads a run's checkpoint and stream, draws fresh mini-batches, and tabulates
the estimators of :mod:`goldenpath.gradnoise.estimators` over the noise, for the whole model and per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from goldenpath.gradnoise.estimators import (atom_fraction, gaussianity, noise_scale, per_coordinate_tail_index,
                                             pooled_sample, tail_index_ci)


def _record(layer, statistic, value, low=None, high=None, n=None) -> dict:
    return {"layer": layer, "statistic": statistic, "value": value, "ci_low": low, "ci_high": high, "n": n}


def _estimates(noise: np.ndarray, layers: dict, params: list, sizes: np.ndarray, *, batches: int, max_pooled: int,
               rng: np.random.Generator, seed: int) -> list[dict]:
    """The table rows of the tail-index estimators, normality statistics and exact-zero share, for the whole
    model (layer "all") and per layer (``layers``: name -> column spans of ``noise``)."""
    records = []

    def add(*args, **kw):
        records.append(_record(*args, **kw))

    for layer, spans in [("all", [(0, noise.shape[1])]), *layers.items()]:
        part = np.concatenate([noise[:, lo:hi] for lo, hi in spans], axis=1)
        pooled = pooled_sample(part, max_pooled, rng)
        if len(pooled) >= 16:
            alpha, low, high = tail_index_ci(pooled)
            add(layer, "tail_index_pooled", alpha, low, high, len(pooled))
        per = per_coordinate_tail_index(part[:, part.std(0) > 0]) if batches >= 8 else np.array([])
        if len(per):
            q1, med, q3 = np.quantile(per, [0.25, 0.5, 0.75])
            add(layer, "tail_index_per_coordinate_median", float(med), float(q1), float(q3), len(per))
        if part.shape[1] >= 2 and batches >= 3:
            for key, value in gaussianity(part, seed=seed).items():
                if not key.endswith("_n"):
                    add(layer, key, value)
        atoms = atom_fraction(part)
        add(layer, "atom_fraction", float(atoms.mean()))  # share of entries that are exact zeros of the gradient
        add(layer, "coordinates", part.shape[1], n=int(sum(sizes[i] for i, (n_, _) in enumerate(params)
                                                          if layer in ("all", n_.rsplit(".", 1)[0]))))
    return records


def analyse(run_dir, *, at_loss: float | None = None, at_step: int | None = None, batches: int = 100,
            batch_size: int | None = None, max_coords: int = 200_000, max_pooled: int = 1_000_000,
            seed: int = 0, progress: bool = True, estimators: bool = True):
    """Gradient noise of a run's checkpoint on fresh batches of its stream; returns (table, samples).

    Draws ``batches`` mini-batches of ``batch_size`` (default: the run's batch) from the run's stream past
    the last sample training used (an offline run draws from its training subset), computes each batch's
    mean-loss gradient g_j and the noise n_j = g_j - mean_j g_j on at most ``max_coords`` coordinates
    (a fixed random subset, spread over the layers in proportion to their size). The table has, per layer
    and for the whole model: the pooled tail index (Simsekli) with a t interval over its blocks (on at most
    ``max_pooled`` pooled values), the median per-coordinate tail index across batches (Panigrahi) with
    its quartiles, the normality statistics, the share of exact zeros, and (whole model, from exact norms)
    tr Sigma, |G|^2, B_simple. ``estimators=False`` leaves out the per-layer estimators (for callers that run
    their own on the returned noise; ``table.attrs["layers"]`` gives each layer's columns).
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from goldenpath.store import rundir as ckpt
    from goldenpath.config import ConfigError, load_config
    from goldenpath.data import build_stream
    from goldenpath.models import build_model, count, sample_losses

    run_dir = Path(run_dir)
    run = ckpt.RunDir(run_dir)
    config = load_config(run.config)
    source_dir = run.checkpoint(at_loss=at_loss, at_step=at_step)
    name = source_dir.name
    if not ckpt.has_weights(source_dir):
        kind, field, what = ("target", "--at-loss", "a loss target the run reached") if at_loss is not None else \
            ("step", "--at-step", "a step with a checkpoint (checkpoint.steps)")
        saved = sorted((d.name.split("-", 1)[1] for d in run.saved(kind)),
                       key=float, reverse=kind == "target")  # targets in the order training reached them
        raise ConfigError(field, f"{run.path} has no checkpoint {name}",
                          f"pick {what}: {', '.join(saved) or 'none yet'}")
    b = batch_size or config.optim.batch_size
    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=b, micro_batch_size=b)
    position = (run.resume_stream(0) or {"position": 0})["position"]
    fresh = stream.limit is None or position + batches * b <= stream.limit
    stream.load_state_dict({**stream.state_dict(), "position": position if fresh else 0})
    model = build_model(config.model, source.info, seed=config.seed)
    ckpt.load_weights(model, source_dir)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = np.array([p.numel() for _, p in params])
    share = np.minimum(sizes, np.maximum(1, np.round(sizes / sizes.sum() * max_coords)).astype(int))
    rng = np.random.default_rng(seed)
    picks = [torch.as_tensor(np.sort(rng.choice(n, k, replace=False))) for n, k in zip(sizes, share)]
    rows = np.empty((batches, int(share.sum())))
    total = [torch.zeros_like(p, dtype=torch.float64) for _, p in params]
    sq_small = 0.0
    for j in tqdm(range(batches), desc=f"noise {run_dir.name}", disable=not progress, unit="batch"):
        batch = stream.next_step()[0]
        loss = sample_losses(model, batch).sum() / count(batch)
        grads = torch.autograd.grad(loss, [p for _, p in params])
        sq_small += float(sum(g.double().square().sum() for g in grads)) / batches
        for t, g in zip(total, grads):
            t += g.double() / batches
        rows[j] = torch.cat([g.flatten()[idx].double() for g, idx in zip(grads, picks)]).numpy()
    sq_big = float(sum(t.square().sum() for t in total))
    noise = rows - rows.mean(0)
    bounds = np.concatenate([[0], np.cumsum(share)])
    groups = [(n.rsplit(".", 1)[0] if "." in n else n, bounds[i], bounds[i + 1]) for i, (n, _) in enumerate(params)]
    layers: dict[str, list[tuple[int, int]]] = {}
    for layer, lo, hi in groups:
        layers.setdefault(layer, []).append((lo, hi))
    records = _estimates(noise, layers, params, sizes, batches=batches, max_pooled=max_pooled, rng=rng,
                         seed=seed) if estimators else []
    trace, grad_sq, b_simple = noise_scale(sq_small, sq_big, b, b * batches)
    for key, value in (("trace_sigma", trace), ("grad_sq", grad_sq), ("b_simple", b_simple)):
        records.append(_record("all", key, value))
    table = pd.DataFrame(records)
    table.attrs.update(layers={k: [(int(a), int(b)) for a, b in v] for k, v in layers.items()})  # noise columns
    table.attrs.update(checkpoint=name, batches=batches, batch_size=b, fresh=fresh, coordinates=int(share.sum()))
    return table, noise


def write_analysis(run_dir, *, at_loss: float | None = None, at_step: int | None = None, batches: int = 100,
                   batch_size: int | None = None, max_coords: int = 200_000):
    """:func:`analyse` a checkpoint and write its table to ``<run>/noise/<checkpoint>.parquet``; returns
    (table, noise samples, the parquet's path). Bad arguments raise ConfigError naming the option."""
    from goldenpath.store import files, rundir as ckpt
    from goldenpath.config import ConfigError

    if batches < 8:
        raise ConfigError("--batches", f"got {batches}", "use at least 8 batches (100 or more for tail indices)")
    if batch_size is not None and batch_size < 1:
        raise ConfigError("--batch-size", f"got {batch_size}", "use a positive batch size")
    run = ckpt.RunDir(run_dir)
    if not run.exists():
        raise ConfigError("run_dir", f"{run.path} is not a run directory",
                          "give a run's directory (it holds config.yaml)")
    table, noise = analyse(run.path, at_loss=at_loss, at_step=at_step, batches=batches, batch_size=batch_size,
                           max_coords=max_coords)
    run.noise.mkdir(exist_ok=True)
    path = run.noise / f"{table.attrs['checkpoint']}.parquet"
    files.atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    return table, noise, path


def summary_line(table, batches: int) -> str:
    """One line: the draws, and the whole model's tail indices and B_simple."""
    whole = table[table.layer == "all"].set_index("statistic").value
    fresh = "" if table.attrs["fresh"] else " (from the training subset: no fresh samples left)"
    return (f"{batches} batches of {table.attrs['batch_size']}, {table.attrs['coordinates']} coordinates{fresh}: "
            f"tail index pooled {whole['tail_index_pooled']:.2f}, per coordinate (median) "
            f"{whole.get('tail_index_per_coordinate_median', float('nan')):.2f}, B_simple {whole['b_simple']:.1f}")

