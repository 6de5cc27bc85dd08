"""Plots checked by the data they draw; the report page from a real small sweep, rendered headless."""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from goldenpath.draw.plots import (distance_vs_loss, error_bands, loss_bands, loss_curves, ratio_matrix,  # noqa: E402
                              short_labels, tail_index_by_layer, toys_metric)
from goldenpath.draw.report import error_by_loss, seed_bands  # noqa: E402

from .conftest import write_sweep  # noqa: E402


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


def test_seed_bands_take_mean_min_and_max_over_seeds_in_log_x():
    rows = [{"run": f"lr=0.1_seed={s}", "step": k, "samples": x, "tokens": 0, "eval_loss": loss, "eval_error": 0.5,
             "lr": 0.1, "batch": 32, "sigma": 0.0, "regime": "online", "fork": False}
            for s, pts in ((0, [(0, 2.4), (10, 2.0), (1000, 1.6)]), (1, [(0, 2.4), (10, 2.2), (100, 2.0)]))
            for k, (x, loss) in enumerate(pts)]
    bands = seed_bands(pd.DataFrame(rows), x="samples", points=3)  # grid 10, 100, 1000
    assert bands.setting.unique().tolist() == ["lr=0.1"]
    np.testing.assert_allclose(bands.samples, [10, 100, 1000])
    np.testing.assert_allclose(bands["mean"], [2.1, (1.8 + 2.0) / 2, 1.6])  # seed 0 at 100: halfway in log x
    np.testing.assert_allclose(bands.low, [2.0, 1.8, 1.6])
    np.testing.assert_allclose(bands.high, [2.2, 2.0, 1.6])
    assert bands.n_seeds.tolist() == [2, 2, 1]  # seed 1 stopped at 100
    ax = loss_bands(bands, x="samples", hue="lr", style="batch", floor=1.4, targets=(2.0,))
    line = next(line for line in ax.lines if line.get_label() == "lr=0.1")
    np.testing.assert_allclose(line.get_ydata(), bands["mean"])


def test_panels_beside_each_other_give_a_knob_value_one_colour_and_dash():
    """The online panel has an extra lr (a fork), the offline one not: with the rows of both as the palette's,
    lr=0.05 and batch 64 look the same in both panels (each panel's own palette gave lr=0.05 offline the colour
    the online legend gives lr=0.025)."""
    import matplotlib.pyplot as plt

    rows = [{"setting": f"lr={lr}_bs={b}_{regime}", "samples": x, "mean": 2.0, "low": 1.9, "high": 2.1, "lr": lr,
             "batch": b, "regime": regime}
            for regime, lrs in (("online", (0.025, 0.05, 0.1)), ("offline", (0.05, 0.1)))
            for lr in lrs for b in (16, 64) for x in (10, 100)]
    table = pd.DataFrame(rows)
    looks = {}
    for draw in (loss_bands, lambda p, **kw: error_bands(p.assign(eval_loss=p.samples), **kw)):
        _, axes = plt.subplots(1, 2)
        for k, (ax, regime) in enumerate(zip(axes, ("online", "offline"))):
            draw(table[table.regime == regime], hue="lr", style="batch", legend=k == 0, palette_rows=table, ax=ax)
            for line in ax.lines:
                if line.get_label().endswith(regime):
                    lr, b = line.get_label().split("_")[:2]
                    looks.setdefault((lr, b), set()).add((line.get_color() if isinstance(line.get_color(), str)
                                                          else tuple(line.get_color()), str(line.get_linestyle())))
        plt.close("all")
    assert len(looks) == 6 and all(len(v) == 1 for v in looks.values()), looks
    assert len({next(iter(v)) for v in looks.values()}) == 6  # and the six settings look different


def test_error_by_loss_bins_each_seed_then_spans_the_seeds():
    rows = [{"run": f"bs=32_seed={s}", "step": k, "samples": k, "tokens": 0, "eval_loss": loss, "eval_error": err,
             "lr": 0.1, "batch": 32, "sigma": 0.0, "regime": "online", "fork": False}
            for s, pts in ((0, [(2.0, 0.8), (1.9, 0.7), (1.1, 0.3)]), (1, [(2.0, 0.6), (1.05, 0.1), (1.0, 0.2)]))
            for k, (loss, err) in enumerate(pts)]
    bins = error_by_loss(pd.DataFrame(rows), bins=2)  # edges 1.0, 1.5, 2.0
    top, bottom = bins.set_index("eval_loss").loc[1.75], bins.set_index("eval_loss").loc[1.25]
    assert (top["mean"], top.low, top.high) == pytest.approx(((0.75 + 0.6) / 2, 0.6, 0.75))  # seed 0: 0.8, 0.7
    assert (bottom["mean"], bottom.low, bottom.high) == pytest.approx(((0.3 + 0.15) / 2, 0.15, 0.3))
    ax = error_bands(bins, hue="lr", style="batch")
    line = next(line for line in ax.lines if line.get_label() == "bs=32")
    np.testing.assert_allclose(line.get_xdata(), [1.25, 1.75])
    assert ax.xaxis_inverted()


