"""Command line: ``goldenpath <verb> ...``.

    goldenpath train CONFIG [key=value ...]     # prints the run directory last
    goldenpath demo [--out DIR]                 # the README's main job

Exit codes: 0 success, 2 bad input (one line on stderr naming the field and the fix), 1 failure during
work (the run's status.json records it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from goldenpath.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        print(f"goldenpath: {message}; see goldenpath {self.prog.split()[-1]} --help", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="goldenpath", description="Study SGD noise in online deep learning.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = verbs.add_parser("train", help="train one run (resumes when its directory holds a checkpoint)")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    p = verbs.add_parser("demo", help="short vision and language runs on the embedded streams")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    return parser


def _train(args) -> int:
    from goldenpath.checkpoints import read_json
    from goldenpath.train import train

    run_dir = train(load_config(args.config, args.overrides))
    state = read_json(run_dir / "status.json")["state"]
    _print_main(str(run_dir))
    return 0 if state == "completed" else 1


def _demo(args) -> int:
    from goldenpath.checkpoints import read_json
    from goldenpath.train import train

    code = 0
    for name in ("teacher-cnn", "markov-gpt2"):
        path = CONFIGS / f"{name}.yaml"
        if not path.exists():
            raise ConfigError("demo", f"{path} not found", "run from a source checkout (pip install -e .)")
        run_dir = train(load_config(path, [f"out={args.out}"]))
        status = read_json(run_dir / "status.json")
        saved = sorted((run_dir / "checkpoints").glob("target-*"))
        _print_main(f"{name}: {status['state']} after {status['samples']} samples, eval loss "
                    f"{status['eval_loss']:.4f} (Bayes floor {status['loss_floor']:.4f}); "
                    f"{len(saved)} loss-matched checkpoints:")
        for d in saved:
            _print_main(f"  {d}")
        code |= status["state"] != "completed"
    return code


def _print_main(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = {"train": _train, "demo": _demo}[args.verb](args)
    except ConfigError as e:
        print(f"goldenpath: {e}", file=sys.stderr)
        code = 2
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
