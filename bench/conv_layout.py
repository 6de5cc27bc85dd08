"""Convolutional nets with their images channels-last against channels-first, timed interleaved in one process.

    python bench/conv_layout.py [--rounds 40] [--device cpu|cuda]

On a CPU goldenpath runs the CNN and ResNet-18 channels-last (``goldenpath.models.CHANNELS_LAST_DEVICES``): the
baseline switches that off. On a CUDA GPU goldenpath runs them channels-first: the bench switches channels-last
on there, to measure whether a GPU should too (bench/gpu.sh's ``layout`` part). Rows, at the sizes of
:data:`SIZES` for the device: the CNN's training step (bf16 autocast on a GPU, as ``precision: auto`` trains)
and its forward without gradients (evals, ``compare``); ResNet-18 with group norm, its non-private SGD step and
its DP-SGD fast-path step (bench/dp_step.py's steps); ResNet-18 with batch norm, its training step; on a CPU
also bench/dp_step.py's group-norm CNN, non-private and DP-SGD. Each line: median ms channels-first,
channels-last, and first / last (the speed-up of channels-last).
"""

from __future__ import annotations

import argparse
import contextlib
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
import dp_step  # noqa: E402 - the DP bench's steps

IMAGES = SourceInfo("classification", (3, 32, 32), 10)
# (width, batch): on a CPU the teacher CNN's config and a small ResNet-18; on a GPU the GPU study's CNN
# (analysis/golden_path.py --gpu) and bench/gpu.sh's DP ResNet-18
SIZES = {"cpu": {"cnn": (32, 64), "resnet": (16, 64)}, "cuda": {"cnn": (128, 1024), "resnet": (64, 256)}}


def plain_steps(overrides: list[str], batch: int, device: str) -> dict:
    """A training step and a forward without gradients of the model ``overrides`` build, on one fixed batch
    (bf16 autocast on a GPU)."""
    model = models.build_model(load_config(None, ["data.source=teacher", *overrides]).model, IMAGES,
                               seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if device == "cuda" else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), autocast():
            model(x)

    return {"step": step, "forward": forward}


def cases(device: str = "cpu", sizes: dict | None = None) -> dict:
    """{row name: a function doing one step} for ``device`` at ``sizes`` (default: SIZES[device])."""
    (cw, cb), (rw, rb) = (sizes or SIZES[device])["cnn"], (sizes or SIZES[device])["resnet"]
    cnn = plain_steps(["model.name=cnn", f"model.width={cw}", "model.depth=3"], cb, device)
    dp_step.MODELS["resnet18-layout"] = {"overrides": ["model.name=resnet18", f"model.width={rw}", "model.norm=group"],
                                         "input": (3, 32, 32), "classes": 10, "batch": rb}
    out = {
        f"CNN width {cw}, batch {cb}: train step": cnn["step"],
        f"CNN width {cw}, batch {cb}: forward without gradients": cnn["forward"],
        f"ResNet-18 width {rw} group norm, batch {rb}: non-private step":
            dp_step.make_step("resnet18-layout", "non-private", device),
        f"ResNet-18 width {rw} group norm, batch {rb}: DP-SGD fast step":
            dp_step.make_step("resnet18-layout", "dp-fast", device),
        f"ResNet-18 width {rw} batch norm, batch {rb}: train step":
            plain_steps(["model.name=resnet18", f"model.width={rw}"], rb, device)["step"],
    }
    if device == "cpu":  # the DP bench's own CPU model
        out["group-norm CNN of bench/dp_step.py: non-private step"] = dp_step.make_step("cnn", "non-private", device)
        out["group-norm CNN of bench/dp_step.py: DP-SGD fast step"] = dp_step.make_step("cnn", "dp-fast", device)
    return out


def measure(runs: dict, rounds: int, warmup: int = 3, device: str = "cpu", deadline: float | None = None,
            rows: list | None = None) -> list[dict]:
    """Median ms of each of ``runs`` channels-first and channels-last, one call of each in turn per round (fewer
    rounds where ``deadline``, a time.perf_counter() value, comes first). Appends to and returns ``rows``."""
    keep = models.CHANNELS_LAST_DEVICES
    layouts = {"first": (), "last": (device,)}  # the device types that convert
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {(name, lay): [] for name in runs for lay in layouts}
    try:
        for r in range(warmup + rounds):
            if r > warmup and deadline is not None and time.perf_counter() > deadline:
                break
            for name, fn in runs.items():
                for lay, devices in layouts.items():
                    models.CHANNELS_LAST_DEVICES = devices
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    if r >= warmup:
                        times[(name, lay)].append(time.perf_counter() - t0)
    finally:
        models.CHANNELS_LAST_DEVICES = keep
    rows = [] if rows is None else rows
    for name in runs:
        if times[(name, "first")]:
            first, last = (statistics.median(times[(name, lay)]) * 1e3 for lay in layouts)
            rows.append({"case": name, "channels_first_ms": first, "channels_last_ms": last, "speedup": first / last,
                         "rounds": len(times[(name, "first")])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    tune_malloc()
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'case':58s} {'first ms':>9s} {'last ms':>9s} {'first / last':>13s}")
    for row in measure(cases(args.device), args.rounds, device=args.device):
        print(f"{row['case']:58s} {row['channels_first_ms']:9.2f} {row['channels_last_ms']:9.2f} "
              f"{row['speedup']:13.2f}")


if __name__ == "__main__":
    main()
