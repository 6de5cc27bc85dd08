"""What a design can decide before any run (goldenpath sweep --plan): the smallest adjusted p against a
count of relabellings by hand, the seeds a design needs, and the plan's lines for a sweep."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from goldenpath.comparison import plan
from goldenpath.config.grid import load_sweep

from .conftest import write_sweep

ROOT = Path(__file__).resolve().parents[1]


def test_smallest_adjusted_p_counts_relabellings_and_targets():
    # one setting and the reference, 5 seeds each: 252 splits, the observed one ties with its mirror image
    assert plan.smallest_adjusted(1, 5, 1, "independent") == pytest.approx(2 / math.comb(10, 5))
    assert plan.smallest_adjusted(1, 5, 8, "independent") == pytest.approx(min(1, 8 * 2 / 252))
    # paired: 2^5 swaps within seeds, 4 targets
    assert plan.smallest_adjusted(1, 5, 4, "paired") == pytest.approx(4 * 2 / 32)
    # three settings and the reference of 10 seeds: relabellings beyond counting, 2000 random ones
    assert plan.smallest_adjusted(3, 10, 4, "independent") == pytest.approx(4 / 2001)
    assert math.isnan(plan.smallest_adjusted(1, 1, 4, "independent"))
    # two settings and the reference of 3 seeds: 1680 relabellings of the family, but a setting's adjusted p
    # never goes below its pairwise p against the reference, 2 / C(6, 3) (paired: 2 / 2^3)
    assert plan.smallest_adjusted(2, 3, 1, "independent") == pytest.approx(2 / 20)
    assert plan.smallest_adjusted(2, 3, 1, "paired") == pytest.approx(2 / 8)


def test_seeds_needed_is_the_first_count_that_reaches_the_level():
    n = plan.seeds_needed(1, 4, "paired")
    assert plan.smallest_adjusted(1, n, 4, "paired") < 0.05 <= plan.smallest_adjusted(1, n - 1, 4, "paired")
    assert n == 8  # 4 x 2 / 2^n < 0.05
    assert plan.seeds_needed(1, 8, "independent") == 6  # 8 x 2 / C(2n, n) < 0.05 from n = 6 (C(12, 6) = 924)
    assert plan.seeds_needed(2, 1, "independent") == 4  # the pairwise floor 2 / C(2n, n): 0.1 at n = 3
    assert plan.seeds_needed(2, 1, "paired") == 6  # 2 / 2^n: 0.0625 at n = 5


def test_the_plan_names_reference_family_and_what_the_design_cannot_decide(tmp_path):
    path = write_sweep(tmp_path, "grid: {optim.lr: [0.02, 0.05], 'data.epochs,data.train_size': [[1, null], "
                                 "[2, 256]]}\nseeds: [0, 1]\ndesign: paired\n")
    lines = plan.plan(load_sweep(path))
    assert lines[0].startswith("seeds: 2 per setting, paired design") and "trivial loss" in lines[0]
    online = next(line for line in lines if line.startswith("online:"))
    assert "reference lr=0.02_epochs=1_n=none" in online and "family of 1 setting" in online
    assert "cannot decide at 0.05" in online  # 2 paired seeds: 4 relabellings
    out = subprocess.run([sys.executable, "-m", "goldenpath", "sweep", str(path), "--plan"], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line.removeprefix("plan: ") for line in out.stdout.strip().splitlines()] == lines
    assert not (tmp_path / "out").exists()  # a plan trains nothing
