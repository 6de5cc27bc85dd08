"""Shifted probe sets: each kind against what it must do to the clean probe, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from goldenpath.config import ConfigError, load_config
from goldenpath.data import probe_shift
from goldenpath.data.shift import parse_shift

from .conftest import TINY_MARKOV, TINY_TEACHER


def data(overrides, *extra):
    return load_config(None, [*overrides, *extra]).data


def test_noise_adds_gaussian_pixels_of_the_asked_std_that_depend_only_on_the_sample():
    small, big = data(TINY_TEACHER), data(TINY_TEACHER, "data.probe_size=256")
    clean = big.build().heldout("probe")
    shifted = probe_shift(big, "noise:0.5")
    z = (shifted["x"] - clean["x"]).double()
    assert z.std().item() == pytest.approx(0.5, rel=0.02) and abs(z.mean().item()) < 0.01
    assert torch.equal(shifted["y"], clean["y"]) and torch.equal(shifted["ids"], clean["ids"])
    # per sample id: the first 64 of a 256-image probe are the 64-image probe, shifted the same way
    assert torch.equal(probe_shift(small, "noise:0.5")["x"], shifted["x"][:64])
    assert torch.equal(probe_shift(big, "noise:0.5")["x"], shifted["x"])  # deterministic


def test_contrast_scales_each_image_about_its_own_mean():
    d = data(TINY_TEACHER)
    clean = d.build().heldout("probe")["x"].double()
    got = probe_shift(d, "contrast:0.25")["x"].double()
    mean = clean.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(got, mean + 0.25 * (clean - mean), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mean((1, 2, 3), keepdim=True), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probe_shift(d, "contrast:1")["x"], d.build().heldout("probe")["x"])


class Padded:
    """A text source whose probe has padding (labels -100 at the end of some sequences)."""

    def __init__(self, source):
        self.info = source.info
        probe = dict(source.heldout("probe"))
        probe["labels"] = probe["labels"].clone()
        probe["labels"][::2, -4:] = -100
        self.probe = probe

    def heldout(self, split):
        return self.probe


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_shuffle_permutes_a_fraction_of_each_sequence_and_keeps_padding_and_labels_consistent(fraction):
    d = data(TINY_MARKOV, "data.probe_size=64")
    source = Padded(d.build())
    clean = source.heldout("probe")
    got = probe_shift(d, f"shuffle:{fraction:g}", source=source)
    real = torch.cat([torch.ones(len(clean["ids"]), 1, dtype=torch.bool), clean["labels"] != -100], 1)
    whole = [torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in (clean, got)]
    for row in range(len(clean["ids"])):
        keep = real[row]
        assert torch.equal(whole[0][row][keep].sort().values, whole[1][row][keep].sort().values)  # a permutation
        assert torch.equal(whole[0][row][~keep][:-1], whole[1][row][~keep][:-1])  # padding in place
    assert torch.equal(got["labels"] == -100, clean["labels"] == -100)
    valid = got["labels"][:, :-1] != -100
    assert torch.equal(got["labels"][:, :-1][valid], got["input_ids"][:, 1:][valid])  # labels follow the tokens
    moved = (whole[0] != whole[1])[real].double().mean().item()
    assert moved > 0.8 if fraction == 1 else 0.1 < moved < fraction + 0.02


def test_source_builds_the_probe_of_the_changed_data_section():
    d = data(TINY_MARKOV)
    other = data(TINY_MARKOV, "data.seed=7").build().heldout("probe")
    got = probe_shift(d, "source:seed=7")
    assert torch.equal(got["input_ids"], other["input_ids"]) and torch.equal(got["labels"], other["labels"])
    assert not torch.equal(got["input_ids"], d.build().heldout("probe")["input_ids"])
    img = probe_shift(data(TINY_TEACHER), "source:max_frequency=4,seed=3")
    assert img["x"].shape == (64, 3, 16, 16)


@pytest.mark.parametrize("spec, which, says", [
    ("noise", TINY_TEACHER, "cannot read 'noise'; write noise:SIGMA"),
    ("blur:2", TINY_TEACHER, "cannot read 'blur:2'"),
    ("noise:abc", TINY_TEACHER, "noise needs a number, got 'abc'; write e.g. noise:0.5"),
    ("noise:-1", TINY_TEACHER, "noise:-1 is out of range; use a positive value"),
    ("shuffle:1.5", TINY_MARKOV, "shuffle:1.5 is out of range; use 0 < F <= 1"),
    ("source:", TINY_MARKOV, "names no data keys; write source:KEY=VALUE"),
    ("source:seed=0", TINY_MARKOV, "leaves the data section as it is"),
    ("source:vocab_size=8", TINY_MARKOV, "changes the data's task, input shape or classes"),
    ("source:colour=1", TINY_MARKOV, "data.colour"),
    ("noise:0.5", TINY_MARKOV, "noise applies to images, the probe is text; use shuffle:F or source:KEY=VALUE"),
    ("shuffle:0.5", TINY_TEACHER, "shuffle applies to text, the probe is images; use noise:SIGMA or contrast:C"),
])
def test_bad_shifts_get_one_line_naming_the_option_and_the_fix(spec, which, says):
    with pytest.raises(ConfigError) as error:
        probe_shift(data(which), spec)
    message = str(error.value)
    assert "\n" not in message and says in message
    assert message.startswith("--probe-shift: ") or message.startswith("data.colour")


def test_specs_round_trip_into_directory_names():
    assert parse_shift("noise:0.50").slug == "noise-0.5" and parse_shift(" contrast:2").spec == "contrast:2"
    assert parse_shift("source:seed=7,sharpness=1").slug == "source-seed=7_sharpness=1"
