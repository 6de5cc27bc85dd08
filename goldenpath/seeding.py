"""Seeding: every random stream of goldenpath is named by integers, never by global RNG state.

- ``stream_key(*parts)``: a 64-bit key for one stream (seed, split, purpose, step), mixed by numpy's
  SeedSequence; ``seeded_generator(*parts)``: a torch CPU generator from the same kind of key.
- ``setting_seed(knobs, replicate)``: the seed of one replicate of one setting in a sweep with independent
  seeds, a function of the setting's knobs and the replicate index alone;
- ``counter_uniform`` / ``counter_normal``: counter-based draws (splitmix64), entry (i, j) a function of
  (key, index i, counter j) alone, so a sample's values depend on its stream position and nothing else:
  resume, sharding and replay reproduce them exactly without saved state.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch

_MASK64 = 2**64


def _signed(x: int) -> int:
    x %= _MASK64
    return x - _MASK64 if x >= 2**63 else x


_M1, _M2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key for one random stream (e.g. data seed, split, purpose)."""
    return _stream_key(tuple(int(p) for p in parts))


@lru_cache(maxsize=256)
def _stream_key(parts: tuple[int, ...]) -> int:
    return _signed(int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0]))


class Purpose:
    """What each random stream is for: the number that keys it apart from every other stream of the same seed
    (``stream_key(seed, Purpose.X, ...)``, ``seeded_generator(seed, Purpose.X, ...)``). A value changed here
    changes every run that draws from that stream."""

    SUBSET = 1          # an offline run's training subset: disjoint blocks of one permutation of a finite pool
    ORDER = 2           # an online run's order over a finite pool
    EPOCH = 3           # an offline run's order within each epoch (with the epoch)
    HELDOUT = 4         # a finite source's held-out rows, split into the eval and probe sets
    INIT = 5            # a model's initialisation
    BUFFER = 6          # a streaming dataset's shuffle buffer (with the process's rank)
    TEACHER = 10        # the teacher network of the teacher source
    SECOND_TEACHER = 11  # its second teacher (data.mix)
    MARKOV_TABLE = 20   # the Markov source's transition table
    SHIFT = 30          # a shifted probe set's perturbations
    PROBES = 0xBA5E     # the random probes of the trivial-loss baselines
    SETTING = 0x5E7714  # a sweep's setting seeds (independent design)
    NOISE = 0x6E6F697365  # ("noise") the injected noise of each optimizer step
    FORK = 0x666F726B   # ("fork") a fork's own noise seed, from its seed and fork step

    # Within one split of an embedded source (``stream_key(seed, split, Purpose.X)``):
    IMAGES = 0          # the teacher's images
    LABELS = 1          # the teacher's labels
    TOKENS = 2          # the Markov source's tokens
    MIXED = 3           # which samples take the second teacher's label (data.mix)


SEED_SPACE = 2**20  # run seeds: online streams read pool indices seed * 2**40 + position (streams.ONLINE_STRIDE)


def setting_seed(knobs: dict, replicate: int, attempt: int = 0) -> int:
    """The run seed of replicate ``replicate`` of the setting ``knobs`` (dotted key -> value; the keys that
    vary in the sweep): a hash of both, in [0, 2**20). Every (setting, replicate) gets its own initialisation,
    stream order and noise draws; ``attempt`` draws another seed where two points of a sweep collide."""
    text = json.dumps(knobs, sort_keys=True, default=str)
    setting = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big")
    return stream_key(Purpose.SETTING, setting, replicate, attempt) % SEED_SPACE


def counter_uniform(key: int, index: torch.Tensor, counters: int | torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 of shape [len(index), n]: entry (i, j) depends only on (key, index[i], j)."""
    if isinstance(counters, int):
        counters = torch.arange(counters, dtype=torch.int64, device=index.device)
    x = _mix(_mix(index.to(torch.int64)[:, None] ^ key) + counters[None, :] * _GOLDEN)
    return (_shr(x, 11).to(torch.float64) + 0.5) * 2.0**-53


def counter_normal(key: int, index: torch.Tensor, counters: int | torch.Tensor) -> torch.Tensor:
    """Standard normal float64 of shape [len(index), n], by the inverse CDF of counter_uniform."""
    return torch.special.ndtri(counter_uniform(key, index, counters))


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from several integers (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
