"""One self-contained HTML page per sweep: ``goldenpath report SWEEP_DIR`` -> ``SWEEP_DIR/report.html``.

The page names the reference setting, leads with the answer (one sentence per regime, from the
``answer.json`` compare wrote), then one section per metric that ``compare`` measured: the setting x
setting ratio matrices (one panel per target, one colour scale), the ratios against the reference, the
distances against loss and, folded, the run x run heatmaps. Then compute to target, loss curves and error
against loss per setting (mean and min-max over seeds), the runs, and warnings (runs that stalled, diverged
or failed). Figures are embedded as base64 PNG and the style is inline: the file opens with no network.

The page only reads: the runs' directories and the tables of ``compare/`` (:mod:`goldenpath.store.tables`);
a table it needs and does not find is named under the warnings. (The ``goldenpath report`` verb compares
again first the tables whose runs changed since compare wrote them.) Each ``compare-<shift>/`` (``compare
--probe-shift``) gets its own sections after the metrics.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from goldenpath.config import load_config
from goldenpath.store import files, rundir as ckpt
from goldenpath.store.tables import COMPARE, missing, read_tables, shift_of, shifted_dirs
from goldenpath.config.identity import NOISE_KNOBS
from goldenpath.draw.curves import error_by_loss, seed_bands, sweep_curves

METRIC_NAMES = {"tv": "total variation", "kl": "symmetrised KL divergence", "js": "Jensen-Shannon divergence",
                "top1": "top-1 disagreement", "cka": "1 - linear CKA of the penultimate features",
                "lmc": "loss barrier on the linear path between the weights"}
DPI = 100  # one figure inch is 100 CSS pixels: figures are drawn at the size they are shown


def _png(draw, size=(6.5, 4.0), *, panels: int = 1) -> str:
    import matplotlib.pyplot as plt

    from goldenpath.draw.figures import figure

    return _encode(figure(draw, size, panels=panels), plt)


def _encode(fig, plt=None) -> str:
    if plt is None:
        import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str, alt: str, kind: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" data-figure="{kind}" src="data:image/png;base64,{data}">' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _table(frame: pd.DataFrame) -> str:
    """An HTML table without the columns that are empty in every row (epsilon without DP, say)."""
    empty = [c for c in frame.columns if frame[c].isna().all() or (frame[c].astype(str).str.strip() == "").all()]
    body = frame.drop(columns=empty).to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="")
    return f'<div class="table">{body}</div>'


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1220px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}.table{overflow-x:auto;max-height:32em;overflow-y:auto}
figure{margin:.8em 0}figcaption{font-size:12px;color:#555}img{display:block;max-width:100%;height:auto}
.warn{color:#a40000}pre{background:#f7f7f7;padding:.5em;font-size:12px;white-space:pre-wrap}
.ref{font-size:15px;background:#eef4fb;border-left:4px solid #1f77b4;padding:.4em .8em}
nav a{margin-right:.8em}section.metric{border-top:2px solid #ccc;margin-top:1.5em}h3{font-size:1.35em}
details{margin:.8em 0}summary{cursor:pointer;font-weight:600}"""


def _metrics(t: dict, lead: str) -> list[str]:
    """The metrics of a tables directory in the order compare measured them, ``lead`` first when measured."""
    metrics = list(dict.fromkeys([*t["distances"].metric, *t["summary"].metric]))
    return sorted(metrics, key=lambda m: m != lead)


def _compared(sweep_dir: Path, metric: str, warnings: list[str]) -> tuple[dict, list[str], list[str]]:
    """The ``compare/`` tables, the metrics in the order compare measured them, and the notes and answer for the
    first metric (``metric`` when it was measured); a missing table is named in ``warnings``."""
    tables = sweep_dir / COMPARE
    lacking = missing(tables)
    if lacking:
        warnings.append(f"no distances: {COMPARE}/{lacking} is missing; run goldenpath compare {sweep_dir}")
        return {"summary": pd.DataFrame(), "compute": pd.DataFrame()}, [], []
    t = read_tables(tables)
    metrics = _metrics(t, metric)
    said = t["answer"].get(metrics[0], {}) if metrics else {}
    return t, metrics, said.get("notes", []) + said.get("answer", [])


