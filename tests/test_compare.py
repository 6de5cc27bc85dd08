"""All pairs against a naive loop; floors, reference, cache, heatmap."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from goldenpath.store import files, rundir as ckpt
from goldenpath.comparison import compare as cmp, distances, pairs, runs as runs_mod
from goldenpath.config import load_config, to_dict
from goldenpath.comparison import lmc
from goldenpath.config import ConfigError
from goldenpath.data import probe_shift
from goldenpath.comparison.distances import js, kl, linear_cka, top1, tv
from goldenpath.comparison.pairs import pair_sums
from goldenpath.models import build_model, logits, sample_losses
from goldenpath.draw.plots import distance_heatmap

from .conftest import TINY_MARKOV, TINY_TEACHER

# ----------------------------------------------------------------------------- all pairs


def tiny_models(overrides, n, info):
    config = load_config(None, [*overrides, "budget.steps=1"])
    return [build_model(config.model, info, seed=s).double().eval() for s in range(n)]


def sym_kl(logits_p, logits_q):
    """compare's kl: the mean of the two one-way KLs (from the one-way reference, tested against scipy)."""
    return (kl(logits_p, logits_q) + kl(logits_q, logits_p)) / 2


@pytest.mark.parametrize("group_bytes", [None, 1, "blocks", "no room"])
@pytest.mark.parametrize("which", ["cnn", "lm"])
def test_all_pairs_equal_a_naive_double_loop_with_n_forwards_per_chunk(which, group_bytes, monkeypatch):
    """All pairs of a chunk in one gathered group (the default here); with the groups' bytes at 1, one model
    against two others at a time: consecutive ones (views) or not (0 against 1 and 3); with room for a third of
    the pairs, gathered blocks of two pairs; with no room on the device for the sums of every chunk, those sums
    kept on the host and the probe set moved chunk by chunk."""
    import goldenpath.comparison.pairs

    if group_bytes == "no room":
        monkeypatch.setattr(goldenpath.comparison.pairs, "free_memory_bytes", lambda device: 0)
    if group_bytes == 1:
        monkeypatch.setattr(goldenpath.comparison.pairs, "PAIR_GROUP_BYTES", group_bytes)
    config = load_config(None, [*(TINY_TEACHER if which == "cnn" else TINY_MARKOV), "budget.steps=1"])
    source = config.data.build()
    probe = {k: v.double() if v.is_floating_point() else v for k, v in source.heldout("probe").items()}
    if which == "lm":  # padded positions are not points
        probe["labels"] = probe["labels"].clone()
        probe["labels"][::3, -5:] = -100
    models = tiny_models(TINY_TEACHER if which == "cnn" else TINY_MARKOV, 4, source.info)
    chunk = 5
    groups = []
    if group_bytes == "blocks":  # a pair's two float64 outputs of a chunk: blocks of two pairs, three blocks
        with torch.no_grad():
            per_pair = logits(models[0], {k: v[:chunk] for k, v in probe.items() if k != "ids"}).numel() * 8 * 2
        monkeypatch.setattr(goldenpath.comparison.pairs, "PAIR_GROUP_BYTES", 8 * per_pair)  # one group needs 12
        monkeypatch.setattr(goldenpath.comparison.pairs, "GATHERED_PAIRS", 2)
        real = goldenpath.comparison.pairs._eager_groups
        monkeypatch.setattr(goldenpath.comparison.pairs, "_eager_groups",
                            lambda *a: (groups.append(list(g)) or (g, s) for g, s in real(*a)))
    calls = [0] * len(models)
    for i, m in enumerate(models):
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    if group_bytes == 1:  # two models against others in groups of two: consecutive ones (a view) or not
        monkeypatch.setattr(goldenpath.comparison.pairs, "_pairs_per_group", lambda per_pair: 2)
        pairs = [(0, 1), (0, 3), (1, 2), (1, 3), (2, 3)]
    got = pair_sums(models, probe, pairs, ("tv", "kl", "js", "top1", "sq"), chunk=chunk, device="cpu",
                    dtype=torch.float64)
    n_chunks = math.ceil(len(probe["ids"]) / chunk)
    assert calls == [n_chunks] * 4
    if group_bytes == "blocks":
        # each pair once a chunk (a smaller last chunk may fit in one group)
        assert groups[:3] == [[0, 1], [2, 3], [4, 5]] and sorted(sum(groups, [])) == sorted([*range(6)] * n_chunks)
    with torch.no_grad():
        outs = [logits(m, probe) for m in models]
    mask = probe["labels"] != -100 if which == "lm" else None
    for i, j in pairs:
        for name, f in (("tv", tv), ("kl", sym_kl), ("js", js), ("top1", top1), ("sq", distances.sq)):
            values = f(outs[i], outs[j])
            if mask is not None:
                want = (values * mask).sum(1)
                torch.testing.assert_close(got[(i, j)]["count"], mask.sum(1).double())
            else:
                want = values
            torch.testing.assert_close(got[(i, j)][name], want.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("group_bytes", [None, 1])
@pytest.mark.parametrize("which", ["cnn", "lm"])
def test_pair_sums_read_the_device_once_a_probe_chunk_whatever_the_models_and_pairs(which, group_bytes, monkeypatch):
    """On a GPU each host read waits for the device, and so does a copy of a host list to it: a probe chunk's
    distributions are read once (whether any token is ruled out, or underflows) and the sums once at the end, not
    per model, group or pair; the pairs' indices go to the device once (also one first model at a time: the
    groups' bytes at 1)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from host_reads import HostReads

    config = load_config(None, [*(TINY_TEACHER if which == "cnn" else TINY_MARKOV), "budget.steps=1"])
    source = config.data.build()
    probe = source.heldout("probe")
    chunk = 5
    n_chunks = math.ceil(len(probe["ids"]) / chunk)
    if group_bytes is not None:
        monkeypatch.setattr(pairs, "PAIR_GROUP_BYTES", group_bytes)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: made.append(1) or real(*a, **kw))
    for metrics in (("tv", "kl", "js", "top1", "sq"), ("tv", "js")):  # with and without the inner products
        counted = {}
        for n in (2, 5):
            models = [m.float() for m in tiny_models(TINY_TEACHER if which == "cnn" else TINY_MARKOV, n, source.info)]
            made.clear()
            with HostReads() as reads:
                pair_sums(models, probe, list(itertools.combinations(range(n), 2)), metrics, chunk=chunk,
                          device="cpu", dtype=torch.float32)
            counted[n] = {**reads.kinds, "torch.tensor": len(made)}
        assert counted[2] == counted[5], (metrics, counted)
        assert counted[5].pop("torch.tensor") == 1 and sum(counted[5].values()) <= n_chunks + 2, (metrics, counted)


def test_pair_forwards_run_in_strict_float32_whatever_the_process_set_before(tmp_path):
    """A training run before in the same process (bf16 on a GPU) turns TF32 on, and cuDNN has it on by default:
    compare's forwards and its loss-barrier path turn both off, and give them back as they were."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        _check_strict_float32(tmp_path)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _check_strict_float32(tmp_path):
    config = load_config(None, [*TINY_TEACHER, "budget.steps=1"])
    source = config.data.build()
    probe = {k: v[:8] for k, v in source.heldout("probe").items()}
    seen = []

    def record(*_):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    models = tiny_models(TINY_TEACHER, 2, source.info)
    for m in models:
        m.float().register_forward_pre_hook(record)
    pair_sums(models, probe, [(0, 1)], ("tv",), chunk=8, device="cpu", dtype=torch.float32)
    slots = pairs.Slots(build_model(config.model, source.info, seed=9).eval())
    for s, m in enumerate(models):
        ckpt.save_checkpoint(tmp_path / f"m{s}", m, {"target": 1.0})
    slots.module.register_forward_pre_hook(record)
    swapped = [pairs.Swapped(slots, tmp_path / f"m{s}") for s in range(2)]
    pairs.pair_barriers(swapped, probe, probe, [(0, 1)], k=3, chunk=8, device="cpu", dtype=torch.float32)
    assert len(seen) > 2 and set(seen) == {(False, False)}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)


