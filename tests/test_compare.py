"""All pairs against a naive loop; floors, reference, cache, heatmap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from goldenpath import checkpoints as ckpt
from goldenpath import compare as cmp
from goldenpath.config import load_config, to_dict
from goldenpath.distances import js, kl, top1, tv, unit_sums
from goldenpath.models import build_model, logits
from goldenpath.plots import distance_heatmap

from .conftest import TINY_MARKOV, TINY_TEACHER

# ----------------------------------------------------------------------------- all pairs


def tiny_models(overrides, n, info):
    config = load_config(None, [*overrides, "budget.steps=1"])
    return [build_model(config.model, info, seed=s).double().eval() for s in range(n)]


@pytest.mark.parametrize("which", ["cnn", "lm"])
def test_all_pairs_equal_a_naive_double_loop_with_n_forwards_per_chunk(which):
    config = load_config(None, [*(TINY_TEACHER if which == "cnn" else TINY_MARKOV), "budget.steps=1"])
    source = config.data.build()
    probe = {k: v.double() if v.is_floating_point() else v for k, v in source.heldout("probe").items()}
    if which == "lm":  # padded positions are not points
        probe["labels"] = probe["labels"].clone()
        probe["labels"][::3, -5:] = -100
    models = tiny_models(TINY_TEACHER if which == "cnn" else TINY_MARKOV, 4, source.info)
    calls = [0] * len(models)
    for i, m in enumerate(models):
        m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    chunk = 5
    got = cmp.pair_sums(models, probe, pairs, ("tv", "kl", "js", "top1"), chunk=chunk, device="cpu",
                        dtype=torch.float64)
    n_chunks = math.ceil(len(probe["ids"]) / chunk)
    assert calls == [n_chunks] * 4
    with torch.no_grad():
        outs = [logits(m, probe) for m in models]
    mask = probe["labels"] != -100 if which == "lm" else None
    for i, j in pairs:
        for name, f in (("tv", tv), ("kl", kl), ("js", js), ("top1", top1)):
            values = f(outs[i], outs[j])
            if mask is not None:
                want = (values * mask).sum(1)
                torch.testing.assert_close(got[(i, j)]["count"], mask.sum(1).double())
            else:
                want = values
            torch.testing.assert_close(got[(i, j)][name], want.double(), rtol=1e-10, atol=1e-12)


def test_checkpoints_sharing_one_module_give_their_own_outputs_and_bad_files_are_refused(tmp_path):
    """Tied GPT-2 weights: each checkpoint read into the shared module gives what its own model gives."""
    config = load_config(None, [*TINY_MARKOV, "budget.steps=1"])
    source = config.data.build()
    batch = {k: v[:3] for k, v in source.heldout("probe").items() if k != "ids"}
    models = [build_model(config.model, source.info, seed=s).eval() for s in range(2)]
    for s, m in enumerate(models):
        ckpt.save_checkpoint(tmp_path / f"m{s}", m, {"target": 1.0})
    slots = cmp._Slots(build_model(config.model, source.info, seed=9).eval())
    swapped = [cmp._Swapped(slots, tmp_path / f"m{s}") for s in range(2)]
    with torch.no_grad():
        for s in (1, 0, 1):  # alternating: each call copies its own weights in
            assert torch.equal(logits(swapped[s], batch), logits(models[s], batch))
    other = load_config(None, [*TINY_MARKOV, "budget.steps=1", "model.width=16"])
    ckpt.save_checkpoint(tmp_path / "narrow", build_model(other.model, source.info, seed=0), {"target": 1.0})
    with pytest.raises(RuntimeError, match="has shape .* the model its config builds"):
        cmp._Swapped(slots, tmp_path / "narrow")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "m0" / "model.safetensors"))  # stored once: under one of the tied names
    (tied,) = [names for names in slots.names if len(names) > 1]
    stored = next(n for n in tied if n in state)
    state.update({n: state[stored] + 1 for n in tied if n != stored})  # both names, different values
    (tmp_path / "both").mkdir()
    save_file(state, str(tmp_path / "both" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="tied weights"):
        cmp._Swapped(slots, tmp_path / "both")


# ----------------------------------------------------------------------------- a hand-made sweep


def make_run(sweep_dir, name, overrides, targets):
    """A run directory as the trainer leaves it: config.yaml and loss-target checkpoints (random weights)."""
    config = load_config(None, [*TINY_TEACHER, f"out={sweep_dir}", f"name={name}", "budget.steps=1", *overrides])
    run = sweep_dir / name
    run.mkdir(parents=True)
    ckpt.write_text(run / "config.yaml", ckpt.config_text(to_dict(config)))
    source = config.data.build()
    for k, (target, loss) in enumerate(targets):
        model = build_model(config.model, source.info, seed=config.seed * 10 + k)
        ckpt.save_checkpoint(run / "checkpoints" / ckpt.target_name(target), model,
                             {"target": target, "eval_loss": loss, "step": k, "samples": k, "tokens": 0})
    return run


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "s"
    make_run(d, "a0", ["optim.lr=0.01", "seed=0"], [(2.0, 1.99), (1.9, 1.89)])
    make_run(d, "a1", ["optim.lr=0.01", "seed=1"], [(2.0, 1.995), (1.9, 1.899)])
    make_run(d, "b0", ["optim.lr=0.1", "seed=0"], [(2.0, 1.9), (1.9, 1.88)])  # overshot 2.0 by 0.1
    make_run(d, "b1", ["optim.lr=0.1", "seed=1"], [(2.0, 1.99)])
    make_run(d, "c0", ["optim.lr=0.001", "data.epochs=2", "data.train_size=64", "seed=0"], [(2.0, 1.99)])
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
    assert list(tv2.index) == ["a0", "b0", "c0"] and set(tv2.reference) == {"a0"}  # settings named by a run
    b = tv2.loc["b0"]
    assert (b.n_seeds, b.n_ref_seeds, b.regime) == (1, 2, "online")
    assert b.d_cross == pytest.approx((d[("a0", "b1")] + d[("a1", "b1")]) / 2)
    assert b.d_floor == pytest.approx(d[("a0", "a1")])  # b has one seed here: the floor is a's
    assert b.ratio == pytest.approx(b.d_cross / b.d_floor) and b.ci_low <= b.ratio <= b.ci_high
    assert 0 < b.p_value <= 1 and b.p_holm >= b.p_value and tv2.loc["c0"].regime == "offline"
    assert np.isnan(tv2.loc["a0"].ratio)  # the reference itself
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


def test_a_stalled_run_is_left_out_and_named(sweep, capsys):
    ckpt.write_json(sweep / "c0" / "status.json", {"state": "stalled", "reason": "never got below chance"})
    frame = cmp.compare(sweep, ("tv",), n_boot=50)
    assert "c0" not in set(frame.run_a) | set(frame.run_b)
    lines = cmp.conclusions(sweep)
    assert lines[0].startswith("left out of the statistics (2") and "c0 at 2 (stalled run)" in lines[0]
    assert any(line.startswith("online: ") for line in lines)


def test_a_rerun_computes_only_the_pairs_of_changed_or_new_checkpoints(sweep, monkeypatch):
    cmp.compare(sweep, ("tv",), n_boot=50)
    computed = []
    real = cmp.pair_sums

    def counting(models, probe, pairs, *a, **k):
        computed.extend(pairs)
        return real(models, probe, pairs, *a, **k)

    monkeypatch.setattr(cmp, "pair_sums", counting)
    cmp.compare(sweep, ("tv",), n_boot=50)
    assert computed == []
    make_run(sweep, "b2", ["optim.lr=0.1", "seed=2"], [(2.0, 1.99)])
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


def test_heatmap_has_one_cell_per_pair_and_outlines_the_floors(sweep):
    import matplotlib

    matplotlib.use("Agg")
    from goldenpath.figures import write_figures

    frame = cmp.compare(sweep, ("tv",), n_boot=50, include_flagged=True)
    paths = {p.name for p in write_figures(sweep)}
    assert {"heatmap-tv-target-2.png", "ratios-tv-target-2.png", "compute-to-target.png"} <= paths
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
