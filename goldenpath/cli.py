"""Command line: ``goldenpath <verb> ...``.

    goldenpath train CONFIG [key=value ...]     # prints the run directory last
    goldenpath sweep SWEEP_CONFIG [--out DIR] [--executor local|slurm] [--jobs N] [--retry-diverged]
    goldenpath fork RUN_DIR (--at-loss L | --at-step S) [key=value ...]   # key=x4 or key=/4: relative
    goldenpath compare SWEEP_DIR [--metrics tv,kl,js,top1,cka,lmc] [--probe-shift noise:0.5]  # + heatmaps
    goldenpath noise RUN_DIR (--at-loss L | --at-step S) [--batches M] [--batch-size b]  # gradient noise
    goldenpath toys lls|dln [key=value ...] [--out DIR]    # theory toys: tables, figures, a verdict
    goldenpath report SWEEP_DIR                 # -> SWEEP_DIR/report.html (compares again what changed)
    goldenpath demo [--out DIR]                 # the README's main job

Exit codes: 0 success (and a bare ``goldenpath``, which prints this help), 2 bad input (one line on stderr
naming the field and the fix), 1 failure during work (the run's status.json records it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from goldenpath.config import ConfigError, load_config
from goldenpath.config.naming import default_run_name

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"goldenpath: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


TRAIN_HELP = """Train one run into <out>/<name>/ (default runs/<config name>_<overrides>, e.g.
runs/teacher-cnn_lr=0.05: each command line gets its own directory). Running the same command again
resumes from checkpoints/last. Ctrl-C stops at the current step, saves the resume point of the target
search's last eval (the steps since are trained again, identically, on resume) and exits with 130 (a
second Ctrl-C exits at once). On a CPU the run uses threads=N from the config, else $OMP_NUM_THREADS,
else half the usable cores (1 to 4)."""


def _parser() -> argparse.ArgumentParser:
    from goldenpath import __version__

    parser = _Parser(prog="goldenpath", description="Study SGD noise in online deep learning.")
    parser.add_argument("--version", action="version", version=f"goldenpath {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = verbs.add_parser("train", help="train one run (resumes when its directory holds a checkpoint)",
                         description=TRAIN_HELP)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. optim.lr=0.1")
    p = verbs.add_parser("sweep", help="run a grid of runs (skips completed ones, resumes interrupted ones)")
    p.add_argument("sweep_config", help="sweep YAML: base, set, grid, seeds, forks")
    p.add_argument("--out", help="output root (default: the sweep's out, else runs)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--jobs", type=int, help="runs at once (default: one per GPU, else 1)")
    p.add_argument("--retry-diverged", action="store_true", help="run diverged points again from scratch")
    p.add_argument("--plan", action="store_true", help="print what the design can decide (reference, family, "
                   "seeds, the smallest adjusted p) and stop; a sweep prints it when it starts")
    p = verbs.add_parser("fork", help="continue a run from one of its checkpoints with changed knobs")
    # one positional list (RUN_DIR then overrides): argparse cannot split two positionals around options
    p.add_argument("run_dir_and_overrides", nargs="+", metavar="RUN_DIR [key=value ...]",
                   help="the parent's run directory, then changed keys, e.g. optim.batch_size=x4 optim.lr=/4")
    at = p.add_mutually_exclusive_group(required=True)
    at.add_argument("--at-loss", type=float, help="the parent's loss-target checkpoint")
    at.add_argument("--at-step", type=int, help="the parent's checkpoint at this step (checkpoint.steps)")
    p.add_argument("--name", help="the child's run name (default: derived from the fork point and changes)")
    p = verbs.add_parser("compare", help="loss-matched functional distances between a sweep's runs")
    p.add_argument("sweep_dir")
    p.add_argument("--metrics", default="tv,kl,js,top1",
                   help="comma-separated: tv, kl, js, top1, sq (half the squared distance of the predicted "
                        "distributions), cka (1 - linear CKA of the penultimate features), lmc (loss barrier on "
                        "the linear path between the weights)")
    p.add_argument("--probe-shift", metavar="KIND:VALUE",
                   help="compare on a shifted probe set: noise:SIGMA, contrast:C (images), shuffle:F (text), "
                        "source:KEY=VALUE (tables under compare-<shift>/)")
    p.add_argument("--lmc-points", type=int, default=11, help="points on each linear path for lmc (default 11)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--include-flagged", action="store_true",
                   help="keep stalled runs and checkpoints more than 2%% below their target in the statistics")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p = verbs.add_parser("noise", help="gradient noise of a checkpoint: tail index, Gaussianity, noise scale")
    p.add_argument("run_dir")
    at = p.add_mutually_exclusive_group(required=True)
    at.add_argument("--at-loss", type=float, help="the run's loss-target checkpoint")
    at.add_argument("--at-step", type=int, help="the run's checkpoint at this step")
    p.add_argument("--batches", type=int, default=100, help="fresh mini-batches M (default 100)")
    p.add_argument("--batch-size", type=int, help="b (default: the run's batch size)")
    p.add_argument("--max-coords", type=int, default=200_000, help="coordinates kept (a fixed random subset)")
    p = verbs.add_parser("toys", help="theory toys: linear least squares (lls), diagonal linear networks (dln)")
    p.add_argument("which", choices=["lls", "dln"])
    p.add_argument("overrides", nargs="*", default=[],
                   help="dln: e.g. sigmas=[0,0.3,1] noise=label seeds=16; lls: e.g. sigma=1 batch=5")
    p.add_argument("--out", default="runs", help="output root (default: runs)")
    p = verbs.add_parser("report", help="one self-contained HTML page for a sweep (compares again first where runs "
                         "landed or changed since compare)")
    p.add_argument("sweep_dir")
    p = verbs.add_parser("demo", help="a small sweep on the embedded vision stream, compared and drawn")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    return parser


# Overrides that do not change what a run computes: left out of its default name.


def _train(args) -> int:
    from goldenpath.training.trainer import train

    config = load_config(args.config, args.overrides)
    if not any(o.split("=", 1)[0].strip() == "name" for o in args.overrides):
        config = load_config(args.config, [*args.overrides, f"name={default_run_name(config.name, args.overrides)}"])
    return _finish_run(train(config))


def _finish_run(run_dir: Path) -> int:
    """One summary line, then the run directory last; exit 0 only for a completed run (130 after Ctrl-C)."""
    import shlex

    from goldenpath.store.rundir import RunDir
    from goldenpath.training.runtime import EXIT_CTRL_C

    s = RunDir(run_dir).status()
    if s["state"] == "interrupted":
        _print_main(f"interrupted ({s.get('reason')}) at step {s.get('step')}, {s.get('samples')} samples; resume "
                    f"state saved in {RunDir(run_dir).last}; to resume run the same command: "
                    f"{shlex.join(['goldenpath', *sys.argv[1:]])}")
        _print_main(str(run_dir))
        return EXIT_CTRL_C if s.get("reason") == "Ctrl-C" else 143
    line = f"{s['state']} ({s.get('reason')}): {s.get('step')} steps, {s.get('samples')} samples"
    if s.get("eval_loss") is not None:
        line += f", eval loss {s['eval_loss']:.4f}"
    if s.get("loss_floor") is not None:
        line += f" (Bayes floor {s['loss_floor']:.4f})"
    line += f", targets reached: {', '.join(s.get('targets_reached') or {}) or 'none'}"
    if s.get("epsilon") is not None:
        line += f", epsilon {s['epsilon']:.3g} at delta {s['delta']:g}"
    _print_main(line)
    _print_main(str(run_dir))
    return 0 if s["state"] == "completed" else 1


def _sweep(args) -> int:
    from goldenpath.training.sweep import SweepInterrupted, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("--jobs", f"got {args.jobs}", "use a positive number of parallel runs")
    from goldenpath.comparison.plan import plan
    from goldenpath.config.grid import load_sweep
    from goldenpath.training.sweep import check_points

    sweep = load_sweep(args.sweep_config)
    check_points(sweep, args.out)  # every point, forks included, before the plan says anything
    for line in plan(sweep):
        print(f"plan: {line}", file=sys.stderr if not args.plan else sys.stdout, flush=True)
    if args.plan:
        return 0
    try:
        sweep_dir = run_sweep(args.sweep_config, out=args.out, executor=args.executor, jobs=args.jobs,
                              retry_diverged=args.retry_diverged)
    except SweepInterrupted as stop:
        return _sweep_interrupted(stop)
    if args.executor == "slurm":
        _print_main(f"submitted to Slurm; follow {sweep_dir}/slurm/")
        _print_main(str(sweep_dir))
        return 0
    counts = _runs_summary(sweep_dir)[1]
    _print_main(str(sweep_dir))
    return 1 if counts.get("failed") else 0


def _sweep_interrupted(stop) -> int:
    """One line: what the interrupted sweep finished and saved, and how to go on."""
    import shlex

    from goldenpath.training.runtime import EXIT_CTRL_C, signal_name

    runs, counts = _runs_summary(stop.sweep_dir)
    _print_main(f"sweep stopped ({signal_name(stop.signum)}): {counts.get('interrupted', 0)} runs saved their resume "
                f"point, {counts.get('pending', 0)} not started; to go on run the same command: "
                f"{shlex.join(['goldenpath', *sys.argv[1:]])}")
    _print_main(str(stop.sweep_dir))
    return EXIT_CTRL_C if signal_name(stop.signum) == "Ctrl-C" else 143


def _runs_summary(sweep_dir: Path):
    """Print how many runs ended in which state; returns (runs.csv as a frame, {state: count})."""
    import pandas as pd

    runs = pd.read_csv(sweep_dir / "runs.csv")
    counts = runs["state"].value_counts().to_dict()
    _print_main(f"{_count(len(runs), 'run')}: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                + f"; table: {sweep_dir / 'runs.csv'}")
    return runs, counts


def _fork(args) -> int:
    from goldenpath.training.fork import fork_config
    from goldenpath.training.trainer import train

    parent, *overrides = args.run_dir_and_overrides
    return _finish_run(train(fork_config(parent, args.at_loss, args.at_step, overrides, name=args.name)))


def compare_and_draw(sweep_dir: Path, options: dict | None = None, *, figures: bool = True,
                     report: bool = False) -> tuple[object, Path | None]:
    """From a sweep's runs to its tables, figures and report page: the one path of the compare, demo and report
    verbs. Returns (compare's pair rows or None, the report page or None).

    ``options``: compare's keyword arguments: compare now. None: bring the tables that exist up to date
    (:func:`_refresh`). ``figures``: draw the figures after ``compare/`` was compared (they are drawn from it
    alone). ``report``: then write the page.
    """
    from goldenpath.comparison.compare import compare
    from goldenpath.draw.figures import write_figures
    from goldenpath.draw.report import write_report

    frame, warnings = None, []
    if options is not None:
        frame, unshifted = compare(sweep_dir, **options), options.get("probe_shift") is None
    else:
        unshifted = _refresh(sweep_dir, warnings)
    if figures and unshifted:
        write_figures(sweep_dir)
    return frame, write_report(sweep_dir, warnings=warnings) if report else None


def _refresh(sweep_dir: Path, warnings: list[str]) -> bool:
    """Compare again each tables directory whose runs changed since compare wrote it, with the options it was
    made with (its pair cache keeps the unchanged pairs); write the answer of one an older goldenpath wrote
    without it (from its tables); name in ``warnings`` one that records no inputs. Returns whether
    ``compare/`` was compared again."""
    from goldenpath.comparison.compare import compare, write_answer
    from goldenpath.comparison.runs import changes, collect, last_options
    from goldenpath.store.tables import ANSWER, COMPARE, INPUTS, shift_of, shifted_dirs

    unshifted, collected = False, None
    for tables in [sweep_dir / COMPARE, *shifted_dirs(sweep_dir)]:
        if not (tables / "summary.csv").exists():
            continue  # the page names what is missing
        if not (tables / INPUTS).exists():
            warnings.append(f"{tables.name}/ does not record the runs it compared (an older goldenpath wrote it): "
                            "runs that landed since are not in it; run goldenpath compare again")
            continue
        shift = shift_of(tables)
        collected = collected or collect(sweep_dir)  # once while nothing is compared again
        changed = changes(sweep_dir, shift, collected=collected)
        if changed:
            print(f"report: {tables.name}/ is out of date ({'; '.join(changed)}): comparing again with the options "
                  "it was made with (pairs of unchanged checkpoints come from its cache)", file=sys.stderr, flush=True)
            compare(sweep_dir, **last_options(sweep_dir, shift))
            unshifted, collected = unshifted or shift is None, None  # runs still training may have landed more
        elif not (tables / ANSWER).exists():
            write_answer(tables, last_options(sweep_dir, shift)["metrics"])
    return unshifted


def _compare(args) -> int:
    from goldenpath.comparison.compare import conclusions
    from goldenpath.comparison.runs import tables_dir

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("sweep_dir", f"{sweep_dir} is not a directory", "give a sweep directory (it holds runs)")
    options = {"metrics": [m.strip() for m in args.metrics.split(",") if m.strip()], "device": args.device,
               "include_flagged": args.include_flagged, "probe_shift": args.probe_shift,
               "lmc_points": args.lmc_points}
    frame, _ = compare_and_draw(sweep_dir, options, figures=not args.no_figures)
    tables = tables_dir(sweep_dir, args.probe_shift)
    pairs = frame.drop_duplicates(["target", "run_a", "run_b"])
    _print_main(f"{_count(len(pairs), 'pair')} of runs at {_count(frame['target'].nunique(), 'loss target')}; "
                f"tables: {tables}")
    for line in conclusions(sweep_dir, metric=frame["metric"].iloc[0] if len(frame) else "tv",
                            probe_shift=args.probe_shift):
        _print_main(line)
    _print_main(str(tables))
    return 0


def _noise(args) -> int:
    from goldenpath.draw.figures import write_noise_figures
    from goldenpath.gradnoise.collect import summary_line, write_analysis

    table, noise, path = write_analysis(args.run_dir, at_loss=args.at_loss, at_step=args.at_step,
                                        batches=args.batches, batch_size=args.batch_size, max_coords=args.max_coords)
    write_noise_figures(table, noise, path.parent, title=Path(args.run_dir).name)
    _print_main(summary_line(table, args.batches))
    _print_main(str(path))
    return 0


def _toys(args) -> int:
    from goldenpath.store import files
    from goldenpath.draw.figures import write_toy_figure
    from goldenpath.toys.experiments import run_toy, toy_options

    options = toy_options(args.which, args.overrides)
    out = Path(args.out) / f"toys-{args.which}"
    out.mkdir(parents=True, exist_ok=True)
    frame, line = run_toy(args.which, options)
    if args.which == "dln":
        files.write_text(out / "verdict.txt", line + "\n")
    write_toy_figure(frame, args.which, out / "figure.png")
    files.atomic_write(out / "table.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    _print_main(line)
    _print_main(str(out))
    return 0


def _report(args) -> int:
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError("sweep_dir", f"{sweep_dir} is not a directory", "give a sweep directory (it holds runs)")
    try:
        _, path = compare_and_draw(sweep_dir, figures=(sweep_dir / "figures").is_dir(), report=True)
    except ValueError as e:
        raise ConfigError("sweep_dir", str(e), "give a sweep directory whose runs have trained") from None
    page = path.read_text()
    figures, warnings = page.count("<img"), page.count('class="warn"')
    _print_main(f"{_count(figures, 'figure')}, {_count(warnings, 'warning')} on one page")
    _print_main(str(path))
    return 0


def _demo(args) -> int:
    """A small lr x batch x 5-seed sweep, online and offline, then loss-matched comparison and heatmaps."""
    from goldenpath.comparison.compare import conclusions
    from goldenpath.comparison.plan import plan
    from goldenpath.config.grid import load_sweep
    from goldenpath.training.sweep import SweepInterrupted, run_sweep

    path = CONFIGS / "sweeps" / "demo.yaml"
    if not path.exists():
        raise ConfigError("demo", f"{path} not found", "run from a source checkout (pip install -e .)")
    for line in plan(load_sweep(path)):
        print(f"plan: {line}", file=sys.stderr, flush=True)
    try:
        sweep_dir = run_sweep(path, out=args.out, jobs=max(1, min(4, os.cpu_count() or 1)))
    except SweepInterrupted as stop:
        return _sweep_interrupted(stop)
    runs, counts = _runs_summary(sweep_dir)
    # the four output metrics, the penultimate features (cka) and the loss barrier between the weights (lmc);
    # lmc at 5 points on each path (3 inner ones): every pair of runs at every target, a fifth of the cost
    # of the 11-point default
    _, page = compare_and_draw(sweep_dir, {"metrics": ("tv", "kl", "js", "top1", "cka", "lmc"), "lmc_points": 5},
                               report=True)
    for line in conclusions(sweep_dir):
        _print_main(line)
    _print_main(f"tables: {sweep_dir / 'compare'}; figures: {sweep_dir / 'figures'}")
    _print_main(f"report: {page}")
    _print_main(str(sweep_dir))
    return 1 if counts.get("failed") else 0


def _count(n: int, noun: str) -> str:
    """``1 warning``, ``2 warnings``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_main(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare goldenpath: what it can do
        parser.print_help()
        raise SystemExit(0)
    args, extra = parser.parse_known_args(argv)
    if args.verb == "fork":  # key=value after the options: argparse leaves them over
        args.run_dir_and_overrides += [a for a in extra if "=" in a and not a.startswith("-")]
        extra = [a for a in extra if "=" not in a or a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from goldenpath.training.runtime import gpu_memory_share, tune_malloc

    tune_malloc()
    try:
        gpu_memory_share()
        code = {"train": _train, "sweep": _sweep, "fork": _fork, "compare": _compare, "noise": _noise,
                "toys": _toys, "report": _report, "demo": _demo}[args.verb](args)
    except ConfigError as e:
        print(f"goldenpath: {e}", file=sys.stderr)
        code = 2
    except (NotADirectoryError, IsADirectoryError, PermissionError) as e:  # a path given that cannot be used
        print(f"goldenpath: {e.filename}: {e.strerror}; give a path that is a writable directory where one is "
              f"written (out=, --out) and a file where one is read", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        from goldenpath.training.runtime import EXIT_CTRL_C

        print("goldenpath: stopped by Ctrl-C; completed checkpoints and the last saved resume point are kept: "
              "run the same command to resume", file=sys.stderr)
        code = EXIT_CTRL_C
    _exit(code)


def _exit(code: int) -> None:
    """Exit; a multi-process run ends its process group first (gloo can abort at interpreter exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
