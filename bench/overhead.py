"""Trainer overhead and stream speed, as ratios against baselines measured in the same run.

    python bench/overhead.py [--rounds 5] [--steps 300] [--configs teacher-mlp,teacher-cnn] [--streams-only]

1. samples/s of ``goldenpath train`` (its training time, eval/checkpoint time reported apart) on each of
   ``--configs`` (the demo's MLP and the teacher CNN), against a minimal hand-written torch loop on the same
   model and the same stream. Goal: ratio >= 0.97. Rounds alternate the two so machine noise hits both alike;
   medians are reported.
2. the embedded streams against the trainer's consumption rate (goal >= 10x), for the teacher MLP and CNN
   and the Markov GPT-2 configs: the rate at which the stream hands the trainer its samples (samples / the
   seconds the trainer spends waiting in ``next_step``: generation, less what the background prefetch of the
   teacher stream did while the trainer stepped), and the stream's bare generation rate in the trainer's
   micro-batch size. For streams that prefetch, rounds alternate prefetch on and off (medians), so the
   trainer's rate with the background thread is compared with its rate without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from goldenpath.config import load_config
from goldenpath.data import build_stream
from goldenpath.data.streams import Stream
from goldenpath.models import build_model
from goldenpath.run import make_optimizer
from goldenpath.train import train

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(config, steps: int) -> float:
    """samples/s of the simplest correct loop: stream -> forward -> mean CE -> backward -> step."""
    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=config.optim.batch_size,
                          micro_batch_size=config.optim.batch_size)
    model = build_model(config.model, source.info, seed=config.seed)
    opt = make_optimizer(model, config.optim)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = stream.next_step()[0]
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * config.optim.batch_size / (time.perf_counter() - t0)


def trainer(config_path: Path, steps: int, out: str, name: str, extra=()) -> dict:
    """Run goldenpath train with only the initial and final evals; its own timers split the time."""
    config = load_config(config_path, [f"budget.steps={steps}", "budget.samples=null", "checkpoint.targets=[]",
                                       f"checkpoint.eval_every={10 * steps}", "checkpoint.last_every_seconds=1e9",
                                       "log.progress=false", f"out={out}", f"name={name}", *extra])
    t0 = time.perf_counter()
    run_dir = train(config)
    wall = time.perf_counter() - t0
    status = json.loads((run_dir / "status.json").read_text())
    samples = status["samples"]
    return {"config": config, "samples_per_s": samples / status["seconds"]["train"],
            "wall_samples_per_s": samples / wall, **{f"{k}_s": v for k, v in status["seconds"].items()}}


def generation_rate(config, seconds: float = 2.0) -> float:
    """Samples/s the stream produces in the trainer's own micro-batch size."""
    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=config.optim.batch_size,
                          micro_batch_size=config.optim.micro_batch_size or config.optim.batch_size)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += sum(len(b["ids"]) for b in stream.next_step())
    return n / (time.perf_counter() - t0)


class Waits:
    """Times every Stream.next_step call of the trainer (patched in for one run); ``prefetch`` forces it."""

    def __init__(self, prefetch: bool | None):
        self.prefetch, self.seconds, self.samples = prefetch, 0.0, 0

    def __enter__(self):
        original, init, waits = Stream.next_step, Stream.__init__, self

        def next_step(stream):
            t0 = time.perf_counter()
            try:
                out = original(stream)
            finally:
                waits.seconds += time.perf_counter() - t0
            waits.samples += sum(len(b["ids"]) for b in out)
            return out

        def __init__(stream, *args, **kw):
            init(stream, *args, **kw)
            if waits.prefetch is not None:
                stream.prefetch = waits.prefetch

        self._restore = (original, init)
        Stream.next_step, Stream.__init__ = next_step, __init__
        return self

    def __exit__(self, *exc):
        Stream.next_step, Stream.__init__ = self._restore


def stream_rates(name: str, out: str, rounds: int) -> dict:
    """Consumption, waits and bare generation of one config's stream; prefetch on and off alternate."""
    path = ROOT / "configs" / f"{name}.yaml"
    prefetches = bool(getattr(load_config(path).data.build(), "prefetch", False))
    modes = (True, False) if prefetches else (None,)
    got: dict = {m: {"consumed": [], "handed": []} for m in modes}
    for r in range(rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            with Waits(mode) as waits:
                res = trainer(path, 150, out, f"stream-{name}-{r}-{mode}")
            got[mode]["consumed"].append(res["samples_per_s"])
            got[mode]["handed"].append(waits.samples / max(waits.seconds, 1e-9))
    made = generation_rate(res["config"])
    row = {"generated_per_s": made, "prefetch": prefetches}
    for mode, v in got.items():
        key = {True: "prefetch_on", False: "prefetch_off", None: "plain"}[mode]
        consumed, handed = statistics.median(v["consumed"]), statistics.median(v["handed"])
        row[key] = {"consumed_per_s": consumed, "handed_per_s": handed, "ratio": handed / consumed,
                    "bare_ratio": made / consumed, "rounds": v}
        print(f"{name} ({key}): the trainer consumes {consumed:7.0f} samples/s; the stream hands them over at "
              f"{handed:9.0f} samples/s: {handed / consumed:6.1f}x (goal >= 10x); bare generation {made:7.0f} "
              f"samples/s: {made / consumed:5.1f}x", flush=True)
    main_mode = row.get("prefetch_on") or row["plain"]
    row.update(consumed_per_s=main_mode["consumed_per_s"], ratio=main_mode["ratio"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--configs", default="teacher-mlp,teacher-cnn", help="configs/<name>.yaml to time")
    parser.add_argument("--streams-only", action="store_true", help="only part 2 (the streams)")
    parser.add_argument("--streams", default="teacher-mlp,teacher-cnn,markov-gpt2", help="configs of part 2")
    args = parser.parse_args()
    parser_configs = [] if args.streams_only else [c for c in args.configs.split(",") if c]
    results: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": args.steps,
                     "overhead": {}}
    with tempfile.TemporaryDirectory() as out:
        for name in parser_configs:
            path = ROOT / "configs" / f"{name}.yaml"
            ours, plain, evals = [], [], []
            for r in range(args.rounds):
                res = trainer(path, args.steps, out, f"{name}-round{r}")
                ours.append(res["samples_per_s"])
                evals.append(res["eval_s"] + res["checkpoint_s"])
                plain.append(plain_loop(res["config"], args.steps))
                print(f"{name} round {r}: goldenpath {ours[-1]:8.0f} samples/s   plain loop {plain[-1]:8.0f} "
                      f"samples/s   ratio {ours[-1] / plain[-1]:.3f}   (eval+checkpoint {evals[-1]:.2f} s apart)",
                      flush=True)
            ratios = [a / b for a, b in zip(ours, plain)]
            results["overhead"][name] = {"goldenpath_samples_per_s": ours, "plain_samples_per_s": plain,
                                         "ratio_median": statistics.median(ratios), "ratios": ratios,
                                         "eval_checkpoint_s": evals}
            print(f"{name}: trainer / plain loop: median {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} rounds; goal >= 0.97")

        results["streams"] = {}
        for name in (c for c in args.streams.split(",") if c):
            results["streams"][name] = stream_rates(name, out, max(2, min(args.rounds, 4)))
    path = ROOT / "bench" / "results" / ("overhead-streams.json" if args.streams_only else "overhead.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