def test_checkpoints_sharing_one_module_give_their_own_outputs_and_bad_files_are_refused(tmp_path):
    """Tied GPT-2 weights: each checkpoint read into the shared module gives what its own model gives."""
    config = load_config(None, [*TINY_MARKOV, "budget.steps=1"])
    source = config.data.build()
    batch = {k: v[:3] for k, v in source.heldout("probe").items() if k != "ids"}
    models = [build_model(config.model, source.info, seed=s).eval() for s in range(2)]
    for s, m in enumerate(models):
        ckpt.save_checkpoint(tmp_path / f"m{s}", m, {"target": 1.0})
    slots = pairs.Slots(build_model(config.model, source.info, seed=9).eval())
    swapped = [pairs.Swapped(slots, tmp_path / f"m{s}") for s in range(2)]
    with torch.no_grad():
        for s in (1, 0, 1):  # alternating: each call copies its own weights in
            assert torch.equal(logits(swapped[s], batch), logits(models[s], batch))
    other = load_config(None, [*TINY_MARKOV, "budget.steps=1", "model.width=16"])
    ckpt.save_checkpoint(tmp_path / "narrow", build_model(other.model, source.info, seed=0), {"target": 1.0})
    with pytest.raises(RuntimeError, match="has shape .* the model its config builds"):
        pairs.Swapped(slots, tmp_path / "narrow")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "m0" / "model.safetensors"))  # stored once: under one of the tied names
    (tied,) = [names for names in slots.names if len(names) > 1]
    stored = next(n for n in tied if n in state)
    state.update({n: state[stored] + 1 for n in tied if n != stored})  # both names, different values
    (tmp_path / "both").mkdir()
    save_file(state, str(tmp_path / "both" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="tied weights"):
        pairs.Swapped(slots, tmp_path / "both")


# ----------------------------------------------------------------------------- a hand-made sweep


def fit(model, source, steps: int):
    """A few Adam steps on the stream: enough to reach loss ~2 (random models' linear paths have no barrier)."""
    batch = source.train_batch(torch.arange(512))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for k in range(steps):
        opt.zero_grad()
        sample_losses(model, {n: v[(k % 4) * 128 : (k % 4 + 1) * 128] for n, v in batch.items()}).mean().backward()
        opt.step()
    return model.eval()


def make_run(sweep_dir, name, overrides, targets, *, fit_steps=0):
    """A run directory as the trainer leaves it: config.yaml and loss-target checkpoints (random weights, or
    ``fit_steps`` Adam steps from them)."""
    config = load_config(None, [*TINY_TEACHER, f"out={sweep_dir}", f"name={name}", "budget.steps=1", *overrides])
    run = sweep_dir / name
    run.mkdir(parents=True)
    files.write_text(run / "config.yaml", ckpt.config_text(to_dict(config)))
    source = config.data.build()
    for k, (target, loss) in enumerate(targets):
        model = fit(build_model(config.model, source.info, seed=config.seed * 10 + k), source, fit_steps)
        ckpt.save_checkpoint(run / "checkpoints" / ckpt.target_name(target), model,
                             {"target": target, "eval_loss": loss, "step": k, "samples": k, "tokens": 0})
    return run


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "s"
    make_run(d, "a0", ["optim.lr=0.01", "seed=0"], [(2.0, 1.99), (1.9, 1.89)])  # every run its own seed
    make_run(d, "a1", ["optim.lr=0.01", "seed=1"], [(2.0, 1.995), (1.9, 1.899)])
    make_run(d, "b0", ["optim.lr=0.1", "seed=2"], [(2.0, 1.9), (1.9, 1.88)])  # overshot 2.0 by 0.1
    make_run(d, "b1", ["optim.lr=0.1", "seed=3"], [(2.0, 1.99)])
    make_run(d, "c0", ["optim.lr=0.001", "data.epochs=2", "data.train_size=64", "seed=4"], [(2.0, 1.99)])
    return d


def test_settings_floors_reference_and_ratios_on_a_hand_made_sweep(sweep):
    frame = cmp.compare(sweep, ("tv", "top1"), n_boot=200)
    at2 = frame[(frame.target == 2.0) & (frame.metric == "tv")]
    kinds = {(r.run_a, r.run_b): r.kind for r in at2.itertuples()}
    # b0 overshot 2.0 by 5%: left out. The reference setting is a (the least-noisy online setting with two
    # seeds; c has a smaller lr but is offline); every pair of a reference seed with another setting's is a
    # reference pair
    assert kinds == {("a0", "a1"): "floor", ("a0", "b1"): "reference", ("a1", "b1"): "reference",
                     ("a0", "c0"): "reference", ("a1", "c0"): "reference", ("b1", "c0"): "pair"}
    excluded = pd.read_csv(sweep / "compare" / "excluded.csv")
    assert excluded[["target", "run"]].values.tolist() == [[2.0, "b0"]] and "below its target" in excluded.reason[0]
    assert set(frame[frame.target == 1.9].run_a) | set(frame[frame.target == 1.9].run_b) == {"a0", "a1", "b0"}
    d = {(r.run_a, r.run_b): r.value for r in at2.itertuples()}
    summary = pd.read_csv(sweep / "compare" / "summary.csv")
    tv2 = summary[(summary.target == 2.0) & (summary.metric == "tv")].set_index("setting")
    # settings named by a run; each regime has its reference (c is the only offline setting)
    assert list(tv2.index) == ["a0", "b0", "c0"] and list(tv2.reference) == ["a0", "a0", "c0"]
    b = tv2.loc["b0"]
    assert (b.n_seeds, b.n_ref_seeds, b.regime, b.design) == (1, 2, "online", "independent")
    assert b.d_cross == pytest.approx((d[("a0", "b1")] + d[("a1", "b1")]) / 2)
    assert b.d_floor == pytest.approx(d[("a0", "a1")])  # b has one seed here: the floor is a's
    assert b.ratio == pytest.approx(b.d_cross / b.d_floor) and b.ref_floor == pytest.approx(d[("a0", "a1")])
    assert np.isnan(b.ci_low) and np.isnan(b.floor)  # one seed: no floor of its own, no interval
    assert 0 < b.p_value <= 1 and not b.in_family and np.isnan(b.p_adjusted)  # the family needs two seeds
    c = tv2.loc["c0"]
    assert c.regime == "offline" and np.isnan(c.ratio) and c.online_reference == "a0"  # the second reading
    assert c.online_ratio == pytest.approx((d[("a0", "c0")] + d[("a1", "c0")]) / 2 / d[("a0", "a1")])
    assert np.isnan(tv2.loc["a0"].ratio)  # the reference itself
    family = pd.read_csv(sweep / "compare" / "family.csv")
    assert set(family.regime) == {"online", "offline"} and (family.settings == 0).all()
    matrix = pd.read_csv(sweep / "compare" / "settings.csv")
    assert len(matrix[(matrix.target == 2.0) & (matrix.metric == "tv")]) == 3  # a-b, a-c, b-c
    compute = pd.read_csv(sweep / "compare" / "compute.csv")
    a19 = compute[(compute.target == 1.9) & (compute.setting == "a0")].iloc[0]
    assert (a19.n_seeds, a19.n_reached, a19.steps_mean) == (2, 2, 1.0)
    assert compute[(compute.target == 1.9) & (compute.setting == "b0")].n_reached.iloc[0] == 1  # b1 never got there
    assert list(pd.read_parquet(sweep / "compare" / "distances.parquet").columns[:7]) == [
        "target", "run_a", "run_b", "setting_a", "setting_b", "metric", "value"]

    kept = cmp.compare(sweep, ("tv",), n_boot=50, include_flagged=True)
    assert ("a0", "b0") in {(r.run_a, r.run_b) for r in kept[kept.target == 2.0].itertuples()}
    b = pd.read_csv(sweep / "compare" / "summary.csv").set_index(["target", "setting"]).loc[(2.0, "b0")]
    dk = {(r.run_a, r.run_b): r.value for r in kept[kept.target == 2.0].itertuples()}
    assert b.d_floor == pytest.approx((dk[("a0", "a1")] + dk[("b0", "b1")]) / 2)  # the pooled floor


def test_compare_reads_the_design_from_the_seeds_and_refuses_to_mix_designs(tmp_path):
    """Settings that share every seed are analysed within seeds (2^3 swaps for three seeds); runs of a
    paired and an independent sweep in one directory are refused."""
    d = tmp_path / "p"
    for s in (0, 1, 2):
        for name, lr in (("a", 0.01), ("b", 0.1)):
            make_run(d, f"{name}{s}", [f"optim.lr={lr}", f"seed={s}", f"replicate={s}", "design=paired"],
                     [(2.0, 1.99)])
    cmp.compare(d, ("tv",), n_boot=20)
    row = pd.read_csv(d / "compare" / "settings.csv").iloc[0]
    assert (row.design, row.permutations) == ("paired", 8)
    frame = pd.read_parquet(d / "compare" / "distances.parquet")
    same = frame[(frame.kind == "reference") & (frame.run_a.str[1] == frame.run_b.str[1])]
    d_cross = frame[(frame.kind == "reference") & (frame.run_a.str[1] != frame.run_b.str[1])].value.mean()
    assert len(same) == 3 and row.d_cross == pytest.approx(d_cross)  # same-seed pairs are not in D
    make_run(d, "c0", ["optim.lr=0.2", "seed=7", "replicate=0", "design=independent"], [(2.0, 1.99)])
    with pytest.raises(ConfigError, match="different seed designs"):
        cmp.compare(d, ("tv",))


def test_a_stalled_run_is_left_out_and_named(sweep, capsys):
    files.write_json(sweep / "c0" / "status.json", {"state": "stalled", "reason": "never got below chance"})
    frame = cmp.compare(sweep, ("tv",), n_boot=50)
    assert "c0" not in set(frame.run_a) | set(frame.run_b)
    lines = cmp.conclusions(sweep)
    assert lines[0].startswith("left out of the statistics (2") and "c0 at 2 (stalled run)" in lines[0]
    assert any(line.startswith("online: ") for line in lines)


def test_the_answer_is_renamed_after_every_table_and_the_inputs_last(sweep, monkeypatch):
    """All synced first, then renamed in this order: a kill part way leaves no answer (compare removed the old
    one) or one its tables give, and inputs.json, which says what the tables come from, never newer than them."""
    renamed = []
    replace = files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (renamed.append(Path(b).name), replace(a, b))[1])
    cmp.compare(sweep, ("tv",), n_boot=20)
    tables = [n for n in renamed if n.endswith((".csv", ".parquet"))]
    assert len(tables) == 7 and renamed[-2:] == ["answer.json", "inputs.json"]
    assert renamed.index("answer.json") > max(renamed.index(n) for n in tables)