def test_ratio_matrix_keeps_the_order_leaves_the_diagonal_blank_and_marks_the_reference():
    rows = pd.DataFrame([dict(setting_a=a, setting_b=b, regime_a=ra, regime_b=rb, ratio=r, ci_low=r - 0.1,
                              p_value=p) for a, b, ra, rb, r, p in
                         (("lr=1_n=none", "lr=2_n=none", "online", "online", 1.5, 0.01),
                          ("lr=1_n=none", "lr=1_n=9", "online", "offline", 3.0, 0.2))])
    order = ["lr=1_n=none", "lr=2_n=none", "lr=1_n=9", "lr=3_n=9"]  # lr=3 was not compared: a blank row
    ax = ratio_matrix(rows, order=order, reference="lr=1_n=none", vmax=4.0)
    cells = np.ma.masked_invalid(np.ma.filled(ax.collections[0].get_array(), np.nan)).reshape(4, 4)
    assert cells.mask[np.diag_indices(4)].all() and cells.mask[3].all()
    assert cells[0, 1] == pytest.approx(1.5) and cells[2, 0] == pytest.approx(3.0)
    assert ax.collections[0].norm.vmin == pytest.approx(0.25) and ax.collections[0].norm.vmax == 4.0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lr=1 n=none", "lr=2 n=none", "lr=1 n=9", "lr=3 n=9"]
    assert ax.get_yticklabels()[0].get_fontweight() == "bold" and ax.get_yticklabels()[1].get_fontweight() != "bold"
    assert {t.get_text() for t in ax.texts} >= {"1.50*", "3.00", "online", "offline"}
    assert short_labels(["lr=1_n=none_seed=0", "lr=2_n=none_seed=1"]) == {"lr=1_n=none_seed=0": "lr=1 seed=0",
                                                                          "lr=2_n=none_seed=1": "lr=2 seed=1"}


def test_ratio_matrix_greys_out_single_seed_settings_and_keeps_them_off_the_colour_scale():
    from goldenpath.draw.figures import counted, ratio_limit
    from goldenpath.draw.matrices import SINGLE_SEED

    rows = pd.DataFrame([dict(setting_a=a, setting_b=b, n_a=na, n_b=nb, ratio=r, ci_low=r - 0.1, p_value=0.01)
                         for a, b, na, nb, r in (("ref", "two", 3, 2, 1.5), ("ref", "one", 3, 1, 6.0),
                                                 ("two", "one", 2, 1, 5.0))])
    order = ["ref", "two", "one"]
    ax = ratio_matrix(rows, order=order, reference="ref", vmax=ratio_limit(counted(rows).ratio))
    assert ax.collections[0].norm.vmax == pytest.approx(1.5)  # the 6.0 and 5.0 of one seed do not stretch it
    coloured = np.ma.getmaskarray(ax.collections[0].get_array()).reshape(3, 3)
    grey = ax.collections[1]
    assert grey.cmap(0.0)[:3] == pytest.approx((0.85, 0.85, 0.85)) and SINGLE_SEED == "0.85"
    greyed = ~np.ma.getmaskarray(grey.get_array()).reshape(3, 3)
    want = np.zeros((3, 3), dtype=bool)
    want[2, :2] = want[:2, 2] = True  # the row and column of "one", the diagonal blank
    assert (greyed == want).all() and (coloured[want]).all()
    assert {t.get_text() for t in ax.texts} >= {"1.50*", "6.00", "5.00"}  # the greyed values, with no star
    assert "6.00*" not in {t.get_text() for t in ax.texts}


