"""analysis/golden_path.py --gpu: its setting is the one promised, and --cpu-smoke runs its path end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))

import golden_path  # noqa: E402


def test_gpu_setting_is_a_cnn_on_the_gpu_deep_enough_with_ten_seeds():
    from goldenpath.config import load_config

    s = golden_path.STUDIES["teacher"]["gpu"]
    assert s["base"] == "teacher-cnn.yaml" and len(s["lr"]) >= 2 and len(s["batch"]) >= 2
    assert s["fixed"]["cpu"] is False and s["fixed"]["precision"] == "auto" and len(golden_path.SEEDS) >= 10
    targets = s["fixed"]["checkpoint.targets"]
    chance, floor = 2.27, 1.40
    assert max(targets) < 1.73 and (chance - min(targets)) / (chance - floor) >= 0.9  # below trivial, to 90%
    assert s["offline"][0] * s["offline"][1] == s["fixed"]["budget.samples"]  # offline: the same budget
    c = load_config(ROOT / "configs" / s["base"],
                    [f"{k}={v}" for k, v in s["fixed"].items() if k != "checkpoint.targets"])
    assert c.model.name == "cnn" and not c.cpu and c.threads == 1
    assert c.data.generate == "device"  # the teacher stream made on the GPU: the CPU's would bind the runs
    assert golden_path.STUDIES["teacher"]["cpu_smoke"]["fixed"]["data.generate"] == "device"  # its path, tested


# the GPU study's smoke variant, run on the CPU (about 40 s): its one prepared command, tested in CI
def test_cpu_smoke_writes_the_tables_and_a_verdict(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "analysis" / "golden_path.py"), "--cpu-smoke", "--work",
                           str(tmp_path / "runs"), "--out", str(out), "--jobs", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 1 * 2 * 2 * 2 and (runs.state == "completed").all()  # lr x batch x regime x seeds
    assert set(runs.regime) == {"online", "offline"} and runs.seed.nunique() == len(runs)
    summary = pd.read_csv(out / "summary.csv")
    assert {"ratio", "ci_low", "ci_high", "p_adjusted", "spread", "location", "trivial"} <= set(summary.columns)
    assert summary[summary.metric == "tv"].ratio.notna().sum() == 2 * 2  # a setting per regime at 2 targets
    family = pd.read_csv(out / "family.csv")
    assert {"p_adjusted", "smallest_adjusted", "settings", "targets"} <= set(family.columns)
    power = pd.read_csv(out / "power.csv")
    assert set(power.level) == {0.0, 0.2} and (power.draws == 20).all() and power.detected.between(0, 1).all()
    gap = pd.read_csv(out / "gap.csv")
    assert len(gap) == 4 and gap.reference.sum() == 2 and gap.gap_closed.between(0, 1).all()
    assert {"ratios.png", "power.png", "final_loss.png"} <= {p.name for p in out.iterdir()}
    verdict = (out / "verdict.md").read_text()
    assert "Mode cpu_smoke" in verdict and "of the way from chance" in verdict
    assert "- **teacher**: power:" in verdict and "Online, " in verdict and "Offline: " in verdict