def test_conclusions_come_from_answer_json_as_the_tables_give_them_and_a_failed_compare_leaves_none(
        sweep, monkeypatch):
    files.write_json(sweep / "c0" / "status.json", {"state": "stalled", "reason": "never got below chance"})
    cmp.compare(sweep, ("tv", "top1"), n_boot=50)
    answer = files.read_json(sweep / "compare" / "answer.json")
    for m in ("tv", "top1"):
        notes, said = cmp._said(cmp._answer_tables(sweep / "compare"), m)
        assert cmp.conclusions(sweep, metric=m) == answer[m]["notes"] + answer[m]["answer"] == notes + said
    assert "kl" not in answer and cmp.conclusions(sweep, metric="kl")[0].startswith("left out of the statistics")
    with pytest.raises(ConfigError, match="unknown metric"):  # fails before it reads a run: answer.json stays
        cmp.compare(sweep, ("nope",))
    assert (sweep / "compare" / "answer.json").exists()
    with pytest.raises(ConfigError, match="--device"):  # so does a device that is not one
        cmp.compare(sweep, ("tv",), device="no-such-device")
    assert (sweep / "compare" / "answer.json").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("the forwards failed")

    monkeypatch.setattr(cmp, "pair_table", broken)
    with pytest.raises(RuntimeError):  # fails once it began: no answer is left that its tables may not give
        cmp.compare(sweep, ("tv",))
    assert not (sweep / "compare" / "answer.json").exists()


