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


def test_floors_reference_and_ratios_on_a_hand_made_sweep(sweep):
    frame = cmp.compare(sweep, ("tv", "top1"), n_boot=200, figures=False)
    at2 = frame[(frame.target == 2.0) & (frame.metric == "tv")]
    kinds = {(r.run_a, r.run_b): r.kind for r in at2.itertuples()}
    # the least-noisy online run is a0 (c0 has a smaller lr but is offline)
    assert kinds == {("a0", "a1"): "floor", ("b0", "b1"): "floor", ("a0", "b0"): "reference",
                     ("a0", "b1"): "reference", ("a0", "c0"): "reference", ("a1", "b0"): "pair",
                     ("a1", "b1"): "pair", ("a1", "c0"): "pair", ("b0", "c0"): "pair", ("b1", "c0"): "pair"}
    assert set(frame[frame.target == 1.9].run_a) | set(frame[frame.target == 1.9].run_b) == {"a0", "a1", "b0"}
    flagged = {(r.run_a, r.run_b) for r in at2.itertuples() if r.flagged}
    assert flagged == {("a0", "b0"), ("a1", "b0"), ("b0", "b1"), ("b0", "c0")}  # every pair with b0
    summary = pd.read_csv(sweep / "compare" / "summary.csv")
    row = summary[(summary.target == 2.0) & (summary.run == "b1") & (summary.metric == "tv")].iloc[0]
    d = {(r.run_a, r.run_b): r.value for r in at2.itertuples()}
    assert row.reference == "a0" and row.floor_from == "own seeds"
    assert row.ratio == pytest.approx(d[("a0", "b1")] / d[("b0", "b1")])
    assert row.ci_low <= row.ratio <= row.ci_high
    c0 = summary[(summary.target == 2.0) & (summary.run == "c0") & (summary.metric == "tv")].iloc[0]
    assert c0.floor_from == "reference's seeds" and c0.ratio == pytest.approx(d[("a0", "c0")] / d[("a0", "a1")])
    parquet = pd.read_parquet(sweep / "compare" / "distances.parquet")
    assert list(parquet.columns[:10]) == ["target", "run_a", "run_b", "metric", "value", "ci_low", "ci_high",
                                          "loss_a", "loss_b", "kind"]


def test_a_rerun_computes_only_the_pairs_of_changed_or_new_checkpoints(sweep, monkeypatch):
    cmp.compare(sweep, ("tv",), n_boot=50, figures=False)
    computed = []
    real = cmp.pair_sums

    def counting(models, probe, pairs, *a, **k):
        computed.extend(pairs)
        return real(models, probe, pairs, *a, **k)

    monkeypatch.setattr(cmp, "pair_sums", counting)
    cmp.compare(sweep, ("tv",), n_boot=50, figures=False)
    assert computed == []
    make_run(sweep, "b2", ["optim.lr=0.1", "seed=2"], [(2.0, 1.99)])
    frame = cmp.compare(sweep, ("tv",), n_boot=50, figures=False)
    assert len(computed) == 5  # b2 against each of the five runs at 2.0
    assert len(frame[frame.target == 2.0]) == 15
    # the cache is written without fsync: a torn file is recomputed, not trusted
    torn = sorted((sweep / "compare" / "cache").glob("*.pt"), key=lambda f: f.stat().st_size)[-1]
    torn.write_bytes(torn.read_bytes()[:10])
    computed.clear()
    again = cmp.compare(sweep, ("tv",), n_boot=50, figures=False)
    assert len(computed) == 15  # every pair of the target whose file was torn
    assert again.sort_values(["target", "run_a", "run_b"]).value.tolist() == \
        frame.sort_values(["target", "run_a", "run_b"]).value.tolist()


def test_heatmap_has_one_cell_per_pair_and_outlines_the_floors(sweep):
    import matplotlib

    matplotlib.use("Agg")
    frame = cmp.compare(sweep, ("tv",), n_boot=50, figures=True)
    assert (sweep / "figures" / "heatmap-tv-target-2.png").exists()
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
