"""One self-contained HTML page per sweep: ``goldenpath report SWEEP_DIR`` -> ``SWEEP_DIR/report.html``.

The page holds the sweep's knobs, a runs table, loss curves (online and offline side by side, against
samples and steps), error against loss, distances against loss, the heatmaps, the golden-path ratios per
target, and warnings (runs that diverged or failed, checkpoints past their target, missing seed floors).
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


def _runs(names) -> str:
    """'1 run (a) has' / '2 runs (a, b) have'."""
    names = sorted(names)
    return f"{len(names)} run{'s' if len(names) != 1 else ''} ({', '.join(names)}) ha{'ve' if len(names) != 1 else 's'}"


def write_report(sweep_dir: str | Path, *, metric: str = "tv") -> Path:
    """Write ``report.html`` (running ``compare`` first when its results are missing); returns its path."""
    from goldenpath.compare import compare
    from goldenpath.plots import distance_heatmap, distance_vs_loss, error_vs_loss, loss_curves, run_order

    sweep_dir = Path(sweep_dir)
    curves = sweep_curves(sweep_dir)
    if curves.empty:
        raise ValueError(f"{sweep_dir} holds no runs with metrics; run a sweep first")
    configs = {r: load_config(sweep_dir / r / "config.yaml") for r in curves.run.unique()}
    first = next(iter(configs.values()))
    statuses = {r: ckpt.read_json(sweep_dir / r / "status.json") for r in configs if (sweep_dir / r / "status.json").exists()}
    floor = next((s.get("loss_floor") for s in statuses.values() if s.get("loss_floor") is not None), None)
    targets = first.checkpoint.targets
    parts = [f"<h1>goldenpath sweep: {html.escape(sweep_dir.name)}</h1>"]

    # knobs
    sweep_yaml = sweep_dir / "sweep.yaml"
    knob_cols = ["lr", "batch", "sigma", "regime", "seed"]
    varied = {k: sorted(curves[k].unique().tolist()) for k in knob_cols}
    parts += ["<h2>Knobs</h2>", "<p>" + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in varied.items()) + "</p>"]
    if sweep_yaml.exists():
        parts.append(f"<pre>{html.escape(sweep_yaml.read_text())}</pre>")

    # runs
    runs_csv = sweep_dir / "runs.csv"
    runs = pd.read_csv(runs_csv) if runs_csv.exists() else pd.DataFrame(
        [{"run": r, "state": s.get("state"), "step": s.get("step"), "samples": s.get("samples"),
          "eval_loss": s.get("eval_loss"), "epsilon": s.get("epsilon"),
          "targets_reached": ";".join(s.get("targets_reached") or {})} for r, s in statuses.items()])
    cols = [c for c in ("run", "state", "step", "samples", "eval_loss", "best_eval_loss", "epsilon", "targets_reached")
            if c in runs.columns]
    parts += ["<h2>Runs</h2>", _table(runs[cols])]

    # curves
    hue = "lr" if curves.lr.nunique() > 1 else "batch" if curves.batch.nunique() > 1 else "sigma"
    figs = []
    for x in ("samples", "steps"):
        for regime in ("online", "offline"):
            sub = curves[curves.regime == regime]
            if len(sub):
                figs.append(_img(_png(lambda ax, s=sub, x=x: loss_curves(s, x="step" if x == "steps" else x, hue=hue,
                                                                         floor=floor, targets=targets, ax=ax)),
                                 f"eval loss against {x}, {regime}"))
    parts += ["<h2>Loss curves</h2>", *figs]
    if curves.eval_error.notna().any():
        parts += ["<h2>Error against loss</h2>",
                  _img(_png(lambda ax: error_vs_loss(curves.dropna(subset=["eval_error"]), hue=hue, ax=ax)),
                       "eval error against eval loss, one curve per run")]

    # distances
    warnings = [f"run {r}: {s.get('state')} ({s.get('reason')})" for r, s in statuses.items()
                if s.get("state") not in ("completed", None)]
    if "state" in runs.columns:
        warnings += [f"run {r.run}: {r.state} ({r.reason})" for r in runs.itertuples()
                     if r.state in ("skipped", "failed", "pending") and r.run not in statuses]
    distances_path = sweep_dir / "compare" / "distances.parquet"
    try:
        frame = pd.read_parquet(distances_path) if distances_path.exists() else compare(sweep_dir)
    except Exception as e:  # noqa: BLE001 - a sweep with no loss-matched pairs still gets its page
        frame = pd.DataFrame()
        warnings.append(f"no distances: {e}")
    if len(frame):
        regimes = {r: c.regime for r, c in configs.items()}
        parts += ["<h2>Distances against loss</h2>",
                  _img(_png(lambda ax: distance_vs_loss(frame, metric=metric, regimes=regimes, ax=ax)),
                       f"{metric}: distance to the reference run and the seed floor, by loss target")]
        order = run_order(configs)
        heat = []
        for target, part in frame[frame.metric == metric].groupby("target"):
            n = len(set(part.run_a) | set(part.run_b))
            heat.append(_img(_png(lambda ax, p=part: distance_heatmap(p, order=order, ax=ax),
                                  size=(2.5 + 0.45 * n, 2 + 0.4 * n)), f"{metric} between runs at loss {target:g}"))
        parts += ["<h2>Heatmaps</h2>", *heat]
        flagged = frame.drop_duplicates(["target", "run_a", "run_b"])
        for target, part in flagged[flagged.flagged].groupby("target"):
            over = sorted({run for side in "ab" for run, o in zip(part[f"run_{side}"], part[f"overshoot_{side}"])
                           if o > 0.02 * target})
            warnings.append(f"loss {target:g}: {len(part)} pairs include a checkpoint more than 2% below its target: "
                            + ", ".join(f"{r}/checkpoints/target-{target:g}" for r in over))
    summary_path = sweep_dir / "compare" / "summary.csv"
    parts.append("<h2>Golden-path ratios</h2>")
    if summary_path.exists():
        summary = pd.read_csv(summary_path)
        summary = summary[summary.metric == metric]
        summary["regime"] = [configs[r].regime if r in configs else "?"
                             for r in summary.run]
        table = summary.dropna(subset=["ratio"]).groupby(["target", "regime"]).agg(
            runs=("run", "count"), median_ratio=("ratio", "median"), median_ci_low=("ci_low", "median"),
            median_ci_high=("ci_high", "median")).reset_index().sort_values(["target", "regime"], ascending=[False, True])
        parts += [f"<p>d(run, reference) / d(seed floor), {metric}; near 1 online and above 1 offline is what the "
                  "golden-path hypothesis predicts.</p>", _table(table),
                  "<details><summary>every run</summary>", _table(summary), "</details>"]
        borrowed = summary[summary.floor_from == "reference's seeds"].run.unique()
        if len(borrowed):
            warnings.append(f"{_runs(borrowed)} no seed sibling; the ratio uses the reference's seed floor")
        missing = summary[summary.floor_from.isna()].run.unique()
        if len(missing):
            warnings.append(f"{_runs(missing)} no seed floor at all")
    else:
        parts.append("<p>no ratios (no loss-matched pairs)</p>")
    parts += ["<h2>Warnings</h2>",
              "<ul>" + "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>"
              if warnings else "<p>none</p>"]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>goldenpath: {html.escape(sweep_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = sweep_dir / "report.html"
    ckpt.write_text(path, page)
    return path
