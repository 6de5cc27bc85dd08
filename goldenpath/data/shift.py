"""Off-distribution probe sets: a source's probe set moved off the training distribution, where models that
agree in-distribution may part.

    goldenpath compare SWEEP_DIR --probe-shift noise:0.5

A shift is spelled ``KIND:VALUE``:

- ``noise:SIGMA`` (images): every pixel plus SIGMA x N(0, 1) (the embedded and real image sources have
  about unit pixel variance, so SIGMA is a noise-to-signal ratio);
- ``contrast:C`` (images): each image pulled towards its own mean pixel, m + C (x - m) (C < 1 lowers the
  contrast, C > 1 raises it);
- ``shuffle:F`` (text): in each sequence, a fraction F of the token positions, drawn at random, permuted
  among themselves (F = 1: a random permutation of the whole sequence); labels follow the tokens;
- ``source:KEY=VALUE[,KEY=VALUE...]`` (any task): the probe set of the same data section with
  ``data.KEY=VALUE``, e.g. ``source:seed=7`` (another Markov chain, or another teacher's images and labels)
  or ``source:sharpness=1`` (a smoother chain); its task, input shape and classes must stay the same.

Images keep their labels (the clean image's). Random draws are pure functions of (data seed, sample id),
so a shifted probe is the same for every run and every chunking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from goldenpath.config import ConfigError, DataConfig, apply_overrides, config_from_dict, require, to_dict
from goldenpath.data.streams import Batch
from goldenpath.seeding import Purpose, counter_normal, counter_uniform, stream_key

FIELD = "--probe-shift"
SPELLINGS = "noise:SIGMA or contrast:C (images), shuffle:F (text), source:KEY=VALUE (any)"


@dataclass(frozen=True)
class Shift:
    """A parsed shift: its kind and either a number (noise, contrast, shuffle) or data overrides (source)."""

    kind: str
    value: float | None = None
    overrides: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        return f"{self.kind}:{','.join(self.overrides) if self.kind == 'source' else f'{self.value:g}'}"

    @property
    def slug(self) -> str:
        """A directory-safe name, e.g. ``noise-0.5`` or ``source-seed=7``."""
        return self.spec.replace(":", "-").replace(",", "_").replace("/", "_")


def parse_shift(spec: str | Shift) -> Shift:
    """``'noise:0.5'`` -> Shift('noise', 0.5); bad spellings raise ConfigError naming --probe-shift."""
    if isinstance(spec, Shift):
        return spec
    kind, sep, value = str(spec).partition(":")
    kind = kind.strip()
    require(bool(sep) and kind in (*_NUMERIC, "source"), FIELD, f"cannot read {spec!r}", f"write {SPELLINGS}")
    if kind == "source":
        overrides = tuple(o.strip() for o in value.split(",") if o.strip())
        require(bool(overrides) and all("=" in o for o in overrides), FIELD, f"{spec!r} names no data keys",
                "write source:KEY=VALUE, e.g. source:seed=7")
        return Shift("source", overrides=overrides)
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(FIELD, f"{kind} needs a number, got {value!r}", f"write e.g. {_EXAMPLE[kind]}") from None
    low, high = _NUMERIC[kind]
    require(low < number <= high and math.isfinite(number), FIELD, f"{kind}:{value} is out of range",
            f"use {'0 < F <= 1' if kind == 'shuffle' else 'a positive value'}, e.g. {_EXAMPLE[kind]}")
    return Shift(kind, number)


def probe_shift(data: DataConfig, spec: str | Shift, *, source=None) -> Batch:
    """The probe set of ``data`` under the shift ``spec`` (module docstring for the spellings).

    ``source``: ``data.build()`` when already built (its probe set is the one shifted).
    """
    shift = parse_shift(spec)
    source = source if source is not None else data.build()
    if shift.kind == "source":
        return _other_source(data, shift, source.info)
    task = source.info.task
    want = "lm" if shift.kind == "shuffle" else "classification"
    require(task == want, FIELD, f"{shift.kind} applies to {'text' if want == 'lm' else 'images'}, the probe is "
            f"{'text' if task == 'lm' else 'images'}",
            "use shuffle:F or source:KEY=VALUE for text" if task == "lm" else "use noise:SIGMA or contrast:C")
    probe = source.heldout("probe")
    key = stream_key(data.seed, Purpose.SHIFT, list(_KINDS).index(shift.kind))
    return {**probe, **_KINDS[shift.kind](probe, shift.value, key)}


def _noise(probe: Batch, sigma: float, key: int) -> Batch:
    x = probe["x"]
    z = counter_normal(key, probe["ids"], x[0].numel()).view_as(x)
    return {"x": (x.double() + sigma * z).to(x.dtype)}


def _contrast(probe: Batch, c: float, key: int) -> Batch:
    x = probe["x"].double()
    mean = x.flatten(1).mean(1).view(-1, *[1] * (x.dim() - 1))
    return {"x": (mean + c * (x - mean)).to(probe["x"].dtype)}


def _shuffle(probe: Batch, fraction: float, key: int) -> Batch:
    """Permute a random fraction of each sequence's real tokens among themselves; padding stays in place."""
    labels = probe["labels"]
    tokens = torch.cat([probe["input_ids"], labels[:, -1:].clamp_min(0)], 1)  # the whole sequence [N, T + 1]
    n, length = tokens.shape
    real = torch.cat([torch.ones(n, 1, dtype=torch.bool), labels != -100], 1)
    u = counter_uniform(key, probe["ids"], 2 * length)
    chosen = (u[:, :length] < fraction) & real
    pos = torch.arange(length, dtype=torch.float64).expand(n, -1)
    # chosen positions first (in random order for the sources, in place order for the destinations), then the
    # others in place order on both sides: the others map to themselves
    src = torch.argsort(torch.where(chosen, u[:, length:], 2.0 + pos), 1)
    dst = torch.argsort(torch.where(chosen, pos, length + pos), 1)
    perm = torch.empty_like(src).scatter_(1, dst, src)
    shuffled = tokens.gather(1, perm)
    new_labels = torch.where(labels == -100, labels, shuffled[:, 1:])
    return {"input_ids": shuffled[:, :-1], "labels": new_labels}


def _other_source(data: DataConfig, shift: Shift, info) -> Batch:
    raw = apply_overrides({"data": to_dict(data)}, [f"data.{o}" for o in shift.overrides])
    other = config_from_dict(raw).data
    require(to_dict(other) != to_dict(data), FIELD, f"{shift.spec} leaves the data section as it is",
            "change a key to another value, e.g. source:seed=7")
    built = other.build()
    require(built.info == info, FIELD, f"{shift.spec} changes the data's task, input shape or classes "
            f"({built.info} instead of {info})", "change only keys that keep them, e.g. source:seed=7")
    return built.heldout("probe")


_KINDS = {"noise": _noise, "contrast": _contrast, "shuffle": _shuffle}
_NUMERIC = {"noise": (0.0, math.inf), "contrast": (0.0, math.inf), "shuffle": (0.0, 1.0)}
_EXAMPLE = {"noise": "noise:0.5", "contrast": "contrast:0.5", "shuffle": "shuffle:0.3"}
