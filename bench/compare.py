"""Cost of ``goldenpath compare`` against the forwards it cannot avoid, measured in the same run.

    python bench/compare.py [--sizes 8,16] [--rounds 3] [--models cnn,tiny-lm] [--probe-size K] [--compiled-metrics]
    python bench/compare.py --stats 8x10
    python bench/compare.py --design 4x10 [--targets 3] [--models cnn]

A sweep directory of N loss-target checkpoints (one target, N runs with random weights; the cost does not
depend on what the weights are) is compared with all four metrics and the default 1000 bootstrap
resamples, no cache (a fresh sweep directory), with the allocator settings of ``goldenpath``'s command line
(``goldenpath.training.runtime.tune_malloc``). The figure reported is wall time / (N x one model's forward over the
probe set), for the teacher CNN and the tiny Markov GPT-2. Goal: <= 1.2. Each line also splits the median
round's time into the models' forwards, the pair metrics and the rest (loading, statistics, tables), and gives
the time of a second compare of the same sweep, every pair from the cache the first one wrote, and the cache's size.

The rest hardly depends on the probe set, the forwards and pair metrics grow with it: ``--probe-size K``
(``data.probe_size``; the configs': 1024 images, 128 sequences) shows how the ratio falls as the forwards
grow against compare's fixed costs.

``--compiled-metrics`` times the same with the pair metrics (tv, kl, js) under ``torch.compile`` and
reports their largest difference from the eager metrics on a near-identical pair (float32 accuracy).

``--design 4x10`` compares a sweep as a study lays it out: 4 settings (learning rates) of 10 independent seeds,
each run with a checkpoint at each of ``--targets`` loss targets, and splits the median round's time into the
forwards, the pair metrics, the setting statistics (every pair of settings, the family tests), the pair rows
(each pair's bootstrap interval), the tables and the rest. There the statistics and pair rows grow with the
settings and pairs while the forwards grow with the runs.

``--stats 8x10`` times compare's statistics alone at one target and metric for 8 settings of 10 independent
seeds each (random per-unit distances over 1024 probe units): every pair of settings
(``stats.compare_settings``, with the location test) and one family of 3 settings against the first
(``stats.family_test``), 2000 relabellings where they are not few enough to enumerate.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import torch

from goldenpath.store import files, rundir as ckpt
from goldenpath.training.runtime import strict_float32, tune_malloc
from goldenpath.comparison.compare import compare
from goldenpath.config import load_config, to_dict
from goldenpath.models import build_model, logits

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"cnn": ROOT / "configs" / "teacher-cnn.yaml", "tiny-lm": ROOT / "configs" / "markov-gpt2.yaml"}


def make_sweep(directory: Path, config_path: Path, n: int, overrides=(), *, settings: int = 1,
               targets: tuple[float, ...] = (1.0,)) -> Path:
    """``settings`` x ``n`` runs (settings differ in their learning rate, every run has a seed of its own), each
    with one checkpoint per loss target (random weights: the cost does not depend on them)."""
    for s in range(settings * n):
        name = f"lr{s // n}-run{s}" if settings > 1 else f"run{s}"
        lr = [f"optim.lr={0.01 * (1 + s // n)}"] if settings > 1 else []
        config = load_config(config_path, [f"out={directory}", f"name={name}", f"seed={s}", *lr, *overrides])
        run = directory / name
        run.mkdir(parents=True)
        files.write_text(run / "config.yaml", ckpt.config_text(to_dict(config)))
        model = build_model(config.model, config.data.build().info, seed=s)
        for target in targets:
            ckpt.save_checkpoint(run / "checkpoints" / ckpt.target_name(target), model,
                                 {"target": target, "eval_loss": target * 0.99, "step": 0, "samples": 0, "tokens": 0})
    return directory


def forward_seconds(config_path: Path, chunk: int = 256, device: str = "cpu", overrides=()) -> float:
    """One model's forward over the probe set, as compare runs it (chunks, no grad)."""
    config = load_config(config_path, list(overrides))
    source = config.data.build()
    probe = {k: v.to(device) for k, v in source.heldout("probe").items() if k != "ids"}
    model = build_model(config.model, source.info, seed=0).to(device).eval()
    n = len(next(iter(probe.values())))

    def run():
        with torch.no_grad(), strict_float32():  # as compare's forwards: no TF32 on a GPU
            for lo in range(0, n, chunk):
                logits(model, {k: v[lo : lo + chunk] for k, v in probe.items()})
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    return (time.perf_counter() - t0) / 3


