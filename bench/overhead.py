"""Trainer overhead and the time the loop waits for data, as ratios against baselines measured in the same run.

    python bench/overhead.py [--rounds 5] [--steps 300] [--configs teacher-mlp,teacher-cnn] [--data-only]

1. samples/s of ``goldenpath train`` (its training time, eval/checkpoint time reported apart) on each of
   ``--configs`` (the demo's MLP and the teacher CNN), against a minimal hand-written torch loop on the same
   model and the same stream. Goal: ratio >= 0.97. Rounds alternate the two so machine noise hits both alike;
   medians are reported.
2. the data-wait fraction per source (``--sources``: teacher, markov, fashion-mnist, cifar5m-npz, hf-text,
   hf-image): the seconds ``goldenpath train`` spends blocked in the stream's ``next_step`` over its training
   seconds, with the batches made in the step (``data.prefetch=0``) and made ahead by the background thread
   (``data.prefetch=2``), rounds alternating the two; and the prefetched run's training samples/s over the
   synchronous one's. CIFAR-5m parts, the datasets files (json text with a BPE fast tokenizer trained here,
   parquet images) are written in a temporary directory in their real formats; Fashion-MNIST reads the Debian
   package's files when installed. Goal: the prefetched fraction near 0 wherever the stream is faster than
   the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from goldenpath.config import load_config
from goldenpath.data import build_stream
from goldenpath.models import build_model
from goldenpath.training.run import make_optimizer
from goldenpath.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
# the small CNN the file-backed image sources train
CNN = ["model.name=cnn", "model.width=32", "model.depth=2", "optim.batch_size=64", "optim.lr=0.02",
       "optim.momentum=0.9"]


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


class Watched:
    """The stream ``goldenpath train`` builds, each ``next_step`` run inside ``around()`` (a context manager)."""

    def __init__(self, stream, around):
        self._stream, self._around = stream, around

    def next_step(self):
        with self._around():
            return self._stream.next_step()

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_stream", "_around"):
            raise AttributeError(name)
        return getattr(self._stream, name)


@contextlib.contextmanager
def watched_streams(around):
    """Within the block, every stream ``goldenpath train`` builds is :class:`Watched` with ``around``."""
    import goldenpath.training.run as run_module

    build = run_module.build_stream
    run_module.build_stream = lambda *a, **kw: Watched(build(*a, **kw), around)
    try:
        yield
    finally:
        run_module.build_stream = build


def timed_train(config_path, overrides, steps: int, out: str, name: str, skip: int = 0) -> dict:
    """One trainer run with every ``next_step`` timed: its data-wait fraction and training samples/s (the
    first ``skip`` steps' waits, e.g. a shuffle buffer's first fill, left out of the time and the waits)."""
    waits: list[float] = []

    @contextlib.contextmanager
    def timed():
        t0 = time.perf_counter()
        try:
            yield
        finally:
            waits.append(time.perf_counter() - t0)

    with watched_streams(timed):
        res = trainer(config_path, steps, out, name, extra=["budget.min_progress=null", *overrides])
    return {"wait": sum(waits[skip:]) / (res["train_s"] - sum(waits[:skip])), "samples_per_s": res["samples_per_s"]}


def write_sources(root: Path) -> dict[str, tuple[Path | None, list[str]]]:
    """{source: (base config or None, overrides)}; the file-backed ones written under ``root``."""
    out = {
        "teacher": (ROOT / "configs" / "teacher-cnn.yaml", []),
        "markov": (ROOT / "configs" / "markov-gpt2.yaml", []),
        "cifar5m-npz": write_cifar5m(root),
        "hf-text": (None, ["data.source=hf_text", "data.path=json", f"data.data_files={write_text(root)}",
                           f"data.tokenizer={root / 'tokenizer'}", "data.seq_len=128", "data.eval_size=64",
                           "data.probe_size=32", "data.shuffle_buffer=1000", "model.name=gpt2", "model.width=128",
                           "model.depth=2", "model.heads=4", "optim.name=adamw", "optim.lr=0.003",
                           "optim.batch_size=16"]),
        "hf-image": (None, ["data.source=hf_image", "data.path=parquet", f"data.data_files={write_images(root)}",
                            "data.eval_size=500", "data.probe_size=250", "data.shuffle_buffer=1000", *CNN]),
    }
    fashion = Path("/usr/share/datasets/fashion-mnist")
    if any(fashion.glob("train-images-idx3-ubyte*")):
        out["fashion-mnist"] = (ROOT / "configs" / "fashion-mnist-cnn.yaml", [])
    return out


def write_cifar5m(root: Path) -> tuple[None, list[str]]:
    """Two CIFAR-5m parts of 6000 random images under ``root``; (no base config, the overrides that train on them)."""
    import numpy as np

    rng = np.random.default_rng(0)
    cifar = root / "cifar5m"
    cifar.mkdir()
    for part in range(2):  # uncompressed parts: memory-mapped, as the released files
        np.savez(cifar / f"cifar5m_part{part}.npz", X=rng.integers(0, 256, (6000, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, 6000))
    return None, ["data.source=cifar5m", f"data.path={cifar}", "data.eval_size=1000", "data.probe_size=1000", *CNN]


def write_text(root: Path) -> Path:
    """8000 documents of random words as json lines, and a 2048-token byte-level BPE trained on them."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(1)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(5000)]
    docs = [" ".join(rng.choice(words, rng.integers(50, 400))) + "." for _ in range(8000)]
    path = root / "text.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                      show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(root / "tokenizer")
    return path