def test_a_run_that_diverged_after_reaching_its_targets_counts_and_is_named(sweep):
    cmp.compare(sweep, ("tv",), n_boot=50)
    numbers = ["target", "setting", "n_seeds", "d_cross", "d_floor", "ratio", "p_value"]
    completed = pd.read_csv(sweep / "compare" / "summary.csv")[numbers]
    files.write_json(sweep / "a1" / "status.json", {"state": "diverged", "diverged_after_targets": {"2": 0, "1.9": 1},
                                                   "reason": "train loss 9.1 at step 40, after reaching 2, 1.9"})
    frame = cmp.compare(sweep, ("tv",), n_boot=50)
    assert "a1" in set(frame.run_a) | set(frame.run_b)
    summary = pd.read_csv(sweep / "compare" / "summary.csv")
    pd.testing.assert_frame_equal(summary[numbers], completed)  # its checkpoints count as a completed run's
    named = summary.set_index(["target", "setting"]).diverged_later
    assert named.dropna().to_dict() == {(2.0, "a0"): "a1", (1.9, "a0"): "a1"}  # a1 is one of setting a0's seeds
    lines = cmp.conclusions(sweep)
    assert "diverged after reaching a target (1; their checkpoints are in the statistics): a1 at 2, 1.9" in lines


def test_a_rerun_computes_only_the_pairs_of_changed_or_new_checkpoints(sweep, computed_pairs):
    first = cmp.compare(sweep, ("tv",), n_boot=50)
    computed = computed_pairs
    computed.clear()
    cached = cmp.compare(sweep, ("tv",), n_boot=50)
    assert computed == []
    pd.testing.assert_frame_equal(cached, first)  # the cache holds every value exactly (some packed in float32)
    make_run(sweep, "b2", ["optim.lr=0.1", "seed=5"], [(2.0, 1.99)])
    frame = cmp.compare(sweep, ("tv",), n_boot=50)
    assert len(computed) == 4  # b2 against each of the four runs kept at 2.0 (b0 overshot it)
    assert len(frame[frame.target == 2.0]) == 10
    # the cache is written without fsync: a torn file is recomputed, not trusted
    torn = sorted((sweep / "compare" / "cache").glob("*.pt"), key=lambda f: f.stat().st_size)[-1]
    torn.write_bytes(torn.read_bytes()[:10])
    computed.clear()
    again = cmp.compare(sweep, ("tv",), n_boot=50)
    assert len(computed) == 10  # every pair of the target whose file was torn
    assert again.sort_values(["target", "run_a", "run_b"]).value.tolist() == \
        frame.sort_values(["target", "run_a", "run_b"]).value.tolist()


