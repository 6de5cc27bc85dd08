"""The device check runs end to end at toy sizes on a CPU (bench/gpu.sh --cpu-smoke), so GPU time is not
spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every part of bench/gpu.py on the CPU: about 2 minutes
def test_gpu_check_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert results["sizes"] == "cpu-smoke"
    for part in ("train", "dp", "compare", "launch"):
        assert "error" not in results[part], results[part].get("error")
    for mode in ("eager", "compiled", "compiled_big"):
        row = results["train"][mode]
        assert row["goldenpath_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
    assert results["train"]["compiled_big"]["batch"] == 2 * results["train"]["compiled"]["batch"]
    assert results["dp"]["free_memory_read_us"] > 0  # what a DP step's per-layer read of the free memory costs
    for model in ("gpt2-small", "resnet18"):
        row = results["dp"][model]
        assert {"non-private", "dp-fast", "opacus-hooks"} <= set(row)
        assert row["non-private"]["x_non_private"] == 1.0
    # Opacus' ghost clipping refuses GPT-2's tied embeddings: recorded as not run, not as a crash
    assert "opacus-ghost" in results["dp"]["resnet18"]
    assert "opacus-ghost" in results["dp"]["gpt2-small"]["not_run"]
    assert results["compare"]["4"]["ratio"] > 1.0  # compare does the forwards and more
    split = results["compare"]["4"]
    assert 0 < split["forwards_s"] and 0 < split["pairs_s"] and 0 < split["stats_s"] and 0 < split["rows_s"]
    assert sum(split[k] for k in ("forwards_s", "pairs_s", "stats_s", "rows_s", "tables_s")) < split["compare_s"]
    assert split["pair_kernel"] is False  # Triton's kernel runs on CUDA alone
    eager = split["without_kernel"]  # tv and js from the eager forms: within compare's tolerances of the above
    assert eager["ratio"] > 0 and set(eager["largest_differences"]) == {"tv", "kl", "js", "top1"}
    assert all(x < (1e-4 if m == "kl" else 1e-5) for m, x in eager["largest_differences"].items())
    for model in ("gpt2-small", "resnet18"):  # where a dp-fast step goes: the parts add up to the step
        routes = results["dp"][model]["routes"]
        assert {"forward", "backward to layer outputs", "noise"} <= {r["part"] for r in routes}
        assert any(r["part"] == "layer rule" for r in routes)
        assert 0.5 < sum(r["share"] for r in routes) <= 1.0 + 1e-9
    launch = results["launch"]
    assert launch["ok"] and launch["processes"] == 2 and launch["replicas_in_sync"] is True
    table = (tmp_path / "gpu_cpu_smoke.md").read_text()
    assert "accelerate launch (2 proc.)" in table and "FAILED" not in table
    assert "| free-memory read (DP chunk sizes, per layer) |" in table
    layout = {case: r for case, r in results["layout"].items() if isinstance(r, dict)}
    assert len(layout) == 7 and all(r["speedup"] > 0 and r["rounds"] >= 1 for r in layout.values())
    assert "| layout: CNN width 8, batch 8: train step |" in table
    profile = results["profile"]
    assert "error" not in profile, profile.get("error")
    for mode in ("eager", "compiled"):
        row = profile[mode]
        assert 0 <= row["idle_fraction"] < 1 and row["kernels_per_step"] > 0 and row["host_ms_per_step"] > 0
        assert row["categories"]["lm head + cross-entropy"]["ms_per_step"] > 0
        assert row["categories"]["matmul (blocks)"]["ms_per_step"] > 0
        assert abs(sum(c["share"] for c in row["categories"].values()) - 1) < 1e-9
    assert profile["eager"]["attention_backends"] and profile["eager"]["ce_input_dtype"] == "float32"
    assert profile["lm_head"]["time_ratio"] > 0 and profile["lm_head"]["memory_ratio"] > 0
    assert profile["lm_head"]["recompute_time_ratio"] > 0 and profile["lm_head"]["recompute_memory_ratio"] > 0
    assert "profile (compiled)" in table
    assert "| lm head + cross-entropy |" in (tmp_path / "gpu_cpu_smoke_profile.md").read_text()
    assert (tmp_path / "gpu_cpu_smoke_profile.csv").read_text().startswith("mode,kind,name,category")
    data = results["data"]
    assert "error" not in data, data.get("error")
    for name, row in data["device_streams"].items():  # made on the "device" (the CPU here): the CPU's samples
        assert row["samples"] == 512 and row["inputs_differing"] == 0 and row["labels_differing"] == 0
        assert row["samples_per_s"] > 0 and f"| {name} stream made on the device |" in table
    assert set(data["device_streams"]) == {"teacher", "teacher-mix", "markov"}
    for source in ("teacher", "teacher-device", "cifar5m-npz", "c4-text"):
        row = data[source]
        assert 0 <= row["wait_prefetch"] <= 1 and 0 <= row["wait_sync"] <= 1 and row["speed_ratio"] > 0
        assert f"| data wait {source} |" in table
    reads = results["reads"]
    assert "error" not in reads, reads.get("error")
    for key in ("trainer", "added_read"):
        r = reads[key]["reads"]
        assert 0 <= r["quiet_max"] and 0 <= r["quiet_mean"] <= r["quiet_max"] and r["log_mean"] >= 0
        assert reads[key]["syncs"] is None  # CUDA's own count: on a GPU only
    assert reads["added_read_seen"] == {"reads": 1}  # one float() per step, counted in every quiet step
    assert "host reads per step (GPT-2 trainer)" in table


# ----------------------------------------------------------------------------- the profile part's arithmetic

def _step_profile():
    sys.path.insert(0, str(ROOT / "bench"))
    import step_profile

    return step_profile


def test_profile_categories_from_kernel_names_launching_ops_and_the_vocabulary_dim():
    sp = _step_profile()
    V = 50257
    cases = [  # kernel name, launching ops, dims -> category
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>",
         "aten::_flash_attention_forward < aten::_scaled_dot_product_flash_attention", {16, 12, 1024, 64},
         "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "aten::mm < aten::matmul < aten::linear",
         {16384, 768, V}, "lm head + cross-entropy"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "aten::addmm", {16384, 768, 2304}, "matmul (blocks)"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "aten::mm < MmBackward0", {768, 3072}, "matmul (blocks)"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>",
         "aten::_log_softmax < aten::log_softmax < aten::cross_entropy_loss", {16384, V}, "lm head + cross-entropy"),
        ("triton_red_fused__log_softmax_nll_loss_forward_3", "", set(), "lm head + cross-entropy"),
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>",
         "aten::copy_ < aten::_to_copy < aten::to", {768, 2304}, "casts (_to_copy)"),
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>",
         "aten::copy_ < aten::_to_copy < aten::to", {16384, V}, "lm head + cross-entropy"),  # float32 logits
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>",
         "aten::copy_ < aten::clone < aten::contiguous", {16, 1024, 768}, "elementwise / other"),
        ("void at::native::multi_tensor_apply_kernel<AdamW>", "aten::_foreach_mul_ < Optimizer.step#AdamW.step",
         set(), "optimizer"),
        ("void at::native::embedding_backward_feature_kernel", "aten::embedding_dense_backward", {V, 768}, "embedding"),
        ("triton_per_fused_native_layer_norm_7", "", set(), "layer norm"),
        ("Memcpy HtoD (Pageable -> Device)", "aten::copy_ < aten::to", set(), "memcpy / memset"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "aten::gelu", {3072},
         "elementwise / other"),
    ]
    for name, context, dims, want in cases:
        row = sp.Row(name, 0.0, 1.0, 1.0, context, frozenset(dims))
        assert sp.category(row, V) == want, (name, context)
    math_row = sp.Row("aten::bmm", 0, 1, 1, "aten::_scaled_dot_product_attention_math", frozenset())
    assert sp.attention_backend(math_row) == "math"
    assert sp.attention_backend(sp.Row("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", 0, 1, 1,
                                       "aten::_efficient_attention_forward")) == "mem-efficient"


def test_profile_idle_fraction_and_per_step_figures_of_a_hand_made_window():
    sp = _step_profile()
    V = 1000
    rows = [  # two steps in a 0..100 us window; kernels overlap (streams) and one is nested in another
        sp.Row("gemm_a", 0, 20, 20, "aten::mm", frozenset({64, 32})),
        sp.Row("gemm_lm", 10, 30, 20, "aten::mm", frozenset({64, V})),        # overlaps gemm_a by 10
        sp.Row("flash_fwd", 40, 50, 10, "aten::_scaled_dot_product_flash_attention"),
        sp.Row("copy", 42, 45, 3, "aten::copy_ < aten::_to_copy"),           # inside flash_fwd
        sp.Row("gemm_a", 60, 80, 20, "aten::mm", frozenset({64, 32})),
        sp.Row("late", 95, 110, 15, "aten::add"),                            # runs past the window: 5 us count
    ]
    s = sp.summarise(rows, vocab=V, steps=2, window=(0.0, 100.0), top=3)
    # busy: [0, 30] + [40, 50] + [60, 80] + [95, 100] = 65 of 100
    assert abs(s["idle_fraction"] - 0.35) < 1e-12
    assert abs(s["busy_ms_per_step"] - 65 / 2 / 1e3) < 1e-12 and s["window_ms_per_step"] == 0.05
    assert s["kernels_per_step"] == 3.0
    total = 20 + 20 + 10 + 3 + 20 + 15
    cats = s["categories"]
    assert cats["matmul (blocks)"]["ms_per_step"] == 40 / 2 / 1e3
    assert cats["lm head + cross-entropy"]["share"] == 20 / total
    assert cats["attention"]["share"] == 10 / total and cats["casts (_to_copy)"]["share"] == 3 / total
    assert list(cats)[0] == "matmul (blocks)"                                # sorted by time
    assert [t["name"] for t in s["top"]] == ["gemm_a", "gemm_lm", "late"]
    assert s["top"][0]["calls_per_step"] == 1.0
    assert s["attention_backends"] == ["flash"]
    assert sp.busy_us([], 0.0, 10.0) == 0.0


def test_a_part_past_its_time_limit_is_stopped_and_keeps_what_it_measured(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    def slow(size, device, rows):
        rows["eager"] = {"measured": True}
        time.sleep(30)

    monkeypatch.setattr(gpu, "part_profile", slow)
    monkeypatch.setitem(gpu.SIZES["cpu-smoke"], "limits_s", {"profile": 0.5})
    t0 = time.perf_counter()
    assert gpu.main(["--cpu-smoke", "--parts", "profile", "--out", str(tmp_path)]) == 1
    assert time.perf_counter() - t0 < 10
    profile = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())["profile"]
    assert profile["eager"] == {"measured": True} and "time limit of 0.5 s" in profile["error"].splitlines()[-1]


@pytest.mark.parametrize("link", ["linked id (torch >= 2.12)", "runtime call (torch 2.11)"])
def test_profile_rows_of_cuda_events_link_each_kernel_to_its_launching_op(link):
    # the CUDA branch cannot run here: hand-made profiler events (torch's own FunctionEvent) stand in for it,
    # with the kernel -> operator link as each torch version records it
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    sp = _step_profile()
    V = 50257
    step = FunctionEvent(1, sp.STEP, 0, 0.0, 100.0, input_shapes=[])
    mm = FunctionEvent(7, "aten::mm", 0, 10.0, 20.0, input_shapes=[[64, 32], [32, V]])
    mm.set_cpu_parent(step)
    launch = FunctionEvent(8, "cudaLaunchKernel", 0, 12.0, 13.0, input_shapes=[])  # shares the kernel's id
    launch.set_cpu_parent(mm)
    clash = FunctionEvent(9, "aten::add", 0, 30.0, 31.0, input_shapes=[])  # an operator whose id is a kernel's
    gemm = FunctionEvent(8, "sm90_xmma_gemm_bf16", 0, 15.0, 40.0, device_type=DeviceType.CUDA,
                         linked_correlation_id=7)
    late = FunctionEvent(9, "Memset (Device)", 0, 90.0, 120.0, device_type=DeviceType.CUDA,
                         linked_correlation_id=42)  # its launcher was not recorded
    region = FunctionEvent(10, sp.STEP, 0, 0.0, 119.0, device_type=DeviceType.CUDA, is_user_annotation=True)
    events = [step, mm, launch, clash, gemm, late, region]
    if link.startswith("runtime"):
        for e in events:
            del e.linked_correlation_id, e.input_dtypes
    rows, window = sp.rows_of(events, "cuda")
    assert window == (0.0, 120.0)
    assert [(r.name, r.self_us, r.context) for r in rows] == [  # the annotated region is no kernel
        ("sm90_xmma_gemm_bf16", 25.0, f"aten::mm < {sp.STEP}"), ("Memset (Device)", 30.0, "")]
    assert sp.category(rows[0], V) == sp.LM_HEAD and sp.category(rows[1], V) == "memcpy / memset"
    s = sp.summarise(rows, vocab=V, steps=1, window=window)
    assert abs(s["idle_fraction"] - (1 - 55 / 120)) < 1e-12
    log_softmax = FunctionEvent(11, "aten::_log_softmax", 0, 50.0, 60.0, input_shapes=[[64, V], [], []])
    if link.startswith("runtime"):
        del log_softmax.input_dtypes
    assert sp._ce_input_dtype([log_softmax], V) == ("unrecorded" if link.startswith("runtime") else None)


# ----------------------------------------------------------------------------- the reads part's CUDA count

def test_reads_part_counts_cuda_sync_warnings_per_step_and_by_thread(tmp_path, monkeypatch):
    # no GPU here: torch's sync debug mode is stood in for by its warning, issued where a batch moves to the
    # device (once per step, in the main thread) and from a second thread (counted apart)
    import threading
    import warnings

    import torch

    from goldenpath.training import step as step_mod

    from .conftest import TINY_TEACHER

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    real = step_mod.to_device

    def syncing(batch, device, dtype):
        warnings.warn(gpu.SYNC_WARNING)
        if not modes[1:]:  # once, from another thread
            thread = threading.Thread(target=warnings.warn, args=(gpu.SYNC_WARNING,))
            thread.start()
            thread.join()
            modes.append("thread done")
        return real(batch, device, dtype)

    monkeypatch.setattr(step_mod, "to_device", syncing)
    rows = {key: gpu.host_reads(None, 12, 4, tmp_path, key, device="cuda", added_read=key == "added",
                                overrides=[*TINY_TEACHER, "cpu=true"]) for key in ("plain", "added")}
    assert modes[0] == "warn" and modes[-1] == 0
    for key, row in rows.items():
        assert row["syncs"]["quiet_max"] == row["syncs"]["quiet_mean"] == 1, (key, row)
        assert row["syncs"]["log_mean"] >= 1  # and the eval's batches
        assert row["reads"]["quiet_max"] == (1 if key == "added" else 0), (key, row)
    assert rows["plain"]["syncs_other_threads"] == 1
    assert step_mod.to_device is syncing  # the part put back what it patched, and no more


def test_a_budget_stops_the_part_running_out_of_it_skips_the_rest_and_each_part_is_written_as_it_ends(
        tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    on_disk = []  # gpu_cpu_smoke.json as the second part starts: what a kill from outside would leave

    def quick(size, device, rows):
        rows["done"] = True

    def slow(size, work, device, rows):
        on_disk.append(json.loads((tmp_path / "gpu_cpu_smoke.json").read_text()))
        rows["first_row"] = 1.0
        time.sleep(30)

    monkeypatch.setattr(gpu, "MIN_PART_S", 0.5)
    monkeypatch.setattr(gpu, "part_profile", quick)
    monkeypatch.setattr(gpu, "part_data", slow)
    monkeypatch.setattr(gpu, "part_reads", lambda *a: pytest.fail("started with no budget left"))
    monkeypatch.setitem(gpu.SIZES["cpu-smoke"], "limits_s", {"profile": 60, "data": 60})
    t0 = time.perf_counter()
    assert gpu.main(["--cpu-smoke", "--parts", "profile,data,reads", "--out", str(tmp_path), "--budget-s", "1.2"]) == 1
    assert time.perf_counter() - t0 < 10
    assert on_disk[0]["profile"]["done"] and "data" not in on_disk[0]
    results = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert results["profile"]["done"] and "error" not in results["profile"]
    # the part that ran out of the budget keeps its rows; the next is not started
    assert results["data"]["first_row"] == 1.0 and "time limit of" in results["data"]["error"].splitlines()[-1]
    assert "not started" in results["reads"]["skipped"]
    assert "| reads | NOT RUN: not started" in (tmp_path / "gpu_cpu_smoke.md").read_text()
    assert gpu.part_limit(None, None) is None and gpu.part_limit(45, 10.0) == 10.0 and gpu.part_limit(None, 7) == 7


def test_an_unknown_part_is_refused_before_any_part_runs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    monkeypatch.setattr(gpu, "part_profile", lambda *a: pytest.fail("ran before the part list was checked"))
    with pytest.raises(SystemExit):
        gpu.main(["--cpu-smoke", "--parts", "profile,profiel", "--out", str(tmp_path)])
    assert not (tmp_path / "gpu_cpu_smoke.json").exists()


def test_resume_keeps_the_parts_an_earlier_run_finished_and_runs_the_rest(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    calls = []

    def part(name, fails=False):
        def run(*args):
            calls.append(name)
            args[-1]["row"] = name
            if fails:
                raise RuntimeError("broke")
        return run

    monkeypatch.setattr(gpu, "part_profile", part("profile"))
    monkeypatch.setattr(gpu, "part_data", part("data", fails=True))
    monkeypatch.setattr(gpu, "part_reads", part("reads"))
    args = ["--cpu-smoke", "--parts", "profile,data,reads", "--out", str(tmp_path)]
    assert gpu.main([*args, "--budget-s", "0"]) == 1 and calls == []  # no time: every part NOT RUN
    assert gpu.main([*args, "--parts", "profile,data", "--resume"]) == 1 and calls == ["profile", "data"]
    monkeypatch.setattr(gpu, "part_data", part("data"))
    assert gpu.main([*args, "--resume"]) == 0 and calls == ["profile", "data", "data", "reads"]
    results = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert {p: results[p]["row"] for p in ("profile", "data", "reads")} == {p: p for p in ("profile", "data", "reads")}
    assert not any("error" in results[p] or "skipped" in results[p] for p in ("profile", "data", "reads"))
    assert gpu.main(args) == 0 and calls[-3:] == ["profile", "data", "reads"]  # without --resume: all again
    (tmp_path / "gpu_cpu_smoke.json").write_text(json.dumps({**results, "device": "another"}))
    assert gpu.main([*args, "--resume"]) == 0 and calls[-3:] == ["profile", "data", "reads"]  # not its device


def test_differences_of_two_compares_are_per_metric_absolute_and_relative_for_kl():
    sys.path.insert(0, str(ROOT / "bench"))
    import compare as bench_compare
    import pandas as pd

    rows = [(1.0, "a", "b", "seed", m, v) for m, v in (("tv", 0.5), ("kl", 2.0), ("js", 0.1))]
    rows += [(1.0, "a", "c", "seed", m, v) for m, v in (("tv", 0.25), ("kl", 4.0), ("js", 0.2))]
    columns = ["target", "run_a", "run_b", "kind", "metric", "value"]
    eager = pd.DataFrame(rows, columns=columns)
    other = eager.copy()
    other.loc[1, "value"] = 2.0 + 1e-3  # kl of (a, b): 5e-4 relative
    other.loc[3, "value"] = 0.25 - 2e-6  # tv of (a, c)
    gaps = bench_compare.differences(eager, other.iloc[::-1])  # matched by pair, not by row order
    assert gaps["tv"] == pytest.approx(2e-6, rel=1e-6) and gaps["kl"] == pytest.approx(5e-4, rel=1e-6)
    assert gaps["js"] == 0.0
    with pytest.raises(ValueError, match="different pairs"):
        bench_compare.differences(eager, other.iloc[:4])


def test_a_table_that_fails_to_render_stops_no_part_and_the_figures_are_kept(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    def broken(results):
        raise KeyError("a row the table expected")

    monkeypatch.setattr(gpu, "table", broken)
    monkeypatch.setattr(gpu, "part_data", lambda size, work, device, rows: rows.update(first=1))
    monkeypatch.setattr(gpu, "part_reads", lambda size, work, device, rows: rows.update(second=2))
    assert gpu.main(["--cpu-smoke", "--parts", "data,reads", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    assert results["data"]["first"] == 1 and results["reads"]["second"] == 2
    assert "failed to render" in (tmp_path / "gpu_cpu_smoke.md").read_text()


def test_a_part_that_catches_exceptions_is_still_stopped_by_the_budget(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)

    def swallowing(size, work, device, rows):  # as goldenpath's cache reads and the compiled-metrics try do
        for n in range(5):
            try:
                time.sleep(2)
            except Exception:  # noqa: BLE001
                rows[str(n)] = "swallowed"

    monkeypatch.setattr(gpu, "MIN_PART_S", 0.5)
    monkeypatch.setattr(gpu, "part_compare", swallowing)
    t0 = time.perf_counter()
    assert gpu.main(["--cpu-smoke", "--parts", "compare", "--out", str(tmp_path), "--budget-s", "1"]) == 1
    assert time.perf_counter() - t0 < 5
    row = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())["compare"]
    assert "swallowed" not in row.values() and "PartTimeout" in row["error"] and row["limit"] == "budget"


def test_resume_keeps_parts_not_asked_for_reads_past_a_torn_file_and_keeps_a_part_stopped_at_its_own_limit(
        tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    out_env = tmp_path / "device-out"  # a device machine's $OUT: every write lands there too
    monkeypatch.setenv("OUT", str(out_env))
    calls = []

    def slow_profile(size, device, rows):
        calls.append("profile")
        rows["eager"] = "measured"
        time.sleep(30)

    monkeypatch.setattr(gpu, "part_profile", slow_profile)
    monkeypatch.setattr(gpu, "part_data", lambda size, work, device, rows: calls.append("data"))
    monkeypatch.setitem(gpu.SIZES["cpu-smoke"], "limits_s", {"profile": 0.5})
    out = tmp_path / "results"
    (out).mkdir()
    (out / "gpu_cpu_smoke.json").write_text('{"torch": "2.')  # torn: every part runs
    assert gpu.main(["--cpu-smoke", "--parts", "profile,data", "--out", str(out), "--resume"]) == 1
    assert calls == ["profile", "data"]
    first = json.loads((out_env / "gpu_cpu_smoke.json").read_text())
    assert first == json.loads((out / "gpu_cpu_smoke.json").read_text()) and first["profile"]["limit"] == "part"
    # the profile stopped at its own limit is kept (it would stop there again); data alone asked for, profile stays
    assert gpu.main(["--cpu-smoke", "--parts", "profile,data", "--out", str(out), "--resume"]) == 1
    assert calls == ["profile", "data"]
    assert gpu.main(["--cpu-smoke", "--parts", "data", "--out", str(out)]) == 0 and calls[-1] == "data"
    assert json.loads((out / "gpu_cpu_smoke.json").read_text()).get("profile") is None  # no --resume: afresh
    (out / "gpu_cpu_smoke.json").write_text(json.dumps(first))
    assert gpu.main(["--cpu-smoke", "--parts", "data", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "gpu_cpu_smoke.json").read_text())["profile"]["eager"] == "measured"


def test_kill_tree_reaches_descendants_in_sessions_of_their_own():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    parent = subprocess.Popen(["bash", "-c", "setsid sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    for _ in range(100):  # setsid runs in the child: wait for it
        if os.getsid(child) != os.getsid(parent.pid):
            break
        time.sleep(0.02)
    assert os.getsid(child) != os.getsid(parent.pid)  # out of reach of the parent's process group
    gpu._kill_tree(parent.pid)
    assert parent.wait(timeout=10) == -9
    for _ in range(100):  # the orphan is reaped by init once killed
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child in its own session survived")


def test_gelu_bench_compares_the_same_function_in_its_two_forms():
    sys.path.insert(0, str(ROOT / "bench"))
    import gelu

    r = gelu.measure(width=32, depth=1, batch=2, seq=16, vocab=64, reps=1)
    assert r["loss_difference"] < 1e-5 and r["fused_ms"] > 0 and r["composed_ms"] > 0
    nets = gelu.models(32, 1, 64, 16, "cpu")
    acts = {k: type(net.transformer.h[0].mlp.act).__name__ for k, net in nets.items()}
    assert acts["composed"] == "NewGELUActivation" and acts["fused"] != acts["composed"]


def test_step_ops_counts_a_step_and_an_embedded_stream_makes_its_batches_in_a_few_operators(tmp_path, monkeypatch):
    """bench/step_ops.py on the teacher CNN at batch 16, the teacher's blocks as on a CUDA device (--device-block):
    a step's operators split into the stream's and the rest; within a block (online) or from the held subset
    (offline) the stream's are a handful (~80 when every step made its own batch), the rest the model's forward,
    backward and optimizer."""
    from goldenpath.data.synthetic import TeacherStream

    sys.path.insert(0, str(ROOT / "bench"))
    import step_ops

    monkeypatch.setattr(TeacherStream, "BLOCK_CPU", TeacherStream.BLOCK_CUDA)

    for regime, extra in (("online", []), ("offline", ["data.epochs=4", "data.train_size=128"])):
        row = step_ops.per_step("teacher-cnn", ["optim.batch_size=16", "model.width=8", *extra], (8, 24),
                                str(tmp_path))
        assert row["data_launching"] <= (12 if regime == "online" else 5), (regime, row)
        assert row["step_launching"] > 30 and row["step_ops"] >= row["step_launching"]
        assert "aten.convolution_backward.default" in row["step_top"]


# ----------------------------------------------------------------------------- what science_gpu.sh sends back

def test_science_pack_sends_back_progress_failed_logs_and_tables_in_two_files(tmp_path):
    """A part stopped at its limit still says how far each run got and how fast, the failed runs' logs come
    along, and everything fits the 8 files a device machine returns."""
    import tarfile

    sys.path.insert(0, str(ROOT / "bench"))
    import science_pack

    work, dest, out = tmp_path / "work", tmp_path / "dest", tmp_path / "out"
    runs = {"a": ("completed", 4000, 2.0, {"1.5": 10}), "b": ("interrupted", 1000, 1.0, {}),
            "c": ("failed", 10, 0.5, {})}
    for name, (state, samples, train_s, reached) in runs.items():
        run = work / "grid" / name
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({
            "state": state, "step": samples // 10, "samples": samples, "device": "cuda", "targets_reached": reached,
            "seconds": {"train": train_s, "eval": 0.1}, "best_eval_loss": 2.0,
            "started": "2026-12-05T10:00:00+00:00", "updated": "2026-12-05T10:00:10+00:00"}))
    (work / "pooled").mkdir()  # a sweep of links to runs of another (the power study's): each run once
    (work / "pooled" / "c").symlink_to(work / "grid" / "c", target_is_directory=True)
    (work / "torn" / "t").mkdir(parents=True)
    (work / "torn" / "t" / "status.json").write_text('{"state": ')  # an unreadable status stops nothing
    (work / "grid" / "logs").mkdir()
    (work / "grid" / "logs" / "c.log").write_text("\n".join(f"line {k}" for k in range(100)) + "\nValueError: boom\n")
    (work / "grid" / "logs" / "d.log").write_text("ConfigError: never started\n")  # no run directory: no status
    dest.mkdir()
    (dest / "summary.csv").write_text("metric,value\ntv,0.1\n")
    written = science_pack.pack(work, dest, out, "gpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written) == [
        "science_gpu.md", "science_gpu.tar.gz"]
    with tarfile.open(out / "science_gpu.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["failed.txt", "progress.csv", "summary.csv"]
        progress = tar.extractfile("progress.csv").read().decode()
        failed = tar.extractfile("failed.txt").read().decode()
    import pandas as pd
    from io import StringIO

    frame = pd.read_csv(StringIO(progress)).set_index("run")
    assert frame.loc["a", "samples_per_s"] == 2000 and frame.loc["b", "samples_per_s"] == 1000
    assert frame.loc["a", "targets_reached"] == 1 and frame.loc["c", "state"] == "failed"
    assert len(frame) == 4 and frame.loc["t", "state"] == "unreadable"
    assert "==> grid/c" in failed and "ValueError: boom" in failed and "line 59" not in failed  # the tail only
    assert "==> grid/d\nConfigError: never started" in failed and "==> pooled" not in failed
    md = (out / "science_gpu.md").read_text()
    assert "did not reach its tables" in md and "1 completed, 1 failed, 1 interrupted, 1 unreadable" in md
    assert "5,010 samples in 10 s of wall time" in md


def test_conv_layout_bench_times_every_case_in_both_layouts_and_restores_the_conversion():
    sys.path.insert(0, str(ROOT / "bench"))
    import conv_layout

    import goldenpath.models as models

    keep = models.CHANNELS_LAST_DEVICES
    small = {"cnn": (4, 4), "resnet": (4, 2)}
    runs = conv_layout.cases("cpu", small)
    rows = conv_layout.measure(runs, rounds=1, warmup=0)
    assert models.CHANNELS_LAST_DEVICES == keep == ("cpu",)
    assert [r["case"] for r in rows] == list(runs) and len(rows) == 7
    assert all(r["channels_first_ms"] > 0 and r["channels_last_ms"] > 0 and r["rounds"] == 1 for r in rows)


def test_compare_bench_times_the_statistics_of_a_design_alone():
    sys.path.insert(0, str(ROOT / "bench"))
    import compare as compare_bench

    got = compare_bench.stats_seconds(3, 4, units=16)
    assert set(got) == {"compare_settings_s", "family_test_s"} and all(v > 0 for v in got.values())


def test_compare_bench_splits_a_study_shaped_compare_into_its_parts(capsys):
    """``bench/compare.py --design SxN``: settings x seeds at several targets, every part of compare's time timed
    inside it and less than its wall time together."""
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import compare as compare_bench

    args = argparse.Namespace(rounds=1, targets=2, models="cnn", probe_size=16)
    got = compare_bench.run_design(2, 3, args)["cnn"]
    parts = ("forwards_s", "pairs_s", "stats_s", "rows_s", "tables_s")
    assert all(got[k] > 0 for k in parts) and sum(got[k] for k in parts) < got["wall_s"]
    assert got["forwards"] == 2 * 3 * 2 and got["forward_s"] > 0
    assert "2 settings x 3 seeds, 2 targets" in capsys.readouterr().out


def test_dp_bench_under_bf16_runs_each_method_in_the_autocast_and_goldenpaths_clipping_in_float32(monkeypatch):
    """``bench/dp_step.py --bf16``: every method's forward sees a bf16 autocast, as a GPU run trains; goldenpath's
    layer rules do not (their products are float32 proper, docs/dp-sgd.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dp_step

    from goldenpath.dp import layer_rules

    monkeypatch.setattr(dp_step, "BF16", True)
    monkeypatch.setitem(dp_step.MODELS, "cnn", {**dp_step.MODELS["cnn"], "batch": 4})
    in_rules = []
    rule = layer_rules.RULES[torch.nn.Conv2d]
    monkeypatch.setitem(layer_rules.RULES, torch.nn.Conv2d,
                        lambda *a: (in_rules.append(torch.is_autocast_enabled("cpu")), rule(*a))[1])
    for method in ("non-private", "dp-fast", "opacus-hooks"):
        seen = []
        step = dp_step.make_step("cnn", method, "cpu")
        step()  # the first: goldenpath's first-batch check runs forwards of its own, in float32 proper
        forward = torch.nn.Module.__call__

        def spy(module, *args, **kwargs):
            seen.append(torch.is_autocast_enabled("cpu"))
            return forward(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "__call__", spy)
        step()
        monkeypatch.setattr(torch.nn.Module, "__call__", forward)
        assert seen and all(seen), method
    assert in_rules and not any(in_rules)


def test_a_part_stopped_at_its_first_pass_limit_is_run_again_in_full_by_resume(tmp_path, monkeypatch):
    """Train, dp and compare have first-pass limits, so that one command of a GPU slot reaches each; the same
    command again (--resume) runs a part stopped there once more, without that limit."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    monkeypatch.delenv("OUT", raising=False)
    runs = []

    def slow_dp(size, device, rows):
        runs.append(time.perf_counter())
        rows["gpt2-small"] = "measured"
        time.sleep(1.5)
        rows["resnet18"] = "measured"

    monkeypatch.setattr(gpu, "part_dp", slow_dp)
    monkeypatch.setitem(gpu.SIZES["cpu-smoke"], "first_pass_s", {"dp": 0.5})
    out = tmp_path / "results"
    assert gpu.main(["--cpu-smoke", "--parts", "dp", "--out", str(out), "--resume"]) == 1
    first = json.loads((out / "gpu_cpu_smoke.json").read_text())["dp"]
    assert first["limit"] == "first pass" and first["gpt2-small"] == "measured" and "resnet18" not in first
    assert gpu.main(["--cpu-smoke", "--parts", "dp", "--out", str(out), "--resume"]) == 0
    second = json.loads((out / "gpu_cpu_smoke.json").read_text())["dp"]
    assert len(runs) == 2 and "error" not in second and second["resnet18"] == "measured"
    assert gpu.main(["--cpu-smoke", "--parts", "dp", "--out", str(out), "--resume"]) == 0 and len(runs) == 2  # kept