def write_images(root: Path) -> Path:
    """6000 labelled 32 x 32 PNG images in a parquet file, as datasets writes an image dataset."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(6000)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(6000)]}, features=features)
    ds.to_parquet(root / "images.parquet")
    return root / "images.parquet"


def data_waits(sources: dict, names: list[str], steps: int, rounds: int, out: str, skip: int = 0) -> dict:
    """Per source: the data-wait fraction synchronous and prefetched (medians over rounds, alternating; the
    first ``skip`` steps' waits left out)."""
    results = {}
    for name in names:
        base, overrides = sources[name]
        got: dict = {0: [], 2: []}
        for r in range(rounds):
            for prefetch in (0, 2) if r % 2 == 0 else (2, 0):
                got[prefetch].append(timed_train(base, [*overrides, f"data.prefetch={prefetch}"], steps, out,
                                                 f"wait-{name}-{r}-{prefetch}", skip))
        med = {p: {k: statistics.median(x[k] for x in v) for k in ("wait", "samples_per_s")} for p, v in got.items()}
        speed = statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(got[2], got[0]))
        results[name] = {"wait_sync": med[0]["wait"], "wait_prefetch": med[2]["wait"], "speed_ratio": speed,
                         "rounds": got}
        print(f"{name:14s} waits for data {100 * med[0]['wait']:5.1f}% of step time synchronous, "
              f"{100 * med[2]['wait']:5.1f}% prefetched; prefetched / synchronous samples/s {speed:.3f}",
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--configs", default="teacher-mlp,teacher-cnn", help="configs/<name>.yaml to time")
    parser.add_argument("--data-only", action="store_true", help="only part 2 (the data-wait fraction)")
    parser.add_argument("--sources", default="teacher,markov,fashion-mnist,cifar5m-npz,hf-text,hf-image",
                        help="sources of part 2")
    parser.add_argument("--wait-steps", type=int, default=150, help="steps per run of part 2")
    args = parser.parse_args()
    parser_configs = [] if args.data_only else [c for c in args.configs.split(",") if c]
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

        with tempfile.TemporaryDirectory() as files:
            sources = write_sources(Path(files))
            names = [n for n in args.sources.split(",") if n in sources]
            results["data_wait"] = data_waits(sources, names, args.wait_steps, max(2, min(args.rounds, 4)), out)
    path = ROOT / "bench" / "results" / ("overhead-data.json" if args.data_only else "overhead.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
