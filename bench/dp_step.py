"""DP-SGD step cost: goldenpath's fast path and vmap path, Opacus (hooks, ghost), non-private SGD, same run.

    python bench/dp_step.py [--steps 30] [--device cpu|cuda] [--models cnn,gpt2,resnet18] [--system-malloc] [--routes]
                            [--bf16]

Each method gets its own copy of the same model and batch. After a warm-up, full optimizer steps
(forward, backward or per-sample clipping, noise, SGD update) are timed interleaved, one step of each
method in turn, so machine noise hits all alike; the table gives median step times as ratios to
non-private SGD. Peak memory of a step above what the setup holds is measured per method in a fresh
process. Every process runs with the allocator settings of ``goldenpath``'s command line
(``goldenpath.training.runtime.tune_malloc``), unless ``--system-malloc`` keeps glibc's defaults.
Opacus runs in both of its modes for a plain model: ``hooks`` (per-sample gradients materialised by
layer hooks) and ``ghost`` (ghost clipping: per-sample norms from activations and output gradients, then a
second backward with the clipping coefficients), and goldenpath is compared with the faster of the two.
Goals: fast-path dp <= 1.3x non-private on a CPU (1.2x on a GPU); faster than every Opacus mode.
``--bf16`` runs every method's forward and backward under a bf16 autocast, as a GPU run trains by default
(``precision: auto``); goldenpath's clipping arithmetic stays float32 there (docs/dp-sgd.md), Opacus' does not.
``--routes`` adds where a fast-path step's time goes (:func:`route_times`): the forward, the backward to the
layer outputs, each layer rule, each parameter's norm and clipped sum by route, the noise, the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch

from goldenpath.training.runtime import tune_malloc

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("non-private", "dp-fast", "dp-vmap", "opacus-hooks", "opacus-ghost")
OPACUS = ("opacus-hooks", "opacus-ghost")
UNSUPPORTED: dict[tuple[str, str], str] = {}  # (model, method) -> why the method could not run
BF16 = False  # every method's forward and backward under a bf16 autocast (--bf16)
CPU_GOALS = {"cnn": 1.3, "gpt2": 1.25}  # dp fast / non-private on 2 CPU cores (the GPU's are in bench/gpu.py)
MODELS = {
    # the teacher-CNN of configs/teacher-cnn.yaml with group norm, batch 64 of 3x32x32
    "cnn": {"overrides": ["model.name=cnn", "model.width=32", "model.depth=3", "model.norm=group"],
            "input": (3, 32, 32), "classes": 10, "batch": 64},
    # GPT-2-small's shape (tied embeddings, pre-norm blocks, 4x MLP) scaled to a CPU: d=256, 4 layers
    "gpt2": {"overrides": ["data.source=markov", "model.name=gpt2", "model.width=256", "model.depth=4",
                           "model.heads=4", "model.attention=eager"],
             "input": (128,), "classes": 8192, "batch": 16},
    # the GPU goal's ResNet-18 with group norm (bench/gpu.py: width 64, batch 256) at a CPU's size; no CPU goal,
    # not run by default (--models resnet18): 1.9-2.0x its non-private step on 2 cores, Opacus hooks 2.8-2.9x
    "resnet18": {"overrides": ["model.name=resnet18", "model.width=16", "model.norm=group"],
                 "input": (3, 32, 32), "classes": 10, "batch": 32},
}


def make_step(model_name: str, method: str, device: str):
    """A closure doing one full optimizer step of ``method`` on its own copy of the model and batch."""
    from goldenpath.config import load_config
    from goldenpath.data import SourceInfo
    from goldenpath.models import build_model, sample_losses
    from goldenpath.dp.mechanisms import add_noise, per_sample_clip

    torch.manual_seed(0)
    spec = MODELS[model_name]
    cfg = load_config(None, [*spec["overrides"], "budget.steps=1"])
    lm = len(spec["input"]) == 1
    info = SourceInfo("lm" if lm else "classification", spec["input"], spec["classes"])
    model = build_model(cfg.model, info, seed=0).to(device)
    b = spec["batch"]
    if lm:
        ids = torch.randint(0, spec["classes"], (b, *spec["input"]), device=device)
        batch = {"input_ids": ids, "labels": ids}
    else:
        batch = {"x": torch.randn(b, *spec["input"], device=device), "y": torch.randint(0, 10, (b,), device=device)}
    units = b * spec["input"][0] if lm else b
    sigma, clip = 1.0, 1.0
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=BF16)  # noqa: E731

    if method == "opacus-hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        net = GradSampleModule(model, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), noise_multiplier=sigma, max_grad_norm=clip,
                          expected_batch_size=b, loss_reduction="mean")

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                (sample_losses(net, batch).sum() / units).backward()
            opt.step()
        return step

    if method == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        net = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip, use_ghost_clipping=True,
                                                   loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(net.parameters(), lr=0.01), noise_multiplier=sigma,
                                              max_grad_norm=clip, expected_batch_size=b, loss_reduction="mean")

        def step():
            opt.zero_grad(set_to_none=True)
            # the mean over samples of losses * B / units is the same sum / units the other methods use
            with autocast():
                per_sample = sample_losses(net, batch) * (b / units)
                DPTensorFastGradientClipping(net, opt, per_sample, "mean").backward()
            opt.step()
        return step

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    trained = list(model.named_parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        if method == "non-private":
            with autocast():
                (sample_losses(model, batch).sum() / units).backward()
        else:
            with autocast():  # as goldenpath train runs it: the clipping inside the run's autocast, noise outside
                res = per_sample_clip(model, lambda m, x: sample_losses(m, x) * (b / units), batch, clip,
                                      method=method.removeprefix("dp-"), chunk=b)
            for n, p in trained:
                p.grad = res.grads[n]
            grads = [p.grad for _, p in trained]
            add_noise(grads, sigma * clip, seed=0, step=0)
            torch._foreach_div_(grads, b)
        opt.step()
    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _peak_worker(model_name: str, method: str, device: str, out, system_malloc: bool, bf16: bool) -> None:
    global BF16
    BF16 = bf16
    if not system_malloc:
        tune_malloc()
    step = make_step(model_name, method, device)
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:  # the first step: memory freed by a step stays resident, so a second one would show little
        base = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark (VmHWM) to the current RSS
            f.write("5")
        step()
        out.put((_vm_hwm_bytes() - base) / 2**20)


def peak_memory(model_name: str, method: str, device: str, system_malloc: bool) -> float:
    """Peak memory of a step above what the setup holds, in a fresh process (MB)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(model_name, method, device, queue, system_malloc, BF16))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else float("nan")


