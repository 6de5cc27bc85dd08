"""Where a GPT-2 training step's time goes: torch.profiler over a few eager and compiled steps, as a table.

    python bench/gpu.py --parts profile [--cpu-smoke]     # the profile part of the device check

A step is the plain loop's (bf16 autocast on CUDA; forward, F.cross_entropy over the float32 logits,
backward, AdamW), on batches already on the device, so the figures are the model step's alone. After a
warm-up (and compilation) the steps are timed without the profiler (wall and host-side ms per step), then a
few are profiled. Every device kernel (on a CPU: every aten operator, by its self time) is put in one
category by its name and the names and tensor shapes of the operators that launched it:

- ``attention``: SDPA's kernels; ``attention_backends`` names the ones chosen (flash, mem-efficient,
  cudnn, math).
- ``lm head + cross-entropy``: any kernel of an operator holding a tensor with the vocabulary dimension
  (the head's matmul, the float32 copy of the logits, the head's gradient) and log-softmax / NLL kernels.
- ``casts (_to_copy)``: autocast's casts of the float32 weights on a GPU (and any other dtype conversion).
- ``matmul (blocks)``, ``layer norm``, ``optimizer``, ``embedding``, ``memcpy / memset``, ``elementwise / other``.

``idle_fraction`` is 1 - (time some kernel runs) / (wall time of the profiled steps): on a GPU the share of
the window the device waits for the host; on a CPU, the time outside aten operators (Python, dispatch).
``host_ms_per_step`` is how long the Python call of a step takes to return: near ``wall_ms_per_step`` the
host sets the pace (launch-bound), well under it the device does. ``kernels_per_step`` (per block:
``/ depth``) is the launch count behind per-layer overhead.
"""

from __future__ import annotations

import csv
import re
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

STEP = "goldenpath.profile_step"  # the record_function label around one step
LM_HEAD = "lm head + cross-entropy"
OTHER = "elementwise / other"
# First match wins; each pattern is searched in "name < launching op < its parents", lower case.
CATEGORIES = (
    ("memcpy / memset", r"memcpy|memset"),
    ("attention", r"flash|fmha|efficient_attention|scaled_dot_product|sdpa|attention"),
    ("optimizer", r"optimizer|adam|_foreach|multi_tensor"),
    ("embedding", r"embedding"),
    (LM_HEAD, r"log_softmax|logsoftmax|nll_loss|cross_entropy"),  # and any tensor with the vocabulary dim
    ("casts (_to_copy)", r"_to_copy"),
    ("matmul (blocks)", r"gemm|aten::mm\b|aten::addmm|aten::bmm|matmul|cutlass|xmma|nvjet|cublas"),
    ("layer norm", r"layer_norm|layernorm"),
)
DTYPES = {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16", "double": "float64"}
ATTENTION_BACKENDS = (("cudnn", r"cudnn"), ("flash", r"flash"), ("mem-efficient", r"efficient|mem_eff|fmha"),
                      ("math", r"attention_math|sdpa_math"))


@dataclass(frozen=True)
class Row:
    """One device kernel (GPU) or aten operator (CPU) of the profiled window, times in microseconds."""

    name: str
    start_us: float
    end_us: float
    self_us: float                        # the time it is charged: a kernel's duration, an operator's self time
    context: str = ""                     # the launching operator and its parents, innermost first
    dims: frozenset = frozenset()         # the tensor dimensions those operators saw


def category(row: Row, vocab: int) -> str:
    """The category of a kernel or operator by its name, its launching operators and their shapes."""
    text = f"{row.name} < {row.context}".lower()
    for name, pattern in CATEGORIES:
        if re.search(pattern, text) or (name == LM_HEAD and vocab in row.dims):
            return name
    return OTHER


def attention_backend(row: Row) -> str | None:
    text = f"{row.name} < {row.context}".lower()
    return next((name for name, pattern in ATTENTION_BACKENDS if re.search(pattern, text)), None)


def busy_us(rows: list[Row], lo: float, hi: float) -> float:
    """Length of the union of the rows' intervals within [lo, hi] (overlaps and nesting count once)."""
    total, reached = 0.0, lo
    for start, end in sorted((max(r.start_us, lo), min(r.end_us, hi)) for r in rows):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def summarise(rows: list[Row], *, vocab: int, steps: int, window: tuple[float, float], top: int = 10) -> dict:
    """Per-step figures of a profiled window: idle fraction, kernels, time by category, the top kernels."""
    lo, hi = window
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0])  # (name, category) -> time, calls
    backends: dict[str, float] = defaultdict(float)
    for r in rows:
        cat = category(r, vocab)
        by_cat[cat] += r.self_us
        by_name[r.name, cat][0] += r.self_us
        by_name[r.name, cat][1] += 1
        if cat == "attention" and (backend := attention_backend(r)):
            backends[backend] += r.self_us
    total = sum(by_cat.values()) or 1.0
    busy = busy_us(rows, lo, hi)
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": steps, "window_ms_per_step": (hi - lo) / steps / 1e3, "busy_ms_per_step": busy / steps / 1e3,
        "idle_fraction": 1 - busy / (hi - lo), "kernels_per_step": len(rows) / steps,
        "categories": {c: {"ms_per_step": t / steps / 1e3, "share": t / total}
                       for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n, "category": c, "ms_per_step": t / steps / 1e3, "share": t / total,
                 "calls_per_step": k / steps} for (n, c), (t, k) in names],
        "attention_backends": sorted(backends, key=lambda b: -backends[b]),
    }