def test_compute_to_target_labels_two_ticks_or_more_on_a_log_axis_of_one_decade_tick():
    import matplotlib.pyplot as plt

    from goldenpath.draw.plots import compute_to_target

    compute = pd.DataFrame([dict(target=t, setting=f"lr={lr}", regime="online", n_reached=2, steps_mean=s,
                                 **{"optim.lr": lr, "optim.batch_size": 32})
                            for t, pts in ((1.72, ((0.01, 130), (0.02, 300))), (1.7, ((0.01, 700), (0.02, 1600))))
                            for lr, s in pts])
    ax = compute_to_target(compute)
    ax.figure.canvas.draw()
    lo, hi = sorted(ax.get_ylim())
    assert math.floor(math.log10(hi)) - math.ceil(math.log10(lo)) + 1 == 1  # one power of ten in view: 1000
    shown = {float(t.get_text()): t.get_position()[1] for t in ax.yaxis.get_ticklabels(which="both")
             if t.get_text() and lo <= t.get_position()[1] <= hi}
    assert len(shown) >= 2 and all(v == pytest.approx(pos) for v, pos in shown.items())
    plt.close(ax.figure)


def test_compute_to_target_draws_the_grid_settings_not_their_forks():
    """A fork's steps count its parent's, taken under other knobs: on the grid's lines it put a second point at
    the parent's lr."""
    import matplotlib.pyplot as plt

    from goldenpath.draw.plots import compute_to_target

    rows = [dict(target=2.0, setting=f"lr={lr}", regime="online", n_reached=2, steps_mean=s, **{
        "optim.lr": lr, "optim.batch_size": 64, "fork.parent": parent})
            for lr, s, parent in ((0.05, 49.0, None), (0.1, 14.0, None), (0.1, 11.0, "/runs/lr=0.1_rep=0"))]
    ax = compute_to_target(pd.DataFrame(rows))
    drawn = [line for line in ax.lines if len(line.get_xdata())]
    assert len(drawn) == 1 and list(drawn[0].get_xdata()) == [0.05, 0.1] and list(drawn[0].get_ydata()) == [49, 14]
    plt.close(ax.figure)


def test_heatmap_order_puts_online_before_offline_and_the_least_noisy_first():
    """compare's heatmap figures sorted runs by name, and online and offline runs alternated down the matrix."""
    from goldenpath.config import load_config
    from goldenpath.draw.figures import heatmap_order

    offline = ["data.epochs=2", "data.train_size=640"]
    configs = {"a_lr=0.1_off": load_config(None, ["optim.lr=0.1", *offline]),
               "b_lr=0.1_on": load_config(None, ["optim.lr=0.1"]),
               "c_lr=0.02_off": load_config(None, ["optim.lr=0.02", *offline]),
               "d_lr=0.02_on": load_config(None, ["optim.lr=0.02"])}
    regimes = {r: c.regime for r, c in configs.items()}
    order = heatmap_order(configs, [*configs, "e_no_config"], regimes)
    assert order == ["d_lr=0.02_on", "b_lr=0.1_on", "c_lr=0.02_off", "a_lr=0.1_off", "e_no_config"]


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
    values = (("all", "tail_index_pooled", 1.3), ("all", "tail_index_per_coordinate_median", 1.9),
              ("fc", "tail_index_pooled", 1.5), ("fc", "tail_index_per_coordinate_median", 1.8))
    table = pd.DataFrame([dict(layer=l, statistic=s, value=v, ci_low=v - 0.1, ci_high=v + 0.1) for l, s, v in values])
    ax = tail_index_by_layer(table)
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [1.3, 1.5, 1.8, 1.9]
    frame = pd.DataFrame([dict(sigma=s, batch=10, seed=k, alpha_eff=a)
                          for s, vals in ((0.0, [0.5, 0.5]), (1.0, [0.2, 0.4])) for k, a in enumerate(vals)])
    ax = toys_metric(frame, metric="alpha_eff")
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.5, 0.3])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from goldenpath.draw.report import write_report
    from goldenpath.training.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("report")
    path = write_sweep(tmp, "grid: {optim.lr: [0.05, 0.1, 1000.0]}\nseeds: [0, 1]\n")
    from goldenpath.comparison.compare import compare

    sweep_dir = run_sweep(path, jobs=2, progress=False)
    compare(sweep_dir, metrics=LENSES, lmc_points=3)  # as goldenpath demo: the output metrics, cka and lmc
    return write_report(sweep_dir)


