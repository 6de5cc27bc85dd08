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


def _parent(directory, name, *overrides):
    """A run directory holding only its config.yaml (what a fork's setting reads of its parent)."""
    from goldenpath.config import to_dict
    from goldenpath.store import rundir

    config = load_config(None, [f"name={name}", f"out={directory}", *overrides])
    (directory / name).mkdir(parents=True)
    (directory / name / "config.yaml").write_text(rundir.config_text(to_dict(config)))
    return directory / name


def test_forks_of_seed_siblings_share_knobs_but_keep_their_parent_as_a_column(tmp_path):
    p0, p1 = (_parent(tmp_path, f"lr=0.1_rep={k}", "optim.lr=0.1", f"seed={k}") for k in (0, 1))
    a = load_config(None, ["seed=0", f"fork.parent={p0}", "fork.at_loss=2.0"])
    b = load_config(None, ["seed=1", f"fork.parent={p1}", "fork.at_loss=2.0"])
    assert ident.knobs(a) == ident.knobs(b)
    assert ident.setting_columns(a)["fork.parent"] == str(p0)


def test_forks_that_set_the_knob_their_parents_differ_in_stay_two_settings(tmp_path):
    """sigma = 0 forked from sigma 0.5 and from sigma 2 (two seeds each): the forks' own knobs are equal, their
    histories are not; they were one setting of 4 seeds. A fork of a fork counts its whole line; a parent whose
    config cannot be read stands in by its name less its replicate."""
    forks = {}
    for sigma in (0.5, 2.0):
        for k in (0, 1):
            parent = _parent(tmp_path, f"sigma={sigma}_rep={k}", "noise.kind=gaussian", f"noise.sigma={sigma}",
                             f"seed={k + 10 * int(sigma)}")
            forks[sigma, k] = load_config(None, [f"seed={k + 10 * int(sigma)}", f"fork.parent={parent}",
                                                 "fork.at_loss=2.0", "noise.kind=gaussian", "noise.sigma=0"])
    assert ident.knobs(forks[0.5, 0]) == ident.knobs(forks[0.5, 1]) != ident.knobs(forks[2.0, 0])
    assert ident.knobs(forks[2.0, 0]) == ident.knobs(forks[2.0, 1])
    gone = [load_config(None, [f"fork.parent={tmp_path / 'moved' / f'sigma=0.5_rep={k}'}", "fork.at_loss=2.0"])
            for k in (0, 1)]
    assert ident.knobs(gone[0]) == ident.knobs(gone[1])
    assert ident.setting_dict(gone[0])["fork"]["parent"] == "sigma=0.5"


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
    # a swept data.seed names its runs seed=1_...: only the replicate at the end of the grid point's name goes
    assert ident.setting_label("seed=1_lr=0.05_rep=0") == "seed=1_lr=0.05"
    assert ident.setting_label("lr=0.05_rep=0+fork-loss=2.28-bs=x4") == "lr=0.05+fork-loss=2.28-bs=x4"
