"""One self-contained HTML page per sweep: ``goldenpath report SWEEP_DIR`` -> ``SWEEP_DIR/report.html``.

The page leads with the answer (one sentence per regime, from ``goldenpath.compare.conclusions``), then the
setting x setting ratio matrices, the ratios against the reference and compute to target; then the runs,
loss curves (online and offline, against samples and steps), error against loss, distances against loss,
the run x run heatmaps, and warnings (runs that stalled, diverged or failed).
Figures are embedded as base64 PNG and the style is inline: the file opens with no network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd

from goldenpath import checkpoints as ckpt
from goldenpath.config import load_config


def sweep_curves(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run and evaluation: run, step, samples, tokens, eval_loss, eval_error and the run's knobs."""
    rows = []
    for run_dir in sorted(p.parent for p in Path(sweep_dir).glob("*/metrics.jsonl")):
        if not (run_dir / "config.yaml").exists():
            continue
        c = load_config(run_dir / "config.yaml")
        knobs = {"lr": c.optim.lr, "batch": c.optim.batch_size, "seed": c.seed,
                 "sigma": c.injected_sigma, "regime": c.regime, "fork": c.fork.parent is not None}
        for r in ckpt.read_metrics(run_dir):
            if "eval_loss" in r:
                rows.append({"run": run_dir.name, "step": r["step"], "samples": r["samples"],
                             "tokens": r.get("tokens", 0), "eval_loss": r["eval_loss"],
                             "eval_error": r.get("eval_error"), **knobs})
    return pd.DataFrame(rows)


def _png(draw, size=(6.5, 4.0)) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>' \
           f"{html.escape(alt)}</figcaption></figure>"


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", na_rep="")


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}figure{display:inline-block;margin:.5em}figcaption{font-size:12px;color:#555}
img{max-width:600px}.warn{color:#a40000}pre{background:#f7f7f7;padding:.5em;font-size:12px}"""


def write_report(sweep_dir: str | Path, *, metric: str = "tv") -> Path:
    """Write ``report.html`` (running ``compare`` first when its tables are missing); returns its path.

    The page leads with the answer (one sentence per regime), then the setting x setting ratio matrices,
    the ratios against the reference, compute to target, then runs, curves, distances and warnings.
    """
    from goldenpath import figures, plots
    from goldenpath.compare import compare, conclusions

    sweep_dir = Path(sweep_dir)
    curves = sweep_curves(sweep_dir)
    if curves.empty:
        raise ValueError(f"{sweep_dir} holds no runs with metrics; run a sweep first")
    configs = {r: load_config(sweep_dir / r / "config.yaml") for r in curves.run.unique()}
    first = next(iter(configs.values()))
    statuses = {r: ckpt.read_json(sweep_dir / r / "status.json") for r in configs
                if (sweep_dir / r / "status.json").exists()}
    floor = next((s.get("loss_floor") for s in statuses.values() if s.get("loss_floor") is not None), None)
    targets = first.checkpoint.targets
    parts = [f"<h1>goldenpath sweep: {html.escape(sweep_dir.name)}</h1>"]
    warnings = [f"run {r}: {s.get('state')} ({s.get('reason')})" for r, s in statuses.items()
                if s.get("state") not in ("completed", None)]
    tables = sweep_dir / "compare"
    try:
        if not (tables / "summary.csv").exists():
            compare(sweep_dir)
        frame = pd.read_parquet(tables / "distances.parquet")
        summary, settings = pd.read_csv(tables / "summary.csv"), _read(tables / "settings.csv")
        compute = _read(tables / "compute.csv")
        said = conclusions(sweep_dir, metric=metric)
    except Exception as e:  # noqa: BLE001 - a sweep with no loss-matched pairs still gets its page
        frame, summary, settings, compute, said = pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), []
        warnings.append(f"no distances: {e}")

    # the answer
    parts += ["<h2>The answer</h2>", "".join(f"<p><b>{html.escape(line)}</b></p>" for line in said)
              or "<p>no loss-matched comparison</p>",
              f"<p>Ratio = mean {metric} distance between the seeds of a setting and of the reference / the pooled "
              "seed floor of both; 95% intervals from a hierarchical bootstrap (seeds within settings, then probe "
              "units); p from reassigning seeds between the two (Holm-adjusted within a target and regime).</p>"]
    if len(settings):
        parts.append("<h2>Setting x setting ratios</h2>")
        order = list(dict.fromkeys(summary.setting))
        for target, part in settings[settings.metric == metric].groupby("target", sort=False):
            ref = summary[(summary.target == target) & (summary.metric == metric)].reference.iloc[0]
            n = len(set(part.setting_a) | set(part.setting_b))
            parts.append(_img(_png(lambda ax, p=part, r=ref: plots.ratio_matrix(p, order=order, reference=r, ax=ax),
                                   size=figures.matrix_size(n)), f"{metric} ratios between settings at loss {target:g}"))
    if len(summary):
        cols = ["target", "regime", "setting", "n_seeds", "reference", "n_ref_seeds", "d_cross", "d_floor", "ratio",
                "ci_low", "ci_high", "p_value", "p_holm"]
        parts += ["<h2>Against the reference</h2>", _table(summary[summary.metric == metric][cols])]
    if len(compute):
        parts += ["<h2>Compute to target</h2>",
                  _img(_png(lambda ax: plots.compute_to_target(compute, ax=ax), size=(7, 4.5)),
                       "optimizer steps to reach each target"), _table(compute)]

    # runs
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
    sweep_yaml = sweep_dir / "sweep.yaml"
    parts += ["<h2>Runs</h2>", _table(runs[cols])]
    if sweep_yaml.exists():
        parts.append(f"<pre>{html.escape(sweep_yaml.read_text())}</pre>")

    # curves
    hue = "lr" if curves.lr.nunique() > 1 else "batch" if curves.batch.nunique() > 1 else "sigma"
    figs = []
    for x in ("samples", "steps"):
        for regime in ("online", "offline"):
            sub = curves[curves.regime == regime]
            if len(sub):
                figs.append(_img(_png(lambda ax, s=sub, x=x: plots.loss_curves(
                    s, x="step" if x == "steps" else x, hue=hue, floor=floor, targets=targets, ax=ax)),
                    f"eval loss against {x}, {regime}"))
    parts += ["<h2>Loss curves</h2>", *figs]
    if curves.eval_error.notna().any():
        parts += ["<h2>Error against loss</h2>",
                  _img(_png(lambda ax: plots.error_vs_loss(curves.dropna(subset=["eval_error"]), hue=hue, ax=ax)),
                       "eval error against eval loss, one curve per run")]
    if len(frame):
        regimes = {r: c.regime for r, c in configs.items()}
        parts += ["<h2>Distances against loss</h2>",
                  _img(_png(lambda ax: plots.distance_vs_loss(frame, metric=metric, regimes=regimes, ax=ax)),
                       f"{metric}: distance to the reference's seeds and the seed floor, by loss target")]
        order = plots.run_order(configs)
        heat = []
        for target, part in frame[frame.metric == metric].groupby("target"):
            n = len(set(part.run_a) | set(part.run_b))
            heat.append(_img(_png(lambda ax, p=part: plots.distance_heatmap(p, order=order, ax=ax),
                                  size=figures.matrix_size(n)), f"{metric} between runs at loss {target:g}"))
        parts += ["<h2>Run x run distances</h2>", *heat]
    parts += ["<h2>Warnings</h2>",
              "<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>"
              if warnings else "<p>none</p>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>goldenpath: {html.escape(sweep_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = sweep_dir / "report.html"
    ckpt.write_text(path, page)
    return path


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()