TARGETS, LENSES = (2.0, 1.9, 1.8, 1.7), ("tv", "kl", "js", "top1", "cka", "lmc")
WHOLE = ("cka", "lmc")  # one value per pair of runs: no interval over probe units


def demo_like(root: Path) -> Path:
    """A sweep directory shaped like ``goldenpath demo``'s (lr x batch x online/offline x 5 seeds, 4 targets, 4
    metrics) with made-up curves and ``compare/`` tables in compare's columns: the report at full size, no training."""
    from goldenpath.comparison.compare import write_answer
    from goldenpath.comparison.verdicts import COMPUTE, FAMILY, MATRIX, SUMMARY
    from goldenpath.config.identity import setting_label

    rng = np.random.default_rng(0)
    sweep, runs = root / "demo", []
    for lr, bs, (epochs, n), seed in itertools.product((0.02, 0.05), (32, 128), ((1, None), (10, 4096)), range(5)):
        name = f"lr={lr}_bs={bs}_epochs={epochs}_n={n or 'none'}_rep={seed}"
        run = sweep / name
        run.mkdir(parents=True)
        run.joinpath("config.yaml").write_text(
            f"name: {name}\nseed: {seed}\ndata: {{source: teacher, epochs: {epochs}, train_size: {n or 'null'}}}\n"
            f"optim: {{lr: {lr}, batch_size: {bs}}}\ncheckpoint: {{targets: {list(TARGETS)}}}\n")
        steps = np.unique(np.r_[0, np.geomspace(1, 40960 // bs, 60).astype(int)])
        rate = lr / bs * (0.8 if epochs > 1 else 1.0) * rng.uniform(0.9, 1.1)
        loss = 1.45 + 0.82 * np.exp(-rate * steps * 2.0)
        run.joinpath("metrics.jsonl").write_text("".join(json.dumps(
            {"step": int(k), "samples": int(k * bs), "tokens": 0, "eval_loss": float(v),
             "eval_error": float(0.9 - 0.5 * (2.27 - v) + rng.normal(0, 0.01))}) + "\n" for k, v in zip(steps, loss)))
        run.joinpath("status.json").write_text(json.dumps({"state": "completed", "loss_floor": 1.40}))
        runs.append({"run": name, "setting": setting_label(name), "regime": "offline" if n else "online",
                     "knobs": {"optim.lr": lr, "optim.batch_size": bs, "data.epochs": epochs, "data.train_size": n},
                     "state": "completed", "step": int(steps[-1]), "eval_loss": float(loss[-1]), "epsilon": None})
    pd.DataFrame(runs).drop(columns=["setting", "regime", "knobs"]).to_csv(sweep / "runs.csv", index=False)
    settings = {r["setting"]: r for r in runs}
    ref = "lr=0.02_bs=128_epochs=1_n=none"
    dist, summary, matrix, compute, family = [], [], [], [], []
    for target, metric in itertools.product(TARGETS, LENSES):
        for a, b in itertools.combinations(runs, 2):
            kind = "floor" if a["setting"] == b["setting"] else "reference" if ref in (a["setting"], b["setting"]) \
                else "pair"
            v = rng.uniform(0.05, 0.15) * (1 if kind == "floor" else 1.3)
            half = np.nan if metric in WHOLE else 0.01
            dist.append({"target": target, "run_a": a["run"], "run_b": b["run"], "setting_a": a["setting"],
                         "setting_b": b["setting"], "metric": metric, "value": v, "ci_low": v - half,
                         "ci_high": v + half, "loss_a": target, "loss_b": target, "kind": kind,
                         "overshoot_a": 0.0, "overshoot_b": 0.0})
        for sa, sb in itertools.combinations(settings, 2):
            r = float(rng.uniform(0.8, 2.5))
            matrix.append({"target": target, "metric": metric, "setting_a": sa, "setting_b": sb,
                           "regime_a": settings[sa]["regime"], "regime_b": settings[sb]["regime"], "n_a": 5,
                           "n_b": 5, "d_cross": 0.1 * r, "d_floor": 0.1, "ratio": r, "ci_low": r - 0.2,
                           "ci_high": r + 0.2, "p_value": 0.008 if r > 1.5 else 0.3, "permutations": 252})
        for regime in ("online", "offline"):
            family.append({"target": target, "metric": metric, "regime": regime, "reference": ref, "settings": 3,
                           "p_global": 0.001, "p_adjusted": 0.004, "smallest_p": 0.0005, "smallest_adjusted": 0.002,
                           "targets": 4, "trivial": False, "trivial_loss": 1.73})
        for s, info in settings.items():
            r = np.nan if s == ref else float(rng.uniform(0.9, 2.0))
            summary.append({"target": target, "metric": metric, "regime": info["regime"], "setting": s,
                            "reference": ref, "n_seeds": 5, "n_ref_seeds": 5, "noise_scale": 0.001, "d_cross": 0.1 * r,
                            "d_floor": 0.1, "ratio": r, "ci_low": r - 0.2, "ci_high": r + 0.2,
                            "p_value": 0.008 if r > 1.5 else 0.3, "p_adjusted": 0.024 if r > 1.5 else 0.6,
                            "in_family": s != ref, "trivial": False, "spread": 1.1, "spread_low": 0.9,
                            "spread_high": 1.3, "spread_p_adjusted": 0.5, "location": r, "location_low": r - 0.1,
                            "location_high": r + 0.1, "location_p_adjusted": 0.03 if r > 1.5 else 0.7,
                            **info["knobs"]})
    for target, (s, info) in itertools.product(TARGETS, settings.items()):
        compute.append({"target": target, "setting": s, "regime": info["regime"], "n_seeds": 5, "n_reached": 5,
                        "steps_mean": 100 / target, "steps_min": 90, "steps_max": 110, "samples_mean": 3200,
                        **info["knobs"]})
    tables = sweep / "compare"
    tables.mkdir()
    pd.DataFrame(dist).to_parquet(tables / "distances.parquet", index=False)
    pd.DataFrame(summary).reindex(columns=[*SUMMARY, *runs[0]["knobs"]]).to_csv(tables / "summary.csv", index=False)
    pd.DataFrame(family).reindex(columns=FAMILY).to_csv(tables / "family.csv", index=False)
    pd.DataFrame(matrix).reindex(columns=MATRIX).to_csv(tables / "settings.csv", index=False)
    pd.DataFrame(compute)[[*COMPUTE, *runs[0]["knobs"]]].to_csv(tables / "compute.csv", index=False)
    pd.DataFrame(columns=["target", "metric", "regime", "reference", "settings", "slope", "ci_low", "ci_high"]).to_csv(
        tables / "trend.csv", index=False)
    pd.DataFrame(columns=["target", "run", "checkpoint", "reason"]).to_csv(tables / "excluded.csv", index=False)
    write_answer(tables, LENSES)
    return sweep


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    from goldenpath.draw.report import write_report

    return write_report(demo_like(tmp_path_factory.mktemp("demo")))


def with_curve(run: Path) -> Path:
    """A run as make_run leaves it, with the eval curve a report draws."""
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(
        {"step": k, "samples": 32 * k, "tokens": 0, "eval_loss": 2.3 - 0.2 * k, "eval_error": 0.9 - 0.1 * k}) + "\n"
        for k in range(3)))
    return run


def test_report_compares_again_what_landed_and_shows_the_shifted_probe(tmp_path, bars, monkeypatch, capsys,
                                                                       computed_pairs):
    from goldenpath.cli import compare_and_draw
    from goldenpath.comparison import compare as cmp, runs as runs_mod
    from goldenpath.draw import report as rep

    from .test_compare import make_run

    d, later = tmp_path / "s", tmp_path / "later"
    for name, seed, lr, targets in (("a0", 0, 0.01, [(2.0, 1.99), (1.9, 1.89)]),
                                    ("a1", 1, 0.01, [(2.0, 1.995), (1.9, 1.899)]), ("b0", 2, 0.1, [(2.0, 1.99)]),
                                    ("b1", 3, 0.1, [(2.0, 1.99), (1.9, 1.89)])):
        with_curve(make_run(d, name, [f"optim.lr={lr}", f"seed={seed}"], targets))
    (d / "b1" / "checkpoints" / "target-1.9").rename(later)  # b1 reaches 1.9 only after the first report
    options = {"n_boot": 50, "n_perm": 200}
    cmp.compare(d, ("tv",), **options)
    cmp.compare(d, ("tv",), probe_shift="noise:1", **options)
    compare_and_draw(d, report=True)
    assert "out of date" not in capsys.readouterr().err

    with_curve(make_run(d, "b2", ["optim.lr=0.1", "seed=5"], [(2.0, 1.99)]))  # a run lands
    later.rename(d / "b1" / "checkpoints" / "target-1.9")
    computed_pairs.clear()
    monkeypatch.setattr(rep, "tqdm", bars)
    page = compare_and_draw(d, report=True)[1].read_text()
    err = capsys.readouterr().err
    for tables in ("compare", "compare-noise-1"):
        assert f"report: {tables}/ is out of date (new runs: b2; new checkpoints: b1 at 1.9): comparing again" in err
    assert len(computed_pairs) == 2 * (4 + 2)  # per directory: b2 with the 4 runs at 2, b1 with a0 and a1 at 1.9

    # the tables now are what a comparison from scratch of the grown sweep gives
    fresh = tmp_path / "fresh"
    shutil.copytree(d, fresh, ignore=shutil.ignore_patterns("compare*", "report.html"))
    for shift in (None, "noise:1"):
        want = cmp.compare(fresh, ("tv",), probe_shift=shift, **options)
        got = pd.read_parquet(runs_mod.tables_dir(d, shift) / "distances.parquet")
        key = ["target", "run_a", "run_b", "metric"]
        pd.testing.assert_frame_equal(got.sort_values(key).reset_index(drop=True),
                                      want.sort_values(key).reset_index(drop=True))
    heat = re.search(r"Run x run distances: (\d+) runs", page)
    assert heat and int(heat.group(1)) == 5  # every run directory
    # the shifted probe's own sections: heading, answer, the table against the reference
    start = page.index("<h2>Probe shifted by noise:1</h2>")
    assert page.index('<section class="metric" id="metric-tv">') < start < page.index("<h2>Compute to target</h2>")
    shifted = page[start:page.index("<h2>Compute to target</h2>")]
    assert '<section class="metric" id="shift-noise-1-tv">' in shifted
    assert "<h4>tv: against the reference</h4>" in shifted
    assert '<a href="#shift-noise-1">probe noise:1</a>' in page
    sections = page.count('<section class="metric"')
    assert [(b["n"], b["total"]) for b in bars.closed] == [(sections + 2, sections + 2)]  # + compute, curves

    said = (d / "compare" / "answer.json").read_text()
    (d / "compare" / "answer.json").unlink()  # the page only reads: it names the table it lacks
    assert "compare/answer.json is missing; run goldenpath compare" in rep.write_report(d).read_text()
    page = compare_and_draw(d, report=True)[1].read_text()  # the verb writes it again from the tables
    assert "answer.json is missing" not in page and (d / "compare" / "answer.json").read_text() == said
    (d / "compare" / "inputs.json").unlink()  # tables from before goldenpath recorded their inputs
    assert "compare/ does not record the runs it compared" in compare_and_draw(d, report=True)[1].read_text()


def figures_on(page: str) -> list[str]:
    return re.findall(r'<img alt="[^"]*" data-figure="([a-z-]+)"', page)


def test_report_has_every_section_and_needs_no_network(report):
    page = report.read_text()
    metrics = list(dict.fromkeys(pd.read_csv(report.parent / "compare" / "summary.csv").metric))
    assert metrics == list(LENSES)  # every metric compare wrote, the lead one first
    sections = ["<h2>The answer</h2>", "<h2>Setting x setting ratios</h2>", *(f"<h3>{m}: " for m in metrics),
                "<h2>Compute to target</h2>", "<h2>Loss curves</h2>", "<h2>Error against loss</h2>", "<h2>Runs</h2>",
                "<h2>Warnings</h2>"]
    at = [page.find(s) for s in sections]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(sections, at))  # all there, the answer first
    assert page.find('class="ref">Reference setting: <b>lr=0.05</b>') < at[0]  # named before the answer
    sources = re.findall(r'(?:src|href)="([^"#]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "diverged" in page  # the lr=1000 runs diverge, and the page says so
    targets = pd.read_parquet(report.parent / "compare" / "distances.parquet").target.nunique()
    # per metric a ratio grid and distances against loss; run x run matrices for the lead metric; compute;
    # loss against samples and steps; error against loss
    assert sorted(figures_on(page)) == sorted(["ratios", "distance-vs-loss"] * len(metrics) + ["heatmap"] * targets
                                              + ["compute"] + ["curves"] * 3)
    assert "<th>epsilon</th>" not in page  # no DP: an empty column, left out
    has_lens_sections(page, report.parent)


def has_lens_sections(page: str, sweep_dir: Path) -> None:
    """cka and lmc each get a section like the output metrics: heading, answer, the setting x setting ratio
    figure, the table against the reference (ratio, interval, p) and the distances against loss."""
    from goldenpath.draw.report import METRIC_NAMES

    summary = pd.read_csv(sweep_dir / "compare" / "summary.csv")
    for m in WHOLE:
        start = page.find(f'<section class="metric" id="metric-{m}"><h3>{m}: {html.escape(METRIC_NAMES[m])}</h3>')
        assert start >= 0, m
        body = page[start:page.find("</section>", start)]
        assert f'<a href="#metric-{m}">' in page  # in the page's navigation
        assert re.findall(r'data-figure="([a-z-]+)"', body) == ["ratios", "distance-vs-loss"], m
        assert f"<h4>{m}: against the reference</h4>" in body
        table = body[body.find("<table"):body.find("</table>")]
        assert all(f"<th>{c}</th>" in table for c in ("ratio", "ci_low", "ci_high", "p_value")), m
        rows = summary[(summary.metric == m) & (summary.setting != summary.reference)]
        assert table.count("<tr>") == len(rows) > 0  # one body row per setting and target (the header row is styled)


def test_demo_sized_page_leaves_empty_columns_out_and_orders_targets(demo_report):
    page = demo_report.read_text()
    assert page.count('data-figure="heatmap"') == len(TARGETS) and page.count('data-figure="ratios"') == len(LENSES)
    heat = re.findall(r'alt="tv between runs at loss ([0-9.]+)"', page)
    assert [float(t) for t in heat] == sorted(TARGETS, reverse=True)  # training order: highest loss first
    assert "<th>epsilon</th>" not in page and "<th>reference</th>" not in page  # empty / named at the top
    assert 'at the target: online: <b>lr=0.02_bs=128_epochs=1_n=none</b> (5 seeds)' in page
    has_lens_sections(page, demo_report.parent)


def pngs(page: str):
    from PIL import Image

    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        yield np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))


