"""The lm-head + cross-entropy in token chunks (goldenpath.models.lm_loss) against the plain full-logits path.

    python bench/lm_head_loss.py [--tokens 2048] [--width 768] [--vocab 50257] [--chunk 512] [--device cpu]
    python bench/lm_head_loss.py --depth 4 --width 256 --heads 4 --tokens 1024 --seq 256   # a whole GPT-2

The plain path is goldenpath's loss today: logits = hidden @ W.T in the compute dtype, their float32 copy,
F.cross_entropy per token. With ``--depth`` the hidden states come from a GPT-2 of that size (a training
step's forward and backward without the optimizer: ``model(ids)`` then the loss, against
``goldenpath.models.lm_loss.causal_lm_losses``); without it, from fixed random features (the head alone). The
times are medians over interleaved repetitions (one of each path in turn); the peak memory is what a
forward + backward holds above its inputs (on a GPU the allocator's peak; on a CPU the resident high-water
mark of a fresh process per path). Ratios are chunked / plain, measured in the same run. bf16 autocast on
CUDA.
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

from goldenpath.models.lm_loss import causal_lm_losses, lm_head_losses  # noqa: E402

# plain: the float32 logits; chunked: gradients summed in the forward; chunked-recompute: logits recomputed in
# the backward
PATHS = ("plain", "chunked", "chunked-recompute")


def make_case(shape: dict, device: str, seed: int = 0):
    """``run(path, chunk)``: one forward and backward of the mean token loss by ``path`` (one of PATHS)."""
    tokens, width, vocab = shape["tokens"], shape["width"], shape["vocab"]
    g = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    if shape.get("depth"):  # a whole GPT-2
        from goldenpath.config import load_config
        from goldenpath.data import SourceInfo
        from goldenpath.models import build_model

        seq = shape["seq"]
        config = load_config(None, ["model.name=gpt2", f"model.width={width}", f"model.depth={shape['depth']}",
                                    f"model.heads={shape['heads']}", "budget.steps=1"]).model
        model = build_model(config, SourceInfo("lm", (seq,), vocab), seed=seed).to(device)
        ids = torch.randint(vocab, (tokens // seq, seq + 1), generator=g).to(device)
        x, y = ids[:, :-1], ids[:, 1:]

        def loss(path, chunk):
            if path == "plain":
                return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
            return causal_lm_losses(model, x, y, chunk_tokens=chunk, grad_in_forward=path == "chunked")[0].mean()

        params = list(model.parameters())
    else:  # the head alone, on fixed features
        hidden = torch.randn(tokens, width, generator=g).to(device).requires_grad_()
        weight = (torch.randn(vocab, width, generator=g) / width**0.5).to(device).requires_grad_()
        labels = torch.randint(vocab, (tokens,), generator=g).to(device)

        def loss(path, chunk):
            if path == "plain":
                return F.cross_entropy((hidden @ weight.T).float(), labels)
            return lm_head_losses(hidden, weight, labels, chunk_tokens=chunk,
                                  grad_in_forward=path == "chunked")[0].mean()

        params = [hidden, weight]

    def run(path: str, chunk: int) -> None:
        with autocast:
            value = loss(path, chunk)
        value.backward()
        for p in params:
            p.grad = None

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_worker(path: str, shape: dict, chunk: int, out) -> None:
    import dp_step

    run = make_case(shape, "cpu")
    base = dp_step._rss_bytes()  # the first call: memory it frees stays resident, so a second would show little
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
        f.write("5")
    run(path, chunk)
    out.put((dp_step._vm_hwm_bytes() - base) / 2**20)


def peak_mb(path: str, shape: dict, device: str, chunk: int) -> float:
    """Peak memory of one forward + backward above its inputs (MB): on a GPU the allocator's peak, on a CPU
    the resident high-water mark of a fresh process."""
    if device == "cuda":
        run = make_case(shape, device)
        run(path, chunk)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(path, chunk)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(path, shape, chunk, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else float("nan")


def measure(*, tokens: int, width: int, vocab: int, chunk: int, device: str, reps: int = 5, depth: int = 0,
            heads: int = 0, seq: int = 0) -> dict:
    """Median ms and peak MB of each path, and the ratios chunked / plain (``depth``: a whole GPT-2)."""
    shape = {"tokens": tokens, "width": width, "vocab": vocab, "depth": depth, "heads": heads, "seq": seq}
    run = make_case(shape, device)
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for rep in range(reps + 1):  # the first round warms up
        for path in times:
            _sync(device)
            t0 = time.perf_counter()
            run(path, chunk)
            _sync(device)
            if rep:
                times[path].append(time.perf_counter() - t0)
    del run
    rows = {**shape, "chunk_tokens": chunk, "device": device, "float32_logits_mb": tokens * vocab * 4 / 2**20}
    for path, t in times.items():
        rows[path] = {"ms": 1e3 * statistics.median(t), "peak_mb": peak_mb(path, shape, device, chunk)}
    rows["time_ratio"] = rows["chunked"]["ms"] / rows["plain"]["ms"]
    rows["memory_ratio"] = rows["chunked"]["peak_mb"] / rows["plain"]["peak_mb"]
    rows["recompute_time_ratio"] = rows["chunked-recompute"]["ms"] / rows["plain"]["ms"]
    rows["recompute_memory_ratio"] = rows["chunked-recompute"]["peak_mb"] / rows["plain"]["peak_mb"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x seq)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=512, help="tokens whose logits the chunked path holds")
    parser.add_argument("--depth", type=int, default=0, help="blocks of a whole GPT-2 (0: the head alone)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = measure(tokens=args.tokens, width=args.width, vocab=args.vocab, chunk=args.chunk, device=args.device,
                   reps=args.reps, depth=args.depth, heads=args.heads, seq=args.seq)
    print(json.dumps(rows, indent=1))
    for path in PATHS[1:]:
        r = rows[path]
        print(f"{path} / plain: time {r['ms'] / rows['plain']['ms']:.2f}x, peak memory "
              f"{r['peak_mb'] / rows['plain']['peak_mb']:.2f}x ({r['ms']:.0f} vs {rows['plain']['ms']:.0f} ms, "
              f"{r['peak_mb']:.0f} vs {rows['plain']['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
