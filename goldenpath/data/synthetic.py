"""Embedded infinite streams with an exactly known Bayes-optimal loss: teacher images and Markov text.

Every sample is a pure function of (data seed, split, sample index): random numbers come from a
counter-based hash (splitmix64) evaluated on whole tensors, so a sample costs no state, any index can be
produced on demand, and resuming is free. Nothing is downloaded and nothing large is stored.

* **teacher** (vision): smooth random images (band-limited Gaussian fields, unit pixel variance; 3 x 16 x 16
  by default), labels
  ``y ~ softmax(T(x) / temperature)`` from a fixed random CNN ``T``. Bayes-optimal loss on the eval set:
  ``mean_x H(softmax(T(x) / temperature))``. Images are computed in float64 and rounded, so a sample's
  pixels do not depend on the batch it is generated in. The teacher runs in float32, whose logits can move
  by ~1e-6 with the batch they are computed in, which would change a label where its uniform draw lies that
  close to a class boundary (about one sample in 10^6); so consecutive training indices (an online stream,
  an offline subset made whole) are made in aligned blocks (:meth:`TeacherStream.train_batch`) and a label
  depends on its index alone: not on the batch size, the micro-batch or the number of processes. Only
  indices asked for out of order (an offline subset too large to hold, made step by step) are made in the
  batch they are asked in. ``mix`` plants a difference of graded strength: that fraction of
  the *training* samples (chosen by sample id) is labelled by a second, independent teacher, so a run
  learns a mixture of the two; eval and probe labels stay the first teacher's (the power curve of
  ``analysis/golden_path.py``).
* **markov** (text): an order-``k`` source over ``vocab_size`` tokens; the next-token logits of each context
  are ``sharpness * N(0, 1)`` hashed from the context, so the source is infinite and stores nothing (the
  table is cached when small). The first ``k`` tokens of a sequence are uniform. Bayes-optimal loss: the
  mean conditional entropy of every predicted eval token given its context.

**Where samples are made** (``data.generate``): ``cpu`` (default) makes every batch on the CPU; ``device``
makes the *training* batches on the run's device (a GPU is then fed at its own rate, with no host-to-device
copy), while the eval and probe sets stay CPU-made, so targets, floors and comparisons do not depend on the
device. The counter-based draws are integer hashes, exact on any device. On a device the teacher runs in
float64 (on the CPU in float32): a teacher image equals the CPU's up to float32 rounding of a float64 value
and a label differs only where its uniform lies within the CPU teacher's float32 error (~1e-6) of a class
boundary, about one sample in 10^6. Markov tokens with the next-token table cached (vocab_size ** (order + 1)
<= 2**22) are gathers and searches on the same float64 table: identical to the CPU's. On a CUDA device the
teacher's aligned blocks hold BLOCK_CUDA samples, so making a batch costs a few kernels a step, not ~80.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from goldenpath.config import DataConfig, data_source, require
from goldenpath.data.streams import Batch, SourceInfo
from goldenpath.seeding import Purpose, counter_normal, counter_uniform, stream_key

SPLITS = {"train": 0, "eval": 1, "probe": 2}

# ----------------------------------------------------------------------------- counter-based randomness

def _cdf(probs: torch.Tensor) -> torch.Tensor:
    cdf = probs.to(torch.float64).cumsum(-1)
    return (cdf / cdf[..., -1:]).contiguous()


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from each row of ``probs`` ([N, K]) with uniforms ``u`` ([N])."""
    draw = torch.searchsorted(_cdf(probs), u.to(torch.float64).reshape(-1, 1).contiguous()).squeeze(-1)
    return draw.clamp_max(probs.shape[-1] - 1)


def _consecutive(index: torch.Tensor) -> bool:
    """Whether ``index`` (a CPU tensor) is a non-empty run of consecutive indices (what a stream's step reads)."""
    return len(index) > 0 and bool((index[1:] - index[:-1] == 1).all())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dim, in float64."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _check_generate(value: str) -> None:
    require(value in ("cpu", "device"), "data.generate", f"got {value!r}",
            "use cpu (batches made on the CPU) or device (training batches made on the run's device)")


