"""analysis/: the golden-path study's core on a reduced grid, its verdict rules, and the README's numbers."""

from __future__ import annotations

import ast
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
sys.path.insert(0, str(ANALYSIS))

import golden_path  # noqa: E402
import readme  # noqa: E402

TINY = dict(base="teacher-mlp.yaml", quick=dict(
    fixed={"data.eval_size": 256, "data.probe_size": 256, "budget.samples": 2048, "checkpoint.targets": [2.2],
           "checkpoint.eval_every": 8, "model.width": 32, "budget.min_progress": None},
    lr=[0.05], batch=[16, 64], offline=[4, 512]))


@pytest.mark.slow  # trains the study's reduced grid: about 30 s
def test_golden_path_core_gives_setting_ratios_with_intervals_and_p_values(tmp_path):
    sweep_dir = golden_path.train("tiny", TINY, tmp_path, quick=True, seeds=(0, 1, 2), jobs=2)
    t = golden_path.tables(sweep_dir, "teacher")
    summary, family, runs = t["summary"], t["family"], t["runs"]
    assert len(runs) == 1 * 2 * 2 * 3 and set(runs.regime) == {"online", "offline"}
    assert (runs.state == "completed").all() and runs.final_loss.notna().all()
    assert set(runs.noise) == {0.05 / 16, 0.05 / 64} and runs.seed.nunique() == 12  # every run its own seed
    tv = summary[summary.metric == "tv"]
    assert set(summary.metric) == {"tv", "js", "top1"}
    assert set(tv.reference) == {"lr=0.05_bs=64_epochs=1_n=none", "lr=0.05_bs=64_epochs=4_n=512"}
    rows = tv[tv.ratio.notna()]
    assert len(rows) == 2 and set(rows.design) == {"independent"}  # one setting against each regime's reference
    assert (rows.ci_low <= rows.ratio + 1e-12).all() and (rows.ratio <= rows.ci_high + 1e-12).all()
    assert rows.ratio.to_numpy() == pytest.approx((rows.d_cross / rows.d_floor).to_numpy())
    assert ((rows.p_value > 0) & (rows.p_value <= 1)).all() and rows.spread.notna().all()
    assert rows.location.notna().all() and rows.trivial.all()  # 2.2 lies above the teacher's linear model
    assert set(family.regime) == {"online", "offline"} and family.p_adjusted.isna().all()  # trivial: no family
    for name, frame in t.items():
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    text = golden_path.section(tmp_path)
    assert "| teacher | 2.2 | online |" in text and "| teacher | 2.2 | offline |" in text and "**teacher**" in text
    assert "inconclusive (no family" in text


def _rows(regime, ratios, *, p=0.5, low=None, high=None, seeds=10, trivial=False, spread_p=0.5, loc_p=0.5):
    return [{"dataset": "d", "study": "main", "metric": "tv", "target": 2.0, "regime": regime, "setting": f"s{i}",
             "n_seeds": seeds, "n_ref_seeds": 10, "ratio": r, "ci_low": r - 0.05 if low is None else low,
             "ci_high": r + 0.05 if high is None else high, "p_value": p, "p_adjusted": p, "in_family": True,
             "trivial": trivial, "spread": 1.0, "spread_low": 0.9, "spread_high": 1.1, "spread_p_adjusted": spread_p,
             "location": r, "location_low": r - 0.05, "location_high": r + 0.05, "location_p_adjusted": loc_p}
            for i, r in enumerate(ratios)]


def _family(regime, *, reach=0.002, p=0.5, trivial=False):
    return {"dataset": "d", "study": "main", "metric": "tv", "target": 2.0, "regime": regime, "settings": 3,
            "p_global": p, "p_adjusted": math.nan if trivial else p, "smallest_adjusted": reach, "trivial": trivial,
            "trivial_loss": 2.1 if trivial else 2.5}


POWER = pd.DataFrame({"level": [0.0, 0.05, 0.1], "target": 2.0, "draws": 50, "pool": 16,
                      "detected": [0.0, 0.5, 0.9], "detected_05": [0.04, 0.8, 1.0], "ratio": [1.0, 1.05, 1.2]})
WEAK = POWER.assign(detected=[0.04, 0.2, 0.5])
TREND = pd.DataFrame([{"dataset": "d", "study": "main", "metric": "tv", "regime": "online", "target": 2.0,
                       "slope": 0.01, "ci_low": -0.1, "ci_high": 0.1}])
