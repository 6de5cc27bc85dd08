"""Embedded streams: the counter-based RNG, the sampled labels/tokens, and the exact Bayes-optimal losses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from goldenpath.config import ConfigError, load_config
from goldenpath.data.synthetic import MarkovStream
from goldenpath.seeding import counter_normal, counter_uniform, stream_key


def source(*overrides):
    return load_config(None, [*overrides, "budget.steps=1"]).data.build()


def test_counter_normal_is_standard_normal_and_deterministic():
    z = counter_normal(stream_key(1, 2), torch.arange(2000), 64).flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert torch.equal(counter_normal(7, torch.tensor([5, 9]), 3), counter_normal(7, torch.tensor([5, 9]), 3))
    # neighbouring ids and counters are uncorrelated
    u = counter_uniform(3, torch.arange(20000), 2).numpy()
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.03
    assert not torch.equal(counter_uniform(3, torch.arange(5), 1), counter_uniform(4, torch.arange(5), 1))


def test_teacher_images_are_smooth_unit_variance_fields():
    src = source("data.image_size=32", "data.max_frequency=4")
    x = src.train_batch(torch.arange(512))["x"]
    assert x.shape == (512, 3, 32, 32)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.var()) - 1) < 0.05
    power = torch.fft.fft2(x.double()).abs().pow(2).mean((0, 1))
    k = torch.fft.fftfreq(32) * 32
    high = (k.abs()[:, None] > 4) | (k.abs()[None, :] > 4)
    assert float(power[high].sum() / power.sum()) < 1e-10  # band-limited to |k| <= 4 (float32 round-off)


def test_the_cached_teacher_is_the_calibrated_one_and_a_bad_cache_file_is_rebuilt(tmp_path, monkeypatch):
    from goldenpath.data.synthetic import TeacherStream

    monkeypatch.setenv("GOLDENPATH_CACHE", str(tmp_path))
    calibrations = []
    real = TeacherStream._make_teacher
    monkeypatch.setattr(TeacherStream, "_make_teacher",
                        lambda self, purpose=10: calibrations.append(1) or real(self, purpose))
    first = source("data.image_size=16")
    (cached,) = tmp_path.glob("teacher-*.pt")
    second = source("data.image_size=16")
    assert len(calibrations) == 1  # the second build read the cache
    fresh = real(second)
    for a, b, c in zip(first.teacher.state_dict().values(), second.teacher.state_dict().values(),
                       fresh.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(first.heldout("eval")["y"], second.heldout("eval")["y"])
    source("data.image_size=16", "data.teacher_width=8")  # another teacher: another cache entry
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 2 and len(calibrations) == 2
    cached.write_bytes(b"torn")
    third = source("data.image_size=16")
    assert len(calibrations) == 3 and torch.equal(third.heldout("eval")["y"], first.heldout("eval")["y"])
    # the teacher's weights come from goldenpath.seeding: an edit there rebuilds it too (it kept the old one)
    from goldenpath import seeding

    edited = tmp_path / "seeding.py"
    edited.write_bytes(Path(seeding.__file__).read_bytes() + b"\n# an edit\n")
    monkeypatch.setattr(seeding, "__file__", str(edited))
    source("data.image_size=16")
    assert len(calibrations) == 4


def test_teacher_floor_is_the_entropy_of_the_teacher_on_the_eval_set():
    src = source("data.eval_size=512")
    p = torch.softmax(src.logits(src.heldout("eval")["x"]).double(), -1).numpy()
    assert src.loss_floor() == pytest.approx(float(np.mean(stats.entropy(p, axis=1))), rel=1e-9)


def test_teacher_floor_matches_monte_carlo_over_the_stream():
    src = source("data.eval_size=4096")
    floor = src.loss_floor()
    nll = []
    for start in range(0, 60_000, 6000):
        b = src.train_batch(torch.arange(start, start + 6000))
        logp = torch.log_softmax(src.logits(b["x"]).double(), -1)
        nll.append(-logp.gather(1, b["y"][:, None]).squeeze(1))  # labels drawn by the stream
    nll = torch.cat(nll)
    ent = -(torch.softmax(src.logits(src.heldout("eval")["x"]).double(), -1)
            * torch.log_softmax(src.logits(src.heldout("eval")["x"]).double(), -1)).sum(-1)
    se = math.sqrt(float(nll.var()) / len(nll) + float(ent.var()) / len(ent))
    assert abs(float(nll.mean()) - floor) < 4 * se, (float(nll.mean()), floor, se)
    assert 0.3 < floor < math.log(10) - 0.3  # labels neither deterministic nor uniform


def markov_entropies_by_loop(src: MarkovStream, seq: torch.Tensor) -> np.ndarray:
    """Second implementation: per position, rebuild the context code and the distribution from the hash."""
    k, v = src.cfg.order, src.cfg.vocab_size
    out = []
    for row in seq.tolist():
        for t in range(1, len(row)):
            if t < k:
                out.append(math.log(v))
                continue
            code = sum(row[t - k + j] * v**j for j in range(k))
            logits = src.cfg.sharpness * counter_normal(stream_key(src.cfg.seed, 20), torch.tensor([code]), v)[0]
            out.append(stats.entropy(torch.softmax(logits, -1).numpy()))
    return np.array(out)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_markov_floor_matches_a_loop_implementation(order):
    src = source("data.source=markov", f"data.order={order}", "data.vocab_size=8", "data.seq_len=12",
                 "data.eval_size=40")
    ev = src.heldout("eval")
    seq = torch.cat([ev["input_ids"], ev["labels"][:, -1:]], 1)
    assert torch.equal(seq[:, 1:], ev["labels"])
    assert src.loss_floor() == pytest.approx(float(markov_entropies_by_loop(src, seq).mean()), rel=1e-9)


def test_markov_floor_matches_monte_carlo_and_tokens_follow_the_table():
    src = source("data.source=markov", "data.order=2", "data.vocab_size=16", "data.seq_len=32",
                 "data.eval_size=512")
    seq = src.sequences("train", torch.arange(8000))
    probs = torch.softmax(src.next_logits(src.context_codes(seq[:, :-1])[:, :].flatten()), -1)
    targets = seq[:, 2:].flatten()
    nll = -torch.log(probs.gather(1, targets[:, None]).squeeze(1))
    first = torch.full((len(seq),), math.log(16), dtype=torch.float64)  # target 1: uniform given one token
    mc = torch.cat([first, nll]).mean()
    ent_eval = src.token_entropies(torch.cat([src.heldout("eval")["input_ids"],
                                              src.heldout("eval")["labels"][:, -1:]], 1))
    se = math.sqrt(float(nll.var()) / len(nll) + float(ent_eval.var()) / ent_eval.numel())
    assert abs(float(mc) - src.loss_floor()) < 4 * se
    # Empirical next-token counts of the commonest context against its distribution (chi-square).
    codes = src.context_codes(seq[:, :-1]).flatten()
    common = int(torch.bincount(codes).argmax())
    observed = torch.bincount(targets[codes == common], minlength=16).numpy()
    expected = torch.softmax(src.next_logits(torch.tensor([common])), -1)[0].numpy() * observed.sum()
    keep = expected > 5
    assert stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def test_markov_without_the_cached_table_gives_the_same_tokens(monkeypatch):
    cached = source("data.source=markov", "data.order=2")
    monkeypatch.setattr(MarkovStream, "TABLE_LIMIT", 0)
    hashed = source("data.source=markov", "data.order=2")
    assert hashed._table is None
    ids = torch.arange(20)
    assert torch.equal(cached.train_batch(ids)["input_ids"], hashed.train_batch(ids)["input_ids"])


def test_markov_read_ahead_gives_the_direct_tokens(monkeypatch):
    """Contiguous reads come from a read-ahead block; the tokens must be those of one sequence at a time."""
    monkeypatch.setattr(MarkovStream, "READ_AHEAD", 24)
    src = source("data.source=markov", "data.order=2")
    start = 5 * 2**40 + 3
    direct = {i: src._batch("train", torch.tensor([i])) for i in range(start, start + 70)}
    # micro-batches inside a block, one crossing its end, a read longer than a block, a read back inside it,
    # a gap, and a non-contiguous read
    reads = [torch.arange(start, start + 8), torch.arange(start + 8, start + 16), torch.arange(start + 16, start + 24),
             torch.arange(start + 20, start + 30), torch.arange(start + 30, start + 62),
             torch.arange(start + 40, start + 44), torch.arange(start + 64, start + 70),
             torch.tensor([start + 9, start + 2, start + 40])]
    for index in reads:
        got = src.train_batch(index)
        assert torch.equal(got["ids"], index)
        for k in ("input_ids", "labels"):
            assert torch.equal(got[k], torch.cat([direct[int(i)][k] for i in index]))
    assert src._ahead[0] == start + 64  # the block was refilled where the reads jumped


def test_splits_are_distinct_and_samples_are_pure_functions_of_their_index():
    src = source()
    a, b = src.train_batch(torch.tensor([3, 4])), src.train_batch(torch.tensor([4]))
    assert torch.equal(a["x"][1], b["x"][0]) and torch.equal(a["y"][1], b["y"][0])
    ev, probe = src.heldout("eval")["x"], src.heldout("probe")["x"]
    assert not torch.equal(ev[0], probe[0]) and not torch.equal(ev[0], src.train_batch(torch.tensor([0]))["x"][0])


def test_teacher_logits_are_its_plain_forward_and_labels_train():
    """The teacher's logits (pooling of a 4 x 4 map skipped, inference mode) equal the plain module's forward
    to the bit, and a batch's tensors are ordinary ones a loss can be trained on."""
    src = source("data.image_size=16")
    batch = src.train_batch(torch.arange(50))
    with torch.no_grad():
        want = src.teacher(batch["x"]).double() / src.cfg.temperature
    assert torch.equal(src.logits(batch["x"]), want)
    w = torch.zeros(3 * 16 * 16, 10, requires_grad=True)
    torch.nn.functional.cross_entropy(batch["x"].flatten(1) @ w, batch["y"]).backward()
    assert w.grad is not None and not batch["y"].is_inference()


