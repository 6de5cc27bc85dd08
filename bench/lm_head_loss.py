"""The lm-head + cross-entropy in token chunks (goldenpath.lm_loss) against the plain full-logits path.

    python bench/lm_head_loss.py [--tokens 2048] [--width 768] [--vocab 50257] [--chunk 1024] [--device cpu]

The plain path is goldenpath's loss today: logits = hidden @ W.T in the compute dtype, their float32 copy,
F.cross_entropy per token. Both paths run forward and backward on the same hidden states and weight; the
times are medians over interleaved repetitions (one of each path in turn), the peak memory is what a
forward + backward holds above its inputs (on a GPU from the allocator's peak; on a CPU the resident
high-water mark of a fresh process per path). Ratios are chunked / plain, measured in the same run.
bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from goldenpath.lm_loss import lm_head_losses  # noqa: E402


def make_inputs(tokens: int, width: int, vocab: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, width, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, width, generator=g) / width**0.5).to(device).requires_grad_()
    labels = torch.randint(vocab, (tokens,), generator=g).to(device)
    return hidden, weight, labels


def run_path(path: str, hidden, weight, labels, *, chunk: int) -> None:
    """One forward and backward of the loss (mean over tokens) by ``path``: plain or chunked."""
    device = hidden.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        if path == "plain":
            loss = F.cross_entropy((hidden @ weight.T).float(), labels)
        else:
            loss = lm_head_losses(hidden, weight, labels, chunk_tokens=chunk)[0].mean()
    loss.backward()
    hidden.grad = weight.grad = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_worker(path: str, shape: tuple, chunk: int, out) -> None:
    import dp_step

    inputs = make_inputs(*shape, "cpu")
    base = dp_step._rss_bytes()  # the first call: memory it frees stays resident, so a second would show little
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    run_path(path, *inputs, chunk=chunk)
    out.put((dp_step._vm_hwm_bytes() - base) / 2**20)


def peak_mb(path: str, shape: tuple, device: str, chunk: int) -> float:
    """Peak memory of one forward + backward above its inputs (MB): on a GPU the allocator's peak, on a CPU
    the resident high-water mark of a fresh process."""
    if device == "cuda":
        inputs = make_inputs(*shape, device)
        run_path(path, *inputs, chunk=chunk)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_path(path, *inputs, chunk=chunk)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(path, shape, chunk, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else float("nan")


def measure(*, tokens: int, width: int, vocab: int, chunk: int, device: str, reps: int = 5) -> dict:
    """Median ms and peak MB of each path, and the ratios chunked / plain."""
    inputs = make_inputs(tokens, width, vocab, device)
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    for rep in range(reps + 1):  # the first round warms up
        for path in times:
            _sync(device)
            t0 = time.perf_counter()
            run_path(path, *inputs, chunk=chunk)
            _sync(device)
            if rep:
                times[path].append(time.perf_counter() - t0)
    del inputs
    rows = {"tokens": tokens, "width": width, "vocab": vocab, "chunk_tokens": chunk, "device": device,
            "float32_logits_mb": tokens * vocab * 4 / 2**20}
    for path, t in times.items():
        rows[path] = {"ms": 1e3 * statistics.median(t),
                      "peak_mb": peak_mb(path, (tokens, width, vocab), device, chunk)}
    rows["time_ratio"] = rows["chunked"]["ms"] / rows["plain"]["ms"]
    rows["memory_ratio"] = rows["chunked"]["peak_mb"] / rows["plain"]["peak_mb"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = measure(tokens=args.tokens, width=args.width, vocab=args.vocab, chunk=args.chunk, device=args.device,
                   reps=args.reps)
    print(json.dumps(rows, indent=1))
    print(f"chunked / plain: time {rows['time_ratio']:.2f}x, peak memory {rows['memory_ratio']:.2f}x "
          f"(plain {rows['plain']['peak_mb']:.0f} MB, chunked {rows['chunked']['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