RUNS = pd.DataFrame({"dataset": "d", "study": "main", "state": "completed", "regime": ["online"] * 4,
                     "noise": [1, 2, 3, 4], "final_loss": [1.0, 1.1, 1.2, 1.3]})


@pytest.mark.parametrize("online, offline, family, power, says_online, says_offline", [
    (_rows("online", [1.0, 1.05]), _rows("offline", [1.5], p=0.01, loc_p=0.01), [], POWER, "holds", "noise changes"),
    (_rows("online", [1.3], p=0.01, spread_p=0.01), _rows("offline", [1.0]), [], POWER, "does not hold",
     "no setting differs"),
    (_rows("online", [1.1], low=0.7, high=1.6), [], [], POWER, "inconclusive: no setting differs", "inconclusive"),
    (_rows("online", [1.0]), [], [], WEAK, "inconclusive: no setting differs", "inconclusive"),
    (_rows("online", [1.0]), [], [], None, "inconclusive: no setting differs", "inconclusive"),
    (_rows("online", [1.0], seeds=5), [], [_family("online", reach=0.06)], POWER, "cannot be decided with 5 seeds",
     "inconclusive"),
    (_rows("online", [1.0], trivial=True), [], [_family("online", trivial=True)], POWER, "inconclusive (no family",
     "inconclusive"),
])
def test_golden_path_verdict_rules(online, offline, family, power, says_online, says_offline):
    regimes = {r["regime"] for r in online + offline}
    fam = family or [_family(r) for r in sorted(regimes)]
    v = golden_path.verdicts(pd.DataFrame(online + offline), pd.DataFrame(fam), TREND, RUNS,
                             power if power is None else power.assign(dataset="d")).iloc[0]
    assert v.online.startswith(says_online), v.online
    assert v.offline.startswith(says_offline), v.offline
    assert "online rho 1.00" in v.final_loss
    if says_online == "holds":
        assert "planted mix of 0.1 (ratio about 1.20) at >= 80%" in v.online  # the size the curve detects
    if says_online == "does not hold":
        assert "0 by their mean function (location), 1 by spread alone" in v.online


def test_power_table_detects_a_planted_difference_and_not_the_null(tmp_path, monkeypatch):
    """The power curve's draws on made-up distances: the null level rejects about as often as its level,
    a strong planted level always."""
    rng = np.random.default_rng(0)
    runs = [(f"m{level}_r{i}", level) for level, n in ((0.0, 40), (0.2, 16)) for i in range(n)]
    x = {name: rng.normal(size=8) + (3.0 if level else 0.0) * np.eye(8)[0] for name, level in runs}
    rows = []
    for (a, _), (b, _) in itertools.combinations(runs, 2):
        for metric, value in (("tv", np.abs(x[a] - x[b]).mean()), ("sq", ((x[a] - x[b]) ** 2).mean())):
            rows.append({"target": 1.7, "run_a": a, "run_b": b, "metric": metric, "value": value})
    d = tmp_path / "power"
    for i, (name, level) in enumerate(runs):
        (d / name).mkdir(parents=True)
        (d / name / "config.yaml").write_text(f"seed: {i}\ndata: {{source: teacher, mix: {level}}}\n")
    import goldenpath.comparison.compare

    monkeypatch.setattr(goldenpath.comparison.compare, "compare", lambda *a, **k: pd.DataFrame(rows))
    table = golden_path.power_table(d, level_alpha=0.01, draws=60)
    null, planted = table.set_index("level").loc[0.0], table.set_index("level").loc[0.2]
    assert null.draws == planted.draws == 60 and null.pool == 40 and planted.pool == 16
    assert null.detected_05 <= 0.15 and planted.detected == 1.0 and planted.ratio > 1.2


def test_readme_numbers_are_the_ones_the_results_tables_give():
    text = (ANALYSIS / "README.md").read_text()
    blocks = readme.BLOCK.findall(text)
    assert {name for _, name, _, _ in blocks} >= {"golden_path", "noise_reduction"}
    assert readme.render(text) == text, "analysis/README.md is stale: run python analysis/readme.py"


def test_readme_render_replaces_a_stale_block(tmp_path):
    stale = "intro\n<!-- results:golden_path -->\nold numbers\n<!-- /results:golden_path -->\nend\n"
    new = readme.render(stale)
    assert "old numbers" not in new and new.startswith("intro\n") and new.endswith("end\n")
    assert golden_path.section(ANALYSIS / "results" / "golden_path").strip() in new