def test_mix_labels_that_fraction_of_training_samples_by_a_second_teacher_and_nothing_else():
    """A planted difference of graded strength: the images, the eval and probe labels and the first
    teacher's training labels are those of mix=0 (bit for bit); a fraction mix of the training samples,
    chosen by sample id, draws its label from a second teacher."""
    plain = source("data.image_size=8")
    mixed = source("data.image_size=8", "data.mix=0.3")
    index = torch.arange(20000)
    a, b = plain.train_batch(index), mixed.train_batch(index)
    assert torch.equal(a["x"], b["x"])
    for split in ("eval", "probe"):
        assert torch.equal(plain.heldout(split)["y"], mixed.heldout(split)["y"])
    assert mixed.loss_floor() == plain.loss_floor()
    x = a["x"]
    p1, p2 = torch.softmax(plain.logits(x), -1), torch.softmax(mixed.logits(x, mixed.second), -1)
    assert (p1 - p2).abs().sum(-1).mean() > 0.3  # an independent teacher
    # the second teacher labels the samples its id rule picks (about 30%), and only those can change
    chosen = counter_uniform(stream_key(0, 0, 3), index, 1)[:, 0] < 0.3
    changed = a["y"] != b["y"]
    assert abs(chosen.float().mean() - 0.3) < 0.01 and not (changed & ~chosen).any()
    assert torch.equal(mixed.train_batch(index)["y"], b["y"])  # by sample id: the same labels on every call
    log_p = {t: torch.log(p[changed].gather(1, b["y"][changed, None])).mean() for t, p in (("1", p1), ("2", p2))}
    assert changed.float().mean() > 0.15 and log_p["2"] > log_p["1"] + 0.5  # the changed labels are the second's
    with pytest.raises(ConfigError, match="data.mix"):
        source("data.mix=1.5")


