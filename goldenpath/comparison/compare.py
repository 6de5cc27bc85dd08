"""Loss-matched functional distances across a sweep: ``goldenpath compare SWEEP_DIR``.

For every loss target, the runs that reached it are compared pairwise on the fixed probe set. Each
model's forward runs once per probe chunk: the N models' outputs for one chunk are held, all pairs are
computed, and the next chunk follows, so N checkpoints cost N forwards and memory stays bounded for
language-model vocabularies (:mod:`goldenpath.comparison.pairs`). Runs are grouped into *settings* (the same knobs,
any seed); each setting is compared with the reference of its regime (every seed of the least-noisy setting)
and with every other setting: the golden-path ratio D / F with its interval and permutation p-value, each
setting's own seed floor, its spread (floor over the reference's) and its location (the distance between
the settings' mean functions, from the squared distance ``sq``, always measured), and per target and regime
the family test of every setting at once (:mod:`goldenpath.comparison.stats`,
:mod:`goldenpath.comparison.verdicts`). The runs' seeds decide the analysis: settings with disjoint seeds are
compared as independent, settings that share every seed as paired (within seeds); runs of sweeps with
different seed designs are refused.

Beyond the pointwise distances (``tv``, ``kl``, ``js``, ``top1``), two opt-in lenses (``--metrics
...,cka,lmc``): ``cka`` is 1 - linear CKA of the penultimate features on the probe set (per image, or per
predicted token), read by a hook on the output layer in the same forward as the logits; ``lmc`` is the
loss barrier on the straight line between the two checkpoints' weights (:mod:`goldenpath.comparison.lmc`,
``lmc_points`` points; batch-norm statistics recomputed at every point from the eval set; nan between
different architectures). Both are statistics of the whole probe set, not means over its points: their
setting-level intervals resample seeds only (the probe set held fixed), and their pair rows carry no
probe-unit interval. ``probe_shift`` (:mod:`goldenpath.data.shift`) compares on a shifted probe set
instead; its tables go to ``compare-<shift>/`` (e.g. ``compare-noise-0.5/``), leaving ``compare/`` as it is.

Stalled runs, and checkpoints more than ``tolerance`` (relative) below their target, are left out unless
``include_flagged``; ``compare/excluded.csv`` lists them. A run that diverged after reaching a target keeps
its checkpoints in the statistics (each predates the divergence); ``summary.csv``'s ``diverged_later`` and
the answer (:func:`conclusions`) name it. Tables written under ``compare/``:

- ``distances.parquet``: one row per target, pair of runs and metric (value with its probe-unit interval);
- ``summary.csv``: one row per target, metric and setting: the ratio against the reference;
- ``settings.csv``: one row per target, metric and pair of settings (the knob x knob matrix);
- ``family.csv``: one row per target, metric and regime: the family test, its adjusted p and the smallest
  adjusted p the seeds allow;
- ``trend.csv``: slope of log ratio on log noise scale per target, metric and regime;
- ``compute.csv``: samples and steps each setting needed to reach each target;
- ``answer.json``: per metric, the notes and the answer's sentences (:func:`conclusions`), which the report
  page leads with.

Per-pair results are cached under ``compare/cache/`` (one file per target and metric set) keyed by both
checkpoint files' size and mtime and by the probe set, so a re-run recomputes only pairs whose
checkpoints changed or are new. ``compare/inputs.json`` records the options and every run's checkpoints
the tables come from: :func:`goldenpath.comparison.runs.changes` says what changed in the sweep since
(``goldenpath report`` compares again when something did). Figures and the report page are drawn from these
tables alone (:mod:`goldenpath.draw`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from goldenpath.comparison import verdicts

from goldenpath.comparison.design import Design
from goldenpath.comparison.distances import METRICS, bootstrap_rows, bootstrap_weights
from goldenpath.comparison.pairs import PairTable, load_shared, pair_barriers, pair_table, probe_chunk
from goldenpath.comparison.runs import collect, inputs, tables_dir
from goldenpath.config import Config, ConfigError, to_dict
from goldenpath.data.shift import parse_shift, probe_shift as shifted_probe
from goldenpath.store import files
from goldenpath.store.tables import ANSWER, INPUTS

WHOLE = ("cka", "lmc")  # statistics of the whole probe set: one value per pair, no probe units to resample
ALL_METRICS = (*METRICS, "sq", *WHOLE)
LOCATION = "sq"  # the squared distance whose cell means split into location and spread; always measured
COLUMNS = ["target", "run_a", "run_b", "setting_a", "setting_b", "metric", "value", "ci_low", "ci_high", "loss_a",
           "loss_b", "kind", "overshoot_a", "overshoot_b"]


def _probe_fingerprint(configs: dict[str, Config]) -> tuple[dict, str]:
    """The data section shared by every run (the probe set depends on it), minus the regime keys."""
    sections = set()
    for config in configs.values():
        d = to_dict(config)["data"]
        for k in ("epochs", "train_size", "subset", "mix", "prefetch"):  # regime, subset, training labels, pace
            d.pop(k, None)
        sections.add(json.dumps(d, sort_keys=True))
    if len(sections) > 1:
        raise ConfigError("compare", "the runs of this directory use different data sources or probe sets",
                          "compare runs of one sweep (one data source)")
    text = sections.pop()
    return json.loads(text), hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Probe:
    """What every pair at every target is measured on, and how."""

    info: object          # the source's SourceInfo
    probe: dict           # the probe set (shifted where asked)
    source: object        # the data source: its eval set gives batch-norm statistics along a linear path
    key: str              # the cache key of the probe set and of the lenses' settings
    chunk: int | None     # probe units per forward (None: from the free memory, per call)
    device: torch.device
    dtype: torch.dtype
    lmc_points: int


def _probe_setup(configs: dict, metrics, probe_shift: str | None, chunk: int, device: str | None,
                 lmc_points: int) -> _Probe:
    """The probe set every pair is measured on (shifted where asked), the source, the cache key, the device."""
    _, probe_key = _probe_fingerprint(configs)
    first = next(iter(configs.values()))
    source = first.data.build()
    probe = source.heldout("probe") if probe_shift is None else shifted_probe(first.data, probe_shift, source=source)
    lens = f"|lmc:{lmc_points}" if "lmc" in metrics else ""
    shift = "" if probe_shift is None else f"|shift:{parse_shift(probe_shift).spec}"
    return _Probe(source.info, probe, source, probe_key + shift + lens, chunk,
                  torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")),
                  torch.float64 if first.precision == "fp64" else torch.float32, lmc_points)


def compare(sweep_dir: str | Path, metrics=METRICS, *, chunk: int | None = None, device: str | None = None,
            tolerance: float = 0.02, n_boot: int = 1000, n_perm: int = 2000, include_flagged: bool = False,
            probe_shift: str | None = None, lmc_points: int = 11):
    """Compare every pair of runs and of settings at every loss target; writes the tables under
    ``compare/`` (``compare-<shift>/`` with ``probe_shift``, e.g. ``"noise:0.5"``); returns the pairs
    (``distances.parquet``) as a DataFrame. ``metrics``: some of :data:`ALL_METRICS`; ``n_boot``: probe-unit
    resamples of each pair's interval; ``n_perm``: random relabellings of a permutation test that is not
    exact; ``lmc_points``: points on each pair's linear path (``lmc``); ``chunk``: probe units per forward
    (None: as many as the device's free memory holds, :func:`goldenpath.comparison.pairs.probe_chunk`)."""
    import pandas as pd

    from goldenpath.data.baselines import trivial_loss

    sweep_dir = Path(sweep_dir)
    metrics = tuple(dict.fromkeys(metrics))  # a metric named twice would write its rows twice
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ConfigError("--metrics", f"unknown metric {unknown[0]!r}", f"use some of {','.join(ALL_METRICS)}")
    if not metrics:  # it wrote empty tables over the last compare's
        raise ConfigError("--metrics", "no metric given", f"use some of {','.join(ALL_METRICS)}")
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError("--device", f"got {device!r}", "use cpu or cuda (cuda:N for one GPU)")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device", f"{device} asked, but torch sees no CUDA GPU here", "use cpu")
    if lmc_points < 2:
        raise ConfigError("--lmc-points", f"got {lmc_points}", "use 2 or more points (both ends count)")
    out_dir = tables_dir(sweep_dir, probe_shift)
    (out_dir / ANSWER).unlink(missing_ok=True)  # present only once written from the tables written below
    by_target, runs = collect(sweep_dir)
    if not by_target:
        raise ConfigError("compare", f"no loss-target checkpoints under {sweep_dir}",
                          "run a sweep whose runs reach checkpoint.targets first")
    configs = {n: r.config for n, r in runs.items()}
    first = next(iter(configs.values()))
    setup = _probe_setup(configs, metrics, probe_shift, chunk, device, lmc_points)
    probe = setup.probe
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    measured = metrics + (() if LOCATION in metrics else (LOCATION,))
    baseline = trivial_loss(first.data)[0]

    tables = {name: [] for name in ("distances", "summary", "settings", "family", "trend", "excluded")}
    weights = bootstrap_weights(len(probe["ids"]), n_boot=n_boot)  # the same resamples for every pair
    for target in sorted(by_target, reverse=True):
        cks = _kept(by_target[target], runs, target, tolerance, tables["excluded"] if not include_flagged else None)
        order = {s: k for k, s in enumerate(sorted({runs[c.run].setting for c in cks}, key=lambda s: s.order))}
        cks.sort(key=lambda c: (order[runs[c.run].setting], runs[c.run].config.seed, c.run))
        if len(cks) < 2:
            continue
        results = _pair_results(cks, by_target[target], configs, setup, target, measured, cache_dir)
        settings = list(order)
        groups = [[i for i, c in enumerate(cks) if runs[c.run].setting == s] for s in settings]
        design = Design(tuple(map(tuple, groups)), tuple(runs[c.run].config.seed for c in cks))
        refs = {r: verdicts.reference_of(settings, [len(g) for g in groups], r) for r in ("online", "offline")}
        against = {}  # a setting is compared with its regime's reference, an offline one also with the online
        for k, s in enumerate(settings):
            mine = [refs[s.regime]] + ([refs["online"]] if s.regime == "offline" else [])
            theirs = {i for r in mine if r is not None and r != k for i in groups[r]}
            against.update({i: theirs for i in groups[k]})
        tables["distances"] += _distance_rows(target, cks, runs, results, metrics, weights, against)
        # the statistics read each pair's mean alone: its sum over the probe units and their points, taken once
        # here for every metric, family and regime (distance_matrix divides the same sums by the same total)
        total = results.rows("count")[0].double().numpy().sum(keepdims=True)
        sq = results.rows(LOCATION).double().numpy().sum(1, keepdims=True)
        # runs that diverged after this checkpoint: their checkpoints count, and the summary names them
        late = [c.run for c in cks if runs[c.run].state == "diverged"]
        diverged = {s.label: ";".join(r for r in late if runs[r].setting is s) for s in settings}
        for m in metrics:
            sums = results.rows(m).double().numpy().sum(1, keepdims=True)
            # a whole-probe statistic is one "unit" (its seeds alone vary); location needs the probe points
            got = verdicts.setting_rows(target, m, settings, design, sums, np.ones(1) if m in WHOLE else total,
                                      sq_sums=None if m in WHOLE else sq, trivial=target >= baseline,
                                      trivial_loss=baseline, n_perm=n_perm)
            for row in got["summary"]:
                row["diverged_later"] = diverged[row["setting"]]
            for name, rows in got.items():
                tables[name] += rows
    verdicts.adjust(tables["summary"], tables["family"])
    options = {"metrics": list(metrics), "tolerance": tolerance, "n_boot": n_boot, "n_perm": n_perm,
               "include_flagged": include_flagged, "probe_shift": probe_shift, "lmc_points": lmc_points}
    frame = pd.DataFrame(tables["distances"], columns=COLUMNS)
    _write_tables(out_dir, runs, by_target, tables, frame, metrics,
                  {"options": options, "runs": inputs(runs, by_target)})
    return frame


def _kept(cks: list, runs: dict, target: float, tolerance: float, excluded: list | None) -> list:
    """The checkpoints at ``target`` that enter the statistics: not of a stalled run, not more than ``tolerance``
    (relative) below the target. The others go to ``excluded`` with the reason (None: every one is kept)."""
    kept = []
    for c in cks:
        why = ("stalled run" if runs[c.run].state == "stalled" else
               f"{c.overshoot:.4g} below its target (more than {tolerance:.0%})"
               if c.overshoot > tolerance * target else None)
        if why and excluded is not None:
            excluded.append({"target": target, "run": c.run, "checkpoint": str(c.path), "reason": why})
        else:
            kept.append(c)
    return kept


def _write_tables(out_dir: Path, runs, by_target, tables: dict, frame, metrics, recorded: dict) -> None:
    """The tables, then ``answer.json`` read from them, then ``inputs.json`` (``recorded``), all synced before the
    first is renamed and renamed in that order: a kill part way leaves no answer or the old inputs, never an
    answer of other tables (the answer is read from the tables' CSV text, as :func:`write_answer` reads the
    files)."""
    import pandas as pd

    reached = []
    for info in runs.values():
        n_seeds = sum(r.setting == info.setting for r in runs.values())
        for target in by_target:
            hit = next((c for c in by_target[target] if c.run == info.name), None)
            reached.append({"target": target, "setting": info.setting.label, "regime": info.setting.regime,
                            "columns": info.setting.columns, "n_seeds": n_seeds,
                            "step": hit.step if hit else None, "samples": hit.samples if hit else None})
    writes = {out_dir / "distances.parquet": lambda tmp: frame.to_parquet(tmp, index=False)}
    texts = {}
    for name, table, columns in (("summary", tables["summary"], verdicts.SUMMARY),
                                 ("settings", tables["settings"], verdicts.MATRIX),
                                 ("family", tables["family"], verdicts.FAMILY),
                                 ("trend", tables["trend"], verdicts.TREND),
                                 ("compute", verdicts.compute_rows(reached), verdicts.COMPUTE),
                                 ("excluded", tables["excluded"], verdicts.EXCLUDED)):
        table = pd.DataFrame(table)
        table = table.reindex(columns=[*columns, *(c for c in table.columns if c not in columns)])  # + the knobs
        texts[name] = table.to_csv(index=False)
        writes[out_dir / f"{name}.csv"] = lambda tmp, text=texts[name]: tmp.write_text(text, encoding="utf-8")
    said = _answer_text(_answer_tables(texts), metrics)
    writes[out_dir / ANSWER] = lambda tmp: tmp.write_text(said, encoding="utf-8")
    writes[out_dir / INPUTS] = lambda tmp: tmp.write_text(json.dumps(recorded, indent=1) + "\n", encoding="utf-8")
    files.atomic_writes(writes)


def _pair_results(cks, every, configs, setup: _Probe, target, metrics, cache_dir) -> PairTable:
    """Per-unit sums of every metric for every pair of ``cks`` in ``itertools.combinations`` order, from the cache
    where it holds them (the cache also keeps the pairs of ``every`` checkpoint at this target, those left out
    included)."""
    pairs = list(itertools.combinations(range(len(cks)), 2))
    keys = [f"{cks[i].run}|{cks[i].fingerprint}|{cks[j].run}|{cks[j].fingerprint}" for i, j in pairs]
    path = cache_dir / f"{hashlib.sha1(f'{setup.key}|{target!r}|{metrics}'.encode()).hexdigest()}.pt"
    cached = _read_cache(path)
    row = {k: r for r, k in enumerate(cached.keys)}
    todo = [(p, k) for p, k in zip(pairs, keys) if k not in row]
    if not todo:
        return PairTable.select(keys, [cached])
    models, modules = {}, {}
    for idx in sorted({i for (p, _) in todo for i in p}):
        models[idx] = load_shared(cks[idx], configs[cks[idx].run], setup.info, setup.device, setup.dtype, modules)
    kw = {"device": setup.device, "dtype": setup.dtype}
    label = f"loss {target:g}: {len(todo)} pairs"
    todo_pairs = [p for p, _ in todo]
    new = pair_table(models, setup.probe, todo_pairs, metrics, progress=f"{label}, forwards",
                     chunk=setup.chunk or probe_chunk(len(models), setup.info, **kw), **kw)
    if "lmc" in metrics:
        got = pair_barriers(models, setup.probe, setup.source.heldout("eval"), todo_pairs, k=setup.lmc_points,
                            progress=f"{label}, lmc paths", chunk=setup.chunk or probe_chunk(0, setup.info, **kw), **kw)
        new.values["lmc"] = torch.stack([got[p]["lmc"] for p in todo_pairs])
    del models
    results = PairTable.select(keys, [cached, new.rekeyed([k for _, k in todo])])
    del new
    # keep the cached pairs of checkpoints left out this time (they may be included again)
    alive = {f"{c.run}|{c.fingerprint}" for c in every}
    current = set(keys)
    kept = [k for k in cached.keys if k not in current
            and {"|".join(k.split("|")[:2]), "|".join(k.split("|")[2:])} <= alive]
    everything = PairTable.select(kept + keys, [cached, results]) if kept else results
    del cached
    files.atomic_write(path, lambda tmp: torch.save(_pack(everything), tmp), durable=False)
    return results


def _distance_rows(target, cks, runs, results: PairTable, metrics, weights, against: dict[int, set]) -> list[dict]:
    """One row per pair of runs and metric, with a bootstrap interval over probe units (none for the
    whole-probe statistics cka and lmc). ``results``: the pairs in ``itertools.combinations`` order. ``against``:
    run -> the runs of the references its setting is compared with (a pair of a run and one of those is a
    ``reference`` pair)."""
    pairs = list(itertools.combinations(range(len(cks)), 2))
    est = {m: (results.rows(m)[:, 0].tolist(), [math.nan] * len(pairs), [math.nan] * len(pairs))
           for m in metrics if m in WHOLE}
    unit = [m for m in metrics if m not in WHOLE]
    if unit:  # every pair and pointwise metric in one resampling, pair by pair (one product, its rows in one order:
        # a row's last bit can depend on how many rows the product has and where the row stands)
        count = results.values["count"][None] if "count" in results.shared else \
            results.rows("count").repeat_interleave(len(unit), 0)
        rows = torch.stack([results.rows(m) for m in unit], 1).flatten(0, 1)  # [pairs x metrics, units]
        got = bootstrap_rows(rows, count, weights=weights)
        value, low, high = (x.view(len(pairs), len(unit)).T.tolist() for x in got)
        est.update({m: (value[k], low[k], high[k]) for k, m in enumerate(unit)})
    base = []
    for i, j in pairs:
        a, b = cks[i], cks[j]
        sa, sb = runs[a.run].setting, runs[b.run].setting
        kind = "floor" if sa == sb else "reference" if i in against[j] or j in against[i] else "pair"
        base.append({"target": target, "run_a": a.run, "run_b": b.run, "setting_a": sa.label, "setting_b": sb.label,
                     "loss_a": a.eval_loss, "loss_b": b.eval_loss, "kind": kind, "overshoot_a": a.overshoot,
                     "overshoot_b": b.overshoot})
    return [{**base[k], "metric": m, "value": est[m][0][k], "ci_low": est[m][1][k], "ci_high": est[m][2][k]}
            for k in range(len(pairs)) for m in metrics]


def _pack(table: PairTable) -> dict:
    """A :class:`PairTable` as a cache file holds it: the keys, one [pairs, units] tensor per name; a name whose rows
    are all equal (the probe's points per unit) as that one row (``shared``), a float64 tensor in float32 where
    that holds its values exactly (``single``: an image's per-unit sums are float32 values), so a cache of image
    pairs takes 40% of its float64 size."""
    values, shared, single = {}, [], []
    for n in table.values:
        rows = table.rows(n)
        if n in table.shared or (len(rows) and torch.equal(rows[-1], rows[0]) and bool((rows == rows[:1]).all())):
            values[n] = rows[0] if len(rows) else table.values[n]
            shared.append(n)
        else:
            values[n] = rows
        if values[n].dtype == torch.float64 and torch.equal(values[n].float().double(), values[n]):
            values[n] = values[n].float()
            single.append(n)
        elif values[n].untyped_storage().nbytes() > values[n].numel() * values[n].element_size():
            values[n] = values[n].clone()  # a view of every metric's sums: torch.save would write all of them
    return {"keys": list(table.keys), "values": values, "shared": shared, "single": single, "kl": KL_DEFINITION}


KL_DEFINITION = "symmetric"  # compare's kl: 1/2 [KL(a||b) + KL(b||a)]; caches of the one-way KL before it say none


def _read_cache(path: Path) -> PairTable:
    """A target's cached pair results, as they were packed; empty when missing or unreadable (written without
    fsync), or when it holds a kl of another definition (the one-way KL of earlier versions)."""
    try:
        packed = torch.load(path, weights_only=True)
        if "kl" in packed["values"] and packed.get("kl") != KL_DEFINITION:  # another kl: every pair again
            return PairTable([], {})
        single = set(packed.get("single", ()))
        values = {n: v.double() if n in single else v for n, v in packed["values"].items()}
        table = PairTable(packed["keys"], values, packed.get("shared", ()))
        if any(table.rows(n).shape[0] != len(table) for n in values):
            raise ValueError(f"{path}: rows and keys differ")
        return table
    except Exception:  # noqa: BLE001 - missing, torn or foreign: recompute the target's pairs
        return PairTable([], {})


def conclusions(sweep_dir: str | Path, *, metric: str = "tv", probe_shift: str | None = None) -> list[str]:
    """What a compared sweep says, in plain lines: what was left out and which runs diverged after reaching a
    target (by name), then one sentence per regime (from ``compare-<shift>/`` with ``probe_shift``): as
    ``answer.json`` holds them, or from the tables for a metric it lacks."""
    tables = tables_dir(sweep_dir, probe_shift)
    said = files.read_json(tables / ANSWER).get(metric) if (tables / ANSWER).exists() else None
    notes, answer = (said["notes"], said["answer"]) if said else _said(_answer_tables(tables), metric)
    return notes + answer


def _answer_tables(tables: Path | dict[str, str]) -> dict:
    """The tables the answer is read from, each read once: the CSV files of a tables directory, or their text
    by name."""
    import io

    import pandas as pd

    return {name: pd.read_csv(io.StringIO(tables[name]) if isinstance(tables, dict) else tables / f"{name}.csv")
            for name in ("excluded", "summary", "trend", "family")}


def _said(t: dict, metric: str) -> tuple[list[str], list[str]]:
    """The lines of :func:`conclusions` for ``metric`` from :func:`_answer_tables`: (the notes, the answer)."""
    lines = []
    excluded, summary = t["excluded"], t["summary"]
    if len(excluded):
        names = ", ".join(f"{r.run} at {r.target:g} ({r.reason})" for r in excluded.itertuples())
        lines.append(f"left out of the statistics ({len(excluded)}; --include-flagged keeps them): {names}")
    mine = summary[summary.metric == metric]
    if "diverged_later" in summary:  # kept: each checkpoint predates its run's divergence
        at = {}
        late = mine.diverged_later.dropna()
        for target, runs in zip(mine.target[late.index], late):
            for run in runs.split(";"):
                at.setdefault(run, []).append(f"{target:g}")
        if at:
            lines.append(f"diverged after reaching a target ({len(at)}; their checkpoints are in the statistics): "
                         + ", ".join(f"{run} at {', '.join(ts)}" for run, ts in sorted(at.items())))
    refs = mine.groupby("target").reference.first()
    if refs.nunique() > 1:
        lines.append("the reference setting differs between targets: "
                     + ", ".join(f"{t:g}: {r}" for t, r in refs.sort_index(ascending=False).items()))
    answer = verdicts.answer(mine, t["trend"], family=t["family"], metric=metric)
    return lines, list(answer.values())


def _answer_text(t: dict, metrics) -> str:
    """``answer.json``'s text from :func:`_answer_tables`: per metric, the notes and the answer's sentences."""
    return json.dumps({m: dict(zip(("notes", "answer"), _said(t, m))) for m in metrics}, indent=1) + "\n"


def write_answer(tables: Path, metrics) -> None:
    """``answer.json`` from a tables directory's CSV files (what the report page leads with)."""
    files.write_text(tables / ANSWER, _answer_text(_answer_tables(tables), metrics))
