"""What bench/science_gpu.sh sends back from a device machine, whatever state its parts ended in.

    python bench/science_pack.py WORK DEST [--out DIR --name NAME]

1. ``DEST/progress.csv``: one row per run under WORK (``WORK/<sweep>/<run>/status.json``): its state, step,
   samples, seconds by kind, best eval loss and targets reached, with its samples/s over its training time.
   A part stopped by its time limit still says how far each run got and how fast: what sizes the study to
   a GPU slot.
2. ``DEST/failed.txt``: the last lines of the log of every run that failed or never started
   (``WORK/<sweep>/logs/<run>.log``), which otherwise stay on the device machine.
3. With ``--out``: ``science_NAME.tar.gz`` (everything in DEST: tables, figures, verdict, progress, failed
   logs) and ``science_NAME.md`` (the verdict, or what there is of it, and the progress in a few lines) in
   DIR. A device machine returns at most 8 files from $OUT: two.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pandas as pd

TAIL_LINES = 40


def progress(work: Path) -> pd.DataFrame:
    """One row per run directory under ``work`` (sweep/run/status.json; a run linked into another sweep, as the
    power study's pooled sweep links its runs, counts once; an unreadable status is a row that says so)."""
    rows = []
    for status in sorted(Path(work).glob("*/*/status.json")):
        if status.parent.is_symlink():
            continue
        try:
            s = json.loads(status.read_text())
        except (OSError, ValueError) as e:
            rows.append({"sweep": status.parent.parent.name, "run": status.parent.name, "state": "unreadable",
                         "reason": f"{type(e).__name__}: {e}"[:200]})
            continue
        seconds = s.get("seconds", {})
        train = seconds.get("train", 0.0)
        rows.append({"sweep": status.parent.parent.name, "run": status.parent.name, "state": s.get("state"),
                     "reason": s.get("reason"), "device": s.get("device"), "step": s.get("step"),
                     "planned_steps": s.get("planned_steps"), "samples": s.get("samples"),
                     **{f"{k}_s": v for k, v in seconds.items()},
                     "samples_per_s": s["samples"] / train if train and s.get("samples") else None,
                     "best_eval_loss": s.get("best_eval_loss"), "targets_reached": len(s.get("targets_reached") or {}),
                     "started": s.get("started"), "updated": s.get("updated")})
    return pd.DataFrame(rows)


def failed_logs(work: Path, frame: pd.DataFrame) -> str:
    """The last TAIL_LINES lines of the log of each failed run, and of each run that stopped before its run
    directory existed (a log without a status)."""
    work = Path(work)
    runs = [(r.sweep, r.run) for r in frame[frame.state == "failed"].itertuples()] if len(frame) else []
    runs += [(log.parent.parent.name, log.stem) for log in sorted(work.glob("*/logs/*.log"))
             if not (log.parent.parent / log.stem / "status.json").exists()]
    parts = []
    for sweep, run in runs:
        log = work / sweep / "logs" / f"{run}.log"
        tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.exists() else ["(no log)"]
        parts.append(f"==> {sweep}/{run}\n" + "\n".join(tail))
    return "\n\n".join(parts)


def summary(frame: pd.DataFrame) -> str:
    """A few lines: runs by state, and the samples made per second over every run together."""
    if not len(frame):
        return "no runs yet"
    lines = [", ".join(f"{n} {state}" for state, n in frame.state.value_counts().sort_index().items())]
    for sweep, runs in frame.groupby("sweep"):
        runs = runs[runs.state != "unreadable"]
        if not len(runs):
            continue
        span = (pd.to_datetime(runs.updated).max() - pd.to_datetime(runs.started).min()).total_seconds()
        together = (f"{runs.samples.sum() / span:,.0f} samples/s together" if span >= 1 else
                    "within a second" if span >= 0 else "no times")
        lines.append(f"{sweep}: {len(runs)} runs, {int(runs.samples.sum()):,} samples in {span:.0f} s of wall time "
                     f"({together}; one run {runs.samples_per_s.median():,.0f} samples/s over its training time, "
                     "median)")
    return "\n".join(lines)


def pack(work: Path, dest: Path, out: Path | None = None, name: str = "gpu") -> list[Path]:
    """Write progress.csv and failed.txt into ``dest``; with ``out``, the archive and the summary there.
    Returns the files written to ``out``."""
    dest.mkdir(parents=True, exist_ok=True)
    frame = progress(work)
    frame.to_csv(dest / "progress.csv", index=False)
    failed = failed_logs(work, frame)
    (dest / "failed.txt").write_text(failed + "\n" if failed else "no run failed\n")
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"science_{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(dest.rglob("*")):
            if f.is_file():
                tar.add(f, arcname=str(f.relative_to(dest)))
    verdict = dest / "verdict.md"
    text = (verdict.read_text() if verdict.exists() else "no verdict.md: the study did not reach its tables\n")
    md = out / f"science_{name}.md"
    md.write_text(f"{text}\n## Progress\n\n{summary(frame)}\n")
    return [archive, md]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work")
    parser.add_argument("dest")
    parser.add_argument("--out")
    parser.add_argument("--name", default="gpu")
    args = parser.parse_args(argv)
    written = pack(Path(args.work), Path(args.dest), Path(args.out) if args.out else None, args.name)
    print(summary(progress(Path(args.work))))
    for f in written:
        print(f"wrote {f}")


if __name__ == "__main__":
    main()
