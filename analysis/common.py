"""Plumbing shared by the analysis scripts: their command line, where runs and results go, a sweep given as
a dict, and the README blocks regenerated from results tables.

Each script ``analysis/<name>.py`` writes its tables and figures under ``analysis/results/<name>/`` and
defines ``section(results_dir) -> str``: the markdown of its numbers and verdict, computed from those
tables only. ``python analysis/readme.py`` pastes each section between the markers
``<!-- results:<name> -->`` and ``<!-- /results:<name> -->`` of analysis/README.md; a test checks that the
README matches what the tables give.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CONFIGS = ROOT.parent / "configs"


def summary(doc: str) -> str:
    """A module docstring's first paragraph as one line: the description a script's --help shows."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def parser(doc: str) -> argparse.ArgumentParser:
    """--quick, --work (where the runs go; not committed) and --jobs, the same for every script."""
    p = argparse.ArgumentParser(description=summary(doc))
    p.add_argument("--quick", action="store_true", help="the small setting: at most about 15 minutes on 2 CPU cores")
    p.add_argument("--work", default=str(ROOT / "runs"), help="directory for the runs (default analysis/runs)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="runs in parallel")
    return p


def results_dir(script: str) -> Path:
    path = RESULTS / script
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_grid(name: str, base: str | Path, work: str | Path, *, fixed: dict | None = None, grid: dict | None = None,
             seeds=(0,), forks=(), jobs: int | None = None, design: str = "independent") -> Path:
    """Write ``<work>/<name>.yaml`` (a goldenpath sweep over ``base``: ``fixed`` is its
    ``set``, then ``grid``, ``seeds``, ``design`` and ``forks`` as in a sweep file) and run or continue it;
    returns its dir.

    ``base`` is a config path (absolute, or relative to configs/). Runs already completed are skipped, so a
    re-run of a script only trains what is missing.
    """
    from goldenpath.training.sweep import run_sweep

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(base) if Path(base).is_absolute() else CONFIGS / base
    spec = {"name": name, "base": str(base), "set": dict(fixed or {}), "grid": dict(grid or {}),
            "seeds": list(seeds), "design": design, "forks": list(forks)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return run_sweep(path, out=str(work), jobs=jobs)


def rounded(frame, digits: int = 6):
    """``frame`` with every float rounded to ``digits`` significant digits, so that what a script writes rarely
    changes from one CPU to another (float64 sums and BLAS kernels differ in the last bits). Not always: a value
    within that difference of a rounding boundary, or a numerical zero (~1e-16), still moves; compare the
    tables of two machines with a tolerance, not byte for byte."""
    out = frame.copy()
    for c in out.columns[[k == "f" for k in out.dtypes.map(lambda t: t.kind)]]:
        out[c] = [float(f"{v:.{digits}g}") for v in out[c]]
    return out


def interval(value: float, low: float, high: float, digits: int = 2) -> str:
    """``1.23 [1.01, 1.50]``."""
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(frame, floatfmt: str = ".3g") -> str:
    """A pipe table (no extra dependency): one header row, then one row per frame row."""
    def cell(v):
        if isinstance(v, float):
            return "" if v != v else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
