"""The device check: goldenpath's GPU figures, each against a baseline measured in the same run.

    bash bench/gpu.sh                 # on one large NVIDIA GPU: estimated at about 8 minutes
    bash bench/gpu.sh --cpu-smoke     # the same script at toy sizes on a CPU (under 3 minutes)
    python bench/gpu.py [--cpu-smoke] [--parts profile,train,dp,compare,data,reads,launch,layout] [--out DIR]
                        [--budget-s SECONDS] [--resume]

Parts (each fills its rows as it goes; a part that fails is recorded with its error and the others go on).
The results are written after every part, so a run killed from outside keeps the parts it finished.
They run in the order of ``--parts``, by default the profile first (the question the first GPU slot answers)
and the layout question last. ``--budget-s`` bounds the whole run: each part stops at what is left of it (keeping
the rows it finished), and a part with under ``MIN_PART_S`` left is recorded as not run. ``--resume`` keeps the
parts an earlier run in ``--out`` finished and runs the rest, so the same command run again continues where a
budget, a kill or a first-pass limit stopped it (docs/benchmarks.md, "A GPU slot"). Train, dp and compare have
first-pass limits (``first_pass_s``) that, with the profile's own, add up to a slot's 480 s, so that one command
measures something of each; a part stopped there is run again in full by ``--resume``.

1. ``train``: GPT-2 small (124M; 768 wide, 12 blocks, 1024 tokens, vocabulary 50257) trained by
   ``goldenpath train`` against a plain torch loop of the same model reading the same stream, with bf16
   autocast, without and with ``torch.compile`` at 16 x 1024 tokens per step, and compiled at 64 x 1024.
   Tokens/s, the ratio trainer / plain loop (goal >= 0.98) and MFU: model FLOPs per token (6 N + 12 L d T,
   N the parameters without the position table) times tokens/s over the GPU's peak dense bf16 rate
   (``--peak-tflops``; H100/H200 SXM: 989). Goal: compiled >= 35% at 16 x 1024, >= 45% at 64 x 1024.
2. ``dp``: one DP-SGD optimizer step (goldenpath's fast path) against the non-private step, at GPT-2
   small and ResNet-18 shapes, with Opacus in hooks and ghost-clipping modes in the same run (goals: GPT-2
   <= 1.15x non-private and faster than every Opacus mode; ResNet-18 <= 2.0x, the best Opacus mode >= 1.5x
   slower). Steps are interleaved method by method, in float32 proper; then GPT-2 small's non-private, fast
   and Opacus hooks steps under a bf16 autocast, as a GPU run trains (goldenpath's clipping stays float32).
3. ``compare``: ``goldenpath compare`` on 8 and 16 loss-target checkpoints of GPT-2's vocabulary against
   N x one model's forward over the probe set (goal <= 1.2), with its time inside split into the models'
   forwards, the pair metrics (tv and js from compare's Triton kernel on CUDA), the statistics, the pair rows
   and the tables (``bench/compare.py``'s ``split_timed``). Then the same with tv and js
   from the eager forms, with the largest differences of every metric's pair values from the kernel's
   compare (compare's tolerances: 1e-5, kl 1e-4 relative): what the kernel saves and how exact it is on the
   device. ``dp`` also lists where a fast-path step's time goes (``route_times``) and what one read of the
   free memory costs the host (a DP step reads it per layer to size its chunks).
4. ``launch``: ``accelerate launch`` of the C4 config's model on local parquet text in C4's layout
   (columns text, timestamp, url; ``train/`` and ``validation/`` files) for 200 steps in bf16: the run
   must complete and its replicas agree bit for bit at the end (the noise is drawn once per step, after
   the all-reduce, identically on every process). With one GPU it runs one process; the CPU smoke runs two.
5. ``profile``: where a GPT-2 small training step's time goes (``bench/step_profile.py``): torch.profiler over
   3 eager and 3 compiled steps of the plain loop on batches already on the device (bf16 autocast on
   CUDA): the device's idle fraction, host and wall ms per step, kernels per step, time by category (lm head
   + cross-entropy, attention and the SDPA backend chosen, autocast casts, block matmuls, layer norm,
   optimizer, ...) and the top kernels; then the lm head + cross-entropy in token chunks
   (``goldenpath.models.lm_loss``, ``bench/lm_head_loss.py``; gradients summed in the forward, and logits recomputed
   in the backward) against the plain float32-logits path at the step's shape: time and peak memory,
   chunked / plain. Written also as ``<stem>_profile.md`` and ``.csv``.
   It runs under its own time limit (``limits_s``); what it measured before the limit is kept.
6. ``data``: the fraction of ``goldenpath train``'s step time spent waiting for data (``bench/overhead.py``'s
   ``data_waits``), batches made in the step (``data.prefetch=0``) against made ahead (``data.prefetch=2``, the
   default), rounds alternating the two, and the prefetched run's samples/s over the other's: the teacher CNN
   (embedded stream), a small CNN on CIFAR-5m npz parts written to a temporary folder, and the train part's
   GPT-2 on the C4-layout parquet text. The first step's wait (a shuffle buffer's first fill, the thread's
   start) is left out. Goal: prefetched near 0. The teacher CNN runs twice: its stream made on the CPU, and
   on the device (``data.generate=device``). First, the device-made streams against the CPU's on 65,536
   training samples each (teacher, teacher with ``data.mix``, Markov): inputs and labels that differ, and
   samples/s made on the device over the CPU's.
7. ``reads``: host reads per step of the train part's GPT-2 under ``goldenpath train`` (12 steps, logging and
   evaluating every 4): every ``Tensor.item`` / ``tolist`` / ``cpu`` / ``numpy`` / ``__float__`` ... of the
   main thread, counted per loop iteration by ``bench/host_reads.py`` (the counter of tests/test_host_sync.py;
   host tensors count too: a text batch's token count, torch's CPU AdamW step counters); on CUDA also the
   synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` warns of, the device's own count, which sees
   what the patched methods cannot (``.to("cpu")``, nonzero, boolean masks). Per quiet step (neither logging
   nor evaluating; the max and mean) and per logged step; then the same run with one ``float()`` of the
   step's loss sum added per step, the control both counts must see (goal on CUDA: 0 syncs per quiet step).
8. ``layout``: channels-last images against channels-first (``bench/conv_layout.py``), interleaved: the GPU
   study's CNN (width 128, batch 1024, bf16 autocast) training step and forward, ResNet-18 with group norm
   (width 64, batch 256) non-private and DP-SGD fast steps, with batch norm its training step. goldenpath runs
   them channels-last on a CPU (measured faster there) and channels-first on a GPU until this part says.
   Each of 5, 6, 7 and 8 runs under its own time limit and keeps the rows it finished.

The text is random words over a local word-level tokenizer of GPT-2's vocabulary size (nothing is
downloaded): throughput depends on the shapes, not on what the words say. Writes ``gpu.json`` (or
``gpu_cpu_smoke.json``) and a short markdown table under ``--out`` (default: $OUT if set, else bench/results),
and into $OUT as well when that is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 5  # steps before timing starts (compilation, the stream's shuffle buffer); the trainer logs every WARMUP
sys.path.insert(0, str(ROOT / "bench"))

# Sizes: the GPU check and its CPU smoke. "lm" is the C4 config's model; "dp_*" the DP step's shapes.
SIZES = {
    "gpu": {"vocab": 50257, "seq": 1024, "width": 768, "depth": 12, "heads": 12, "batch": 16, "steps": 60,
            "big_batch": 64, "big_steps": 20,
            "dp_lm_batch": 8, "dp_cnn": {"width": 64, "batch": 256}, "dp_steps": 20,
            "compare_sizes": (8, 16), "probe": 64, "chunk": 8, "launch_steps": 200, "docs": 6000,
            "profile_vocab": 50257, "head_chunk": 4096,
            "data_steps": {"teacher": 200, "teacher-device": 200, "cifar5m-npz": 200, "c4-text": 25}, "data_rounds": 2,
            "stream_samples": 65536, "reads_steps": 12,
            "layout": {"cnn": (128, 1024), "resnet": (64, 256), "rounds": 10, "seconds": 40},
            "limits_s": {"profile": 150, "data": 120, "reads": 45, "layout": 90},
            # the first four parts' limits add up to a slot's --budget-s of 480, so that one command measures
            # something of each (the whole check is not timed on a GPU yet: without them, the profile and the
            # compiled training runs could take the budget before dp and compare start); a part stopped at its
            # first-pass limit is run again by --resume, without it
            "first_pass_s": {"train": 140, "dp": 90, "compare": 100}},
    "cpu-smoke": {"vocab": 512, "seq": 64, "width": 64, "depth": 2, "heads": 4, "batch": 8, "steps": 5,
                  "big_batch": 16, "big_steps": 3,
                  "dp_lm_batch": 4, "dp_cnn": {"width": 8, "batch": 8}, "dp_steps": 3,
                  "compare_sizes": (4,), "probe": 16, "chunk": 8, "launch_steps": 10, "docs": 400,
                  # a vocabulary no other dimension equals: the profile finds the lm head by it
                  "profile_vocab": 997, "head_chunk": 128,
                  "data_steps": {"teacher": 10, "teacher-device": 10, "cifar5m-npz": 10, "c4-text": 6},
                  "data_rounds": 2,
                  "stream_samples": 512, "reads_steps": 12,
                  "layout": {"cnn": (8, 8), "resnet": (8, 4), "rounds": 2, "seconds": 60},
                  "limits_s": {"profile": 300, "data": 300, "reads": 120, "layout": 120},
                  "first_pass_s": {"train": 300, "dp": 300, "compare": 300}},
}


# ----------------------------------------------------------------------------- local text in C4's layout

def write_c4_layout(root: Path, *, vocab: int, docs: int, words: int = 600, seed: int = 0) -> tuple[Path, Path]:
    """Parquet files in C4's layout and a word-level tokenizer of ``vocab`` tokens; returns (data, tokenizer)."""
    import numpy as np
    import pandas as pd
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok_dir, data_dir = root / "tokenizer", root / "c4"
    if not (tok_dir / "tokenizer.json").exists():
        words_of = {f"w{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
        tok = Tokenizer(models.WordLevel(words_of, unk_token="<eos>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tok_dir)
    rng = np.random.default_rng(seed)
    for split, n in (("train", docs), ("validation", max(docs // 10, 64))):
        (data_dir / split).mkdir(parents=True, exist_ok=True)
        path = data_dir / split / "part-00000.parquet"
        if path.exists():
            continue
        ids = rng.integers(0, vocab - 1, size=(n, words))
        text = [" ".join(f"w{i}" for i in row) for row in ids]
        pd.DataFrame({"text": text, "timestamp": ["2019-04-25T12:00:00Z"] * n,
                      "url": [f"https://example.org/{split}/{i}" for i in range(n)]}).to_parquet(path)
    return data_dir, tok_dir


def lm_config_file(root: Path, size: dict, data_dir: Path, tok_dir: Path) -> Path:
    """configs/c4-gpt2-small.yaml with its data on the local files (and its model at ``size``)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "c4-gpt2-small.yaml").read_text())
    cfg["data"] = {"source": "hf_text", "path": "parquet", "split": "train", "eval_split": "validation",
                   "data_files": {"train": str(data_dir / "train" / "*.parquet"),
                                  "validation": str(data_dir / "validation" / "*.parquet")},
                   "tokenizer": str(tok_dir), "seq_len": size["seq"], "eval_size": size["probe"],
                   "probe_size": size["probe"], "shuffle_buffer": 1000}
    cfg["model"] = {"name": "gpt2", "width": size["width"], "depth": size["depth"], "heads": size["heads"]}
    cfg["optim"].update(batch_size=size["batch"], micro_batch_size=size["batch"], warmup=10)
    cfg["checkpoint"] = {"targets": [], "eval_every": 10**9, "eval_batch_size": size["chunk"]}
    path = root / "c4-local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- 1. training throughput

def flops_per_token(model: torch.nn.Module, size: dict) -> float:
    """6 N + 12 L d T (N: parameters without the position table), the usual estimate of training FLOPs."""
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return 6 * n + 12 * size["depth"] * size["width"] * size["seq"]


def plain_lm_loop(config, steps: int, *, device: str, compiled: bool) -> float:
    """Tokens/s of the simplest correct loop on goldenpath's own stream: forward, CE, backward, AdamW."""
    from goldenpath.data import build_stream
    from goldenpath.models import build_model
    from goldenpath.training.run import make_optimizer

    source = config.data.build()
    stream = build_stream(source, config.data, seed=config.seed, batch_size=config.optim.batch_size,
                          micro_batch_size=config.optim.batch_size)
    model = build_model(config.model, source.info, seed=config.seed).to(device)
    if compiled:
        model.compile()
    opt = make_optimizer(model, config.optim)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        batch = {k: v.to(device, non_blocking=True) for k, v in stream.next_step()[0].items()}
        with autocast:
            out = model(batch["input_ids"])
        loss = F.cross_entropy(out.float().flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(WARMUP):  # warm-up (and compilation)
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * config.optim.batch_size * config.data.seq_len / (time.perf_counter() - t0)


def trainer_tokens_per_s(config_path: Path, steps: int, out: Path, name: str, *, device: str,
                         compiled: bool, extra=()) -> float:
    """Tokens/s of ``goldenpath train`` over its training time (evals and checkpoints timed apart)."""
    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    over = [f"budget.steps={WARMUP + steps}", "budget.samples=null", "budget.min_progress=null",
            "checkpoint.last_every_seconds=1e9", f"log.every={WARMUP}", "log.progress=false", f"out={out}",
            f"name={name}", f"compile={str(compiled).lower()}", f"cpu={str(device == 'cpu').lower()}",
            f"precision={'bf16' if device == 'cuda' else 'fp32'}", *extra]
    run_dir = train(load_config(config_path, over))
    # steady state, as for the plain loop: from the record after the warm-up steps to the last step's
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in logs if "train_loss" in r]
    first, last = steps_logged[0], steps_logged[-1]
    return (last["tokens"] - first["tokens"]) / (last["seconds"] - first["seconds"])


def part_train(size: dict, work: Path, device: str, peak_tflops: float, rows: dict) -> dict:
    """goldenpath train against the plain loop, eager and compiled at the base batch, and compiled at the large
    batch (``size["big_batch"]`` sequences per step, one micro-batch): fills ``rows`` eager, compiled,
    compiled_big as it goes."""
    from goldenpath.config import load_config
    from goldenpath.models import build_model

    data_dir, tok_dir = write_c4_layout(work, vocab=size["vocab"], docs=size["docs"])
    path = lm_config_file(work, size, data_dir, tok_dir)
    precision = [f"precision={'bf16' if device == 'cuda' else 'fp32'}"]
    config = load_config(path, precision)
    model = build_model(config.model, config.data.build().info, seed=0)
    fpt = flops_per_token(model, size)
    rows.update(params_m=sum(p.numel() for p in model.parameters()) / 1e6, flops_per_token=fpt)
    del model
    big = size["big_batch"]
    for key, compiled, batch, steps in (("eager", False, size["batch"], size["steps"]),
                                        ("compiled", True, size["batch"], size["steps"]),
                                        ("compiled_big", True, big, size["big_steps"])):
        shape = [f"optim.batch_size={batch}", f"optim.micro_batch_size={batch}"]
        ours = trainer_tokens_per_s(path, steps, work / "runs", f"train-{key}", device=device,
                                    compiled=compiled, extra=shape)
        plain = plain_lm_loop(load_config(path, [*precision, *shape]), steps, device=device, compiled=compiled)
        rows[key] = {"goldenpath_tokens_per_s": ours, "plain_tokens_per_s": plain, "ratio": ours / plain,
                     "batch": batch, "seq": size["seq"],
                     "mfu": ours * fpt / (peak_tflops * 1e12) if device == "cuda" else None}
    return rows


# ----------------------------------------------------------------------------- 2. the DP-SGD step

def part_dp(size: dict, device: str, rows: dict) -> dict:
    """Fills ``rows`` model by model, every method in float32 proper (TF32 off, whatever a part before set: the
    arithmetic of goldenpath's clipping rules, :func:`goldenpath.dp.per_sample.exact`)."""
    from goldenpath.training.runtime import strict_float32

    rows["tf32"] = False
    with strict_float32():
        return _part_dp(size, device, rows)


def _part_dp(size: dict, device: str, rows: dict) -> dict:
    import dp_step

    from goldenpath.training.runtime import free_memory_bytes

    # a DP step reads the free memory per layer (chunk sizes): what one read costs the host, the driver's part
    # (cudaMemGetInfo, some milliseconds on some machines) apart
    rows["free_memory_read_us"] = _call_us(lambda: free_memory_bytes(device))
    if device == "cuda":
        rows["mem_get_info_us"] = _call_us(torch.cuda.mem_get_info)
    cnn = size["dp_cnn"]
    dp_step.MODELS.update({
        "gpt2-small": {"overrides": ["data.source=markov", "model.name=gpt2", f"model.width={size['width']}",
                                     f"model.depth={size['depth']}", f"model.heads={size['heads']}",
                                     "model.attention=eager"],
                       "input": (size["seq"],), "classes": size["vocab"], "batch": size["dp_lm_batch"]},
        "resnet18": {"overrides": ["model.name=resnet18", f"model.width={cnn['width']}", "model.norm=group"],
                     "input": (3, 32, 32), "classes": 10, "batch": cnn["batch"]},
    })
    def row(name: str, times: dict) -> dict:
        base = statistics.median(times["non-private"])
        med = {m: statistics.median(t) for m, t in times.items()}
        best = min((m for m in dp_step.OPACUS if m in med), key=med.get)
        return {**{m: {"step_ms": t * 1e3, "x_non_private": t / base} for m, t in med.items()},
                "best_opacus": best, "best_opacus_over_dp_fast": med[best] / med["dp-fast"],
                "not_run": {m: why for (n, m), why in dp_step.UNSUPPORTED.items() if n == name}}

    for name in ("gpt2-small", "resnet18"):
        rows[name] = row(name, dp_step.step_times(name, size["dp_steps"], device, warmup=2))
        rows[name]["routes"] = dp_step.route_times(name, device, steps=2, warmup=1)[:12]
    # as a GPU run trains by default: the model in bf16, goldenpath's clipping in float32 proper (docs/dp-sgd.md)
    dp_step.BF16 = True
    try:
        rows["gpt2-small-bf16"] = row("gpt2-small", dp_step.step_times(
            "gpt2-small", size["dp_steps"], device, warmup=2, methods=("non-private", "dp-fast", "opacus-hooks")))
    finally:
        dp_step.BF16 = False
    return rows


# ----------------------------------------------------------------------------- 3. compare

def part_compare(size: dict, work: Path, device: str, rows: dict) -> dict:
    """Fills ``rows`` size by size."""
    import compare as bench_compare

    from goldenpath.comparison import pairs
    from goldenpath.comparison.compare import compare

    data_dir, tok_dir = write_c4_layout(work, vocab=size["vocab"], docs=size["docs"])
    path = lm_config_file(work, size, data_dir, tok_dir)
    def timed(sweep: Path, n: int) -> tuple:
        """(the pairs, the figures) of a compare timed after one that warms it up (imports, compilation)."""
        compare(sweep, device=device, chunk=size["chunk"])
        shutil.rmtree(sweep / "compare")  # and its cache: the timed call computes every pair
        _sync(device)
        with bench_compare.split_timed(device) as split:  # forwards and pair metrics inside compare
            t0 = time.perf_counter()
            frame = compare(sweep, device=device, chunk=size["chunk"])
            _sync(device)
            wall = time.perf_counter() - t0
        shutil.rmtree(sweep / "compare")
        return frame, {"compare_s": wall, "ratio": wall / (n * one), **split}

    one = bench_compare.forward_seconds(path, chunk=size["chunk"], device=device)
    for n in size["compare_sizes"]:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            sweep = bench_compare.make_sweep(Path(tmp) / "s", path, n)
            frame, figures = timed(sweep, n)
            # whether the kernel ran: it can on the device and did not fail in the compare above
            ran = pairs.kernel_available(torch.device(device))
            rows[str(n)] = row = {"forward_s": one, "pair_kernel": ran, **figures}
            if pairs.KERNEL_FAILED:
                row["pair_kernel_error"] = pairs.KERNEL_FAILED[0]
            # the same with tv and js from the eager forms: what the kernel saves, and how far its values are from
            # theirs (on a CPU the two are the same path)
            try:  # a failure here is recorded in its row; the figures above and the next size still come
                with bench_compare.without_pair_kernel():
                    eager, figures = timed(sweep, n)
                row["without_kernel"] = {**figures, "largest_differences": bench_compare.differences(eager, frame)}
            except Exception:  # noqa: BLE001
                row["without_kernel"] = {"error": traceback.format_exc()}
    return rows


# ----------------------------------------------------------------------------- 4. accelerate launch

def part_launch(size: dict, work: Path, device: str) -> dict:
    data_dir, tok_dir = write_c4_layout(work, vocab=size["vocab"], docs=size["docs"])
    path = lm_config_file(work, size, data_dir, tok_dir)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    procs = gpus if gpus > 1 else (1 if device == "cuda" else 2)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
           str(procs), "--mixed_precision", "no", "--dynamo_backend", "no",  # as goldenpath sweep: bf16 is the run's
           "--main_process_port", str(29500 + os.getpid() % 1000)]
    cmd += ["--multi_gpu"] if procs > 1 else []
    over = [f"budget.steps={size['launch_steps']}", "budget.samples=null", "budget.min_progress=null",
            "noise.kind=gaussian",
            "noise.sigma=1.0", f"out={work / 'runs'}", "name=launch", "log.progress=false",
            f"optim.micro_batch_size={size['batch'] // procs if procs > 1 else size['batch']}",
            f"precision={'bf16' if device == 'cuda' else 'fp32'}"] + (["cpu=true"] if device == "cpu" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if device == "cpu" else dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "-m", "goldenpath", "train", str(path), *over], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except BaseException:  # a part stopped by its limit leaves no worker holding the device
        _kill_tree(proc.pid)
        proc.wait()
        raise
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    wall = time.perf_counter() - t0
    status_path = work / "runs" / "launch" / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {}
    return {"processes": procs, "returncode": out.returncode, "wall_s": wall, "state": status.get("state"),
            "step": status.get("step"), "replicas_in_sync": status.get("replicas_in_sync"),
            "ok": out.returncode == 0 and status.get("state") == "completed"
            and status.get("step") == size["launch_steps"] and status.get("replicas_in_sync") is not False,
            "stderr_tail": out.stderr[-1500:] if out.returncode else ""}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the launcher's workers run in sessions of their own, out of
    reach of its process group), from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


# ----------------------------------------------------------------------------- 5. profile

def part_profile(size: dict, device: str, rows: dict) -> dict:
    """Fills ``rows`` as it goes (eager, lm_head, compiled), so a part stopped by its time limit keeps the rest."""
    import lm_head_loss
    import step_profile

    rows["eager"] = step_profile.profile_lm(size, device, compiled=False)
    rows["lm_head"] = lm_head_loss.measure(tokens=size["batch"] * size["seq"], width=size["width"],
                                           vocab=size["profile_vocab"], chunk=size["head_chunk"], device=device,
                                           reps=3)
    rows["compiled"] = step_profile.profile_lm(size, device, compiled=True)
    return rows


# ----------------------------------------------------------------------------- 6. the data-wait fraction

def part_data(size: dict, work: Path, device: str, rows: dict) -> dict:
    """bench/overhead.py's data-wait fraction on this device: the share of ``goldenpath train``'s step time spent
    blocked in the stream, batches made in the step (``data.prefetch=0``) against made ahead (``=2``), for the
    teacher CNN (its stream made on the CPU, and on the device: ``data.generate=device``), a CNN on CIFAR-5m
    parts and the train part's GPT-2 on C4-layout parquet; then the device-made streams against the CPU's
    (:func:`device_streams`). Fills ``rows`` as it goes."""
    import overhead

    data_dir, tok_dir = write_c4_layout(work, vocab=size["vocab"], docs=size["docs"])
    files = work / "data-files"
    files.mkdir(exist_ok=True)
    cpu = ["cpu=true"] if device == "cpu" else []
    small = ["data.eval_size=64", "data.probe_size=64"] if device == "cpu" else []  # the smoke's evals: short
    cifar_base, cifar = overhead.write_cifar5m(files)
    teacher = ROOT / "configs" / "teacher-cnn.yaml"
    sources = {"teacher": (teacher, [*cpu, *small]),
               "teacher-device": (teacher, [*cpu, *small, "data.generate=device"]),
               "cifar5m-npz": (cifar_base, [*cifar, *cpu, *small]),
               "c4-text": (lm_config_file(work, size, data_dir, tok_dir), cpu)}
    rows["device_streams"] = device_streams(device, size["stream_samples"])
    for name, steps in size["data_steps"].items():  # the first step's wait (shuffle buffer, thread start) left out
        got = overhead.data_waits(sources, [name], steps, size["data_rounds"], str(work / "runs"), skip=1)[name]
        rows[name] = {"wait_sync": got["wait_sync"], "wait_prefetch": got["wait_prefetch"],
                      "speed_ratio": got["speed_ratio"], "steps": steps, "rounds": got["rounds"]}
    return rows


def device_streams(device: str, n: int) -> dict:
    """The teacher (configs/teacher-cnn.yaml, also with data.mix=0.2) and Markov (configs/markov-gpt2.yaml)
    training batches of ``n`` samples made on ``device`` (data.generate=device) against the CPU's: images
    differing, labels or tokens differing, and samples/s made there over samples/s made on the CPU."""
    from goldenpath.config import load_config

    def timed(source, index):
        source.train_batch(index[:64] + len(index))  # warm (kernels, caches) outside a Markov read-ahead of index
        _sync(device)
        t0 = time.perf_counter()
        batch = source.train_batch(index)
        _sync(device)
        return {k: v.cpu() for k, v in batch.items()}, time.perf_counter() - t0

    out = {}
    for name, path, over in (("teacher", "teacher-cnn.yaml", []), ("teacher-mix", "teacher-cnn.yaml", ["data.mix=0.2"]),
                             ("markov", "markov-gpt2.yaml", [])):
        data = load_config(ROOT / "configs" / path, over).data
        index = torch.arange(5 * 2**40, 5 * 2**40 + n)
        (a, t_cpu), (b, t_dev) = timed(data.build(), index), timed(data.build().place(device), index)
        keys = ("x", "y") if "x" in a else ("input_ids", "labels")
        out[name] = {"samples": n, "inputs_differing": int((a[keys[0]] != b[keys[0]]).flatten(1).any(1).sum()),
                     "labels_differing": int((a[keys[1]] != b[keys[1]]).reshape(n, -1).any(1).sum()),
                     "samples_per_s": n / t_dev, "speed_over_cpu": t_cpu / t_dev}
    return out


# ----------------------------------------------------------------------------- 7. host reads per step

SYNC_WARNING = "called a synchronizing CUDA operation"


def host_reads(config_path: Path | None, steps: int, every: int, out: Path, name: str, *, device: str,
               added_read: bool = False, overrides=()) -> dict:
    """``goldenpath train`` for ``steps`` steps, logging and evaluating every ``every``: host reads per loop
    iteration (bench/host_reads.py) and, on CUDA, the synchronisations torch's sync debug mode warns of (its own
    count, which sees what patched Tensor methods cannot: ``.to("cpu")``, nonzero, boolean masks).
    ``added_read``: one ``float()`` of the step's summed loss per step, the control that both must see."""
    import threading
    import warnings

    from host_reads import HostReads

    from goldenpath.training import step as step_mod
    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    over = [f"budget.steps={steps}", "budget.samples=null", "budget.min_progress=null", f"log.every={every}",
            f"checkpoint.eval_every={every}", "checkpoint.last_every_seconds=1e9", "log.progress=false",
            f"out={out}", f"name={name}", *overrides] + (["cpu=true"] if device == "cpu" else [])
    syncs = {"main": 0, "other": 0}
    marks: list[int] = []
    shown = warnings.showwarning

    def counted(message, category, *args, **kwargs):
        if SYNC_WARNING in str(message):
            syncs["main" if threading.current_thread() is threading.main_thread() else "other"] += 1
        else:
            shown(message, category, *args, **kwargs)

    with HostReads() as reads, warnings.catch_warnings():
        real = step_mod.optimizer_step

        def step(run, micro_batches, window):
            marks.append(syncs["main"])
            result = real(run, micro_batches, window)
            if added_read:
                float(window.sums[0])
            return result

        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = counted
        step_mod.optimizer_step = step
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(load_config(config_path, over))
        finally:
            step_mod.optimizer_step = real
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    per_read = reads.per_step()
    per_sync = dict(zip(per_read, (b - a for a, b in zip(marks, marks[1:]))))
    quiet = [s for s in per_read if s % every and s > 1]  # neither logging nor evaluating; past the first step
    logged = [s for s in per_read if not s % every]

    def figures(per: dict) -> dict:
        return {"quiet_max": max(per[s] for s in quiet), "quiet_mean": statistics.mean(per[s] for s in quiet),
                "log_mean": statistics.mean(per[s] for s in logged)}

    return {"reads": figures(per_read), "read_kinds": dict(reads.kinds),
            "syncs": figures(per_sync) if device == "cuda" else None,
            "syncs_other_threads": syncs["other"] if device == "cuda" else None, "steps": steps, "every": every}


def part_reads(size: dict, work: Path, device: str, rows: dict) -> dict:
    """Host reads per step of the train part's GPT-2 on the device, and the same run with one read added per step."""
    data_dir, tok_dir = write_c4_layout(work, vocab=size["vocab"], docs=size["docs"])
    path = lm_config_file(work, size, data_dir, tok_dir)
    for key, added in (("trainer", False), ("added_read", True)):
        rows[key] = host_reads(path, size["reads_steps"], 4, work / "runs", f"reads-{key}", device=device,
                               added_read=added)
    seen = {c: rows["added_read"][c]["quiet_mean"] - rows["trainer"][c]["quiet_mean"] for c in ("reads", "syncs")
            if rows["trainer"][c] is not None}
    rows["added_read_seen"] = seen  # per quiet step: 1 read; on CUDA at least 1 sync
    return rows


# ----------------------------------------------------------------------------- driver

class PartTimeout(BaseException):
    """A part reached its time limit. Not an Exception, so that no ``except Exception`` inside a part (goldenpath's
    cache reads, the without-kernel try of the compare part) swallows it and lets the part run on unbounded."""


def part_layout(size: dict, device: str, rows: dict) -> dict:
    """Channels-first against channels-last images (bench/conv_layout.py): the GPU study's CNN, ResNet-18's
    non-private and DP-SGD steps, with TF32 off whatever a part before set (the bf16 cases stay bf16). Rounds
    stop after ``seconds``; fills ``rows`` by case."""
    import conv_layout

    from goldenpath.training.runtime import strict_float32

    lay = size["layout"]
    rows["tf32"] = False
    with strict_float32():
        runs = conv_layout.cases(device, lay)
        for r in conv_layout.measure(runs, lay["rounds"], warmup=2, device=device,
                                     deadline=time.perf_counter() + lay["seconds"]):
            rows[r.pop("case")] = r
    return rows


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise PartTimeout in the main thread after ``seconds`` (None: no limit)."""
    if seconds is None:
        yield
        return
    if seconds <= 0:  # setitimer(0) would mean no limit at all
        raise PartTimeout(f"no time left for it ({seconds:g} s)")

    def stop(signum, frame):
        raise PartTimeout(f"stopped at its time limit of {seconds:g} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _call_us(fn, calls: int = 200) -> float:
    """The median microseconds of one call of ``fn`` (host time; it is timed alone, after one warm-up call)."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def table(results: dict) -> str:
    """The short markdown table of the figures against their goals."""
    lines = ["| check | figure | goal |", "| --- | --- | --- |"]
    tr = results.get("train", {})
    for key, goal in (("eager", ">= 0.98"), ("compiled", ">= 0.98; MFU >= 35%"),
                      ("compiled_big", ">= 0.98; MFU >= 45%")):
        if key in tr:
            r = tr[key]
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
            lines.append(f"| train ({key.split('_')[0]}, {r.get('batch', '?')} x {r.get('seq', '?')}) | "
                         f"{r['goldenpath_tokens_per_s']:,.0f} tok/s, {r['ratio']:.3f} of the plain loop{mfu} | "
                         f"{goal} |")
    dp_goals = {"gpt2-small": "<= 1.15x; > 1", "resnet18": "<= 2.0x; >= 1.5",
                "gpt2-small-bf16": "(bf16 model, float32 clipping: what a GPU run pays)"}
    for name, r in results.get("dp", {}).items():
        if isinstance(r, dict) and "dp-fast" in r:
            lines.append(f"| dp step {name} | fast {r['dp-fast']['x_non_private']:.2f}x non-private; best Opacus "
                         f"({r['best_opacus']}) {r['best_opacus_over_dp_fast']:.2f}x slower | "
                         f"{dp_goals.get(name, '<= 1.2x; > 1')} |")
    read = results.get("dp", {}).get("free_memory_read_us")
    if read is not None:
        driver = results["dp"].get("mem_get_info_us")
        lines.append(f"| free-memory read (DP chunk sizes, per layer) | {read:.0f} us"
                     f"{f' (cudaMemGetInfo {driver:.0f} us)' if driver is not None else ''} | (for tuning) |")
    for name, r in results.get("dp", {}).items():
        if isinstance(r, dict) and r.get("routes"):
            top = ", ".join(f"{x['part']} {x['detail']} {100 * x['share']:.0f}%".replace("  ", " ")
                            for x in r["routes"][:4])
            lines.append(f"| dp-fast step {name}: where it goes | {top} | (for tuning) |")
    for n, r in results.get("compare", {}).items():
        if isinstance(r, dict) and "ratio" in r:
            split = (f"; inside: forwards {r['forwards_s']:.2f} s, pair metrics {r['pairs_s']:.2f} s"
                     + (f", statistics {r['stats_s']:.2f} s, pair rows {r['rows_s']:.2f} s, tables "
                        f"{r['tables_s']:.2f} s" if "stats_s" in r else "")
                     if "pairs_s" in r else "")
            lines.append(f"| compare N={n} | {r['ratio']:.2f} x (N x forward){split} | <= 1.2 |")
            if r.get("pair_kernel_error"):
                lines.append(f"| compare N={n}: the tv/js kernel FAILED | {r['pair_kernel_error'][:160]} | "
                             "(eager instead) |")
            c = r.get("without_kernel", {})
            if "error" in c:
                lines.append(f"| compare N={n}, without the tv/js kernel | FAILED: "
                             f"{c['error'].splitlines()[-1][:120]} | |")
            elif c:
                gaps = ", ".join(f"{m} {x:.1e}" for m, x in c["largest_differences"].items())
                on = "on" if r.get("pair_kernel") else "off"
                lines.append(f"| compare N={n}, without the tv/js kernel (kernel {on} above) | {c['ratio']:.2f} x "
                             f"(N x forward); pair metrics {c['pairs_s']:.2f} s; largest "
                             f"differences from the kernel's: {gaps} (kl relative) | 1e-5, kl 1e-4 |")
    la = results.get("launch", {})
    if "ok" in la:
        lines.append(f"| accelerate launch ({la['processes']} proc.) | {la['state']} at step {la['step']}, replicas "
                     f"in sync: {la['replicas_in_sync']} | completed, in sync |")
    pr = results.get("profile", {})
    for key in ("eager", "compiled"):
        if isinstance(pr.get(key), dict) and "categories" in pr[key]:
            r, cats = pr[key], pr[key]["categories"]
            share = {c: 100 * cats.get(c, {}).get("share", 0.0) for c in ("lm head + cross-entropy", "attention",
                                                                            "casts (_to_copy)")}
            lines.append(f"| profile ({key}) | device idle {100 * r['idle_fraction']:.1f}%, host "
                         f"{r['host_ms_per_step']:.1f} of {r['wall_ms_per_step']:.1f} ms/step, "
                         f"{r['kernels_per_step']:.0f} kernels/step; "
                         f"lm head + CE {share['lm head + cross-entropy']:.1f}%, "
                         f"attention {share['attention']:.1f}% ({', '.join(r['attention_backends']) or '-'}), "
                         f"casts {share['casts (_to_copy)']:.1f}% | where the time goes |")
    head = pr.get("lm_head", {})
    if "time_ratio" in head:
        lines.append(f"| lm head + CE in chunks of {head['chunk_tokens']} | time {head['time_ratio']:.2f}x, peak "
                     f"memory {head['memory_ratio']:.2f}x of the float32-logits path (recomputing: "
                     f"{head['recompute_time_ratio']:.2f}x, {head['recompute_memory_ratio']:.2f}x) | "
                     f"memory < 1, time <= 1 |")
    for name, r in results.get("data", {}).items():
        if isinstance(r, dict) and "wait_sync" in r:
            lines.append(f"| data wait {name} | {100 * r['wait_sync']:.1f}% of step time in the step, "
                         f"{100 * r['wait_prefetch']:.1f}% prefetched; samples/s prefetched / in the step "
                         f"{r['speed_ratio']:.2f} | prefetched near 0 |")
    for name, r in results.get("data", {}).get("device_streams", {}).items():
        lines.append(f"| {name} stream made on the device | {r['samples_per_s']:,.0f} samples/s, "
                     f"{r['speed_over_cpu']:.1f}x the CPU's; of {r['samples']:,}: {r['inputs_differing']} inputs, "
                     f"{r['labels_differing']} labels differ from the CPU's | ~1 label in 10^6 (teacher), 0 (markov) |")
    rd = results.get("reads", {})
    for key in ("trainer", "added_read"):
        if key in rd:
            r, sy = rd[key], rd[key]["syncs"]
            syncs = (f"; CUDA syncs {sy['quiet_max']} per quiet step (max), {sy['log_mean']:.1f} per log step"
                     if sy else "")
            what = "GPT-2 trainer" if key == "trainer" else "with 1 read added per step"
            lines.append(f"| host reads per step ({what}) | {r['reads']['quiet_max']} per quiet step (max), "
                         f"{r['reads']['log_mean']:.1f} per log step{syncs} | "
                         f"{'no CUDA sync between logs' if key == 'trainer' else 'the added read counted'} |")
    for case, r in results.get("layout", {}).items():
        if isinstance(r, dict) and "speedup" in r:
            lines.append(f"| layout: {case} | channels-first {r['channels_first_ms']:.2f} ms, channels-last "
                         f"{r['channels_last_ms']:.2f} ms: {r['speedup']:.2f}x | > 1: channels-last on this device |")
    for part, r in results.items():
        if isinstance(r, dict) and "error" in r:
            lines.append(f"| {part} | FAILED: {r['error'].splitlines()[-1][:120]} | |")
        elif isinstance(r, dict) and "skipped" in r:
            lines.append(f"| {part} | NOT RUN: {r['skipped']} | |")
    return "\n".join(lines)


PARTS = "profile,train,dp,compare,data,reads,launch,layout"  # where the time goes first; the layout question last
MIN_PART_S = 30  # under --budget-s, a part is not started with less time than this left


def write(results: dict, out: Path) -> Path:
    """``gpu.json`` and ``gpu.md`` (``gpu_cpu_smoke.*``), and the profile's tables once it has any, each file
    replaced whole: written after every part, so a run killed from outside keeps the parts it finished. Also
    into ``$OUT`` when that is set and is not ``out`` (what a device machine sends back, even from a command
    killed at its limit)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(results)
    extra = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    dirs = [out] + ([extra] if extra is not None and extra.resolve() != out.resolve() else [])
    for d in dirs[1:]:
        d.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        for d in dirs:
            tmp = d / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, d / name)

    put(f"{stem}.json", json.dumps(results, indent=1, default=str))  # first: the figures themselves
    try:  # the tables only render them: a rendering bug must not stop the parts still to run
        put(f"{stem}.md", table(results) + "\n")
        if any(isinstance(results.get("profile", {}).get(m), dict) for m in ("eager", "compiled")):
            import step_profile

            for d in dirs:
                step_profile.write_tables(results["profile"], d, stem)
    except Exception:  # noqa: BLE001
        put(f"{stem}.md", f"the tables failed to render; {stem}.json holds every figure\n\n"
                          f"```\n{traceback.format_exc()}```\n")
        for d in dirs:  # no older profile tables left to pass for these results
            for suffix in ("_profile.md", "_profile.csv"):
                (d / f"{stem}{suffix}").unlink(missing_ok=True)
    return out / stem


def _stem(results: dict) -> str:
    return "gpu" if results["sizes"] == "gpu" else "gpu_cpu_smoke"


def finished_parts(earlier: dict) -> dict:
    """The parts of an earlier run (:func:`earlier_results`) that finished: those without an error, and those
    stopped by their own time limit (run again, they would stop there again); not those stopped by the budget or
    at their first-pass limit, failed or not run."""
    return {part: r for part, r in earlier.items() if isinstance(r, dict) and "seconds" in r
            and "skipped" not in r and ("error" not in r or r.get("limit") == "part")}


def earlier_results(out: Path, results: dict) -> dict:
    """What an earlier run wrote to ``out``, when it measured the same sizes on the same device (else {})."""
    path = out / f"{_stem(results)}.json"
    try:
        earlier = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        print(f"--resume: {path} unreadable ({e}); running every part", file=sys.stderr)
        return {}
    if not isinstance(earlier, dict) or (earlier.get("sizes"), earlier.get("device")) != (results["sizes"],
                                                                                          results["device"]):
        return {}
    return earlier


def part_limit(own: float | None, left: float | None) -> float | None:
    """A part's time limit: its own (``limits_s``) or what is left of ``--budget-s``, the smaller (None: none)."""
    limits = [x for x in (own, left) if x is not None]
    return min(limits) if limits else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (the check of the check)")
    parser.add_argument("--parts", default=PARTS, help=f"which parts, in this order (default: {PARTS})")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all parts: each part stops at what is left (or its own limit), and a "
                             f"part with under {MIN_PART_S} s left is recorded as not run (default: no budget)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the parts an earlier run in --out finished (same sizes, same device) and run the "
                             "rest: the same command again continues where a budget, a kill or a first-pass "
                             "limit stopped it")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
    size = SIZES["cpu-smoke" if args.cpu_smoke else "gpu"]
    if device == "cpu" and not args.cpu_smoke:
        print("no GPU visible: running the CPU smoke sizes", file=sys.stderr)
        size = SIZES["cpu-smoke"]
    results: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                     "sizes": "gpu" if size is SIZES["gpu"] else "cpu-smoke"}
    out = Path(args.out)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = {"train": lambda rows: part_train(size, work, device, args.peak_tflops, rows),
                "dp": lambda rows: part_dp(size, device, rows),
                "compare": lambda rows: part_compare(size, work, device, rows),
                "launch": lambda rows: rows.update(part_launch(size, work, device)) or rows,
                "profile": lambda rows: part_profile(size, device, rows),
                "data": lambda rows: part_data(size, work, device, rows),
                "reads": lambda rows: part_reads(size, work, device, rows),
                "layout": lambda rows: part_layout(size, device, rows)}
        parts = [p for p in args.parts.split(",") if p]
        unknown = [p for p in parts if p not in jobs]
        if unknown:
            parser.error(f"--parts: unknown part {unknown[0]!r}; use some of {','.join(jobs)}")
        earlier = earlier_results(out, results) if args.resume else {}
        kept = finished_parts(earlier)
        # parts an earlier run stopped at their first-pass limit: run again without it
        second = {p for p, r in earlier.items() if isinstance(r, dict) and r.get("limit") == "first pass"}
        results.update(kept)  # parts not asked for this time stay in the file too
        # a kept part stopped at its own limit, or a launch out of sync, still counts against the exit status
        failed = any("error" in kept[p] or kept[p].get("ok") is False for p in parts if p in kept)
        for part in parts:
            if part in kept:
                print(f"{part}: kept from the earlier run in {out}", flush=True)
                continue
            left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
            if left is not None and left < MIN_PART_S:
                results[part] = {"skipped": f"not started: {max(left, 0):.0f} s of --budget-s {args.budget_s:g} "
                                            f"left (a part needs {MIN_PART_S} s)"}
                failed = True
                print(f"{part}: {results[part]['skipped']}", flush=True)
                write(results, out)
                continue
            t0 = time.perf_counter()
            results[part] = {}  # each part fills its rows as it goes: a part stopped early keeps them
            own = size["limits_s"].get(part)
            first = None if part in second else size["first_pass_s"].get(part)
            try:
                with _time_limit(part_limit(own if first is None else first, left)):
                    jobs[part](results[part])
                failed |= part == "launch" and not results[part]["ok"]
            except (Exception, PartTimeout) as e:  # noqa: BLE001 - one part's failure is recorded, the rest run
                results[part]["error"] = traceback.format_exc()
                if isinstance(e, PartTimeout):  # which limit stopped it: --resume runs it again but for its own
                    binding = own if first is None else first
                    stopped_by = binding is not None and (left is None or binding <= left)
                    results[part]["limit"] = ("budget" if not stopped_by else "part" if first is None else
                                              "first pass")
                failed = True
            results[part]["seconds"] = time.perf_counter() - t0
            print(f"{part}: {results[part]['seconds']:.1f} s", flush=True)
            write(results, out)
    path = write(results, out)
    profiled = any(isinstance(results.get("profile", {}).get(m), dict) for m in ("eager", "compiled"))
    for text in ([Path(f"{path}_profile.md")] if profiled else []) + [Path(f"{path}.md")]:
        if text.exists():
            print(text.read_text())
    print(f"wrote {path}.json and .md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