def _shifted(sweep_dir: Path, metric: str, warnings: list[str]) -> list[tuple[tuple[str, str], dict, list[str]]]:
    """((the shift, its slug), its tables, its metrics) of each ``compare-<slug>/``."""
    out = []
    for tables in shifted_dirs(sweep_dir):
        lacking = missing(tables)
        if lacking:
            warnings.append(f"no shifted-probe distances: {tables.name}/{lacking} is missing; run goldenpath "
                            f"compare --probe-shift again")
            continue
        slug = tables.name.removeprefix(f"{COMPARE}-")
        t = read_tables(tables)
        out.append(((shift_of(tables) or slug, slug), t, _metrics(t, metric)))
    return out


def _reference_line(summary: pd.DataFrame, metric: str) -> str:
    part = summary[summary.metric == metric] if len(summary) else summary
    if not len(part):
        return ""
    names = []
    for regime in ("online", "offline"):
        rows = part[part.regime == regime]
        if len(rows):
            refs = sorted(set(rows.reference))
            seeds = rows[rows.setting.isin(refs)].n_ref_seeds
            n = "" if not len(seeds) else f" ({seeds.min()}" + ("" if seeds.min() == seeds.max() else
                                                              f"-{seeds.max()}") + " seeds)"
            names.append(f"{regime}: " + ", ".join(f"<b>{html.escape(r)}</b>" for r in refs) + n)
    return (f'<p class="ref">Reference settings, the least-noisy setting of each regime with two seeds or more '
            f"at the target: {'; '.join(names)}. Every ratio on this page compares a setting's seeds with its "
            "regime's reference, over the seed floor of both.</p>")


def _metric_section(metric: str, t: dict, configs: dict, *, first: bool, heatmaps: bool,
                    shift: tuple[str, str] | None = None) -> str:
    """One metric: its answer, ratio matrices (one panel per target), the ratios against the reference, its
    distances against loss and, folded, the run x run heatmaps (with ``heatmaps``: they are the slow ones).
    ``shift``: (the shift, its directory's slug) when the tables come from a shifted probe set."""
    from goldenpath.draw import figures, plots

    summary, settings = t["summary"], t["settings"]
    name = f"{metric}: {METRIC_NAMES.get(metric, metric)}" + (f", probe shifted by {shift[0]}" if shift else "")
    anchor = f"metric-{metric}" if shift is None else f"shift-{shift[1]}-{metric}"
    parts = [f'<section class="metric" id="{anchor}"><h3>{html.escape(name)}</h3>']
    if not first:
        parts += [f"<p><b>{html.escape(line)}</b></p>" for line in t["answer"].get(metric, {}).get("answer", [])]
    part = settings[settings.metric == metric] if len(settings) else settings
    mine = summary[summary.metric == metric]
    if len(part):
        fig = figures.ratio_grid(part, order=figures.setting_order(summary, metric),
                                 refs=figures.references(summary, metric))
        parts += [f"<h4>{metric}: setting x setting ratios</h4>",
                  _img(_encode(fig), f"{metric} golden-path ratios between settings, one panel per loss target "
                                     "(highest first), one colour scale", "ratios")]
    if len(mine):
        rows = mine[mine.setting != mine.reference].drop(columns=["metric"])
        if rows.reference.nunique() == 1:
            rows = rows.drop(columns=["reference", "n_ref_seeds"])
        parts += [f"<h4>{metric}: against the reference</h4>", _table(rows)]
    frame = t["distances"][t["distances"].metric == metric]
    regimes = {r: c.regime for r, c in configs.items()}
    if len(frame):
        parts += [f"<h4>{metric}: distances against loss</h4>", _img(_png(lambda ax: plots.distance_vs_loss(
            frame, metric=metric, regimes=regimes, ax=ax)), f"{metric}: distance to the reference's seeds and the "
                                                            "seed floor, by loss target", "distance-vs-loss")]
    if len(frame) and heatmaps:
        present = set(frame.run_a) | set(frame.run_b)
        order = figures.heatmap_order(configs, present, regimes)
        vmin, vmax = figures.value_limits(frame.value)
        refs = figures.references(summary, metric)
        heat = [_img(_png(lambda ax, p=p, tg=tg: plots.distance_heatmap(
            p, order=order, reference=refs.get(tg), regimes=regimes, vmin=vmin, vmax=vmax, ax=ax),
            size=figures.matrix_size(len(order), cell=0.3)), f"{metric} between runs at loss {tg:g}", "heatmap")
            for tg, p in sorted(frame.groupby("target"), key=lambda kv: -kv[0])]
        parts.append(f"<details><summary>Run x run distances: {len(order)} runs, one matrix per loss target "
                     f"(highest first), one colour scale</summary>{''.join(heat)}</details>")
    elif len(frame) and shift is None:
        parts.append("<p>Run x run distances: drawn for the lead metric only "
                     "(<code>write_report(..., heatmap_metrics=...)</code> draws others).</p>")
    return "".join(parts) + "</section>"


