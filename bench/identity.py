"""Behaviour-identity check for a refactor that must be bit-identical.

Drives goldenpath only through its CLI (``python -m goldenpath ...`` subprocesses, on the CPU, one thread
each, into a fresh temporary directory and cache) and fingerprints what it writes:

  mlp     tiny MLP on the teacher stream                  gauss   tiny CNN, Noisy-SGD (noise.kind=gaussian)
  dp      tiny group-norm CNN, DP-SGD (per-sample clip)   markov  tiny GPT-2 on the Markov text stream
  gauss-fork  gauss forked at step 30 with noise.sigma=4   sweep   tiny CNN, 2 lr x 2 seeds + forks at loss 2.25
  (batch x 2), then goldenpath compare --metrics tv,kl,js,top1,cka,lmc

Fingerprint: the sha256 of every *.safetensors (path relative to its run) but the resume RNG state (SKIP),
every metrics.jsonl line less its timing fields (DROP_KEYS), the sweep's runs.csv and every compare/ table
(*.csv, distances.parquet) read as data, floats in repr (exact); the working directory in any text reads WORK.
What was dropped was found by running twice: nothing else differs between two identical invocations.

    python bench/identity.py --out base.json     # write the fingerprint
    python bench/identity.py --check base.json   # exit 0 "identical", else exit 1 with a short diff
    (--keep DIR keeps the runs in DIR; a failed goldenpath command exits 1 with its output's tail)

Which goldenpath is exercised is whatever ``python -m goldenpath`` imports (set PYTHONPATH to pick a
checkout); the script prints its path first. About 70 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DROP_KEYS = {"seconds"}  # metrics.jsonl: wall-clock seconds of the log window
SKIP = "rank*.safetensors"  # checkpoints/last: torch's global RNG state, randomly seeded at each process start
BASE = "{cpu: true, threads: 1, log: {progress: false, every: 5}, budget: {min_progress: null}}\n"
TEACHER = ["data.source=teacher", "data.image_size=16", "data.eval_size=256", "data.probe_size=64",
           "optim.lr=0.05", "optim.batch_size=32", "checkpoint.eval_every=10", "budget.samples=3200"]
CNN = [*TEACHER, "model.name=cnn", "model.width=8", "model.depth=2"]
RUNS = {
    "mlp": [*TEACHER, "model.name=mlp", "model.width=32", "model.depth=1", "checkpoint.targets=[2.1,2.0]"],
    "dp": [*CNN, "model.norm=group", "noise.kind=dp", "noise.sigma=0.5", "noise.clip=1.0", "noise.delta=1e-5",
           "optim.momentum=0.9", "checkpoint.targets=[2.4,2.3]"],
    "gauss": [*CNN, "noise.kind=gaussian", "noise.sigma=1.0", "checkpoint.targets=[2.2,2.1]",
              "checkpoint.steps=[30]"],
    "markov": ["data.source=markov", "data.vocab_size=16", "data.order=2", "data.seq_len=16", "data.eval_size=32",
               "data.probe_size=16", "model.name=gpt2", "model.width=32", "model.depth=1", "model.heads=2",
               "optim.name=adamw", "optim.lr=0.003", "optim.batch_size=8", "checkpoint.eval_every=10",
               "budget.samples=800", "checkpoint.targets=[2.76,2.74]"],
}
SWEEP = """name: sweep
base: base.yaml
set: {%s}
grid: {optim.lr: [0.03, 0.06]}
seeds: [0, 1]
forks: [{at_loss: 2.25, set: {optim.batch_size: x2}, where: {optim.lr: 0.06}}]
""" % ", ".join(f"{k}: {v}" for k, v in dict(o.split("=", 1) for o in [
    *CNN, "budget.samples=1600", "checkpoint.targets=[2.25,2.2]", "checkpoint.eval_every=5"]).items())


def gp(work: Path, *args: str) -> None:
    """Run ``python -m goldenpath ARGS`` in work; exit 1 with its output's tail when it fails."""
    env = {**os.environ, "GOLDENPATH_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    p = subprocess.run([sys.executable, "-m", "goldenpath", *args], cwd=work, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"FAILED (rc {p.returncode}): goldenpath {' '.join(args)}\n{(p.stdout + p.stderr)[-3000:]}")


def table_rows(path: Path) -> list[str]:
    import pandas as pd
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    return [json.dumps(dict(zip(frame.columns, map(repr, row)))) for row in frame.itertuples(index=False)]


def fingerprint(work: Path) -> dict[str, str]:
    """Run everything into work; return {"<run>/<file>[:<line>]": sha256 or normalised line}."""
    out = work / "out"
    where = subprocess.run([sys.executable, "-c", "import goldenpath; print(goldenpath.__file__)"],
                           capture_output=True, text=True, cwd=work)
    print("goldenpath:", where.stdout.strip() or where.stderr.strip()[-500:], flush=True)
    (work / "base.yaml").write_text(BASE)
    (work / "sweep.yaml").write_text(SWEEP + f"out: {out}\n")
    with ThreadPoolExecutor(2) as pool:  # two single-threaded runs at a time
        list(pool.map(lambda kv: gp(work, "train", "base.yaml", *kv[1], f"out={out}", f"name={kv[0]}"), RUNS.items()))
        # at 3351d66 a noised fork crashes where its noise key stream_key(seed, "fork", step) is negative
        # (gauss at loss 2.2, step 43, does): step 30 is a step where it is not
        fork = pool.submit(gp, work, "fork", str(out / "gauss"), "--at-step", "30", "--name", "gauss-fork",
                           "noise.sigma=4.0")
        gp(work, "sweep", "sweep.yaml", "--jobs", "1")
        fork.result()
    gp(work, "compare", str(out / "sweep"), "--metrics", "tv,kl,js,top1,cka,lmc", "--lmc-points", "3",
       "--no-figures", "--device", "cpu")
    fp = {}
    for run in sorted({p.parent for p in out.rglob("metrics.jsonl")}):
        name = run.relative_to(out).as_posix()
        for f in sorted(set(run.rglob("*.safetensors")) - set(run.rglob(SKIP))):
            fp[f"{name}/{f.relative_to(run).as_posix()}"] = hashlib.sha256(f.read_bytes()).hexdigest()
        for i, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
            fp[f"{name}/metrics.jsonl:{i}"] = json.dumps({k: v for k, v in json.loads(line).items()
                                                          if k not in DROP_KEYS}, sort_keys=True)
    tables = [out / "sweep" / "runs.csv", *sorted((out / "sweep" / "compare").glob("*.csv")),
              *sorted((out / "sweep" / "compare").glob("*.parquet"))]
    for t in tables:
        for i, row in enumerate(table_rows(t), 1):
            fp[f"{t.relative_to(out).as_posix()}:{i}"] = row
    return {k: v.replace(str(work), "WORK") for k, v in fp.items()}  # forked_from, fork.parent


def changed(a: str, b: str) -> str:
    """The fields of two JSON lines that differ (the whole values for a hash)."""
    if not a.startswith("{"):
        return f"{a[:16]}.. -> {b[:16]}.."
    a, b = json.loads(a), json.loads(b)
    return "; ".join(f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}" for k in sorted(a.keys() | b.keys())
                     if a.get(k) != b.get(k))[:300]


