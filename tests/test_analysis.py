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

TINY = dict(base="teacher-cnn.yaml", quick=dict(
    fixed={"data.eval_size": 256, "data.probe_size": 256, "budget.samples": 2048, "checkpoint.targets": [2.28],
           "checkpoint.eval_every": 8, "model.width": 8, "model.depth": 2},
    lr=[0.05], batch=[16, 64], offline=[4, 512]))


def test_golden_path_core_gives_one_ratio_with_an_interval_per_run_target_and_metric(tmp_path):
    sweep_dir = golden_path.train("tiny", TINY, tmp_path, quick=True, seeds=(0, 1), jobs=2)
    ratios, runs = golden_path.tables(sweep_dir, "teacher")
    assert len(runs) == 1 * 2 * 2 * 2 and set(runs.regime) == {"online", "offline"}
    assert (runs.state == "completed").all() and runs.final_loss.notna().all()
    assert set(runs.noise) == {0.05 / 16, 0.05 / 64}
    # the reference is the least noisy online run (B = 64); every other run that reached 2.28 has a ratio
    reached = [r for r in runs.run if (sweep_dir / r / "checkpoints" / "target-2.28" / "model.safetensors").exists()]
    others = [r for r in reached if not r.startswith("lr=0.05_bs=64_epochs=1_")]
    assert set(ratios.run) == set(others) and len(others) >= 4
    assert len(ratios) == len(others) * 3 and set(ratios.metric) == {"tv", "js", "top1"}
    assert ratios[["ratio", "ci_low", "ci_high"]].notna().all().all()
    assert (ratios.ci_low <= ratios.ratio + 1e-12).all() and (ratios.ratio <= ratios.ci_high + 1e-12).all()
    # the ratio is the two distances' quotient
    assert ratios.ratio.to_numpy() == pytest.approx((ratios.d_reference / ratios.d_floor).to_numpy(), rel=0.02)
    ratios.to_csv(tmp_path / "ratios.csv", index=False)
    runs.to_csv(tmp_path / "runs.csv", index=False)
    text = golden_path.section(tmp_path)
    assert "| teacher | 2.28 | online |" in text and "| teacher | 2.28 | offline |" in text
    assert "**teacher**" in text


def _ratios(online, offline, low_above_one):
    rows = []
    for regime, values in (("online", online), ("offline", offline)):
        for target in (2.0, 1.9):
            for v in values:
                rows.append({"dataset": "d", "metric": "tv", "target": target, "regime": regime, "ratio": v,
                             "ci_low": v + (0.1 if low_above_one else -v), "ci_high": v + 0.5})
    return pd.DataFrame(rows)


RUNS = pd.DataFrame({"dataset": "d", "state": "completed", "regime": ["online"] * 6 + ["offline"] * 6,
                     "noise": [1, 2, 3, 4, 5, 6] * 2, "final_loss": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5] * 2})
RUNS.loc[RUNS.regime == "offline", "final_loss"] = [1.5, 1.4, 1.3, 1.2, 1.1, 1.0]


@pytest.mark.parametrize("online, offline, above, claim, contrast", [
    ([1.0, 1.1, 1.2], [2.0, 2.5, 3.0], True, "holds", "holds"),
    ([2.0, 2.2, 2.4], [1.0, 1.1, 1.2], True, "does not hold", "does not hold"),
    ([2.0, 2.2, 2.4], [2.0, 2.5, 3.0], False, "inconclusive", "holds"),
])
def test_golden_path_verdict_rules(online, offline, above, claim, contrast):
    v = golden_path.verdicts(_ratios(online, offline, above), RUNS).iloc[0]
    assert v.online_claim.startswith(claim) and v.offline_contrast.startswith(contrast)
    assert v.rho_online == pytest.approx(1.0) and v.rho_offline == pytest.approx(-1.0)
    assert v.final_loss.startswith("holds") and v.p_offline < 0.05
    flat = RUNS.assign(final_loss=[1.0, 1.2, 1.1, 1.2, 1.0, 1.1] * 2)  # no trend: not a verdict either way
    assert golden_path.verdicts(_ratios(online, offline, above), flat).iloc[0].final_loss.startswith("inconclusive")


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
