"""Distances against scipy and hand cases; all-pairs against a naive loop; floors, reference, cache, heatmap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from goldenpath import checkpoints as ckpt
from goldenpath import compare as cmp
from goldenpath.config import load_config, to_dict
from goldenpath.distances import bootstrap, bootstrap_rows, bootstrap_weights, js, kl, top1, tv, unit_sums
from goldenpath.models import build_model, logits
from goldenpath.plots import distance_heatmap

from .conftest import TINY_MARKOV, TINY_TEACHER

# ----------------------------------------------------------------------------- distances


def random_logits(*shape, scale=3.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_distances_match_scipy():
    a, b = random_logits(50, 7, seed=1), random_logits(50, 7, seed=2)
    p, q = softmax(a.numpy(), -1), softmax(b.numpy(), -1)
    np.testing.assert_allclose(kl(a, b).numpy(), rel_entr(p, q).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(js(a, b).numpy(), jensenshannon(p, q, axis=-1) ** 2, rtol=1e-9)
    np.testing.assert_allclose(tv(a, b).numpy(), 0.5 * np.abs(p - q).sum(-1), rtol=1e-10)
    np.testing.assert_array_equal(top1(a, b).numpy(), (p.argmax(-1) != q.argmax(-1)).astype(np.float32))


def test_hand_computed_cases():
    a = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    b = torch.log(torch.tensor([[1.0 - 1e-12, 1e-12], [0.1, 0.9]], dtype=torch.float64))
    torch.testing.assert_close(tv(a, b), torch.tensor([0.5 - 1e-12, 0.8], dtype=torch.float64))
    assert float(kl(a[1:], b[1:])) == pytest.approx(0.9 * math.log(9) + 0.1 * math.log(1 / 9))
    assert top1(a[1:], b[1:]).tolist() == [1.0]
    # disjoint supports: JS reaches ln 2
    far = torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]])
    assert float(js(*far)) == pytest.approx(math.log(2), rel=1e-6)


def test_identities_bounds_and_pinsker():
    a, b = random_logits(400, 11, seed=3), random_logits(400, 11, seed=4)
    for f in (tv, kl, js, top1):
        assert float(f(a, a).abs().max()) < 1e-12
    for f in (tv, js, top1):
        torch.testing.assert_close(f(a, b), f(b, a))
    assert float(tv(a, b).max()) <= 1 and float(js(a, b).max()) <= math.log(2) + 1e-12
    assert bool((tv(a, b) <= torch.sqrt(kl(a, b) / 2) + 1e-12).all())  # Pinsker
    assert bool((js(a, b) <= tv(a, b) * math.log(2) + 1e-12).all())   # JS <= TV ln 2


def test_extreme_logits_stay_finite_and_low_precision_is_computed_in_float32():
    a = torch.tensor([[1e4, 0.0, -1e4]])
    b = torch.tensor([[-1e4, 1e4, 0.0]])
    for f in (tv, kl, js, top1):
        assert torch.isfinite(f(a, b)).all()
    assert float(kl(a, b)) == pytest.approx(2e4, rel=1e-6)  # log p - log q at class 0: 0 - (-2e4)
    h = random_logits(20, 5, seed=5)
    torch.testing.assert_close(tv(h.bfloat16(), h.flip(0).bfloat16()).double(),
                               tv(h.bfloat16().double(), h.flip(0).bfloat16().double()), rtol=1e-5, atol=1e-6)


def test_unit_sums_mask_padding_and_bootstrap_covers_the_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    sums, counts = unit_sums(values, mask)
    assert sums.tolist() == [3.0, 4.0] and counts.tolist() == [2.0, 1.0]
    est, low, high = bootstrap(sums, counts)
    assert est == pytest.approx(7 / 3) and low <= est <= high
    # coverage: the 95% interval of a mean of 200 exponential draws holds the true mean most of the time
    gen = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(100):
        x = -torch.log(torch.rand(200, generator=gen, dtype=torch.float64))
        _, lo, hi = bootstrap(x, torch.ones(200), n_boot=400, seed=rep)
        hits += lo <= 1.0 <= hi
    assert 85 <= hits <= 100


def test_bootstrap_rows_equal_one_bootstrap_per_row_including_an_undefined_draw():
    gen = torch.Generator().manual_seed(1)
    sums = torch.rand(5, 40, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 4, (5, 40), generator=gen).double()
    counts[4, :35] = 0  # few units with points: some resamples draw none of them (0 / 0)
    sums[4, :35] = 0
    den = (torch.rand(5, 40, generator=gen, dtype=torch.float64) + 0.1, torch.ones(5, 40, dtype=torch.float64))
    w = bootstrap_weights(40, n_boot=300, seed=3)
    for denominator in (None, den):
        est, low, high = bootstrap_rows(sums, counts, weights=w, denominator=denominator)
        for k in range(5):  # numpy, row by row: ratio of resampled sums, undefined draws dropped
            wn = w.numpy()
            with np.errstate(invalid="ignore"):  # 0 / 0 for resamples without points: dropped below
                draws = (wn @ sums[k].numpy()) / (wn @ counts[k].numpy())
            value = sums[k].sum().item() / counts[k].sum().item()
            if denominator is not None:
                draws = draws / ((wn @ den[0][k].numpy()) / (wn @ den[1][k].numpy()))
                value /= den[0][k].sum().item() / den[1][k].sum().item()
            draws = draws[np.isfinite(draws)]
            expected = (value, *np.percentile(draws, [2.5, 97.5]))
            assert (est[k].item(), low[k].item(), high[k].item()) == pytest.approx(expected, rel=1e-12)
    # a row whose units have no points at all: every draw undefined, no interval
    counts[2] = 0
    est, low, high = bootstrap_rows(sums, counts, weights=w)
    assert math.isnan(low[2]) and math.isnan(high[2]) and not math.isnan(low[1])


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
