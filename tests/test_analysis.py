"""analysis/: the golden-path study's core on a reduced grid, its verdict rules, and the README's numbers."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_golden_path_core_gives_setting_ratios_with_intervals_and_p_values(tmp_path):
    sweep_dir = golden_path.train("tiny", TINY, tmp_path, quick=True, seeds=(0, 1, 2), jobs=2)
    summary, trend, runs = golden_path.tables(sweep_dir, "teacher")
    assert len(runs) == 1 * 2 * 2 * 3 and set(runs.regime) == {"online", "offline"}
    assert (runs.state == "completed").all() and runs.final_loss.notna().all()
    assert set(runs.noise) == {0.05 / 16, 0.05 / 64}
    tv = summary[summary.metric == "tv"]
    assert set(summary.metric) == {"tv", "js", "top1"} and set(tv.reference) == {"lr=0.05_bs=64_epochs=1_n=none"}
    rows = golden_path._compared(tv)
    assert len(rows) == 3  # the other online setting and both offline ones, each with three seeds a side
    assert (rows.ci_low <= rows.ratio + 1e-12).all() and (rows.ratio <= rows.ci_high + 1e-12).all()
    assert rows.ratio.to_numpy() == pytest.approx((rows.d_cross / rows.d_floor).to_numpy())
    assert ((rows.p_value > 0) & (rows.p_value <= 1)).all() and (rows.p_holm >= rows.p_value).all()
    assert set(trend.regime) == {"online", "offline"} and (trend.dataset == "teacher").all()
    summary.to_csv(tmp_path / "summary.csv", index=False)
    trend.to_csv(tmp_path / "trend.csv", index=False)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    text = golden_path.section(tmp_path)
    assert "| teacher | 2.2 | online |" in text and "| teacher | 2.2 | offline |" in text and "**teacher**" in text


def _rows(study, regime, ratios, *, low=None, high=None, p=None, seeds=5):
    return [{"dataset": "d", "study": study, "metric": "tv", "target": 2.0, "regime": regime, "setting": f"s{i}",
             "n_seeds": seeds, "n_ref_seeds": 5, "ratio": r, "ci_low": r - 0.05 if low is None else low,
             "ci_high": r + 0.05 if high is None else high, "p_value": 0.5 if p is None else p,
             "p_holm": 0.5 if p is None else p, "d_floor": 0.1} for i, r in enumerate(ratios)]


POWER = (_rows("seed-split", "online", [1.0]) + _rows("width", "online", [1.6], p=0.01)
         + _rows("subsets", "offline", [1.3], p=0.01))
TREND = pd.DataFrame([{"dataset": "d", "study": "main", "metric": "tv", "regime": "online", "target": 2.0,
                       "slope": 0.01, "ci_low": -0.1, "ci_high": 0.1}])
RUNS = pd.DataFrame({"dataset": "d", "study": "main", "state": "completed", "regime": ["online"] * 4,
                     "noise": [1, 2, 3, 4], "final_loss": [1.0, 1.1, 1.2, 1.3]})


@pytest.mark.parametrize("online, offline, controls, says_online, says_offline", [
    (_rows("main", "online", [1.0, 1.05]), _rows("main", "offline", [1.5], p=0.01), POWER, "same", "differs"),
    (_rows("main", "online", [1.3], p=0.01), _rows("main", "offline", [1.0]), POWER, "differs", "same"),
    (_rows("main", "online", [1.1], low=0.7, high=1.6), [], POWER, "inconclusive (none differs", "inconclusive"),
    (_rows("main", "online", [1.0]), [], _rows("seed-split", "online", [1.0]), "inconclusive: same", "inconclusive"),
    (_rows("main", "online", [2.0], p=0.01, seeds=1), [], POWER, "inconclusive (no comparison", "inconclusive"),
])
def test_golden_path_verdict_rules(online, offline, controls, says_online, says_offline):
    v = golden_path.verdicts(pd.DataFrame(online + offline + controls), TREND, RUNS).iloc[0]
    assert v.online.startswith(says_online) and v.offline.startswith(says_offline)
    assert v.power.startswith("shown" if controls is POWER else "not shown")
    assert "online rho 1.00" in v.final_loss


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