def _curve_sections(curves: pd.DataFrame, *, floor, targets) -> list[str]:
    """Loss curves against samples and steps and error against loss: per setting, mean and min-max over
    seeds, one panel per regime, coloured by the first knob that varies and dashed by the second."""
    from goldenpath.draw import plots

    varying = [k for k in NOISE_KNOBS if curves[k].nunique() > 1] + ["lr"]
    hue, style = varying[0], (varying[1] if len(varying) > 2 else None)
    regimes = [r for r in ("online", "offline") if (curves.regime == r).any()]

    def panels(table, draw, what):
        def on(axes):
            for k, (ax, regime) in enumerate(zip(np.atleast_1d(axes), regimes)):
                # one colour and dash per knob value in every panel: the legend is drawn on the first only
                draw(table[table.regime == regime], ax=ax, legend=k == 0, palette_rows=table)
                ax.set_title(regime)
        return _img(_png(on, size=(5.6 * len(regimes), 4.2), panels=len(regimes)), what, "curves")

    parts = ['<a id="curves"></a><h2>Loss curves</h2>']
    for x, unit in (("samples", "samples"), ("step", "steps")):
        parts.append(panels(seed_bands(curves, x=x), lambda p, **kw: plots.loss_bands(
            p, x=x, hue=hue, style=style, floor=floor, targets=targets, **kw),
            f"eval loss against {unit} per setting: mean over seeds, band min-max"))
    bins = error_by_loss(curves) if curves.eval_error.notna().any() else pd.DataFrame()
    if len(bins):
        parts += ['<a id="error"></a><h2>Error against loss</h2>', panels(bins, lambda p, **kw: plots.error_bands(
            p, hue=hue, style=style, **kw), "eval error against eval loss per setting, binned by loss: mean over "
                                            "seeds, band min-max")]
    return parts


def _runs_section(sweep_dir: Path, statuses: dict, warnings: list[str]) -> list[str]:
    runs_csv = sweep_dir / "runs.csv"
    runs = pd.read_csv(runs_csv) if runs_csv.exists() else pd.DataFrame(
        [{"run": r, "state": s.get("state"), "step": s.get("step"), "samples": s.get("samples"),
          "eval_loss": s.get("eval_loss"), "epsilon": s.get("epsilon"),
          "targets_reached": ";".join(s.get("targets_reached") or {})} for r, s in statuses.items()])
    if "state" in runs.columns:
        warnings += [f"run {r.run}: {r.state} ({r.reason})" for r in runs.itertuples()
                     if r.state in ("skipped", "failed", "pending") and r.run not in statuses]
    cols = [c for c in ("run", "state", "step", "samples", "eval_loss", "best_eval_loss", "epsilon", "targets_reached")
            if c in runs.columns]
    parts = ['<a id="runs"></a><h2>Runs</h2>', _table(runs[cols])]
    if (sweep_dir / "sweep.yaml").exists():
        parts.append(f"<pre>{html.escape((sweep_dir / 'sweep.yaml').read_text())}</pre>")
    return parts


def _lead(sweep_dir: Path, summary: pd.DataFrame, metrics: list[str], links: list, said: list[str]) -> list[str]:
    """The page's head: its title, the reference, the links to its sections and the answer."""
    return [f"<h1>goldenpath sweep: {html.escape(sweep_dir.name)}</h1>",
            _reference_line(summary, metrics[0]) if metrics else "",
            "<nav>" + "".join(f'<a href="#{a}">{html.escape(b)}</a>' for a, b in links) + "</nav>",
            "<h2>The answer</h2>", f"<p>From the {metrics[0]} ratios:</p>" if metrics else "",
            "".join(f"<p><b>{html.escape(line)}</b></p>" for line in said) or "<p>no loss-matched comparison</p>",
            "<p>Ratio = mean distance between the seeds of a setting and of the reference (of its regime) / the "
            "pooled seed floor of both; spread = the setting's own seed floor / the reference's; location = the same "
            "ratio in the squared distance between predicted distributions, 1 + the distance between the two mean "
            "functions over their spread. 95% intervals over seeds (the probe set held fixed); p from reassigning "
            "seeds between settings, adjusted over the verdict's family (every setting of the regime at every "
            "non-trivial target: min-P within a target, Bonferroni over targets).</p>"]