def step_times(model_name: str, steps: int, device: str, warmup: int = 5,
               methods: tuple[str, ...] = METHODS) -> dict[str, list[float]]:
    """Per-step seconds of every method (of ``methods``), interleaved step by step in one process."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fns = {}
    for m in methods:
        try:
            fns[m] = make_step(model_name, m, device)
            fns[m]()
        except NotImplementedError as e:  # e.g. Opacus ghost clipping refuses tied parameters (GPT-2)
            UNSUPPORTED[(model_name, m)] = str(e).splitlines()[0]
            fns.pop(m, None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    methods = tuple(fns)
    times = {m: [] for m in methods}
    for i in range(steps):
        order = methods[i % len(methods):] + methods[: i % len(methods)]
        for m in order:
            sync()
            t0 = time.perf_counter()
            fns[m]()
            sync()
            times[m].append(time.perf_counter() - t0)
    return times


def route_times(model_name: str, device: str, steps: int = 3, warmup: int = 2) -> list[dict]:
    """Where a fast-path DP step's time goes, per part and per layer: the forward (with the tape), the
    backward to the layer outputs, each layer rule (by type and input shape), each parameter's norm and
    clipped sum (by route: formed per sample and kept, formed and dropped, ghost), the torch.func paths, the
    noise, and the rest. On CUDA every timed part is synchronised, so the parts add up (the step itself runs
    a little slower). Returns rows {part, detail, ms_per_step, share}, largest first."""
    from goldenpath.dp import layer_rules as lr
    from goldenpath import models
    from goldenpath.dp import mechanisms, per_sample

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    totals: dict[tuple[str, str], float] = {}
    patches = []

    def timed(owner, attr, key):
        fn = owner[attr] if isinstance(owner, dict) else getattr(owner, attr)

        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            k = key(*args, **kwargs)
            totals[k] = totals.get(k, 0.0) + time.perf_counter() - t0
            return out
        patches.append((owner, attr, fn))
        if isinstance(owner, dict):
            owner[attr] = wrapper
        else:
            setattr(owner, attr, wrapper)

    def route(parts):
        f = parts[0]
        if not isinstance(f, lr.Factored):
            return "formed", tuple(f.shape[1:])
        if len(parts) == 1 and f.u.is_floating_point() and lr.per_sample_cheaper(f.v.shape[1], f.rows, f.v.shape[-1]):
            return "formed and dropped", tuple(f.shape)
        return ("ghost (tied)" if len(parts) > 1 else "ghost"), tuple(f.shape)

    timed(models, "sample_losses", lambda *a, **k: ("forward", ""))
    timed(per_sample.torch.autograd, "grad", lambda *a, **k: ("backward to layer outputs", ""))
    timed(per_sample, "reference_grads", lambda *a, **k: ("torch.func, whole model", ""))
    timed(per_sample, "_module_grads", lambda call, *a, **k: ("torch.func, one module", type(call.module).__name__))
    timed(lr, "keep_formed", lambda *a, **k: ("form per-sample gradients (kept)", ""))
    timed(lr, "sq_norms", lambda parts: ("norm: " + route(parts)[0], str(route(parts)[1])))
    timed(lr, "weighted_sum", lambda part, c, shape: ("clipped sum: " + ("formed, weighted over samples"
                                                                        if torch.is_tensor(part) else "factored"),
                                                      str(tuple(shape))))
    timed(mechanisms, "add_noise", lambda *a, **k: ("noise", ""))
    import transformers.pytorch_utils  # noqa: F401 - so that rule_of registers Conv1D's rule now

    lr.rule_of(torch.nn.Linear(1, 1))
    for t in list(lr.RULES):
        timed(lr.RULES, t, lambda m, a, g, *_: ("layer rule", f"{type(m).__name__} {tuple(a.shape)}"))
    try:
        step = make_step(model_name, "dp-fast", device)
        for _ in range(warmup):
            step()
        totals.clear()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = time.perf_counter() - t0
    finally:
        for owner, attr, fn in reversed(patches):
            if isinstance(owner, dict):
                owner[attr] = fn
            else:
                setattr(owner, attr, fn)
    rows = [{"part": k[0], "detail": k[1], "ms_per_step": v / steps * 1e3} for k, v in totals.items()]
    rows.append({"part": "rest (update, tape, Python)", "detail": "",
                 "ms_per_step": max(0.0, wall - sum(totals.values())) / steps * 1e3})
    for r in rows:
        r["share"] = r["ms_per_step"] / (wall / steps * 1e3)
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method, interleaved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default=",".join(CPU_GOALS), help=f"some of {','.join(MODELS)}")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's allocator defaults")
    parser.add_argument("--routes", action="store_true", help="also: where a fast-path step's time goes, per part "
                        "and layer (route_times)")
    parser.add_argument("--bf16", action="store_true", help="every method's forward and backward under a bf16 "
                        "autocast (a GPU run's default precision)")
    args = parser.parse_args()
    global BF16
    BF16 = args.bf16
    malloc = "system" if args.system_malloc or not tune_malloc() else "goldenpath"
    results: dict = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
                     "malloc": malloc, "bf16": BF16}
    for name in args.models.split(","):
        times = step_times(name, args.steps, args.device)
        base = statistics.median(times["non-private"])
        rows = {}
        for m in times:
            t = statistics.median(times[m])
            rows[m] = {"step_ms": t * 1e3, "ratio_to_non_private": t / base,
                       "peak_mb": peak_memory(name, m, args.device, args.system_malloc)}
        best = min((m for m in OPACUS if m in rows), key=lambda m: rows[m]["step_ms"])
        rows["unsupported"] = {m: why for (n, m), why in UNSUPPORTED.items() if n == name}
        rows["best_opacus"] = best
        rows["best_opacus_over_dp_fast"] = rows[best]["step_ms"] / rows["dp-fast"]["step_ms"]
        results[name] = rows
        print(f"\n{name} ({args.device}{', bf16 autocast' if BF16 else ''}, {malloc} malloc; median of {args.steps} "
              "interleaved steps; peak memory of a step above setup)")
        print(f"{'method':14s} {'step ms':>9s} {'x non-private':>14s} {'peak MB':>9s}")
        for m in times:
            row = rows[m]
            print(f"{m:14s} {row['step_ms']:9.1f} {row['ratio_to_non_private']:14.2f} {row['peak_mb']:9.0f}")
        print(f"best Opacus mode ({best}) / dp fast path: {rows['best_opacus_over_dp_fast']:.2f}x (goal > 1); "
              f"dp fast / non-private: {rows['dp-fast']['ratio_to_non_private']:.2f}x "
              f"(goal on a CPU {'<= ' + str(CPU_GOALS[name]) if name in CPU_GOALS else 'none'})", flush=True)
        for m, why in rows["unsupported"].items():
            print(f"{m}: not run ({why})")
        if args.routes:
            rows["routes"] = route_times(name, args.device)
            print(f"where a dp-fast step goes ({name}; parts timed apart, synchronised):")
            for r in rows["routes"][:15]:
                print(f"  {r['ms_per_step']:8.2f} ms {100 * r['share']:5.1f}%  {r['part']} {r['detail']}")
    tags = ("_bf16" if BF16 else "") + ("_system_malloc" if malloc == "system" else "")
    path = ROOT / "bench" / "results" / f"dp_step_{args.device}{tags}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
