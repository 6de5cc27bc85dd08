"""Real loaders on files written here in the real formats: idx, CIFAR-5m npz parts, datasets json/parquet."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from goldenpath.config import ConfigError, load_config
from goldenpath.data import build_stream
from goldenpath.data.hub import ByteTokenizer
from goldenpath.data.sources import load_npz_member, read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx format: two zero bytes, type code 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(data)


def data(*overrides):
    return load_config(None, [*overrides, "budget.steps=1"]).data


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (300, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.arange(300) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (100, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(100) * 7) % 10}
    for name, a in arrays.items():
        write_idx(tmp_path / name, a)
    return tmp_path, arrays


def test_idx_reader_and_source(idx_dir):
    root, arrays = idx_dir
    assert np.array_equal(read_idx(root / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte.gz"])
    assert np.array_equal(read_idx(root / "t10k-labels-idx1-ubyte"), arrays["t10k-labels-idx1-ubyte"])
    src = data("data.source=fashion_mnist", f"data.path={root}", "data.eval_size=60", "data.probe_size=30").build()
    assert src.size == 300 and src.info.input_shape == (1, 28, 28) and src.info.num_classes == 10
    b = src.train_batch(torch.tensor([5, 17]))
    assert b["y"].tolist() == [5, 7]
    # standardised with the eval set's statistics: undo it and get the raw pixels back
    raw = b["x"] * src._std + src._mean
    assert torch.allclose(raw[:, 0] * 255, torch.tensor(arrays["train-images-idx3-ubyte.gz"][[5, 17]]).float(),
                          atol=1e-3)
    ev, probe = src.heldout("eval"), src.heldout("probe")
    assert len(ev["ids"]) == 60 and len(probe["ids"]) == 30
    assert not set(ev["ids"].tolist()) & set(probe["ids"].tolist())
    assert ev["y"].tolist() == [int(arrays["t10k-labels-idx1-ubyte"][i]) for i in ev["ids"]]
    assert abs(float(ev["x"].mean())) < 1e-4 and abs(float(ev["x"].std()) - 1) < 1e-2


def test_idx_source_trains_end_to_end(idx_dir, tmp_path):
    from goldenpath.training.trainer import train

    root, _ = idx_dir
    config = load_config(None, ["data.source=fashion_mnist", f"data.path={root}", "data.eval_size=50",
                                "data.probe_size=20", "model.width=4", "model.depth=1", "optim.batch_size=30",
                                "log.progress=false", "budget.min_progress=null", f"out={tmp_path / 'runs'}",
                                "name=idx"])
    status = json.loads((train(config) / "status.json").read_text())
    assert status["state"] == "completed" and status["reason"] == "data exhausted"
    assert status["samples"] == 300  # one pass over the 300-image pool, then it stops


@pytest.mark.skipif(not FASHION.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
    src = data("data.source=fashion_mnist").build()
    assert src.size == 60_000 and src.info.num_classes == 10
    labels = torch.from_numpy(src._y)
    assert torch.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST's training split is balanced


@pytest.fixture
def cifar5m_dir(tmp_path):
    rows = [0, 120, 200]
    for part, (lo, hi) in enumerate(zip(rows, rows[1:])):
        i = np.arange(lo, hi)
        x = np.zeros((hi - lo, 32, 32, 3), dtype=np.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = i % 256, i // 256  # each image carries its row number
        x[:, 5:, :, :] = np.random.default_rng(part).integers(0, 256, (hi - lo, 27, 32, 3))
        save = np.savez if part == 0 else np.savez_compressed  # stored (memory-mapped) and compressed parts
        save(tmp_path / f"cifar5m_part{part}.npz", X=x, Y=(i % 10).astype(np.int64))
    return tmp_path


def test_npz_members_are_memory_mapped_when_stored(cifar5m_dir):
    stored = load_npz_member(cifar5m_dir / "cifar5m_part0.npz", "X")
    compressed = load_npz_member(cifar5m_dir / "cifar5m_part1.npz", "X")
    assert isinstance(stored, np.memmap) and not isinstance(compressed, np.memmap)
    with np.load(cifar5m_dir / "cifar5m_part0.npz") as ref:
        assert np.array_equal(stored, ref["X"])


def test_cifar5m_source_reads_rows_across_parts(cifar5m_dir):
    src = data("data.source=cifar5m", f"data.path={cifar5m_dir}", "data.eval_size=20", "data.probe_size=10").build()
    assert src.size == 170 and src.info.input_shape == (3, 32, 32)
    index = torch.tensor([119, 3, 120, 169])
    b = src.train_batch(index)
    raw = (b["x"] * src._std + src._mean) * 255
    row = raw[:, 0, 0, 0].round() + 256 * raw[:, 1, 0, 0].round()
    assert row.long().tolist() == index.tolist() and b["y"].tolist() == [9, 3, 0, 9]
    assert src.heldout("eval")["ids"].tolist() == list(range(170, 190))
    assert src.heldout("probe")["ids"].tolist() == list(range(190, 200))


# ----------------------------------------------------------------------------- Hugging Face datasets

DOCS = [f"document {i}: " + "abc " * (i % 7) for i in range(60)]


@pytest.fixture
def text_json(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(DOCS)))
    return path


def text_source(path, *overrides):
    return data("data.source=hf_text", "data.path=json", f"data.data_files={path}", "data.seq_len=15",
                "data.eval_size=3", "data.probe_size=2", "data.shuffle_buffer=1", *overrides).build()


def test_hf_text_packs_documents_with_eos_in_order(text_json):
    src = text_source(text_json)
    assert src.info.num_classes == 257 and src.info.input_shape == (15,)
    eos = ByteTokenizer.eos_token_id
    stream_tokens = [t for d in DOCS for t in list(d.encode()) + [eos]]
    ev, probe = src.heldout("eval"), src.heldout("probe")
    held = torch.cat([ev["input_ids"], ev["labels"][:, -1:]], 1)
    assert held.flatten().tolist() == stream_tokens[: 3 * 16]
    assert torch.equal(ev["labels"], held[:, 1:]) and probe["input_ids"].shape == (2, 15)
    # training starts at the first document the held-out sets did not touch (no shuffling: buffer of 1)
    used_docs = next(i for i in range(len(DOCS)) if sum(len(d) + 1 for d in DOCS[: i + 1]) >= 5 * 16) + 1
    it = src.iterate(seed=0, rank=0, world=1)
    first = next(it)
    assert first["input_ids"].tolist() == [t for d in DOCS[used_docs:] for t in list(d.encode()) + [eos]][:15]


def test_hf_text_unpacked_pads_with_ignored_labels(text_json):
    src = text_source(text_json, "data.pack=false", "data.seq_len=40")
    ev = src.heldout("eval")
    for row, doc in zip(ev["labels"], DOCS):
        n = min(len(doc) + 1, 41) - 1  # predicted tokens: document + eos, truncated to seq_len + 1
        assert (row[:n] != -100).all() and (row[n:] == -100).all()


def test_hf_text_iterator_resumes_and_shards(text_json):
    src = text_source(text_json)
    full = [s["input_ids"] for s in src.iterate(seed=0, rank=0, world=1)]
    it = src.iterate(seed=0, rank=0, world=1)
    head = [next(it)["input_ids"] for _ in range(4)]
    state = json.loads(json.dumps(it.state_dict()))  # survives JSON, as in checkpoints/last
    resumed = src.iterate(seed=0, rank=0, world=1)
    resumed.load_state_dict(state)
    tail = [s["input_ids"] for s in resumed]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))
    ids = [[int(s["ids"]) for s in src.iterate(seed=0, rank=r, world=2)] for r in range(2)]
    assert not set(ids[0]) & set(ids[1])


def test_without_an_eval_split_no_process_trains_on_a_held_out_document(tmp_path):
    """The held-out documents are the first of the split and training skips them. With two files on two
    processes, splitting the files between the processes divided that skip among them: some held-out documents
    were trained on and as many others never read. Every other document is read exactly once, on 1 or 2 processes;
    a stream state saved by that split is refused with a one-line error."""
    for k in range(2):
        lines = (json.dumps({"text": d}) + "\n" for d in DOCS[30 * k : 30 * k + 30])
        (tmp_path / f"part{k}.jsonl").write_text("".join(lines))
    src = text_source(tmp_path / "part*.jsonl", "data.pack=false", "data.seq_len=40", "data.eval_size=4",
                      "data.probe_size=2")

    def text(row):
        return bytes(t for t in row.tolist() if t < 256).decode()

    held = [text(r) for split in ("eval", "probe") for r in src.heldout(split)["input_ids"]]
    assert held == DOCS[:6]
    for world in (1, 2):
        seen = [text(x["input_ids"]) for r in range(world) for x in src.iterate(seed=0, rank=r, world=world)]
        assert sorted(seen) == sorted(DOCS[6:]), world  # no held-out document, none lost, none twice
    it = src.iterate(seed=0, rank=0, world=2)
    with pytest.raises(ConfigError, match="^data.eval_split: this run's stream state was saved while"):
        it.load_state_dict({"examples": {"buffer": "a split-by-node state"}, "pending": [], "count": 0})


def test_hf_text_with_a_local_autotokenizer(text_json, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")
    tokenizer.save_pretrained(tmp_path / "tok")
    src = text_source(text_json, f"data.tokenizer={tmp_path / 'tok'}", "data.seq_len=7")
    eos = tok.token_to_id("<eos>")
    expected = [t for d in DOCS for t in tok.encode(d).ids + [eos]]
    ev = src.heldout("eval")
    assert src.info.num_classes == tok.get_vocab_size()
    assert torch.cat([ev["input_ids"], ev["labels"][:, -1:]], 1).flatten().tolist() == expected[:24]


def test_hf_text_parquet_and_a_separate_eval_split(tmp_path):
    import pandas as pd

    pd.DataFrame({"text": DOCS[:40]}).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame({"text": DOCS[40:]}).to_parquet(tmp_path / "val.parquet")
    files = json.dumps({"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "val.parquet")})
    cfg = load_config(None, ["data.source=hf_text", "data.path=parquet", f"data.data_files={files}",
                             "data.eval_split=validation", "data.seq_len=15", "data.eval_size=2",
                             "data.probe_size=1", "data.shuffle_buffer=1", "budget.steps=1"]).data
    src = cfg.build()
    def packed(docs):
        return [t for d in docs for t in list(d.encode()) + [ByteTokenizer.eos_token_id]][:15]

    assert src.heldout("eval")["input_ids"][0].tolist() == packed(DOCS[40:])
    first = next(src.iterate(seed=0, rank=0, world=1))
    assert first["input_ids"].tolist() == packed(DOCS)  # training reads its own split from the start
    # the training split as the eval split: the held-out examples would be the first the run trains on
    with pytest.raises(ConfigError, match="^data.eval_split: is the training split 'train'"):
        load_config(None, ["data.source=hf_text", "data.path=parquet", f"data.data_files={files}",
                           "data.eval_split=train", "budget.steps=1"])


@pytest.fixture
def image_parquet(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(40)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    ds = datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(40)]}, features=features)
    ds.to_parquet(tmp_path / "images.parquet")
    return tmp_path / "images.parquet", images


def test_hf_image_stream_decodes_images_and_labels(image_parquet):
    path, images = image_parquet
    src = data("data.source=hf_image", "data.path=parquet", f"data.data_files={path}", "data.eval_size=8",
               "data.probe_size=4", "data.shuffle_buffer=1").build()
    assert src.info.input_shape == (3, 8, 8) and src.info.num_classes == 3
    ev = src.heldout("eval")
    raw = (ev["x"] * src._std + src._mean) * 255
    assert torch.allclose(raw[2].permute(1, 2, 0), torch.tensor(np.asarray(images[2])).float(), atol=1e-3)
    it = src.iterate(seed=0, rank=0, world=1)
    batch = src.collate([next(it) for _ in range(5)])
    assert batch["x"].shape == (5, 3, 8, 8) and batch["y"].tolist() == [i % 3 for i in range(12, 17)]


def _resumed(src, seed=3, every=5, rank=0, world=1):
    """Every sample of one pass, and for every ``every``-th state the pass saves (through JSON, as
    checkpoints/last keeps it) the samples a fresh iterator hands out after loading it."""
    it = src.iterate(seed=seed, rank=rank, world=world)
    full, states = [], [json.loads(json.dumps(it.state_dict()))]
    for sample in it:
        full.append(sample)
        states.append(json.loads(json.dumps(it.state_dict())))
    tails = {}
    for k in range(0, len(states), every):
        again = src.iterate(seed=seed, rank=rank, world=world)
        again.load_state_dict(states[k])
        tails[k] = list(again)
    return full, tails


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_shuffle_buffered_hf_streams_resume_exactly_from_their_saved_states(text_json, image_parquet):
    """With a shuffle buffer, a resume from a saved state hands out exactly the samples the uninterrupted stream
    does (the buffer's contents are part of the state; ``datasets``' own buffer refills from its source on a
    load, so the samples after it differed); the buffer shuffles, and each example is trained on once."""
    path, _ = image_parquet
    images = ["data.source=hf_image", "data.path=parquet", f"data.data_files={path}", "data.eval_size=8",
              "data.probe_size=4"]
    cases = {"packed text": (text_source(text_json, "data.shuffle_buffer=8"), text_source(text_json)),
             "one document a sample": (text_source(text_json, "data.pack=false", "data.seq_len=40",
                                                   "data.shuffle_buffer=8"),
                                       text_source(text_json, "data.pack=false", "data.seq_len=40")),
             "images": (data(*images, "data.shuffle_buffer=8").build(), data(*images, "data.shuffle_buffer=1").build()),
             "a buffer larger than the split": (data(*images, "data.shuffle_buffer=100").build(),
                                                data(*images, "data.shuffle_buffer=1").build())}
    for case, (src, unshuffled) in cases.items():
        full, tails = _resumed(src)
        for rank in range(2 if case in ("one document a sample", "images") else 0):
            # one of two processes: every other example of the same buffered stream
            shared, shared_tails = _resumed(src, rank=rank, world=2, every=7)
            assert all(_same(tail, shared[k:]) for k, tail in shared_tails.items()), case
            if case != "packed text":  # (packed, each process packs its own examples)
                content = lambda samples: [{k: v for k, v in x.items() if k != "ids"} for x in samples]
                assert _same(content(shared), content(full[rank::2])), case
        assert len(full) > 20, case
        for k, tail in tails.items():
            assert _same(tail, full[k:]), f"{case}: resumed after {k} samples"
        key = "input_ids" if "input_ids" in full[0] else "raw"
        got = [s[key].flatten().tolist() for s in full]
        plain = [s[key].flatten().tolist() for s in unshuffled.iterate(seed=3, rank=0, world=1)]
        assert got != plain, case  # shuffled
        if case != "packed text":  # one example a sample: the same examples, each once
            assert sorted(got) == sorted(plain), case


def test_processes_that_divide_the_files_buffer_their_own_and_resume_exactly(tmp_path):
    """Two files and two processes: each process reads and buffers one file (as datasets' split does),
    shuffled, every example of it once, and resumes exactly."""
    for i, docs in enumerate((DOCS[0::2], DOCS[1::2], DOCS[:5])):
        (tmp_path / f"{'part' if i < 2 else 'heldout'}{i}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs))
    files = json.dumps({"train": str(tmp_path / "part*.jsonl"), "validation": str(tmp_path / "heldout2.jsonl")})
    src = data("data.source=hf_text", "data.path=json", f"data.data_files={files}", "data.eval_split=validation",
               "data.pack=false", "data.seq_len=40", "data.eval_size=2", "data.probe_size=1",
               "data.shuffle_buffer=8").build()
    eos = ByteTokenizer.eos_token_id
    seen = []
    for rank in range(2):
        full, tails = _resumed(src, rank=rank, world=2)
        assert all(_same(tail, full[k:]) for k, tail in tails.items())
        docs = [bytes(t for t in s["input_ids"].tolist() if t != eos).decode() for s in full]
        part = {d.strip() for d in DOCS[0::2]} if {d.strip() for d in docs} <= {d.strip() for d in DOCS[0::2]} \
            else {d.strip() for d in DOCS[1::2]}
        assert sorted(d.strip() for d in docs) == sorted(part) and docs != sorted(docs, key=DOCS.index)
        seen.append(part)
    assert seen[0] != seen[1]


def test_offline_regime_on_a_streaming_source_holds_the_subset_in_memory(text_json):
    cfg = load_config(None, ["data.source=hf_text", "data.path=json", f"data.data_files={text_json}",
                             "data.seq_len=15", "data.eval_size=3", "data.probe_size=2", "data.epochs=3",
                             "data.train_size=10", "budget.steps=1"]).data
    stream = build_stream(cfg.build(), cfg, seed=0, batch_size=5, micro_batch_size=5)
    seen = []
    while True:
        try:
            seen += stream.next_step()[0]["ids"].tolist()
        except Exception:
            break
    assert sorted(seen) == sorted(list(range(10)) * 3)


def test_hf_text_tokenises_documents_in_batches_with_the_one_by_one_samples_and_states(text_json, tmp_path):
    """Read ahead and tokenised 64 at a time, the samples and every state a resume would save are those of
    reading and tokenising one document at a time through transformers; a resume from each state agrees. The
    tokenizer's file sets truncation and padding, as many hub tokenizers' do: the batched Rust calls padded
    every document to the batch's longest and cut long ones, where transformers' encode turns both off."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path / "bpe")
    saved = json.loads((tmp_path / "bpe" / "tokenizer.json").read_text())
    saved["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    saved["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                        "pad_id": tok.token_to_id("<eos>"), "pad_type_id": 0, "pad_token": "<eos>"}
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps(saved))
    assert AutoTokenizer.from_pretrained(tmp_path / "bpe").backend_tokenizer.truncation is not None
    for pack in ("true", "false"):
        src = text_source(text_json, f"data.tokenizer={tmp_path / 'bpe'}", "data.seq_len=7", f"data.pack={pack}",
                          "data.shuffle_buffer=8")
        one = text_source(text_json, f"data.tokenizer={tmp_path / 'bpe'}", "data.seq_len=7", f"data.pack={pack}",
                          "data.shuffle_buffer=8")
        one.read_ahead = 1
        one.prepare = lambda examples, one=one: [one.tokenizer.encode(e["text"], add_special_tokens=False)
                                                 for e in examples]
        assert src.read_ahead > 1

        def run(source, state=None):
            it = source.iterate(seed=2, rank=0, world=1)
            if state is not None:
                it.load_state_dict(json.loads(json.dumps(state)))
            return [(s["input_ids"], s["labels"], it.state_dict()) for s in it]

        got, want = run(src), run(one)
        assert len(got) == len(want) > 20
        for (a, la, sa), (b, lb, sb) in zip(got, want):
            assert torch.equal(a, b) and torch.equal(la, lb) and sa == sb
        for k in (0, 5, 13):  # resumed from a saved state (the shuffle buffer refills alike)
            again, ref = run(src, want[k][2]), run(one, want[k][2])
            assert len(again) == len(ref) and all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(again, ref))


def test_a_stream_state_from_datasets_own_shuffle_buffer_is_refused_in_one_line(text_json):
    from goldenpath.config import ConfigError

    it = text_source(text_json, "data.shuffle_buffer=8").iterate(seed=0, rank=0, world=1)
    with pytest.raises(ConfigError, match="data.shuffle_buffer: .*earlier goldenpath.*from the start"):
        it.load_state_dict({"dataset": {}, "pending": [], "count": 3})