def _distance_sections(t: dict, metrics: list[str], shifted: list, configs: dict, heat: list[str], bar) -> list[str]:
    """One section per metric, then each shifted probe set's, each counted on ``bar`` as it is drawn."""
    parts = []
    if metrics:
        parts += ["<h2>Setting x setting ratios</h2>", f"<p>One section per metric ({', '.join(metrics)}): the "
                  "ratio matrices, the ratios against the reference and the distances against loss.</p>"]
    for k, m in enumerate(metrics):
        parts.append(_metric_section(m, t, configs, first=k == 0, heatmaps=m in heat))
        bar.update()
    for shift, shifted_tables, shifted_metrics in shifted:
        parts += [f'<a id="shift-{shift[1]}"></a><h2>Probe shifted by {html.escape(shift[0])}</h2>',
                  f"<p>The same comparison on a probe set moved off the training distribution (<code>goldenpath "
                  f"compare --probe-shift {html.escape(shift[0])}</code>, tables under <code>compare-{shift[1]}/"
                  "</code>): the same checkpoints, other inputs.</p>"]
        for m in shifted_metrics:
            parts.append(_metric_section(m, shifted_tables, configs, first=False, heatmaps=False, shift=shift))
            bar.update()
    return parts


def write_report(sweep_dir: str | Path, *, metric: str = "tv", heatmap_metrics=None, warnings=()) -> Path:
    """Write ``report.html`` from the sweep's runs and the tables compare wrote; returns its path.

    The page names the reference and leads with the answer for ``metric`` (else the first metric measured),
    then one section per metric, the shifted probe sets (``compare-<shift>/``), compute to target, loss
    curves, error against loss, runs and warnings (``warnings``: the caller's, first; a missing table is
    named there); a progress bar counts the sections as they are drawn. ``heatmap_metrics``: the metrics that
    get run x run matrices (default: the lead metric; a 40-run matrix takes seconds to draw), e.g.
    ``("tv", "kl")``.
    """
    from goldenpath.draw import plots

    sweep_dir = Path(sweep_dir)
    curves = sweep_curves(sweep_dir)
    if curves.empty:
        raise ValueError(f"{sweep_dir} holds no runs with metrics; run a sweep first")
    runs = {r: ckpt.RunDir(sweep_dir / r) for r in curves.run.unique()}
    configs = {r: load_config(run.config) for r, run in runs.items()}
    statuses = {r: run.status() for r, run in runs.items() if run.status_file.exists()}
    floor = next((s.get("loss_floor") for s in statuses.values() if s.get("loss_floor") is not None), None)
    warnings = [*warnings, *(f"run {r}: {s.get('state')} ({s.get('reason')})" for r, s in statuses.items()
                             if s.get("state") not in ("completed", None))]
    t, metrics, said = _compared(sweep_dir, metric, warnings)
    shifted = _shifted(sweep_dir, metrics[0] if metrics else metric, warnings)
    links = [(f"metric-{m}", m) for m in metrics] + [(f"shift-{slug}", f"probe {shift}")
                                                     for (shift, slug), _, _ in shifted]
    links += [("compute", "compute"), ("curves", "loss curves"), ("error", "error against loss"), ("runs", "runs"),
              ("warnings", "warnings")]
    bar = tqdm(total=len(metrics) + sum(len(ms) for _, _, ms in shifted) + 2, desc=f"report {sweep_dir.name}",
               unit="section", disable=None)
    parts = _lead(sweep_dir, t["summary"], metrics, links, said)
    heat = metrics[:1] if heatmap_metrics is None else list(heatmap_metrics)
    parts += _distance_sections(t, metrics, shifted, configs, heat, bar)
    compute = t["compute"]
    if len(compute):
        parts += ['<a id="compute"></a><h2>Compute to target</h2>',
                  _img(_png(lambda ax: plots.compute_to_target(compute, ax=ax), size=(8, 4.5)),
                       "optimizer steps to reach each target", "compute"), _table(compute)]
    bar.update()
    parts += _curve_sections(curves, floor=floor, targets=configs[next(iter(configs))].checkpoint.targets)
    bar.update()
    bar.close()
    parts += _runs_section(sweep_dir, statuses, warnings)
    parts += ['<a id="warnings"></a><h2>Warnings</h2>',
              "<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>"
              if warnings else "<p>none</p>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>goldenpath: {html.escape(sweep_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = sweep_dir / "report.html"
    files.write_text(path, page)
    return path