def test_a_cache_file_that_cannot_be_written_fails_the_compare(sweep, monkeypatch):
    """The pair cache is a file of every target's pairs; a write that fails (a full disk) fails the compare with
    the system's error, not a compare without its cache."""
    cmp.compare(sweep, ("tv",), n_boot=20, n_perm=50)
    cache = sorted((sweep / "compare" / "cache").glob("*.pt"))
    assert len(cache) == 2 and all(len(cmp._read_cache(f)) > 0 for f in cache)  # two targets, every file whole

    def failing(path, write, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "atomic_write", failing)
    for f in cache:
        f.unlink()
    with pytest.raises(OSError, match="No space left"):
        cmp.compare(sweep, ("tv",), n_boot=20, n_perm=50)


def test_changes_name_the_runs_and_checkpoints_that_landed_changed_or_went(sweep):
    cmp.compare(sweep, ("tv",), n_boot=20, n_perm=100)
    assert runs_mod.changes(sweep) == [] and runs_mod.changes(sweep, "noise:1") is None  # never compared shifted
    assert runs_mod.last_options(sweep) == {"metrics": ["tv"], "tolerance": 0.02, "n_boot": 20, "n_perm": 100,
                                       "include_flagged": False, "probe_shift": None, "lmc_points": 11}
    make_run(sweep, "b2", ["optim.lr=0.1", "seed=5"], [(2.0, 1.99)])
    make_run(sweep.parent / "later", "b1", ["optim.lr=0.1", "seed=3"], [(2.0, 1.99), (1.9, 1.89)])
    (sweep.parent / "later" / "b1" / "checkpoints" / "target-1.9").rename(sweep / "b1" / "checkpoints" / "target-1.9")
    weights = sweep / "a1" / "checkpoints" / "target-2" / ckpt.WEIGHTS
    weights.write_bytes(weights.read_bytes() + b" ")  # retrained: another file
    import shutil

    shutil.rmtree(sweep / "c0")
    files.write_json(sweep / "b0" / "status.json", {"state": "stalled", "reason": "never got below chance"})
    assert runs_mod.changes(sweep) == ["new runs: b2", "removed runs: c0", "new checkpoints: b1 at 1.9",
                                  "changed checkpoints: a1 at 2", "stalled or no longer: b0"]


