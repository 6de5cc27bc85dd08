"""What defines a run (goldenpath.config.identity): which keys change a run, its setting, its name, its order."""

from __future__ import annotations

import pytest

from goldenpath.comparison.runs import settings_of
from goldenpath.config import load_config
from goldenpath.config import identity as ident
from goldenpath.config.naming import default_run_name


def test_seeds_that_differ_only_in_where_they_ran_or_what_they_record_are_one_setting():
    """cpu=, log.trackers, log.sample_ids and log.every make another run, but not another setting."""
    base = ["optim.lr=0.05"]
    configs = {"r0": load_config(None, [*base, "seed=0"]),
               "r1": load_config(None, [*base, "seed=1", "cpu=true"]),
               "r2": load_config(None, [*base, "seed=2", "log.trackers=[tensorboard]"]),
               "r3": load_config(None, [*base, "seed=3", "log.sample_ids=true", "log.every=3"]),
               "other": load_config(None, ["optim.lr=0.1", "seed=4"])}
    runs = settings_of(configs, {n: "completed" for n in configs})
    assert len({id(runs[n].setting) for n in ("r0", "r1", "r2", "r3")}) == 1
    assert runs["other"].setting is not runs["r0"].setting
    assert set(runs["r0"].setting.columns) == {"optim.lr"}  # only the knob that varies becomes a column
    assert len({ident.identity_key(c) for c in configs.values()}) == 5  # still five runs


def test_place_and_pace_keys_leave_the_identity_and_only_they_may_change_on_resume():
    a = load_config(None, ["seed=1"])
    b = load_config(None, ["seed=1", "name=elsewhere", "out=/tmp/x", "threads=3", "log.progress=false",
                           "data.prefetch=0"])
    assert ident.identity_key(a) == ident.identity_key(b)
    for override in ("cpu=true", "log.every=5", "seed=2", "optim.lr=0.2", "data.generate=device"):
        assert ident.identity_key(load_config(None, ["seed=1", override])) != ident.identity_key(a), override
    assert set(ident.RESUMABLE) == {"threads", "log.progress", "data.prefetch"}


def test_forks_of_seed_siblings_share_knobs_but_keep_their_parent_as_a_column():
    a = load_config(None, ["seed=0", "fork.parent=p0", "fork.at_loss=2.0"])
    b = load_config(None, ["seed=1", "fork.parent=p1", "fork.at_loss=2.0"])
    assert ident.knobs(a) == ident.knobs(b)
    assert ident.setting_columns(a)["fork.parent"] == "p0"


def test_noise_level_and_order_put_the_least_noisy_online_setting_first():
    quiet = load_config(None, ["optim.lr=0.01", "optim.batch_size=64"])
    loud = load_config(None, ["optim.lr=0.1", "optim.batch_size=16"])
    noisy = load_config(None, ["optim.lr=0.01", "optim.batch_size=64", "noise.kind=gaussian", "noise.sigma=2.0"])
    offline = load_config(None, ["optim.lr=0.001", "data.epochs=2", "data.train_size=64"])
    assert ident.noise_level(quiet) == pytest.approx(0.01 / 64)
    assert ident.noise_level(noisy) == pytest.approx(2.0 * 0.01 / 64)
    order = sorted([offline, noisy, loud, quiet], key=ident.order_key)
    assert order == [quiet, loud, noisy, offline]


def test_a_default_run_name_carries_only_overrides_that_change_the_run():
    assert default_run_name("teacher-cnn", ["threads=2", "log.progress=false", "data.prefetch=0"]) == "teacher-cnn"
    assert default_run_name("teacher-cnn", ["optim.lr=0.05", "out=runs/x"]) == "teacher-cnn_lr=0.05"


def test_setting_label_drops_the_replicate_or_seed():
    assert ident.setting_label("lr=0.02_bs=32_rep=1") == "lr=0.02_bs=32"
    assert ident.setting_label("seed=3") == "default"
