"""Operators one optimizer step of ``goldenpath train`` dispatches: what sizes small runs on a GPU.

    python bench/step_ops.py [--config teacher-cnn] [--batch 128,512] [--steps 64,320] [--device-block]

A small model's step on a GPU costs about its kernel launches, as much as its FLOPs: the GPU study
(analysis/golden_path.py --gpu) is 0.75M steps of a CNN, 14 processes taking turns on one GPU. This
counts, with a torch dispatch mode, the operators a step dispatches in ``goldenpath train`` on the CPU, with
the training batches made by the code path a GPU takes (``data.generate=device``), online and offline
(8 epochs), as the difference of two runs of ``--steps`` steps (setup, evals and saving cancel). Each row
splits them into the stream's (``next_step``: making or gathering the batch) and the rest (forward, loss,
backward, optimizer, the log's sums); "launching" leaves out views, which launch nothing. ``--device-block``
makes the teacher's aligned blocks the size a CUDA device uses (TeacherStream.BLOCK_CUDA), so the stream's
count is the GPU's. On a CPU some operators stay on the host (the stream's index arithmetic, two host reads
of CPU index tensors) and the optimizer is a loop over the parameters (about 3 operators each); on a CUDA
device it is one fused kernel. Writes bench/results/step_ops.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from overhead import watched_streams

ROOT = Path(__file__).resolve().parent.parent


class Counted(TorchDispatchMode):
    """Counts the operators dispatched (per name; ``data`` while the stream makes a step's batches)."""

    def __init__(self):
        super().__init__()
        self.data = False
        self.counts = {part: collections.Counter() for part in ("data", "step")}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["data" if self.data else "step"][(str(func), not func.is_view)] += 1
        return func(*args, **(kwargs or {}))


def counted_run(config: str, overrides: list[str], steps: int, out: str) -> Counted:
    """The operators of one ``goldenpath train`` run of ``steps`` steps (synchronous stream, no targets)."""
    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [
        f"out={out}", "name=" + f"{'-'.join(overrides)}-{steps}".replace("/", "_").replace("=", "_"),
        "data.generate=device", "data.prefetch=0", f"budget.steps={steps}", "budget.samples=null",
        "budget.min_progress=null", "checkpoint.targets=[]", "checkpoint.eval_every=1000000",
        "log.every=1000000", "log.progress=false", *overrides])
    mode = Counted()

    @contextlib.contextmanager
    def data_part():  # the stream's next_step: counted as the data part
        mode.data = True
        try:
            yield
        finally:
            mode.data = False

    with watched_streams(data_part), mode:
        train(cfg)
    return mode


def per_step(config: str, overrides: list[str], steps: tuple[int, int], out: str) -> dict:
    """Operators per step (all and launching, data and the rest) and the rest's ten most frequent."""
    short, long = (counted_run(config, overrides, s, out) for s in steps)
    n = steps[1] - steps[0]
    row, top = {}, collections.Counter()
    for part in ("data", "step"):
        diff = {key: (long.counts[part][key] - short.counts[part].get(key, 0)) / n for key in long.counts[part]}
        row[f"{part}_ops"] = sum(diff.values())
        row[f"{part}_launching"] = sum(v for (_, launching), v in diff.items() if launching)
        if part == "step":
            top.update({name: v for (name, launching), v in diff.items() if launching and v > 0})
    row["step_top"] = {name: round(v, 2) for name, v in top.most_common(10)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="teacher-cnn")
    parser.add_argument("--batch", default="128,512")
    parser.add_argument("--steps", default="64,320", help="two step counts; the rows are their difference")
    parser.add_argument("--device-block", action="store_true", help="the teacher's blocks as on a CUDA device")
    args = parser.parse_args()
    from goldenpath.data.synthetic import TeacherStream

    if args.device_block:
        TeacherStream.BLOCK_CPU = TeacherStream.BLOCK_CUDA
    steps = tuple(int(s) for s in args.steps.split(","))
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for batch in (int(b) for b in args.batch.split(",")):
            offline = ["data.epochs=8", f"data.train_size={batch * steps[1] // 4}"]  # epochs of steps[1] / 4 steps
            for regime, extra in (("online", []), ("offline", offline)):
                key = f"{regime} batch {batch}"
                rows[key] = per_step(args.config, [f"optim.batch_size={batch}", *extra], steps, out)
                r = rows[key]
                print(f"{args.config} {key:18s}: {r['data_ops'] + r['step_ops']:6.1f} operators a step "
                      f"({r['data_launching'] + r['step_launching']:6.1f} launching); the stream's "
                      f"{r['data_ops']:5.1f} ({r['data_launching']:5.1f}), the rest {r['step_ops']:5.1f} "
                      f"({r['step_launching']:5.1f})", flush=True)
    path = ROOT / "bench" / "results" / "step_ops.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"torch": torch.__version__, "config": args.config, "device_block": args.device_block,
                                "steps": steps, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
