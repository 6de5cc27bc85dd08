"""Convolutional nets on a CPU with their images channels-last (what goldenpath runs) against channels-first,
measured interleaved in one process (``goldenpath.models.cpu_channels_last`` switched off for the baseline).

    python bench/cpu_layout.py [--rounds 40]

Rows: the teacher CNN of configs/teacher-cnn.yaml (width 32, batch 64) as trained, its forward without
gradients (compare's and the eval's), its group-norm form's non-private and DP-SGD fast-path steps (the
``cnn`` model of bench/dp_step.py), and ResNet-18 at width 16 (batch 64, batch and group norm). Each line:
median ms channels-first, channels-last, and first / last (the speed-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import goldenpath.models as models
from goldenpath.config import load_config
from goldenpath.data import SourceInfo
from goldenpath.training.runtime import tune_malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dp_step  # noqa: E402 - the DP bench's model and step

IMAGES = SourceInfo("classification", (3, 32, 32), 10)


def plain_steps(overrides: list[str], batch: int) -> dict:
    """A training step and a forward without gradients of the model ``overrides`` build, on one fixed batch."""
    model = models.build_model(load_config(None, ["data.source=teacher", *overrides]).model, IMAGES, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model(x)

    return {"step": step, "forward": forward}


def resnet(norm: str):
    return plain_steps(["model.name=resnet18", "model.width=16", f"model.norm={norm}"], 64)["step"]


def cases() -> dict:
    cnn = plain_steps(["model.name=cnn", "model.width=32", "model.depth=3"], 64)
    return {
        "teacher CNN, train step": cnn["step"],
        "teacher CNN, forward without gradients": cnn["forward"],
        "group-norm CNN, non-private step": dp_step.make_step("cnn", "non-private", "cpu"),
        "group-norm CNN, DP-SGD fast step": dp_step.make_step("cnn", "dp-fast", "cpu"),
        "ResNet-18 width 16, batch norm, train step": resnet("batch"),
        "ResNet-18 width 16, group norm, train step": resnet("group"),
    }


def measure(rounds: int, warmup: int = 3) -> list[dict]:
    """Median ms of each case channels-first and channels-last, one call of each in turn per round."""
    keep = models.cpu_channels_last
    layouts = {"first": lambda x: x, "last": keep}
    runs = cases()
    times = {(name, lay): [] for name in runs for lay in layouts}
    try:
        for r in range(warmup + rounds):
            for name, fn in runs.items():
                for lay, convert in layouts.items():
                    models.cpu_channels_last = convert
                    t0 = time.perf_counter()
                    fn()
                    if r >= warmup:
                        times[(name, lay)].append(time.perf_counter() - t0)
    finally:
        models.cpu_channels_last = keep
    rows = []
    for name in runs:
        first, last = (statistics.median(times[(name, lay)]) * 1e3 for lay in layouts)
        rows.append({"case": name, "channels_first_ms": first, "channels_last_ms": last, "speedup": first / last})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'case':45s} {'first ms':>9s} {'last ms':>9s} {'first / last':>13s}")
    for row in measure(args.rounds):
        print(f"{row['case']:45s} {row['channels_first_ms']:9.2f} {row['channels_last_ms']:9.2f} "
              f"{row['speedup']:13.2f}")


if __name__ == "__main__":
    main()
