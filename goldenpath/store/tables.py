"""The tables compare writes into a sweep directory, as the drawing reads them.

``compare/`` (``compare-<shift>/`` for a shifted probe set) holds ``distances.parquet``, ``summary.csv``,
``settings.csv``, ``family.csv``, ``trend.csv``, ``compute.csv``, ``excluded.csv``, ``answer.json`` (per
metric: the notes and the answer's sentences) and ``inputs.json`` (the options and every run's checkpoints
the tables come from; written last).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from goldenpath.store.files import read_json

COMPARE = "compare"
ANSWER = "answer.json"
INPUTS = "inputs.json"
NEEDED = ("distances.parquet", "summary.csv", ANSWER)  # what a page of distances cannot do without


def missing(tables: Path) -> str | None:
    """The first table a page of distances needs that ``tables`` lacks (None: all there)."""
    return next((name for name in NEEDED if not (tables / name).exists()), None)


def _csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def read_tables(tables: Path) -> dict:
    """Every table of a tables directory (an empty frame for an optional one that is absent or empty)."""
    return {"distances": pd.read_parquet(tables / "distances.parquet"), "summary": pd.read_csv(tables / "summary.csv"),
            "settings": _csv(tables / "settings.csv"), "trend": _csv(tables / "trend.csv"),
            "family": _csv(tables / "family.csv"), "compute": _csv(tables / "compute.csv"),
            "answer": read_json(tables / ANSWER)}


def shifted_dirs(sweep_dir: Path) -> list[Path]:
    """Each ``compare-<shift>/`` of a sweep that holds a summary, in name order."""
    return sorted(p.parent for p in Path(sweep_dir).glob(f"{COMPARE}-*/summary.csv"))


def shift_of(tables: Path) -> str | None:
    """The probe shift a ``compare-<shift>/`` was made with (None when it records no inputs)."""
    inputs = tables / INPUTS
    return read_json(inputs)["options"]["probe_shift"] if inputs.exists() else None
