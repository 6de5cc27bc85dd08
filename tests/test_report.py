"""Plots checked by the data they draw; the report page from a real small sweep, rendered headless."""

from __future__ import annotations

import re
import shutil
import subprocess

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from goldenpath.plots import distance_vs_loss, error_vs_loss, loss_curves, tail_index_by_layer, toys_metric  # noqa: E402

from .test_sweep import write_sweep  # noqa: E402


def curves():
    rows = []
    for run, lr, regime, losses in (("a", 0.1, "online", [2.3, 2.0, 1.8]), ("b", 0.2, "offline", [2.3, 2.1, 1.9])):
        for k, loss in enumerate(losses):
            rows.append({"run": run, "step": 10 * k, "samples": 320 * k, "tokens": 0, "eval_loss": loss,
                         "eval_error": 0.9 - 0.1 * k, "lr": lr, "regime": regime})
    return pd.DataFrame(rows)


def test_loss_curves_draw_each_run_with_floor_and_targets():
    ax = loss_curves(curves(), x="samples", hue="lr", floor=1.5, targets=(2.0, 1.9))
    runs = [line for line in ax.lines if line.get_label() in ("a", "b")]
    assert len(runs) == 2
    a = next(line for line in runs if line.get_label() == "a")
    np.testing.assert_allclose(a.get_ydata(), [2.3, 2.0, 1.8])
    np.testing.assert_allclose(a.get_xdata(), [1, 320, 640])  # samples 0 drawn at 1 on the log axis
    b = next(line for line in runs if line.get_label() == "b")
    assert a.get_linestyle() == "-" and b.get_linestyle() == "--" and a.get_color() != b.get_color()
    flat = [line for line in ax.lines if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2]
    assert sorted({float(line.get_ydata()[0]) for line in flat}) == [1.5, 1.9, 2.0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "samples seen"


def test_error_vs_loss_plots_error_against_loss_per_run():
    ax = error_vs_loss(curves(), hue="lr")
    a = next(line for line in ax.lines if line.get_label() == "a")
    np.testing.assert_allclose(a.get_xdata(), [2.3, 2.0, 1.8])
    np.testing.assert_allclose(a.get_ydata(), [0.9, 0.8, 0.7])


def test_distance_vs_loss_averages_pairs_per_kind_regime_and_target():
    rows = [dict(target=t, run_a="r", run_b=b, metric="tv", value=v, ci_low=v - 0.01, ci_high=v + 0.01, kind=k)
            for t, b, v, k in ((2.0, "x", 0.2, "reference"), (2.0, "y", 0.4, "reference"), (1.9, "x", 0.3, "reference"),
                               (2.0, "z", 0.1, "floor"), (1.9, "z", 0.15, "floor"))]
    ax = distance_vs_loss(pd.DataFrame(rows), metric="tv", regimes={"x": "online", "y": "online", "z": "online"})
    ref = next(line for line in ax.lines if "reference" in line.get_label())
    np.testing.assert_allclose(ref.get_xdata(), [2.0, 1.9])
    np.testing.assert_allclose(ref.get_ydata(), [0.3, 0.3])  # mean of 0.2 and 0.4 at 2.0
    floor = next(line for line in ax.lines if "floor" in line.get_label())
    np.testing.assert_allclose(floor.get_ydata(), [0.1, 0.15])


def test_tail_index_bars_and_toys_metric_draw_their_values():
    table = pd.DataFrame([dict(layer=l, statistic=s, value=v, ci_low=v - 0.1, ci_high=v + 0.1)
                          for l, s, v in (("all", "tail_index_pooled", 1.3), ("all", "tail_index_per_coordinate_median", 1.9),
                                          ("fc", "tail_index_pooled", 1.5), ("fc", "tail_index_per_coordinate_median", 1.8))])
    ax = tail_index_by_layer(table)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [1.3, 1.5, 1.8, 1.9]
    frame = pd.DataFrame([dict(sigma=s, batch=10, seed=k, alpha_eff=a) for s, vals in ((0.0, [0.5, 0.5]), (1.0, [0.2, 0.4]))
                          for k, a in enumerate(vals)])
    ax = toys_metric(frame, metric="alpha_eff")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.3])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from goldenpath.report import write_report
    from goldenpath.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("report")
    path = write_sweep(tmp, "grid: {optim.lr: [0.05, 0.1, 1000.0]}\nseeds: [0, 1]\n")
    sweep_dir = run_sweep(path, jobs=2, progress=False)
    return write_report(sweep_dir)


def test_report_has_every_section_and_needs_no_network(report):
    page = report.read_text()
    sections = ["The answer", "Setting x setting ratios", "Against the reference", "Compute to target", "Runs",
                "Loss curves", "Error against loss", "Distances against loss", "Run x run distances", "Warnings"]
    at = [page.find(f"<h2>{s}</h2>") for s in sections]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(sections, at))  # all there, the answer first
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "diverged" in page  # the lr=1000 runs diverge, and the page says so
    targets = pd.read_parquet(report.parent / "compare" / "distances.parquet").target.nunique()
    settings = pd.read_csv(report.parent / "compare" / "settings.csv")
    matrices = settings[settings.metric == "tv"].target.nunique()
    # ratio matrices, compute, loss curves (samples, steps), error, distances, run heatmaps
    assert page.count("<img") == matrices + 1 + 2 + 1 + 1 + targets


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert shot.exists(), run.stderr[-2000:]
    assert "Failed to load resource" not in run.stderr and "net::ERR" not in run.stderr
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and figures, not a blank page