def _resolved(device: torch.device | str) -> torch.device:
    """``device`` with its index (cuda -> cuda:N, the current one), as the tensors made there report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ----------------------------------------------------------------------------- teacher vision stream

@data_source("teacher")
@dataclass(frozen=True)
class TeacherData(DataConfig):
    """Smooth random images labelled by a fixed random CNN teacher (embedded, infinite)."""

    source: str = "teacher"
    image_size: int = 16           # 16 x 16: small models learn most of the way to the floor on a CPU
    channels: int = 3
    classes: int = 10
    max_frequency: int = 2         # highest spatial frequency (cycles per image) of the random fields
    temperature: float = 0.5       # labels ~ softmax(T(x) / temperature), T's logits standardised
    teacher_width: int = 16        # channels of the teacher CNN
    mix: float = 0.0               # a planted difference: this fraction of training labels (never eval or
                                   # probe ones) is drawn from a second, independent teacher
    generate: str = "cpu"          # where training batches are made: cpu, or device (the run's; module docstring)

    def check(self) -> None:
        super().check()
        _check_generate(self.generate)
        require(0.0 <= self.mix <= 1.0, "data.mix", f"got {self.mix}", "use a fraction in [0, 1]")
        require(self.image_size >= 8, "data.image_size", f"got {self.image_size}", "use >= 8 pixels")
        require(self.channels >= 1, "data.channels", f"got {self.channels}", "use >= 1")
        require(self.classes >= 2, "data.classes", f"got {self.classes}", "use >= 2 classes")
        require(1 <= self.max_frequency <= self.image_size // 2, "data.max_frequency",
                f"got {self.max_frequency}", f"use 1..{self.image_size // 2}")
        require(self.temperature > 0, "data.temperature", f"got {self.temperature}", "use a positive temperature")
        require(self.teacher_width >= 1, "data.teacher_width", f"got {self.teacher_width}", "use >= 1")

    def build(self) -> TeacherStream:
        return TeacherStream(self)


class TeacherStream:
    """The teacher vision source (random access by sample index; see module docstring)."""

    size = None
    BLOCK_CPU = 128    # training samples made in one call, as aligned blocks (train_batch)
    BLOCK_CUDA = 8192

    def __init__(self, cfg: TeacherData):
        self.cfg = cfg
        self.info = SourceInfo("classification", (cfg.channels, cfg.image_size, cfg.image_size), cfg.classes)
        self._basis = self._fourier_basis()
        self.teacher = self._cached_teacher()
        self.second = self._cached_teacher(purpose=Purpose.SECOND_TEACHER) if cfg.mix > 0 else None
        self._train = (self._basis, self.teacher, self.second)  # what makes training batches (place() moves it)
        self._heldout: dict[str, Batch] = {}  # eval and probe sets, made on first use
        self._block: tuple[int, Batch] | None = None  # (block, batch): the last aligned block (place() drops it)

    def place(self, device: torch.device | str) -> TeacherStream:
        """Make training batches on ``device`` from now on (data.generate=device): the basis and float64 copies
        of the teachers move there; held-out sets stay CPU-made. Returns self."""
        device = _resolved(device)
        on = lambda net: None if net is None else copy.deepcopy(net).to(device, torch.float64)  # noqa: E731
        self._train = (self._basis.to(device), on(self.teacher), on(self.second))
        self._block = None
        return self

    def _fourier_basis(self) -> torch.Tensor:
        """[2M, H*W]: cos and sin of the M modes with |kx|, |ky| <= K, weighted ~ 1/(1+|k|), unit pixel variance."""
        k, n = self.cfg.max_frequency, self.cfg.image_size
        grid = torch.arange(n, dtype=torch.float64)
        rows = []
        for kx in range(-k, k + 1):
            for ky in range(0, k + 1):
                if ky == 0 and kx < 0:
                    continue  # (kx, 0) and (-kx, 0) are the same real mode
                phase = 2 * math.pi * (kx * grid[:, None] + ky * grid[None, :]) / n
                w = 1.0 / (1.0 + math.hypot(kx, ky))
                rows += [w * torch.cos(phase).flatten(), w * torch.sin(phase).flatten()]
        basis = torch.stack(rows)
        # Each mode contributes w^2 (cos^2 + sin^2) = w^2 to every pixel's variance (sin of mode 0 is 0).
        return basis / basis.pow(2).sum(0).mean().sqrt()

    def _teacher_net(self) -> nn.Module:
        c, w = self.cfg.channels, self.cfg.teacher_width
        return nn.Sequential(
            nn.Conv2d(c, w, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(w * 16, self.cfg.classes))

    def _cached_teacher(self, purpose: int = Purpose.TEACHER) -> nn.Module:
        """The calibrated teacher, from the disk cache when this exact code and config made it before.

        Calibration is a float64 forward over 4096 images (about half a second on a CPU), paid by every
        process that builds the source. The cache key hashes this file's code and that of the seeding it draws
        from (``goldenpath/seeding.py``: the teacher's weights and calibration images), the config fields
        that shape the teacher, the stream's purpose and the torch version, so any change rebuilds it; a bad
        file is rebuilt too.
        """
        from goldenpath import seeding
        from goldenpath.store.files import atomic_write, cache_dir

        fields = (self.cfg.seed, self.cfg.channels, self.cfg.image_size, self.cfg.classes,
                  self.cfg.max_frequency, self.cfg.teacher_width, torch.__version__, int(purpose))
        code = Path(__file__).read_bytes() + Path(seeding.__file__).read_bytes()
        key = hashlib.sha1(code + repr(fields).encode()).hexdigest()[:20]
        path = cache_dir() / f"teacher-{key}.pt"
        try:
            net = self._teacher_net()
            net.load_state_dict(torch.load(path, weights_only=True))
            return net.requires_grad_(False).eval()
        except Exception:  # noqa: BLE001 - missing, torn or foreign: calibrate and cache
            net = self._make_teacher(purpose)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(net.state_dict(), tmp), durable=False)
        except OSError:  # a read-only home: calibrate every time
            pass
        return net

    def _make_teacher(self, purpose: int = Purpose.TEACHER) -> nn.Module:
        g = torch.Generator().manual_seed(stream_key(self.cfg.seed, purpose) & (2**63 - 1))
        net = self._teacher_net()
        with torch.no_grad():
            for p in net.parameters():
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (math.sqrt(2.0 / fan_in) if p.dim() > 1 else 0.0))
            # Standardise the logits on a calibration set so `temperature` alone sets the label noise.
            x = self._images(SPLITS["train"] + 100, torch.arange(4096)).double()
            net.double()
            z = net(x)
            last = net[-1]
            last.bias.sub_(z.mean(0))
            scale = (z - z.mean(0)).std()
            last.weight.div_(scale), last.bias.div_(scale)
        return net.float().requires_grad_(False).eval()

    def _images(self, split: int, index: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C, H, W] float32 images on ``basis``'s device (default: the CPU's basis)."""
        c, n = self.cfg.channels, self.cfg.image_size
        basis = self._basis if basis is None else basis
        # float64 then rounded: a sample's pixels do not depend on which batch it is generated in
        z = counter_normal(stream_key(self.cfg.seed, split, Purpose.IMAGES), index.to(basis.device), c * len(basis))
        return (z.view(-1, c, len(basis)) @ basis).view(-1, c, n, n).to(torch.float32)

    def logits(self, x: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
        """The teacher's tempered logits T(x) / temperature (the log of the true label distribution + const)."""
        teacher = self.teacher if teacher is None else teacher
        with torch.inference_mode():
            z = x.to(teacher[0].weight.dtype)  # a float64 teacher (data.generate=device) sees the same pixels
            for layer in teacher:
                # adaptive pooling to 4 x 4 of a 4 x 4 map averages single pixels: the identity, exactly
                if not (isinstance(layer, nn.AdaptiveAvgPool2d) and z.shape[-2:] == (4, 4)):
                    z = layer(z)
        return z.double() / self.cfg.temperature  # outside inference mode: ordinary tensors for the trainer

    def _batch(self, split: str, index: torch.Tensor) -> Batch:
        basis, teacher, second = self._train if split == "train" else (self._basis, self.teacher, self.second)
        at = index.to(basis.device)  # ids stay where the stream made them (the CPU)
        x = self._images(SPLITS[split], at, basis)
        u = counter_uniform(stream_key(self.cfg.seed, SPLITS[split], Purpose.LABELS), at, 1)[:, 0]
        probs = torch.softmax(self.logits(x, teacher), -1)
        if split == "train" and second is not None:  # which samples the second teacher labels: by id
            other = counter_uniform(stream_key(self.cfg.seed, SPLITS[split], Purpose.MIXED), at, 1)[:, 0] < self.cfg.mix
            probs = torch.where(other[:, None], torch.softmax(self.logits(x, second), -1), probs)
        y = sample_categorical(probs, u)
        return {"ids": index.clone(), "x": x, "y": y}

    def train_batch(self, index: torch.Tensor) -> Batch:
        """The samples at these indices. A contiguous run of indices (an online stream's) is cut from aligned
        blocks: block b holds indices [b S, (b + 1) S) and is always made whole, in one call, so a sample's
        label depends on its index alone, not on the batch size, the micro-batch size or the number of
        processes, and a block's one generation serves many steps (S = BLOCK_CUDA samples where a GPU makes
        them: ~80 kernels a block instead of a step; BLOCK_CPU on a CPU, where larger blocks run no faster and
        a prefetched step would wait for them). Other indices (an offline subset too large to hold, in its
        shuffled order) are made as asked."""
        if not _consecutive(index):
            return self._batch("train", index)
        size = self.BLOCK_CUDA if self._train[0].device.type == "cuda" else self.BLOCK_CPU
        n, lo = len(index), int(index[0])
        parts = []
        for b in range(lo // size, (lo + n - 1) // size + 1):
            if self._block is None or self._block[0] != b:
                self._block = (b, self._batch("train", torch.arange(b * size, (b + 1) * size)))
            first = max(lo - b * size, 0)
            parts.append({k: v[first : min(lo + n - b * size, size)] for k, v in self._block[1].items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # a copy, also of a single part

    def heldout(self, split: str) -> Batch:
        """The eval or probe set, made on first use (compare needs only the probe set)."""
        if split not in self._heldout:
            self._heldout[split] = self._batch(split, torch.arange({"eval": self.cfg.eval_size,
                                                                     "probe": self.cfg.probe_size}[split]))
        return self._heldout[split]

    def loss_floor(self) -> float:
        return float(entropy(self.logits(self.heldout("eval")["x"])).mean())


# ----------------------------------------------------------------------------- Markov text stream

@data_source("markov")
@dataclass(frozen=True)
class MarkovData(DataConfig):
    """Order-k Markov text with hashed next-token distributions (embedded, infinite)."""

    source: str = "markov"
    eval_size: int = 256           # sequences
    probe_size: int = 128          # sequences
    vocab_size: int = 32
    order: int = 2                 # tokens of context that set the next-token distribution
    seq_len: int = 64              # predicted tokens per sequence (a sample holds seq_len + 1 tokens)
    sharpness: float = 2.0         # std of the random next-token logits: larger = lower entropy
    generate: str = "cpu"          # where training batches are made: cpu, or device (the run's; module docstring)

    def check(self) -> None:
        super().check()
        _check_generate(self.generate)
        require(self.vocab_size >= 2, "data.vocab_size", f"got {self.vocab_size}", "use >= 2 tokens")
        require(self.order >= 1, "data.order", f"got {self.order}", "use an order >= 1")
        require(self.vocab_size ** self.order < 2**62, "data.order", "too many contexts for 64-bit codes",
                "lower data.order or data.vocab_size")
        require(self.seq_len > self.order, "data.seq_len", f"got {self.seq_len}",
                f"use more than data.order={self.order} tokens")
        require(self.sharpness > 0, "data.sharpness", f"got {self.sharpness}", "use a positive value")

    def build(self) -> MarkovStream:
        return MarkovStream(self)


class MarkovStream:
    """The Markov text source (random access by sequence index; see module docstring)."""

    size = None
    TABLE_LIMIT = 2**22  # cache the whole next-token table when it has at most this many entries
    READ_AHEAD = 1024    # sequences generated at once for contiguous reads (about 25x a micro-batch of 16's rate)

    def __init__(self, cfg: MarkovData):
        self.cfg = cfg
        self.info = SourceInfo("lm", (cfg.seq_len,), cfg.vocab_size)
        self._table_key = stream_key(cfg.seed, Purpose.MARKOV_TABLE)
        n_contexts = cfg.vocab_size ** cfg.order
        self._table = self._cdf = None
        self._ahead: tuple[int, Batch] | None = None  # (first index, block) of the read-ahead
        if n_contexts * cfg.vocab_size <= self.TABLE_LIMIT:
            self._table = self._logits_of(torch.arange(n_contexts))
            self._cdf = _cdf(torch.softmax(self._table, -1))
        self._device = torch.device("cpu")  # where training sequences are made
        self._cdfs = {self._device: self._cdf}

    def place(self, device: torch.device | str) -> MarkovStream:
        """Make training sequences on ``device`` from now on (data.generate=device); held-out sets stay
        CPU-made. Returns self."""
        self._device, self._ahead = _resolved(device), None
        self._cdfs.setdefault(self._device, None if self._cdf is None else self._cdf.to(self._device))
        return self

    def _logits_of(self, context: torch.Tensor) -> torch.Tensor:
        return self.cfg.sharpness * counter_normal(self._table_key, context, self.cfg.vocab_size)

    def next_logits(self, context: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float64, [N, V]) for context codes sum_j token_{t-k+j} * V**j."""
        return self._table[context] if self._table is not None else self._logits_of(context)

    def context_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] tokens -> [N, L - k + 1] codes of every window of k consecutive tokens."""
        k, v = self.cfg.order, self.cfg.vocab_size
        weights = v ** torch.arange(k, dtype=torch.int64)
        return (tokens.unfold(1, k, 1) * weights).sum(-1)

    def sequences(self, split: str, index: torch.Tensor) -> torch.Tensor:
        """[N, seq_len + 1] int64 token sequences."""
        cfg = self.cfg
        length = cfg.seq_len + 1
        at = index.to(self._device) if split == "train" else index
        return self._tokens(counter_uniform(stream_key(cfg.seed, SPLITS[split], Purpose.TOKENS), at, length))

    def _tokens(self, u: torch.Tensor) -> torch.Tensor:
        """[N, seq_len + 1] sequences from their uniforms (row i from row i of ``u`` alone)."""
        cfg, n = self.cfg, len(u)
        length, k, v = cfg.seq_len + 1, cfg.order, cfg.vocab_size
        table = self._cdfs[u.device] if self._cdf is not None else None  # made on u's device
        tokens = torch.empty(n, length, dtype=torch.int64, device=u.device)
        tokens[:, :k] = (u[:, :k] * v).long().clamp_max(v - 1)
        code = (tokens[:, :k] * v ** torch.arange(k, device=u.device)).sum(-1)
        newest = v ** (k - 1)
        u_t = u.T.contiguous()  # [length, N]: each step reads one contiguous row
        for t in range(k, length):
            cdf = table[code] if table is not None else _cdf(torch.softmax(self._logits_of(code), -1))
            token = torch.searchsorted(cdf, u_t[t].unsqueeze(1)).squeeze(1).clamp_max_(v - 1)
            tokens[:, t] = token
            code = code // v + token * newest  # drop the oldest token, append the new one
        return tokens

    def _batch(self, split: str, index: torch.Tensor) -> Batch:
        seq = self.sequences(split, index)  # on the training device for "train"; ids stay on the CPU
        return {"ids": index.clone(), "input_ids": seq[:, :-1], "labels": seq[:, 1:]}

    def train_batch(self, index: torch.Tensor) -> Batch:
        """The sequences at these indices; a contiguous run of indices is served from a read-ahead block.

        Generation loops over token positions, so its cost is per position, not per sequence: a block of
        READ_AHEAD sequences costs little more than one micro-batch. Every sequence is a pure function of
        its index, so the block gives exactly the tokens a direct call would.
        """
        if not _consecutive(index):
            return self._batch("train", index)
        n, lo, block = len(index), int(index[0]), self._ahead
        if block is None or not (block[0] <= lo and lo + n <= block[0] + len(block[1]["ids"])):
            block = self._ahead = (lo, self._batch("train", torch.arange(lo, lo + max(n, self.READ_AHEAD))))
        off = lo - block[0]
        return {k: v[off : off + n].clone() for k, v in block[1].items()}

    def heldout(self, split: str) -> Batch:
        return self._heldout[split]

    @cached_property
    def _heldout(self) -> dict[str, Batch]:
        """The eval and probe sets. With the table cached, a token is a gather and a search in its own row, so
        both sets are generated in one pass over the positions (the cost is per position)."""
        sizes = {"eval": self.cfg.eval_size, "probe": self.cfg.probe_size}
        if self._cdf is None:
            return {s: self._batch(s, torch.arange(n)) for s, n in sizes.items()}
        u = [counter_uniform(stream_key(self.cfg.seed, SPLITS[s], Purpose.TOKENS), torch.arange(n),
                             self.cfg.seq_len + 1) for s, n in sizes.items()]
        seqs = self._tokens(torch.cat(u)).split(list(sizes.values()))
        return {s: {"ids": torch.arange(n), "input_ids": seq[:, :-1], "labels": seq[:, 1:]}
                for (s, n), seq in zip(sizes.items(), seqs)}

    def token_entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] sequences -> [N, L - 1] Bayes entropy of each predicted token given everything before it."""
        k, v = self.cfg.order, self.cfg.vocab_size
        n, length = tokens.shape
        out = torch.full((n, length - 1), math.log(v), dtype=torch.float64)  # first k - 1 targets: uniform
        codes = self.context_codes(tokens[:, :-1])  # contexts ending at positions k-1 .. L-2
        out[:, k - 1:] = entropy(self.next_logits(codes.flatten())).view(n, -1)
        return out

    def loss_floor(self) -> float:
        ev = self.heldout("eval")
        seq = torch.cat([ev["input_ids"], ev["labels"][:, -1:]], 1)
        return float(self.token_entropies(seq).mean())