def test_probe_chunks_are_sized_from_the_free_memory(monkeypatch):
    """GPT-2's vocabulary at 1,024 tokens: (2 x 16 + 4) float32 outputs of 1,024 x 50,257 per sequence take
    7.4 GB, so half of 139 GB holds 9 sequences; small outputs stay at MOST_UNITS; never below 1."""
    from goldenpath.data import SourceInfo

    gpt2, images = SourceInfo("lm", (1024,), 50257), SourceInfo("classification", (3, 32, 32), 10)
    free = {"bytes": 139e9}
    monkeypatch.setattr(pairs, "free_memory_bytes", lambda device: free["bytes"])
    assert pairs.probe_chunk(16, gpt2, "cuda", torch.float32) == int(0.5 * 139e9 // (1024 * 50257 * 4 * 36)) == 9
    assert pairs.probe_chunk(0, gpt2, "cuda", torch.float32) == int(0.5 * 139e9 // (1024 * 50257 * 4 * 4)) == 84
    assert pairs.probe_chunk(16, gpt2, "cuda", torch.float64) == 4  # twice the bytes
    assert pairs.probe_chunk(16, images, "cpu", torch.float32) == pairs.MOST_UNITS
    free["bytes"] = 1e6
    assert pairs.probe_chunk(16, gpt2, "cuda", torch.float32) == 1
    # the batched products of kl and sq: a share of a GPU's free memory for their copies, never below a CPU's
    assert pairs._copy_bytes(torch.device("cpu")) == pairs.PAIR_GROUP_BYTES
    assert pairs._copy_bytes(torch.device("cuda")) == pairs.PAIR_GROUP_BYTES  # 1 MB free: the floor
    free["bytes"] = 139e9
    assert pairs._copy_bytes(torch.device("cuda")) == pairs.GRAM_MEMORY_SHARE * 139e9


def test_a_chunk_sized_from_little_memory_gives_the_same_distances(sweep, monkeypatch):
    """Without ``chunk`` compare takes its chunks from the free memory: here room for about 5 probe images at a
    time, with the same distances as one chunk of every image."""
    import shutil

    whole = cmp.compare(sweep, ("tv", "js", "top1"), n_boot=20, n_perm=100, chunk=256)
    shutil.rmtree(sweep / "compare")
    config = load_config(sweep / "a0" / "config.yaml")
    room = 5 * config.data.build().info.num_classes * 4 * (2 * 4 + 4)  # 5 images of 4 models
    monkeypatch.setattr(pairs, "free_memory_bytes", lambda device: room / pairs.PROBE_MEMORY_SHARE)
    chunks, real = [], cmp.pair_table
    monkeypatch.setattr(cmp, "pair_table", lambda *a, chunk, **kw: chunks.append(chunk) or real(*a, chunk=chunk, **kw))
    small = cmp.compare(sweep, ("tv", "js", "top1"), n_boot=20, n_perm=100)
    assert chunks and all(2 <= c <= 8 for c in chunks) and config.data.probe_size > 8
    pd.testing.assert_frame_equal(small, whole, rtol=1e-6)


def test_compare_draws_a_bar_over_each_target_s_probe_chunks_and_lmc_points(sweep, bars, monkeypatch):
    monkeypatch.setattr(pairs, "tqdm", bars)
    frame = cmp.compare(sweep, ("tv", "lmc"), n_boot=20, n_perm=100, chunk=16, lmc_points=4)
    probe_size = load_config(sweep / "a0" / "config.yaml").data.probe_size
    closed = {b["desc"]: b for b in bars.closed}
    for target, rows in frame.groupby("target"):
        n_pairs = len(rows.drop_duplicates(["run_a", "run_b"]))
        n_runs = len(set(rows.run_a) | set(rows.run_b))
        forwards = closed.pop(f"loss {target:g}: {n_pairs} pairs, forwards")
        assert forwards["n"] == forwards["total"] == math.ceil(probe_size / 16)
        paths = closed.pop(f"loss {target:g}: {n_pairs} pairs, lmc paths")
        assert paths["n"] == paths["total"] == n_runs + n_pairs * (4 - 2)  # each end once, 2 inner points a pair
    assert not closed


def test_heatmap_has_one_cell_per_pair_and_outlines_the_floors(sweep, bars, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from goldenpath.draw import figures
    from goldenpath.draw.figures import write_figures

    frame = cmp.compare(sweep, ("tv",), n_boot=50, include_flagged=True)
    monkeypatch.setattr(figures, "tqdm", bars)
    orders, heatmap = [], figures._heatmap
    monkeypatch.setattr(figures, "_heatmap", lambda *a, **k: (orders.append(k["order"]), heatmap(*a, **k))[1])
    paths = {p.name for p in write_figures(sweep)}
    # as the report orders them (online, then offline; least noisy first), not by name
    configs = {r.name: load_config(r / "config.yaml") for r in sweep.iterdir() if (r / "config.yaml").exists()}
    present = set(frame.run_a) | set(frame.run_b)
    full = figures.heatmap_order(configs, present, figures.run_regimes(frame, pd.read_csv(sweep / "compare" /
                                                                                         "settings.csv")))
    assert orders[0] == full and all(o == [r for r in full if r in o] for o in orders)  # a target's runs, in turn
    assert {"heatmap-tv-target-2.png", "ratios-tv-target-2.png", "compute-to-target.png"} <= paths
    drawn = len(list((sweep / "figures").glob("*.png")))
    assert [(b["n"], b["total"], b["unit"]) for b in bars.closed] == [(drawn, drawn, "figure")]  # one bar, over all
    part = frame[(frame.target == 2.0)]
    ax = distance_heatmap(part, order=["a0", "a1", "b0", "b1", "c0"])
    cells = np.asarray(ax.collections[0].get_array()).reshape(5, 5)
    names = ["a0", "a1", "b0", "b1", "c0"]
    for r in part.itertuples():
        i, j = names.index(r.run_a), names.index(r.run_b)
        assert cells[i, j] == pytest.approx(r.value) and cells[j, i] == pytest.approx(r.value)
    assert np.allclose(np.diag(cells), 0)
    assert len(ax.patches) == 2 * (part.kind == "floor").sum()
    assert [t.get_text() for t in ax.get_yticklabels()] == names


# ----------------------------------------------------------------------------- the opt-in lenses


def penultimate(model, batch, which):
    """Features by a route of their own: the CNN without its head; GPT-2's last hidden state (after ln_f)."""
    with torch.no_grad():
        if which == "cnn":
            return model[:-1](batch["x"])
        hidden = model.lm(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1]
        return hidden[batch["labels"] != -100]


@pytest.mark.parametrize("which", ["cnn", "lm"])
def test_cka_from_the_chunked_forwards_equals_linear_cka_of_each_pair(which):
    overrides = TINY_TEACHER if which == "cnn" else TINY_MARKOV
    config = load_config(None, [*overrides, "budget.steps=1"])
    source = config.data.build()
    probe = {k: v.double() if v.is_floating_point() else v for k, v in source.heldout("probe").items()}
    if which == "lm":
        probe["labels"] = probe["labels"].clone()
        probe["labels"][::3, -5:] = -100  # padded positions are not points
    models = tiny_models(overrides, 3, source.info)
    pairs = [(0, 1), (0, 2), (1, 2)]
    got = pair_sums(models, probe, pairs, ("tv", "cka"), chunk=5, device="cpu", dtype=torch.float64)
    for i, j in pairs:
        want = 1 - linear_cka(penultimate(models[i], probe, which), penultimate(models[j], probe, which))
        assert float(got[(i, j)]["cka"][0]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    same = pair_sums([models[0], models[0]], probe, [(0, 1)], ("cka",), chunk=7, device="cpu",
                         dtype=torch.float64)
    assert float(same[(0, 1)]["cka"][0]) == pytest.approx(0.0, abs=1e-12)


def loaded(sweep, run, target=2.0):
    config = load_config(sweep / run / "config.yaml")
    model = build_model(config.model, config.data.build().info, seed=0).eval()
    from safetensors.torch import load_model
    load_model(model, str(sweep / run / "checkpoints" / ckpt.target_name(target) / "model.safetensors"))
    return model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two settings of two seeds whose checkpoints learned a little (positive barriers between seeds)."""
    d = tmp_path_factory.mktemp("trained") / "s"
    for name, lr, seed, steps in (("a0", 0.01, 0, 20), ("a1", 0.01, 1, 20), ("b0", 0.1, 2, 8), ("b1", 0.1, 3, 8)):
        make_run(d, name, [f"optim.lr={lr}", f"seed={seed}"], [(2.0, 1.99)], fit_steps=steps)
    return d


def test_cka_and_lmc_get_pair_rows_and_setting_ratios_with_seed_intervals(trained):
    sweep = trained
    frame = cmp.compare(sweep, ("tv", "cka", "lmc"), n_boot=200, chunk=24)
    config = load_config(sweep / "a0" / "config.yaml")
    source = config.data.build()
    probe = source.heldout("probe")
    rows = frame[frame.target == 2.0].set_index(["run_a", "run_b", "metric"])
    cross = max((("a0", "b0"), ("a0", "b1"), ("a1", "b0"), ("a1", "b1")), key=lambda p: rows.loc[(*p, "lmc")].value)
    assert rows.loc[(*cross, "lmc")].value > 0.05  # trained models: a real barrier to match
    a0, a1 = loaded(sweep, "a0"), loaded(sweep, "a1")
    chunks = [{k: v[lo : lo + 24] for k, v in probe.items()} for lo in range(0, len(probe["ids"]), 24)]
    _, _, want = lmc.barrier(loaded(sweep, cross[0]), loaded(sweep, cross[1]), chunks, k=11)
    assert rows.loc[(*cross, "lmc")].value == pytest.approx(want, rel=1e-6, abs=1e-9)
    want = 1 - linear_cka(penultimate(a0, probe, "cnn"), penultimate(a1, probe, "cnn"))
    assert rows.loc[("a0", "a1", "cka")].value == pytest.approx(want, rel=1e-6, abs=1e-9)
    whole = frame[frame.metric.isin(["cka", "lmc"])]
    assert whole.ci_low.isna().all() and whole.value.notna().all()  # no probe-unit interval
    assert frame[frame.metric == "tv"].ci_low.notna().all()
    summary = pd.read_csv(sweep / "compare" / "summary.csv").set_index(["target", "metric", "setting"])
    for metric in ("cka", "lmc"):
        d = {(r.run_a, r.run_b): r.value for r in frame[frame.metric == metric].itertuples()}
        assert d[("a0", "a1")] > 0.01 and d[("b0", "b1")] > 0.01, metric  # seeds: different inits
        b = summary.loc[(2.0, metric, "b0")]
        assert b.d_cross == pytest.approx(np.mean([d[(a, c)] for a in ("a0", "a1") for c in ("b0", "b1")]))
        assert b.d_floor == pytest.approx((d[("a0", "a1")] + d[("b0", "b1")]) / 2)
        assert b.ratio == pytest.approx(b.d_cross / b.d_floor)
        # seeds alone vary (the probe set held fixed): the interval holds the estimate, and the exact
        # permutation p over the 6 splits of 2 + 2 seeds is a multiple of 1/6
        assert b.ci_low <= b.ratio <= b.ci_high and b.ci_high > b.ci_low, metric
        assert b.p_value * 6 == pytest.approx(round(b.p_value * 6))
    assert set(pd.read_csv(sweep / "compare" / "settings.csv").metric) == {"tv", "cka", "lmc"}


def test_default_metrics_are_the_pointwise_ones_and_a_bad_metric_names_the_option(sweep):
    frame = cmp.compare(sweep, n_boot=20)
    assert set(frame.metric) == {"tv", "kl", "js", "top1"}
    with pytest.raises(ConfigError, match=r"^--metrics: unknown metric 'ckaa'; use some of tv,kl,js,top1,sq,cka,lmc$"):
        cmp.compare(sweep, ("tv", "ckaa"))
    with pytest.raises(ConfigError, match="--lmc-points"):
        cmp.compare(sweep, ("lmc",), lmc_points=1)


def test_lmc_with_batch_norm_recomputes_statistics_from_the_eval_set(tmp_path):
    d = tmp_path / "bn"
    for s in (0, 1):
        make_run(d, f"r{s}", ["model.norm=batch", f"seed={s}"], [(2.0, 1.99)], fit_steps=15)
    frame = cmp.compare(d, ("lmc",), n_boot=20, chunk=32, lmc_points=5)
    source = load_config(d / "r0" / "config.yaml").data.build()
    split = [{k: v[lo : lo + 32] for k, v in source.heldout(s).items()} for s in ("probe", "eval")
             for lo in range(0, len(source.heldout(s)["ids"]), 32)]
    probe_chunks, eval_chunks = split[:2], split[2:]
    _, _, want = lmc.barrier(loaded(d, "r0"), loaded(d, "r1"), probe_chunks, k=5, reset_batches=eval_chunks)
    assert frame.value.iloc[0] == pytest.approx(want, rel=1e-6, abs=1e-9) and want > 0.01


def test_a_shifted_probe_writes_its_own_tables_from_the_shifted_inputs(sweep):
    frame = cmp.compare(sweep, ("tv",), n_boot=20, probe_shift="noise:1")
    assert (sweep / "compare-noise-1" / "summary.csv").exists() and not (sweep / "compare" / "summary.csv").exists()
    shifted = probe_shift(load_config(sweep / "a0" / "config.yaml").data, "noise:1")
    a0, a1 = loaded(sweep, "a0"), loaded(sweep, "a1")
    with torch.no_grad():
        want = float(tv(a0(shifted["x"]), a1(shifted["x"])).double().mean())
    got = frame[(frame.target == 2.0) & (frame.run_a == "a0") & (frame.run_b == "a1")].value.iloc[0]
    assert got == pytest.approx(want, rel=1e-5)
    clean = cmp.compare(sweep, ("tv",), n_boot=20)
    assert clean[(clean.target == 2.0) & (clean.run_a == "a0") & (clean.run_b == "a1")].value.iloc[0] != \
        pytest.approx(got, rel=1e-3)
    assert cmp.conclusions(sweep, probe_shift="noise:1")
    from goldenpath.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(sweep), "--probe-shift", "blur:2"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("which", ["cnn", "lm"])
def test_float32_pair_sums_are_within_the_stated_tolerances_of_float64(which):
    """compare's float32 path (kl and sq from the batched inner products, js from log(p + q)) against the
    pointwise forms in float64 on the same logits: every metric within 1e-5 per probe unit, and kl's mean over
    the probe within 1e-4 relative."""
    config = load_config(None, [*(TINY_TEACHER if which == "cnn" else TINY_MARKOV), "budget.steps=1"])
    source = config.data.build()
    probe = source.heldout("probe")
    models = [m.float() for m in tiny_models(TINY_TEACHER if which == "cnn" else TINY_MARKOV, 4, source.info)]
    pairs = list(itertools.combinations(range(4), 2))
    got = pair_sums(models, probe, pairs, ("tv", "kl", "js", "top1", "sq"), chunk=64, device="cpu",
                        dtype=torch.float32)
    with torch.no_grad():
        outs = [logits(m, probe).double() for m in models]
    mask = probe["labels"] != -100 if which == "lm" else None
    for i, j in pairs:
        count = got[(i, j)]["count"]
        for name, f in (("tv", tv), ("kl", sym_kl), ("js", js), ("top1", top1), ("sq", distances.sq)):
            values = f(outs[i], outs[j])
            want = (values * mask).sum(1) if mask is not None else values
            torch.testing.assert_close(got[(i, j)][name] / count, want / count, rtol=0, atol=1e-5,
                                       msg=f"{name} {i},{j}")
            if name == "kl":  # the pair's distance, a mean over the probe points
                mean, want_mean = got[(i, j)][name].sum() / count.sum(), want.sum() / count.sum()
                assert abs(float(mean / want_mean) - 1) < 1e-4, (i, j, float(mean), float(want_mean))


def test_the_pair_cache_round_trips_exactly_in_its_compact_form_and_reads_the_old_one(tmp_path):
    """float32 only where it holds the float64 values exactly, the shared points-per-unit row once, nan kept; a
    cache written before (every name stacked, float64) reads the same."""
    gen = torch.Generator().manual_seed(0)
    count = torch.full((6,), 64.0, dtype=torch.float64)
    results = {f"r{i}|f|r{j}|f": {"tv": torch.rand(6, generator=gen).double(),  # image sums: float32 values
                                 "js": torch.rand(6, generator=gen, dtype=torch.float64),  # token sums: not
                                 "count": count.clone() if i else count,  # equal rows, not all one object
                                 "cka": torch.tensor([math.nan if i else 0.25], dtype=torch.float64)}
               for i, j in [(0, 1), (0, 2), (1, 2)]}
    names = results["r0|f|r1|f"]
    stacked = {n: torch.stack([r[n] for r in results.values()]) for n in names}
    table = pairs.PairTable(list(results), stacked)  # "count" found equal in every row
    packed = cmp._pack(table)
    assert packed["shared"] == ["count"] and packed["single"] == ["tv", "count"]
    assert packed["values"]["count"].shape == (6,) and packed["values"]["js"].dtype == torch.float64
    assert cmp._pack(pairs.PairTable(list(results), {**stacked, "count": count}, shared=("count",))).keys() == \
        packed.keys()
    # rows that are views of one [metrics, pairs, units] tensor (as compare's pair sums are) are written alone
    both = torch.stack([stacked["js"], stacked["js"] * 2])
    viewed = cmp._pack(pairs.PairTable(list(results), {"js": both[0], "kl": both[1]}))
    for v in viewed["values"].values():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    old = {"keys": list(results), "values": stacked}
    # a cache that holds kl of another definition (the one-way KL before compare's was symmetrised) is recomputed
    with_kl = pairs.PairTable(list(results), {**stacked, "kl": stacked["js"]})
    torch.save({**cmp._pack(with_kl), "kl": None}, tmp_path / "one-way.pt")
    torch.save(cmp._pack(with_kl), tmp_path / "symmetric.pt")
    assert len(cmp._read_cache(tmp_path / "one-way.pt")) == 0 and len(cmp._read_cache(tmp_path / "symmetric.pt")) == 3
    torch.save({"keys": ["a", "b"], "values": {"tv": torch.zeros(3, 6)}}, tmp_path / "torn.pt")  # rows != keys
    assert len(cmp._read_cache(tmp_path / "torn.pt")) == 0
    for name, form in (("new.pt", packed), ("old.pt", old)):
        torch.save(form, tmp_path / name)
        back = cmp._read_cache(tmp_path / name).as_dict()
        assert list(back) == list(results)
        for k, r in results.items():
            for n, v in r.items():
                got = back[k][n]
                assert got.dtype == v.dtype and torch.equal(got.nan_to_num(7.0), v.nan_to_num(7.0)), (name, k, n)


def test_compare_kl_does_not_depend_on_which_run_comes_first_so_its_permutation_test_holds_its_level():
    """compare orders a pair's runs by setting (the reference first), and a relabelling of the permutation test does
    not re-orient the pairs: with KL(first || second), 10 seeds against 10 drawn from one population were called
    different at 5% in about a fifth of sweeps. Its symmetrised form measures the pair the same both ways, and the
    test rejects a true null at its level (compare's own path: the batched inner products of _Gram)."""
    from goldenpath.comparison import calibration, stats
    from goldenpath.comparison.distances import Dist

    rng = np.random.default_rng(5)
    world = calibration.World((0, 0), (1.0, 1.0), points=100, concentration=1.0)
    rejected, reps = 0, 160
    for _ in range(reps):
        p, design = calibration.functions(world, 10, rng)
        logits = torch.from_numpy(np.log(np.clip(p, 1e-30, None))).float()
        dist = None
        for k in range(len(logits)):
            dist = Dist.stack_into(dist, k, len(logits), Dist(logits[k]))
        ps = list(itertools.combinations(range(len(logits)), 2))
        (group, s), = pairs._pair_groups(dist, ps, ["kl"], None, pairs._Gram(dist))
        assert list(group) == list(range(len(ps)))
        if not rejected:  # the same value whichever run is named first
            (_, back), = pairs._pair_groups(dist, [(j, i) for i, j in ps], ["kl"], None, pairs._Gram(dist))
            torch.testing.assert_close(back, s, rtol=1e-6, atol=1e-9)
        got, _ = stats.compare_settings(s[0].numpy(), np.ones(p.shape[1]), design, n_perm=199,
                                        seed=int(rng.integers(1 << 30)))
        rejected += got[(0, 1)].p_value < 0.05
    assert rejected / reps < 0.1  # 5% expected (sd 1.7%); the directional form rejected 19.5% of 400