def test_no_label_is_cut_at_the_edge_of_a_figure(report, demo_report):
    # savefig(bbox_inches="tight") keeps a white margin round everything drawn; a label cut by the canvas
    # would reach the edge
    for page in (report.read_text(), demo_report.read_text()):
        for k, pixels in enumerate(pngs(page)):
            edge = np.concatenate([pixels[:3].ravel(), pixels[-3:].ravel(), pixels[:, :3].ravel(),
                                   pixels[:, -3:].ravel()])
            assert edge.min() > 240, f"figure {k} ({figures_on(page)[k]}) has ink at its edge"


MEASURE = """<script>window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const root = document.documentElement;
  const images = [...document.images].map(i => { const r = i.getBoundingClientRect();
    return {kind: i.dataset.figure, alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
            naturalHeight: i.naturalHeight, left: r.left, right: r.right, width: r.width, height: r.height}; });
  const out = {viewport: root.clientWidth, scrollWidth: root.scrollWidth, images: images};
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def measure(page: Path, tmp_path: Path, width: int = 1280) -> dict:
    """Load a copy of the page in headless Chromium with a script that opens every <details> and writes each
    image's rendered box and natural size into the DOM; returns those measurements."""
    copy = tmp_path / page.name
    copy.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    run = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--window-size={width},1000", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "net::ERR" not in run.stderr, run.stderr[-2000:]
    found = re.search(r'<pre id="measured">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (.ci/run installs it)")
@pytest.mark.parametrize("which", ["report", "demo_report"])
def test_report_renders_in_headless_chromium_with_every_figure_whole(which, request, tmp_path):
    page = request.getfixturevalue(which)
    got = measure(page, tmp_path)
    images, viewport = got["images"], got["viewport"]
    assert [i["kind"] for i in images] == figures_on(page.read_text()) and len(images) >= 8
    assert got["scrollWidth"] <= viewport, "the page scrolls sideways"
    for i in images:
        assert i["complete"] and i["naturalWidth"] > 0 and i["naturalHeight"] > 0, i["alt"]
        assert 0 <= i["left"] and i["right"] <= viewport, f"{i['alt']} runs off the page: {i}"
        # shown at the size it was drawn (one figure inch = 100 px), so 7 pt labels stay about 10 px tall
        assert i["width"] >= 0.98 * i["naturalWidth"], f"{i['alt']} is shrunk to fit: {i}"
    heat = [i for i in images if i["kind"] == "heatmap"]
    assert heat and all(i["height"] > 0 for i in heat)  # folded in <details>, there once opened