def test_golden_path_run_of_some_datasets_replaces_only_their_rows(tmp_path):
    old = pd.DataFrame({"dataset": ["teacher", "teacher", "markov", "shakespeare"],
                        "study": ["main", "width", "main", "main"], "ratio": [1.0, 2.0, 3.0, 4.0],
                        "model.width": [None, 64.0, None, None]})
    old.to_csv(tmp_path / "summary.csv", index=False)
    new = pd.DataFrame({"dataset": ["teacher", "fashion"], "study": ["main", "main"], "ratio": [10.0, 20.0]})
    merged = golden_path._merged(tmp_path / "summary.csv", new)
    assert list(zip(merged.dataset, merged.study, merged.ratio)) == [
        ("teacher", "width", 2.0), ("teacher", "main", 10.0), ("markov", "main", 3.0),
        ("shakespeare", "main", 4.0), ("fashion", "main", 20.0)]
    assert merged.loc[0, "model.width"] == 64.0
    whole = old.assign(ratio=old.ratio * 10).iloc[[3, 1, 0, 2]]  # a run of everything: its rows, its order
    assert golden_path._merged(tmp_path / "summary.csv", whole) is whole
    assert golden_path._merged(tmp_path / "missing.csv", new) is new


def _first_paragraph(path: Path) -> str:
    return (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0]


# the scripts a user runs whose first paragraph spans lines (argparse showed only its first line)
LONG_SUMMARIES = [p.name for p in sorted(ANALYSIS.glob("*.py"))
                  if '__name__ == "__main__"' in p.read_text() and "\n" in _first_paragraph(p)]


@pytest.mark.parametrize("script", LONG_SUMMARIES)
def test_help_shows_the_script_s_whole_first_paragraph(script):
    import subprocess

    out = subprocess.run([sys.executable, str(ANALYSIS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " ".join(_first_paragraph(ANALYSIS / script).split()) in " ".join(out.stdout.split())  # rewrapped


def test_what_a_script_writes_does_not_change_with_the_last_bits_of_its_floats(tmp_path):
    # another CPU's BLAS kernels move float64 results by ~1e-13 (relative): the tables must not move
    from common import rounded

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=500) * 10.0 ** rng.integers(-6, 6, 500), "n": np.arange(500),
                          "ok": rng.random(500) < 0.5})
    moved = frame.assign(x=frame.x * (1 + 1e-13 * rng.choice([-1, 1], 500)))
    assert not (moved.x == frame.x).all()
    rounded(frame).to_csv(tmp_path / "a.csv", index=False)
    rounded(moved).to_csv(tmp_path / "b.csv", index=False)
    rounded(frame).to_parquet(tmp_path / "a.parquet")
    rounded(moved).to_parquet(tmp_path / "b.parquet")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    back = pd.read_csv(tmp_path / "a.csv")
    assert back.x.to_numpy() == pytest.approx(frame.x.to_numpy(), rel=5e-6, abs=0)  # six significant digits
    assert (back.n == frame.n).all() and (back.ok == frame.ok).all()


@pytest.mark.slow  # about 2 CPU minutes
def test_toys_quick_reproduces_the_committed_tables(tmp_path):
    """The committed toy tables again, on this machine: the verdict word for word, every table's text columns
    and integers exactly and its floats within another CPU's roundings (2e-5 relative: a value at a rounding
    boundary of the six digits written may move by one in the last; 1e-12 absolute: numerical zeros)."""
    import subprocess

    out = subprocess.run([sys.executable, str(ANALYSIS / "toys.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    committed = ANALYSIS / "results" / "toys"
    assert (tmp_path / "verdict.txt").read_text() == (committed / "verdict.txt").read_text()
    for name in ("dln.parquet", "lls.parquet", "drift.csv", "regimes.csv"):
        read = pd.read_parquet if name.endswith(".parquet") else pd.read_csv
        got, want = read(tmp_path / name), read(committed / name)
        assert list(got.columns) == list(want.columns) and len(got) == len(want), name
        floats = [c for c in want.columns if want[c].dtype.kind == "f"]
        pd.testing.assert_frame_equal(got.drop(columns=floats), want.drop(columns=floats), obj=name)
        for c in floats:
            np.testing.assert_allclose(got[c], want[c], rtol=2e-5, atol=1e-12, equal_nan=True, err_msg=f"{name}: {c}")