@contextlib.contextmanager
def split_timed(device: str = "cpu"):
    """Within the block, ``goldenpath compare``'s seconds in the models' forwards, in the pair metrics
    (pair_table less its forwards), in the setting statistics (``verdicts.setting_rows``: every pair of settings,
    the family tests, the trends), in the pair rows (each pair's bootstrap interval) and in writing the tables
    and the answer: yields a dict filled at exit with ``forwards_s``, ``pairs_s``, ``stats_s``, ``rows_s`` and
    ``tables_s``."""
    import goldenpath.comparison.compare as gc
    import goldenpath.comparison.pairs as gp
    from goldenpath.comparison import verdicts

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    got = {"forwards_s": 0.0, "pair_sums_s": 0.0, "stats_s": 0.0, "rows_s": 0.0, "tables_s": 0.0}
    places = [(gp, "logits", "forwards_s"), (gc, "pair_table", "pair_sums_s"), (verdicts, "setting_rows", "stats_s"),
              (gc, "_distance_rows", "rows_s"), (gc, "_write_tables", "tables_s")]
    originals = [getattr(owner, name) for owner, name, _ in places]

    def wrap(fn, key):
        def timed(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            got[key] += time.perf_counter() - t0
            return out
        return timed

    for (owner, name, key), fn in zip(places, originals):
        setattr(owner, name, wrap(fn, key))
    try:
        yield got
    finally:
        for (owner, name, _), fn in zip(places, originals):
            setattr(owner, name, fn)
        got["pairs_s"] = got.pop("pair_sums_s") - got["forwards_s"]


@contextlib.contextmanager
def compiled_metrics():
    """Within the block, the pair metrics tv, kl and js under torch.compile (yields the eager ones, restored at
    exit). kl is computed from inner products instead wherever no token is ruled out (pairs._Gram)."""
    from goldenpath.comparison import distances

    eager = dict(distances.ON_DISTS)
    distances.ON_DISTS.update({m: torch.compile(eager[m], dynamic=True) for m in ("tv", "kl", "js")})
    try:
        yield eager
    finally:
        distances.ON_DISTS.update(eager)


@contextlib.contextmanager
def without_pair_kernel():
    """Within the block, tv and js of every pair from the eager forms even where compare would run its Triton
    kernel (CUDA): the baseline the kernel is measured against."""
    from goldenpath.comparison import pairs

    use = pairs.use_kernel
    pairs.use_kernel = lambda dist: False
    try:
        yield
    finally:
        pairs.use_kernel = use


def check_near_equal(eager: dict) -> None:
    """Print how far the compiled metrics are from ``eager`` on two near-equal models (float32 accuracy)."""
    from goldenpath.comparison import distances

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, 512, generator=g) * 3
    b = a + 1e-4 * torch.randn(a.shape, generator=g)
    da, db = distances.Dist(a), distances.Dist(b)
    for m in ("tv", "kl", "js"):
        ref = eager[m](da, db).double()
        got = distances.ON_DISTS[m](da, db).double()
        rel = float((got - ref).abs().max() / ref.abs().max())
        print(f"compiled {m}: largest difference from eager / largest value {rel:.2e} "
              f"(mean value {float(ref.mean()):.2e})")


def differences(eager, other) -> dict[str, float]:
    """The largest difference of each metric's pair values between two compares of the same sweep (DataFrames
    as ``compare`` returns them): absolute, and for kl relative to the value (compare's tolerances: 1e-5, kl 1e-4
    relative)."""
    keys = ["target", "run_a", "run_b", "kind", "metric"]
    both = eager.merge(other, on=keys, suffixes=("", "_other"), validate="one_to_one")
    if len(both) != len(eager) or len(both) != len(other):
        raise ValueError(f"the two compares have different pairs ({len(eager)}, {len(other)}, {len(both)} shared)")
    out = {}
    for metric, rows in both.groupby("metric"):
        gap = (rows["value"] - rows["value_other"]).abs()
        if metric == "kl":
            gap = gap / rows["value"].abs().clip(lower=1e-30)
        out[str(metric)] = float(gap.max())
    return out


def stats_seconds(settings: int, seeds: int, units: int = 1024) -> dict[str, float]:
    """Seconds of compare's statistics at one target and metric for ``settings`` x ``seeds`` independent runs."""
    import itertools

    import numpy as np

    from goldenpath.comparison import stats
    from goldenpath.comparison.design import Design

    design = Design(tuple(tuple(range(k * seeds, (k + 1) * seeds)) for k in range(settings)),
                    tuple(range(settings * seeds)))
    pairs = len(list(itertools.combinations(range(settings * seeds), 2)))
    sums = np.random.default_rng(0).random((pairs, units)) * 0.1
    counts = np.ones(units)
    t0 = time.perf_counter()
    stats.compare_settings(sums, counts, design, sq_sums=sums**2)
    t1 = time.perf_counter()
    family = list(range(1, min(settings, 4)))
    stats.family_test(sums, counts, design, family, 0, sq_sums=sums**2, x=np.log(np.arange(1.0, len(family) + 1)))
    return {"compare_settings_s": t1 - t0, "family_test_s": time.perf_counter() - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", default=None, metavar="SxN",
                        help="only time the statistics of S settings x N seeds (e.g. 8x10)")
    parser.add_argument("--design", default=None, metavar="SxN",
                        help="compare S settings x N seeds at --targets targets (e.g. 4x10)")
    parser.add_argument("--targets", type=int, default=3, help="loss targets of every run (with --design)")
    parser.add_argument("--sizes", default="8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--probe-size", type=int, default=None,
                        help="data.probe_size of every run (default: the config's)")
    parser.add_argument("--compiled-metrics", action="store_true", help="torch.compile the pair metrics")
    args = parser.parse_args()

    def design(option: str, text: str) -> tuple[int, int]:
        try:
            settings, seeds = (int(x) for x in text.lower().split("x"))
        except ValueError:
            parser.error(f"{option}: got {text!r}; write settings x seeds, e.g. 8x10")
        return settings, seeds

    if args.design:
        run_design(*design("--design", args.design), args)
        return
    if args.stats:
        settings, seeds = design("--stats", args.stats)
        got = stats_seconds(settings, seeds)
        print(f"{settings} settings x {seeds} seeds, one target and metric: every pair of settings "
              f"{got['compare_settings_s']:.3f} s, a family test {got['family_test_s']:.3f} s")
        return
    with compiled_metrics() if args.compiled_metrics else contextlib.nullcontext() as eager:
        if args.compiled_metrics:
            check_near_equal(eager)
        run(args)