# ----------------------------------------------------------------------------- from torch.profiler

def _dims(op) -> set[int]:
    return {d for shape in (op.input_shapes or ()) if isinstance(shape, (list, tuple)) for d in shape
            if isinstance(d, int)}


def _chain(op) -> tuple[str, frozenset]:
    """An operator and its parents: their names, innermost first, and the tensor dimensions seen by the aten
    operators up to the first other parent (an autograd node, a compiled graph: those hold every shape)."""
    names, dims, own = [], set(), True
    while op is not None:
        names.append(op.name)
        own = own and op.name.startswith("aten::")
        dims |= _dims(op) if own else set()
        op = op.cpu_parent
    return " < ".join(names), frozenset(dims)


def rows_of(events, device: str) -> tuple[list[Row], tuple[float, float]]:
    """Rows and the window (first step's start to the last step's or kernel's end) of profiler events."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    steps = [e.time_range for e in cpu if e.name == STEP]
    if device == "cuda":
        launching = _launching_ops(cpu)
        rows = [Row(e.name, e.time_range.start, e.time_range.end, e.time_range.end - e.time_range.start,
                    *_chain(launching(e)))
                for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    else:
        rows = []
        for e in cpu:
            if e.name.startswith("aten::"):
                context, dims = _chain(e)
                rows.append(Row(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total,
                                context.partition(" < ")[2], dims))
    lo = min(s.start for s in steps)
    hi = max([s.end for s in steps] + [r.end_us for r in rows])
    return [r for r in rows if r.end_us > lo], (lo, hi)


def _launching_ops(cpu):
    """kernel event -> the CPU operator that launched it (None when not recorded).

    torch >= 2.12 gives each kernel event the id of that operator (``linked_correlation_id``). Earlier
    versions keep that link only inside the profiler; there a kernel shares its id with the CUDA runtime call
    that launched it (``cudaLaunchKernel``, ``cuLaunchKernel``, ``cudaMemcpyAsync``...), a CPU event whose
    parent is the operator. Operators' own ids may collide with runtime ids, so only runtime calls are
    keyed by theirs."""
    if cpu and hasattr(cpu[0], "linked_correlation_id"):
        ops = {e.id: e for e in cpu if e.linked_correlation_id == 0}
        return lambda kernel: ops.get(kernel.linked_correlation_id)
    runtime = {e.id: e.cpu_parent for e in cpu if _is_runtime_call(e.name)}
    return lambda kernel: runtime.get(kernel.id)


def _is_runtime_call(name: str) -> bool:
    """A CUDA runtime or driver API call's name (cudaLaunchKernel, cuLaunchKernelEx), not an operator's."""
    return name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper())


def _ce_input_dtype(events, vocab: int) -> str | None:
    """The dtype the log-softmax of the cross-entropy read: None when it was fused out of sight, "unrecorded"
    where the profiler keeps no input dtypes (torch < 2.12)."""
    for e in events:
        if e.name in ("aten::_log_softmax", "aten::log_softmax") and any(
                vocab in s for s in (e.input_shapes or ()) if isinstance(s, (list, tuple))):
            if not hasattr(e, "input_dtypes"):
                return "unrecorded"
            dtype = (e.input_dtypes or [None])[0]
            return DTYPES.get(dtype, dtype)
    return None


# ----------------------------------------------------------------------------- the profiled step

def lm_step(size: dict, device: str, *, compiled: bool):
    """The plain loop's GPT-2 step on one fixed batch on the device, and its token count."""
    from goldenpath.config import load_config
    from goldenpath.data import SourceInfo
    from goldenpath.models import build_model
    from goldenpath.training.run import make_optimizer

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "configs" / "c4-gpt2-small.yaml",
                         [f"model.{k}={size[k]}" for k in ("width", "depth", "heads")])
    vocab, seq, batch = size["profile_vocab"], size["seq"], size["batch"]
    model = build_model(config.model, SourceInfo("lm", (seq,), vocab), seed=0).to(device)
    if compiled:
        model.compile()
    opt = make_optimizer(model, config.optim)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (batch, seq + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with torch.profiler.record_function(STEP):
            with autocast:
                out = model(x)
            loss = F.cross_entropy(out.float().flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return step, batch * seq


def profile_lm(size: dict, device: str, *, compiled: bool, warmup: int = 3, steps: int = 3) -> dict:
    """Timed and profiled steps of the plain GPT-2 step (see the module docstring for the figures)."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step, tokens = lm_step(size, device, compiled=compiled)
    for _ in range(warmup):
        step()
    sync()
    host, t0 = [], time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        host.append(time.perf_counter() - t)
    sync()
    wall = (time.perf_counter() - t0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.events()
    rows, window = rows_of(events, device)
    vocab = size["profile_vocab"]
    return {**summarise(rows, vocab=vocab, steps=steps, window=window), "compiled": compiled,
            "wall_ms_per_step": 1e3 * wall, "host_ms_per_step": 1e3 * statistics.median(host),
            "tokens_per_s": tokens / wall, "kernels_per_block": len(rows) / steps / size["depth"],
            "ce_input_dtype": _ce_input_dtype(events, vocab),
            "float32_logits_mb": tokens * vocab * 4 / 2**20}


# ----------------------------------------------------------------------------- tables

def markdown(profile: dict) -> str:
    """The profile part's tables: one line per mode, then time by category, then the top kernels."""
    modes = [m for m in ("eager", "compiled") if isinstance(profile.get(m), dict) and "categories" in profile[m]]
    lines = ["| mode | wall ms/step | host ms/step | device idle | kernels/step (per block) | attention | "
             "CE input dtype (float32 logits MB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in modes:
        r = profile[m]
        lines.append(f"| {m} | {r['wall_ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | "
                     f"{100 * r['idle_fraction']:.1f}% | {r['kernels_per_step']:.0f} ({r['kernels_per_block']:.0f}) | "
                     f"{', '.join(r['attention_backends']) or '-'} | {r['ce_input_dtype'] or 'fused'} "
                     f"({r['float32_logits_mb']:.0f}) |")
    cats = list(dict.fromkeys(c for m in modes for c in profile[m]["categories"]))
    lines += ["", "| category | " + " | ".join(f"{m} ms/step (share)" for m in modes) + " |",
              "| --- |" + " --- |" * len(modes)]
    for c in cats:
        cells = [profile[m]["categories"].get(c, {"ms_per_step": 0.0, "share": 0.0}) for m in modes]
        lines.append(f"| {c} | " + " | ".join(f"{x['ms_per_step']:.2f} ({100 * x['share']:.1f}%)" for x in cells)
                     + " |")
    for m in modes:
        lines += ["", f"| top {m} kernel / op | category | ms/step | share | calls/step |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{t['name'][:90]}` | {t['category']} | {t['ms_per_step']:.3f} | {100 * t['share']:.1f}% | "
                  f"{t['calls_per_step']:.0f} |" for t in profile[m]["top"]]
    head = profile.get("lm_head")
    if isinstance(head, dict) and "time_ratio" in head:
        lines += ["", "| lm head + CE, fwd + bwd | ms | peak MB above inputs |", "| --- | --- | --- |",
                  f"| plain (float32 logits) | {head['plain']['ms']:.2f} | {head['plain']['peak_mb']:.0f} |",
                  f"| chunked ({head['chunk_tokens']} tokens), gradients in the forward | "
                  f"{head['chunked']['ms']:.2f} | {head['chunked']['peak_mb']:.0f} |",
                  f"| chunked, logits recomputed in the backward | {head['chunked-recompute']['ms']:.2f} | "
                  f"{head['chunked-recompute']['peak_mb']:.0f} |",
                  f"| chunked / plain | {head['time_ratio']:.2f}x | {head['memory_ratio']:.2f}x |",
                  f"| chunked-recompute / plain | {head['recompute_time_ratio']:.2f}x | "
                  f"{head['recompute_memory_ratio']:.2f}x |"]
    return "\n".join(lines)


def write_tables(profile: dict, out: Path, stem: str) -> list[Path]:
    """``<stem>_profile.md`` and ``<stem>_profile.csv`` (mode, kind, name, category, ms/step, share)."""
    md, path = out / f"{stem}_profile.md", out / f"{stem}_profile.csv"
    md.write_text(markdown(profile) + "\n")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "kind", "name", "category", "ms_per_step", "share"])
        for m in ("eager", "compiled"):
            r = profile.get(m)
            if not isinstance(r, dict) or "categories" not in r:
                continue
            for key in ("wall_ms_per_step", "host_ms_per_step", "idle_fraction", "kernels_per_step"):
                w.writerow([m, "summary", key, "", r[key], ""])
            for c, x in r["categories"].items():
                w.writerow([m, "category", c, c, x["ms_per_step"], x["share"]])
            for t in r["top"]:
                w.writerow([m, "top", t["name"], t["category"], t["ms_per_step"], t["share"]])
    return [md, path]