@pytest.mark.parametrize("mix", [0.0, 0.3])
def test_teacher_made_on_a_device_matches_the_cpu_stream_but_for_float32_label_flips(mix):
    """data.generate=device: the basis and a float64 teacher where the run is (here the CPU, the code path a GPU
    takes): the images are the CPU stream's bit for bit, a label differs only where its uniform lies within the
    float32 teacher's error of a class boundary (none in 20,000 here), the held-out sets stay the CPU's."""
    cpu = source("data.image_size=8", f"data.mix={mix}", "data.eval_size=256", "data.probe_size=64")
    dev = source("data.image_size=8", f"data.mix={mix}", "data.eval_size=256", "data.probe_size=64").place("cpu")
    assert dev._train[1][0].weight.dtype == torch.float64 and dev.teacher[0].weight.dtype == torch.float32
    index = torch.arange(7 * 2**40, 7 * 2**40 + 20000)
    a, b = cpu.train_batch(index), dev.train_batch(index)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["ids"], b["ids"])
    assert int((a["y"] != b["y"]).sum()) <= 1
    # the float64 teacher's logits are the float32 teacher's to float32 precision, not bit for bit
    z32, z64 = cpu.logits(a["x"][:500]), dev.logits(a["x"][:500], dev._train[1])
    assert 0 < float((z32 - z64).abs().max()) < 1e-4
    for split in ("eval", "probe"):
        assert all(torch.equal(cpu.heldout(split)[k], dev.heldout(split)[k]) for k in ("x", "y"))
    assert dev.loss_floor() == cpu.loss_floor()


@pytest.mark.parametrize("limit", [None, 0])
def test_markov_made_on_a_device_gives_the_cpu_tokens(monkeypatch, limit):
    """With the next-token table cached (and without it), the device path's tokens are the CPU's exactly."""
    if limit is not None:
        monkeypatch.setattr(MarkovStream, "TABLE_LIMIT", limit)
    cpu = source("data.source=markov", "data.order=2")
    dev = source("data.source=markov", "data.order=2").place("cpu")
    for index in (torch.arange(3 * 2**40, 3 * 2**40 + 40), torch.tensor([5, 1, 9])):
        a, b = cpu.train_batch(index), dev.train_batch(index)
        assert all(torch.equal(a[k], b[k]) for k in ("ids", "input_ids", "labels"))
    assert torch.equal(cpu.heldout("eval")["input_ids"], dev.heldout("eval")["input_ids"])


def test_generate_takes_cpu_or_device():
    with pytest.raises(ConfigError, match="data.generate"):
        source("data.generate=gpu")
    with pytest.raises(ConfigError, match="data.generate"):
        source("data.source=markov", "data.generate=cuda")