def run_design(settings: int, seeds: int, args) -> dict[str, dict]:
    """The median of ``args.rounds`` compares of ``settings`` x ``seeds`` runs at ``args.targets`` targets, split
    (printed, and returned by model: :func:`split_timed`'s seconds, ``wall_s``, ``forward_s``, ``forwards``)."""
    tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports and first calls are paid once per process
        compare(make_sweep(Path(tmp) / "w", MODELS["cnn"], 2, settings=2))
    targets = tuple(1.0 + 0.5 * k for k in range(args.targets))
    overrides = [] if args.probe_size is None else [f"data.probe_size={args.probe_size}"]
    out = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            sweep = make_sweep(Path(tmp) / "s", MODELS[name], seeds, overrides, settings=settings, targets=targets)
            rounds = []
            for _ in range(args.rounds):
                with split_timed() as split:
                    t0 = time.perf_counter()
                    compare(sweep)
                    split["wall_s"] = time.perf_counter() - t0
                rounds.append(split)
                shutil.rmtree(sweep / "compare")
            one = forward_seconds(MODELS[name], overrides=overrides)
        got = sorted(rounds, key=lambda r: r["wall_s"])[len(rounds) // 2]
        forwards = settings * seeds * len(targets)
        out[name] = {**got, "forward_s": one, "forwards": forwards}
        rest = got["wall_s"] - sum(v for k, v in got.items() if k != "wall_s")
        print(f"{name:8s} {settings} settings x {seeds} seeds, {len(targets)} targets: {got['wall_s']:.2f} s = "
              f"{got['wall_s'] / (forwards * one):.2f} x {forwards} forwards; forwards {got['forwards_s']:.2f} s, "
              f"pair metrics {got['pairs_s']:.2f} s, statistics {got['stats_s']:.2f} s, pair rows "
              f"{got['rows_s']:.2f} s, tables {got['tables_s']:.2f} s, the rest {rest:.2f} s", flush=True)
    return out


def run(args) -> None:
    tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports and first calls are paid once per process
        compare(make_sweep(Path(tmp) / "w", MODELS["cnn"], 2))
    overrides = [] if args.probe_size is None else [f"data.probe_size={args.probe_size}"]
    for name, path in ((m, MODELS[m]) for m in args.models.split(",")):
        for n in [int(x) for x in args.sizes.split(",")]:
            ratios, parts = [], []
            for _ in range(args.rounds):
                with tempfile.TemporaryDirectory() as tmp:
                    sweep = make_sweep(Path(tmp) / "s", path, n, overrides)
                    with split_timed() as split:
                        t0 = time.perf_counter()
                        compare(sweep)
                        wall = time.perf_counter() - t0
                    one = forward_seconds(path, overrides=overrides)
                    ratios.append(wall / (n * one))
                    parts.append({**split, "wall_s": wall})
                    t0 = time.perf_counter()
                    compare(sweep)  # again: every pair from the cache the first compare wrote
                    parts[-1]["cached_s"] = time.perf_counter() - t0
                    parts[-1]["cache_mb"] = sum(f.stat().st_size for f in (sweep / "compare" / "cache").glob("*")) / 1e6
                    shutil.rmtree(sweep / "compare", ignore_errors=True)
            k = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]  # the median round
            print(f"{name:8s} N={n:3d}: compare / (N x forward) = {ratios[k]:.2f} "
                  f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.2); in that round: forwards "
                  f"{parts[k]['forwards_s']:.3f} s, pair metrics {parts[k]['pairs_s']:.3f} s, the rest "
                  f"{parts[k]['wall_s'] - parts[k]['forwards_s'] - parts[k]['pairs_s']:.3f} s; again from its cache "
                  f"{parts[k]['cached_s']:.3f} s ({parts[k]['cache_mb']:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
