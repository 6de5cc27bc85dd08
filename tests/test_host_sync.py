"""The step loop never waits for the device: host reads per step, counted with patched ``torch.Tensor``
methods; the logged values those reads once fed, against values written before; and the choices made for a
CUDA GPU (fused optimizers, TF32, bf16 by default, SDPA without a mask), as far as a CPU can check them."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from goldenpath.training import step as step_mod
from goldenpath.store.rundir import read_metrics
from goldenpath.config import auto_precision, load_config
from goldenpath.models import CAUSAL_SDPA, attn_implementation, build_model, logits
from goldenpath.training.run import make_optimizer, optimizer_kwargs, tf32_allowed
from goldenpath.training.trainer import train

from .conftest import TINY_MARKOV, TINY_TEACHER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from host_reads import READS, HostReads  # noqa: E402 - the counter bench/gpu.py's reads part runs on a device

EVERY = 4  # log.every and checkpoint.eval_every: the steps in between must not read
LOOP = ["budget.steps=12", f"log.every={EVERY}", f"checkpoint.eval_every={EVERY}", "checkpoint.targets=[]",
        "checkpoint.last_every_seconds=1e9"]
DP = ["noise.kind=dp", "noise.sigma=1.0", "noise.clip=1.0"]
# path -> (overrides, host reads allowed per quiet step, why)
PATHS = {
    "plain": ([*TINY_TEACHER, "optim.micro_batch_size=16"], 0, ""),
    "momentum, noise scale": ([*TINY_TEACHER, "optim.momentum=0.9", "optim.micro_batch_size=16",
                               "log.noise_scale=true"], 0, ""),
    "gaussian": ([*TINY_TEACHER, "noise.kind=gaussian", "noise.sigma=2.0"], 0, ""),
    "gaussian, compiled": ([*TINY_TEACHER, "noise.kind=gaussian", "noise.sigma=2.0", "compile=true"], 0, ""),
    "gaussian, bf16": ([*TINY_TEACHER, "noise.kind=gaussian", "noise.sigma=2.0", "precision=bf16"], 0, ""),
    "dp": ([*TINY_TEACHER, *DP, "optim.micro_batch_size=16"], 0, ""),
    "dp, vmap": ([*TINY_TEACHER, *DP, "noise.method=vmap"], 0, ""),
    # torch's AdamW on the CPU reads each parameter's step counter, a host tensor (fused on a GPU: none)
    "adamw": ([*TINY_TEACHER, "optim.name=adamw", "optim.lr=0.001"], 6, "step counters of the 6 parameters"),
    # text: each micro-batch's predicted tokens, counted on its host batch before it moves to the device
    "gpt2, gaussian, noise scale": ([*TINY_MARKOV, "optim.name=sgd", "noise.kind=gaussian", "noise.sigma=1.0",
                                     "optim.micro_batch_size=4", "log.noise_scale=true"], 2,
                                    "tokens of 2 host batches"),
    "gpt2, dp": ([*TINY_MARKOV, *DP, "optim.name=sgd", "optim.micro_batch_size=4"], 2, "tokens of 2 host batches"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_steps_between_logs_never_read_a_device_value(path, tmp_path):
    overrides, allowed, why = PATHS[path]
    with HostReads() as reads:
        train(load_config(None, [*overrides, *LOOP, f"out={tmp_path}", "name=run"]))
    # neither logging nor evaluating; after the first step (DP-SGD checks a batch shape's first per-sample
    # norms once against a loop over samples)
    quiet = {s: n for s, n in reads.per_step().items() if s % EVERY and s > 1}
    assert sorted(quiet) == [2, 3, 5, 6, 7, 9, 10, 11]
    assert max(quiet.values()) <= allowed, \
        f"host reads per quiet step {quiet}, allowed {allowed} ({why or 'none'}); in all {dict(reads.kinds)}"


def test_the_counter_sees_a_read_in_the_step(tmp_path, monkeypatch):
    step = step_mod.optimizer_step

    def reading(run, micro_batches, window):
        lr, units = step(run, micro_batches, window)
        float(window.sums[0])  # what a loop that checks its loss every step does
        return lr, units

    monkeypatch.setattr(step_mod, "optimizer_step", reading)
    with HostReads() as reads:
        train(load_config(None, [*PATHS["plain"][0], *LOOP, f"out={tmp_path}", "name=run"]))
    assert set(n for s, n in reads.per_step().items() if s % EVERY) == {1}


# ----------------------------------------------------------------------------- the logged values

# metrics.jsonl of these runs (less the wall-clock seconds), as goldenpath wrote it at commit e4a69c3, before
# the step loop stopped reading device values
REFERENCE = {
    'none': [
        {'step': 0, 'samples': 0, 'tokens': 0, 'eval_loss': 2.2937388523109385, 'eval_error': 0.85546875},
        {'step': 3, 'samples': 96, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.294416484413398, 'grad_norm':
         0.5347812213133433, 'b_simple': 64.90448552571542, 'grad_sq': 0.09537854873162743, 'eval_loss':
         2.2863643080702394, 'eval_error': 0.83984375},
        {'step': 6, 'samples': 192, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.2940181147034093, 'grad_norm':
         0.5249772457117743, 'b_simple': 347.3560129852283, 'grad_sq': 0.023249681407657263, 'eval_loss':
         2.2804283030151637, 'eval_error': 0.8359375},
    ],
    'gaussian': [
        {'step': 0, 'samples': 0, 'tokens': 0, 'eval_loss': 2.2937388523109385, 'eval_error': 0.85546875},
        {'step': 3, 'samples': 96, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.2939554519206897, 'grad_norm':
         0.5366320061638231, 'noise_norm': 2.8495727133510105, 'eval_loss': 2.2789642326098978, 'eval_error':
         0.79296875},
        {'step': 6, 'samples': 192, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.2719206007204082, 'grad_norm':
         0.5366350996872088, 'noise_norm': 2.933425204916826, 'eval_loss': 2.253552474985428, 'eval_error':
         0.80078125},
    ],
    'dp': [
        {'step': 0, 'samples': 0, 'tokens': 0, 'eval_loss': 2.2937388523109385, 'eval_error': 0.85546875},
        {'step': 3, 'samples': 96, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.2939568988830246, 'grad_norm':
         0.4722084525612454, 'noise_norm': 3.9181624808576387, 'clip_fraction': 0.4166666666666667,
         'per_sample_norm': 2.748902094459298, 'eval_loss': 2.2859809055371154, 'eval_error': 0.8515625},
        {'step': 6, 'samples': 192, 'tokens': 0, 'lr': 0.05, 'train_loss': 2.288128503639101, 'grad_norm':
         0.5009458506450205, 'noise_norm': 4.033459656760636, 'clip_fraction': 0.3958333333333333,
         'per_sample_norm': 2.689009628655517, 'eval_loss': 2.2807191416436785, 'eval_error': 0.8046875},
    ],
    'markov': [
        {'step': 0, 'samples': 0, 'tokens': 0, 'eval_loss': 2.7825050400907525, 'eval_error': 0.93359375},
        {'step': 3, 'samples': 24, 'tokens': 384, 'lr': 0.003, 'train_loss': 2.787934268861374, 'grad_norm':
         0.9101910152706391, 'noise_norm': 14.70007132501504, 'eval_loss': 2.7748314217128773, 'eval_error':
         0.94140625},
        {'step': 6, 'samples': 48, 'tokens': 768, 'lr': 0.003, 'train_loss': 2.770831192745442, 'grad_norm':
         0.9288066202883577, 'noise_norm': 14.699643759301592, 'eval_loss': 2.774524076482268, 'eval_error':
         0.943359375},
    ],
}


COMMON = ["precision=fp64", "budget.steps=6", "log.every=3", "checkpoint.eval_every=3", "checkpoint.targets=[]"]
CASES = {
    "none": [*TINY_TEACHER, "optim.micro_batch_size=16", "log.noise_scale=true"],
    "gaussian": [*TINY_TEACHER, "noise.kind=gaussian", "noise.sigma=2.0", "optim.momentum=0.9"],
    "dp": [*TINY_TEACHER, *DP[:2], "noise.clip=2.75", "optim.micro_batch_size=16"],
    "markov": [*TINY_MARKOV, "noise.kind=gaussian", "noise.sigma=1.0"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logged_values_are_those_written_before(case, tmp_path):
    got = [{k: v for k, v in r.items() if k != "seconds"}
           for r in read_metrics(train(load_config(None, [*CASES[case], *COMMON, f"out={tmp_path}", "name=r"])))]
    want = REFERENCE[case]
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want):
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-12, abs=1e-15), (case, g["step"], key)


def test_a_compiled_model_logs_what_the_eager_one_logs(tmp_path):
    lines = {c: read_metrics(train(load_config(None, [*CASES["gaussian"], *COMMON, "precision=fp32", f"compile={c}",
                                                      f"out={tmp_path}", f"name=compile-{c}"])))
             for c in ("false", "true")}
    assert [r.keys() for r in lines["true"]] == [r.keys() for r in lines["false"]]
    for eager, compiled in zip(lines["false"], lines["true"]):
        for key in eager.keys() - {"seconds"}:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5), (eager["step"], key)


def test_a_logged_line_averages_the_steps_since_the_last(tiny_teacher):
    """train_loss and the norms of a line over 3 steps are the means of the 3 single-step lines."""
    runs = {every: read_metrics(train(load_config(None, [*CASES["gaussian"], *COMMON, f"log.every={every}",
                                                          f"name=every{every}", *tiny_teacher[-2:-1]])))
            for every in (1, 3)}
    single = {r["step"]: r for r in runs[1] if "train_loss" in r}
    for line in (r for r in runs[3] if "train_loss" in r):
        steps = range(line["step"] - 2, line["step"] + 1)
        for key in ("train_loss", "grad_norm", "noise_norm"):
            assert line[key] == pytest.approx(sum(single[s][key] for s in steps) / 3, rel=1e-12), key


# ----------------------------------------------------------------------------- choices for a CUDA GPU


def test_fused_optimizers_on_a_cuda_gpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert optimizer_kwargs(cuda, {torch.float32}) == {"fused": True}
    assert optimizer_kwargs(cuda, {torch.bfloat16, torch.float64}) == {"fused": True}
    assert optimizer_kwargs(cuda, {torch.float32, torch.int64}) == {}
    assert optimizer_kwargs(cpu, {torch.float32}) == {}
    model = torch.nn.Linear(3, 2)
    for name in ("sgd", "adamw"):  # the CPU keeps torch's default implementation
        optimizer = make_optimizer(model, load_config(None, [f"optim.name={name}"]).optim)
        assert not optimizer.defaults.get("fused")


def test_tf32_and_bf16_by_default_on_a_cuda_gpu(monkeypatch):
    assert tf32_allowed(torch.device("cuda"), "bf16") is True
    assert tf32_allowed(torch.device("cuda"), "fp32") is False  # strict float32, as asked
    assert tf32_allowed(torch.device("cpu"), "bf16") is None  # the CPU has no such switch: left alone
    assert auto_precision(cuda=True) == "bf16" and auto_precision(cuda=False) == "fp32"
    assert load_config(None).precision == "fp32"  # this machine: CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(None).precision == "bf16"
    assert load_config(None, ["cpu=true"]).precision == "fp32"
    assert load_config(None, ["precision=fp32"]).precision == "fp32"  # what the config says wins


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sdpa_attention_builds_no_mask_and_gives_transformers_logits(family, monkeypatch):
    config = load_config(None, [*TINY_MARKOV, f"model.name={family}", "precision=fp64"])
    info = config.data.build().info
    model = build_model(config.model, info, seed=0).double()
    assert model.lm.config._attn_implementation == CAUSAL_SDPA
    ids = torch.randint(info.num_classes, (3, info.input_shape[0]), generator=torch.Generator().manual_seed(0))
    model.lm.config._attn_implementation = "sdpa"  # transformers' own, with its mask checks
    want = logits(model, {"input_ids": ids})
    model.lm.config._attn_implementation = attn_implementation("sdpa")
    calls = Counter()

    def counted(name, real):
        return lambda t, *a, **k: calls.update([name]) or real(t, *a, **k)

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    got = logits(model, {"input_ids": ids})
    monkeypatch.undo()
    assert not calls, f"host reads in a forward: {dict(calls)}"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert attn_implementation("eager") == "eager"


# ----------------------------------------------------------------------------- the train time holds the device's

def test_the_wait_for_queued_steps_counts_as_training_time(tmp_path, monkeypatch):
    """A quiet step only queues its work on a GPU; the log's read and the eval's drain wait for it, and that
    wait is training time (tokens/s and MFU divide by it). Here each wait is stood in for by a sleep."""
    import time

    from goldenpath.training.state import Window

    wait, calls = 0.1, Counter()
    collect = Window.collect

    def slow_collect(self, *args, **kwargs):
        calls["collect"] += 1
        time.sleep(wait)
        return collect(self, *args, **kwargs)

    def slow_drain(device):
        calls["drain"] += 1
        time.sleep(wait)
        return wait

    monkeypatch.setattr(Window, "collect", slow_collect)
    monkeypatch.setattr(step_mod, "drain", slow_drain)
    status = train(load_config(None, [*TINY_TEACHER, *LOOP, f"out={tmp_path}", "name=run"])).joinpath("status.json")
    seconds = __import__("json").loads(status.read_text())["seconds"]
    assert calls["collect"] == 3 and calls["drain"] == 4  # logs at steps 4, 8, 12; evals at 0, 4, 8, 12
    assert seconds["train"] >= 3 * wait + 4 * wait
    assert seconds["eval"] < 4 * wait  # no drain counted as eval


def test_drain_waits_for_a_cuda_device_only(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    assert step_mod.drain(torch.device("cpu")) == 0.0 and not synced
    assert step_mod.drain(torch.device("cuda", 0)) >= 0.0 and synced == [torch.device("cuda", 0)]