def diff(old: dict[str, str], new: dict[str, str], limit: int = 15) -> list[str]:
    """One line per differing entry (the first ``limit``), then how many differ in each run or table."""
    natural = lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]
    keys = sorted((k for k in old.keys() | new.keys() if old.get(k) != new.get(k)), key=natural)
    lines = [f"  {k}: " + ("missing now" if k not in new else "new" if k not in old else changed(old[k], new[k]))
             for k in keys[:limit]]
    where = Counter(re.split(r"/checkpoints/|/metrics\.jsonl|:", k)[0] for k in keys)  # the run or the table
    return lines + [f"{len(keys)} entries differ (of {len(old)} in the baseline): "
                    + ", ".join(f"{w} ({n})" for w, n in where.items())] if keys else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="write the fingerprint to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with this fingerprint; exit 1 on any difference")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    start = time.time()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        fp = fingerprint(args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="identity-") as tmp:
            fp = fingerprint(Path(tmp))
    print(f"{len(fp)} entries in {time.time() - start:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(fp, indent=0, sort_keys=True) + "\n")
        print("wrote", args.out)
        return
    changes = diff(json.loads(args.check.read_text()), fp)
    if changes:
        print("\n".join(changes))
        sys.exit(1)
    print("identical")


if __name__ == "__main__":
    main()
