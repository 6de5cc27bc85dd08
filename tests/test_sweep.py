"""Sweeps and forks: grid expansion, skip/resume after a kill, divergence, locks, Slurm arrays, fork lineage."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from goldenpath.store.rundir import read_metrics

from goldenpath.store.files import read_json
from goldenpath.config import ConfigError, load_config
from goldenpath.training.fork import fork_config
from goldenpath.config.naming import fork_name, run_name
from goldenpath.config.grid import expand, load_sweep
from goldenpath.training.sweep import slurm_arrays, submit_slurm
from goldenpath.training.trainer import train

from .conftest import TINY_TEACHER, write_sweep

ROOT = Path(__file__).resolve().parent.parent


def sweep_cli(path: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goldenpath", "sweep", str(path), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, **kw)


def ids(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.int64)


def rows(sweep_dir: Path) -> dict[str, dict]:
    with open(sweep_dir / "runs.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------- expansion and names


def test_runs_csv_gives_a_fork_the_knobs_it_trains_with_not_its_parent_s(tmp_path):
    """A fork at x4 batch: its optim.batch_size column was its parent's 16; now its own 64 once its config is
    written, empty before (x4 of what is known only then), with fork.optim.batch_size keeping 'x4'."""
    from goldenpath.config import to_dict
    from goldenpath.store import rundir
    from goldenpath.training.sweep import _trained_knobs

    path = write_sweep(tmp_path, "grid: {optim.lr: [0.1], optim.batch_size: [16]}\n"
                                 "forks: [{at_loss: 2.2, set: {optim.batch_size: x4, optim.momentum: 0.5}}]\n")
    grid, fork = expand(load_sweep(path))
    assert _trained_knobs(tmp_path, grid) == grid.knobs
    before = _trained_knobs(tmp_path, fork)
    assert before["optim.batch_size"] is None and before["fork.optim.batch_size"] == "x4"
    assert before["optim.lr"] == 0.1
    config = load_config(tmp_path / "base.yaml", [*grid.overrides, "optim.batch_size=64", "optim.momentum=0.5"])
    (tmp_path / fork.name).mkdir()
    (tmp_path / fork.name / "config.yaml").write_text(rundir.config_text(to_dict(config)))
    assert _trained_knobs(tmp_path, fork)["optim.batch_size"] == 64


def test_a_fork_that_divides_says_so_in_its_name():
    assert fork_name("run", 2.2, None, {"optim.lr": "/4"}) == "run+fork-loss=2.2-lr=div4"
    assert fork_name("run", None, 100, {"optim.batch_size": "x4"}) == "run+fork-step=100-bs=x4"


def test_grid_expands_in_order_with_readable_unique_names(tmp_path):
    path = write_sweep(tmp_path, "grid: {optim.lr: [0.05, 0.1], optim.batch_size: [16, 64],\n"
                                 "       'data.epochs,data.train_size': [[1, null], [4, 256]]}\n"
                                 "seeds: [0, 1]\n"
                                 "forks: [{at_loss: 2.2, set: {optim.batch_size: x4}, where: {optim.lr: 0.1}}]\n")
    points = expand(load_sweep(path))
    base = [p for p in points if p.parent is None]
    assert len(base) == 2 * 2 * 2 * 2 and len(points) == 16 + 8
    assert base[0].name == "lr=0.05_bs=16_epochs=1_n=none_rep=0"
    assert base[-1].name == "lr=0.1_bs=64_epochs=4_n=256_rep=1"
    assert len({p.name for p in points}) == len(points)
    assert all(p.knobs["optim.lr"] == 0.1 for p in points if p.parent)
    assert points[-1].name == "lr=0.1_bs=64_epochs=4_n=256_rep=1+fork-loss=2.2-bs=x4"
    # the overrides reproduce the knobs
    config = load_config(tmp_path / "base.yaml", base[-1].overrides)
    assert (config.optim.lr, config.optim.batch_size, config.data.epochs, config.data.train_size, config.replicate,
            config.design) == (0.1, 64, 4, 256, 1, "independent")
    assert config.seed == base[-1].knobs["seed"]
    assert run_name({"a.x": 1, "b.x": 2}) == "a-x=1_b-x=2"  # same last part: the full key


def test_independent_seeds_differ_across_every_setting_and_paired_ones_are_shared(tmp_path):
    """The default design: no two points of a sweep share a seed (so no two settings share an
    initialisation or a stream order); a point's seed depends on its setting and replicate alone. The
    paired design gives replicate s seed s in every setting."""
    from goldenpath.seeding import setting_seed

    grid = "grid: {optim.lr: [0.02, 0.05, 0.1], 'data.epochs,data.train_size': [[1, null], [4, 256]]}\n"
    path = write_sweep(tmp_path, grid + "seeds: [0, 1, 2, 3, 4]\n")
    points = expand(load_sweep(path))
    seeds = [p.knobs["seed"] for p in points]
    assert len(points) == 30 and len(set(seeds)) == 30
    configs = [load_config(tmp_path / "base.yaml", p.overrides) for p in points]
    assert [c.seed for c in configs] == seeds and {c.design for c in configs} == {"independent"}
    # the seed fixes the model's initialisation and the stream's sample ids: no two runs share either
    from goldenpath.data import build_stream
    from goldenpath.models import build_model

    info = configs[0].data.build().info
    inits = {repr(next(build_model(c.model, info, seed=c.seed).parameters()).flatten()[:4].tolist()) for c in configs}
    assert len(inits) == 30
    source = configs[0].data.build()
    firsts = {int(build_stream(source, c.data, seed=c.seed, batch_size=4, micro_batch_size=4).indices(0, 1)[0])
              for c in configs if c.data.epochs == 1}
    assert len(firsts) == 15
    # a point's seed is a function of its setting and replicate: a wider grid leaves it alone
    (tmp_path / "w").mkdir()
    (tmp_path / "p").mkdir()
    wider = write_sweep(tmp_path / "w", grid.replace("0.1]", "0.1, 0.2]") + "seeds: [0, 1, 2, 3, 4, 5]\n")
    again = {p.name: p.knobs["seed"] for p in expand(load_sweep(wider))}
    assert all(again[p.name] == p.knobs["seed"] for p in points)
    assert points[0].knobs["seed"] == setting_seed({"optim.lr": 0.02, "data.epochs": 1, "data.train_size": None}, 0)

    paired = write_sweep(tmp_path / "p", grid + "seeds: [0, 1]\ndesign: paired\n")
    points = expand(load_sweep(paired))
    assert [p.knobs["seed"] for p in points] == [0, 1] * 6 and points[1].name.endswith("_seed=1")
    assert load_config(tmp_path / "p" / "base.yaml", points[1].overrides).design == "paired"


@pytest.mark.parametrize("body, field", [
    ("grid: {optim.lr: []}\n", "sweep.grid.optim.lr"),
    ("grid: {optim.lr: 0.1}\n", "sweep.grid.optim.lr"),
    ("grdi: {optim.lr: [0.1]}\n", "sweep.grdi"),
    ("seeds: [a]\n", "sweep.seeds"),
    ("seeds: [0, 0]\n", "sweep.seeds"),
    ("design: matched\n", "sweep.design"),
    ("grid: {seed: [1, 2]}\n", "sweep.grid.seed"),
    ("grid: {'data.epochs,data.train_size': [[1]]}\n", "sweep.grid.data.epochs,data.train_size"),
    ("forks: [{set: {optim.lr: 0.1}}]\n", "sweep.forks[0]"),
    ("grid: {optim.lr: [0.1, -1]}\n", "optim.lr"),  # every point is checked before anything runs
    ("set: [a, b]\n", "sweep.set"),  # these printed a traceback
    ("slurm: [1]\n", "sweep.slurm"),
    ("forks: [{at_loss: 2.2, set: [1]}]\n", "sweep.forks[0].set"),
    ("forks: [{at_loss: 2.2, where: [1]}]\n", "sweep.forks[0].where"),
    ("grid: {optim.lr: [0.1]}\nforks: [{at_loss: abc}]\n", "sweep.forks[0].at_loss"),
    ("grid: {optim.lr: [0.1]}\nforks: [{at_loss: 2.2, where: {lr: 0.1}}]\n", "sweep.forks[0].where"),  # matched none
    ("grid: {'optim.lr,optim.batch_size': [[0.1, 16]], optim.lr: [0.2]}\n", "sweep.grid.optim.lr"),  # overridden
    ("grid: {'seed,optim.lr': [[5, 0.1]]}\n", "sweep.grid.seed,optim.lr"),  # a seed the sweep did not use
    ("grid: {optim.lr: [0.1]}\nforks: [{at_loss: 2.2, set: {optim.nope: 3}}]\n", "optim.nope"),  # not after hours
    # where: values the grid does not take, or a seed (drawn per point unless paired), matched nothing in silence
    ("grid: {optim.lr: [0.1, 0.2]}\nforks: [{at_loss: 2.2, set: {optim.lr: /2}, where: {optim.lr: 0.3}}]\n",
     "sweep.forks[0].where"),
    ("grid: {optim.lr: [0.1]}\nseeds: [0, 1]\nforks: [{at_loss: 2.2, set: {optim.lr: /2}, where: {seed: 0}}]\n",
     "sweep.forks[0].where"),
    # a name past a file name's length crashed the sweep with OSError after the first runs
    ("grid: {checkpoint.steps: [[" + ", ".join(str(k) for k in range(1, 101)) + "]]}\n", "sweep.grid"),
])
def test_bad_sweep_configs_exit_2_naming_the_field(tmp_path, body, field):
    out = sweep_cli(write_sweep(tmp_path, body))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], out.stderr
    assert not (tmp_path / "out" / "s").exists() or not any((tmp_path / "out" / "s").glob("lr=*"))


# ----------------------------------------------------------------------------- running


def test_killed_sweep_resumes_and_every_point_completes_exactly_once(tmp_path):
    path = write_sweep(tmp_path, "set: {budget.samples: 3200, checkpoint.last_every_seconds: 0.5,\n"
                                 "      checkpoint.targets: []}\n"
                                 "grid: {optim.lr: [0.02, 0.05]}\nseeds: [0, 1]\n")
    sweep_dir = tmp_path / "out" / "s"
    proc = subprocess.Popen([sys.executable, "-m", "goldenpath", "sweep", str(path), "--jobs", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill the sweep and its runs once one run is done and another is under way
        states = [read_json(p).get("state") for p in sweep_dir.glob("*/status.json")]
        if "completed" in states and "running" in states:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name: read_json(p)["updated"] for p in sweep_dir.glob("*/status.json")
                   if read_json(p).get("state") == "completed"}
    assert done_before and len(done_before) < 4

    out = sweep_cli(path, "--jobs", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(sweep_dir)
    table = rows(sweep_dir)
    assert len(table) == 4 and all(r["state"] == "completed" for r in table.values())
    for name, r in table.items():
        run = sweep_dir / name
        seen = ids(run / "samples" / "rank0.i64")
        assert len(seen) == int(r["samples"]) == 3200 and len(set(seen.tolist())) == 3200  # once, no replays
        if name in done_before:  # completed runs were left alone
            assert read_json(run / "status.json")["updated"] == done_before[name]


def wait_until(check, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_ctrl_c_to_a_sweep_saves_its_running_runs_and_the_rerun_finishes(tmp_path):
    path = write_sweep(tmp_path, "set: {budget.samples: 6400, checkpoint.last_every_seconds: 1000,\n"
                                 "      checkpoint.targets: []}\n"
                                 "grid: {optim.lr: [0.02, 0.05]}\nseeds: [0, 1]\n")
    sweep_dir = tmp_path / "out" / "s"
    # its own session: the signal reaches the sweep process alone, which must pass it on to its runs
    proc = subprocess.Popen([sys.executable, "-m", "goldenpath", "sweep", str(path), "--jobs", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def two_running():
        runs = [p.parent for p in sweep_dir.glob("*/metrics.jsonl")]
        return len(runs) == 2 and all(any(r.get("step", 0) >= 5 for r in read_metrics(d)) for d in runs)
    wait_until(two_running)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = out.strip().splitlines()
    assert lines[-1] == str(sweep_dir) and "2 runs saved their resume point, 2 not started" in lines[-2]
    table = rows(sweep_dir)
    stopped = [n for n, r in table.items() if r["state"] == "interrupted"]
    assert len(stopped) == 2 and sum(r["state"] == "pending" for r in table.values()) == 2
    for name in stopped:
        state = read_json(sweep_dir / name / "checkpoints" / "last" / "state.json")["train"]
        assert state["step"] == int(float(table[name]["step"])) >= 5

    out = sweep_cli(path, "--jobs", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    table = rows(sweep_dir)
    assert all(r["state"] == "completed" for r in table.values())
    for name in stopped:
        assert read_json(sweep_dir / name / "status.json")["resumed_from_step"] > 0
        assert len(set(ids(sweep_dir / name / "samples" / "rank0.i64").tolist())) == 6400  # no sample twice


def test_ctrl_c_to_a_fork_saves_it_and_the_same_command_resumes_it(tmp_path):
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=parent", "budget.samples=1280",
                                      "checkpoint.targets=[2.28]", "checkpoint.eval_every=5"]))
    command = [sys.executable, "-m", "goldenpath", "fork", str(parent), "--at-loss", "2.28", "optim.lr=/2",
               "budget.samples=9600", "budget.stop_at_last_target=false", "checkpoint.last_every_seconds=1000"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    child = parent.parent / ("parent+fork-loss=2.28-lr=0.025_samples=9600_stop_at_last_target=false"
                             "_last_every_seconds=1000")
    meta = read_json(parent / "checkpoints" / "target-2.28" / "meta.json")
    wait_until(lambda: (child / "metrics.jsonl").exists()
               and any(r.get("step", 0) >= meta["step"] + 5 for r in read_metrics(child)))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    status = read_json(child / "status.json")
    assert status["state"] == "interrupted" and out.strip().splitlines()[-1] == str(child)
    assert read_json(child / "checkpoints" / "last" / "state.json")["train"]["step"] == status["step"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from step {status['step']} " in out.stderr
    assert read_json(child / "status.json")["state"] == "completed"


def test_a_diverging_point_is_recorded_and_the_rest_complete(tmp_path):
    path = write_sweep(tmp_path, "grid: {optim.lr: [0.05, 1000.0]}\nseeds: [0]\n")
    out = sweep_cli(path, "--jobs", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    table = rows(tmp_path / "out" / "s")
    assert table["lr=1000_rep=0"]["state"] == "diverged"
    assert table["lr=0.05_rep=0"]["state"] == "completed"
    again = sweep_cli(path)  # diverged points are not retried unless asked
    assert again.returncode == 0 and "1 diverged" in again.stdout
    status = read_json(tmp_path / "out" / "s" / "lr=1000_rep=0" / "status.json")
    assert status["state"] == "diverged"


def test_a_failed_run_says_why_where_the_sweep_is_watched_and_the_rest_complete(tmp_path, capsys, monkeypatch):
    """A run that crashes is counted failed and the sweep prints why, which otherwise stays in logs/ (on a
    device machine, out of reach): the error line of a traceback that ends in a hint (as CUDA's do), and for a
    child killed outright (its status left "running") its exit code. Stand-in commands play the children."""
    import goldenpath.training.sweep as sweep_mod

    path = write_sweep(tmp_path, "grid: {optim.lr: [0.05, 0.07, 0.09]}\nseeds: [0]\n")
    real = sweep_mod.command
    crash = ("import sys; print('Traceback (most recent call last):'); print('  File x, line 1'); "
             "print('RuntimeError: CUDA error: out of memory'); "
             "print('Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.'); sys.exit(1)")

    def command(sweep, point, sweep_dir, port=None):
        if point.name.startswith("lr=0.07"):
            return [sys.executable, "-c", crash]
        if point.name.startswith("lr=0.09"):  # killed mid-run: its status still says running
            run = sweep_dir / point.name
            kill = (f"import os, signal, pathlib; d = pathlib.Path({str(run)!r}); d.mkdir(parents=True); "
                    "(d / 'status.json').write_text('{\"state\": \"running\"}'); os.kill(os.getpid(), signal.SIGKILL)")
            return [sys.executable, "-c", kill]
        return real(sweep, point, sweep_dir, port)

    monkeypatch.setattr(sweep_mod, "command", command)
    sweep_dir = sweep_mod.run_sweep(path, jobs=2, progress=False)
    err = capsys.readouterr().err
    assert ("lr=0.07_rep=0 failed (exit code 1): RuntimeError: CUDA error: out of memory "
            "(logs/lr=0.07_rep=0.log)") in err
    assert "lr=0.09_rep=0 failed (exit code -9): (empty log)" in err
    table = rows(sweep_dir)
    assert table["lr=0.07_rep=0"]["state"] == "failed" and table["lr=0.05_rep=0"]["state"] == "completed"
    # a run that failed in the trainer says so in its status: that reason is the line
    run = sweep_dir / "lr=0.05_rep=0"
    (run / "status.json").write_text(json.dumps({"state": "failed", "reason": "ValueError: bad batch\nmore"}))
    assert sweep_mod._why_failed(sweep_dir, "lr=0.05_rep=0") == "ValueError: bad batch"


def test_two_sweep_processes_never_run_the_same_point(tmp_path):
    path = write_sweep(tmp_path, "grid: {optim.lr: [0.02, 0.03, 0.04, 0.05]}\nseeds: [0]\n")
    procs = [subprocess.Popen([sys.executable, "-m", "goldenpath", "sweep", str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=600)
    sweep_dir = tmp_path / "out" / "s"
    for run in sweep_dir.glob("lr=*"):
        status = read_json(run / "status.json")
        assert status["state"] == "completed" and status["resumed_from_step"] is None
        seen = ids(run / "samples" / "rank0.i64")
        assert len(seen) == status["samples"] == len(set(seen.tolist()))
        log = (sweep_dir / "logs" / f"{run.name}.log").read_text()
        assert log.count(str(run)) == 1  # one process printed this run's directory: it ran once


def test_slurm_arrays_hold_the_points_to_run_then_the_forks(tmp_path):
    path = write_sweep(tmp_path, "grid: {optim.lr: [0.05, 0.1]}\nseeds: [0, 1]\nprocesses: 2\n"
                                 "forks: [{at_loss: 2.2, set: {optim.lr: /2}}]\nslurm: {partition: gpu}\n")
    sweep = load_sweep(path)
    points = expand(sweep)
    sweep_dir = tmp_path / "out" / "s"
    done = sweep_dir / points[0].name
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"state": "completed"}))
    arrays = slurm_arrays(sweep, sweep_dir, points, retry_diverged=False)
    assert [len(a) for a in arrays] == [3, 4]
    first = arrays[0][0]
    assert first[1:3] == ["-m", "accelerate.commands.launch"] and first[first.index("--num_processes") + 1] == "2"
    tail = first[first.index("goldenpath") + 1:]
    assert tail == ["train", str(sweep.base), *points[1].overrides, f"out={sweep_dir}", f"name={points[1].name}"]
    assert f"seed={points[1].knobs['seed']}" in tail and "replicate=1" in tail
    fork_cmd = arrays[1][0]
    assert fork_cmd[fork_cmd.index("goldenpath") + 1:][:4] == ["fork", str(sweep_dir / points[0].name),
                                                               "--at-loss", "2.2"]
    assert "optim.lr=/2" in fork_cmd
    jobs = submit_slurm(sweep, sweep_dir, points, jobs=4, retry_diverged=False, cluster="debug")
    assert [j.submission().args[0] for j in jobs] == arrays[0] + arrays[1]


def test_retry_diverged_under_slurm_trains_the_diverged_points_again(tmp_path, monkeypatch):
    """The Slurm jobs of diverged points found their directories and exited: they are cleared first, as a local
    sweep clears them."""
    import goldenpath.training.sweep as sweep_module

    path = write_sweep(tmp_path, "grid: {optim.lr: [0.05, 0.1]}\n")
    points = expand(load_sweep(path))
    sweep_dir = tmp_path / "out" / "s"
    for point, state in zip(points, ("diverged", "completed")):
        (sweep_dir / point.name).mkdir(parents=True)
        (sweep_dir / point.name / "status.json").write_text(json.dumps({"state": state}))
    submitted = []
    monkeypatch.setattr(sweep_module, "submit_slurm", lambda *a, **k: submitted.append(
        [p.name for p in a[2] if (sweep_dir / p.name).exists()]))
    sweep_module.run_sweep(path, out=str(tmp_path / "out"), executor="slurm", retry_diverged=True)
    assert submitted == [[points[1].name]]  # the diverged point's directory is gone before the jobs start


# ----------------------------------------------------------------------------- forks


def test_fork_continues_the_parent_stream_and_records_its_lineage(tmp_path):
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=parent", "budget.samples=1280",
                                      "checkpoint.targets=[2.28, 2.2]", "checkpoint.eval_every=5",
                                      "log.sample_ids=true", "optim.momentum=0.9"]))
    reached = read_json(parent / "status.json")["targets_reached"]
    assert "2.28" in reached
    out = subprocess.run([sys.executable, "-m", "goldenpath", "fork", str(parent), "--at-loss", "2.28",
                          "optim.batch_size=x2", "optim.lr=/2", "budget.samples=2560",
                          "budget.stop_at_last_target=false"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    child = Path(out.stdout.strip().splitlines()[-1])
    assert child == parent.parent / "parent+fork-loss=2.28-bs=64_lr=0.025_samples=2560_stop_at_last_target=false"
    config = load_config(child / "config.yaml")
    assert config.fork.parent == str(parent) and config.fork.at_loss == 2.28
    assert set(config.fork.changed) == {"optim.batch_size", "optim.lr", "budget.samples", "budget.stop_at_last_target"}
    assert config.optim.batch_size == 64 and config.optim.lr == pytest.approx(0.025)

    parent_ids, child_ids = ids(parent / "samples" / "rank0.i64"), ids(child / "samples" / "rank0.i64")
    assert int(child_ids[0]) == int(parent_ids[-1]) + 1  # the parent's next sample
    assert not set(child_ids.tolist()) & set(parent_ids.tolist())
    meta = read_json(parent / "checkpoints" / "target-2.28" / "meta.json")
    assert (parent / "checkpoints" / "target-2.28" / "optimizer.safetensors").exists()  # momentum carries over
    first = read_metrics(child)[0]
    assert (first["step"], first["samples"], first["eval_loss"]) == (meta["step"], meta["samples"],
                                                                        meta["eval_loss"])
    status = read_json(child / "status.json")
    assert status["state"] == "completed"
    assert status["samples"] == meta["samples"] + (2560 - meta["samples"]) // 64 * 64  # budgets count the parent's
    assert len(child_ids) == status["samples"] - meta["samples"]
    assert "2.28" not in status["targets_reached"]  # reached by the parent before the fork


def test_fork_refuses_changing_data_or_a_missing_checkpoint(tmp_path):
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=p", "budget.samples=320"]))
    with pytest.raises(ConfigError, match="seed"):
        fork_config(parent, at_loss=2.0, overrides=["seed=3"])
    with pytest.raises(ConfigError, match="no checkpoint target-0.1"):
        train(fork_config(parent, at_loss=0.1))


def test_fork_refuses_a_parent_that_can_still_resume_and_a_fork_of_a_fork_keeps_the_root_s_first_loss(tmp_path):
    """A parent that is interrupted or failed would, resumed, train on the samples its fork reads: refused. A
    fork of a fork starts from the root's first held-out loss (its stalled and divergence checks compare with
    it), not from its parent's first logged line, the first fork point."""
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=p", "budget.samples=1920",
                                      "checkpoint.targets=[2.28, 2.25]", "checkpoint.eval_every=5",
                                      "budget.stop_at_last_target=false"]))
    assert {"2.28", "2.25"} <= set(read_json(parent / "status.json")["targets_reached"])
    status = read_json(parent / "status.json")
    for state in ("interrupted", "failed", "running"):
        (parent / "status.json").write_text(json.dumps({**status, "state": state}))
        with pytest.raises(ConfigError, match=f"fork.parent: .* is {state}, not one of completed"):
            train(fork_config(parent, at_loss=2.28, overrides=["optim.lr=/2"]))
    (parent / "status.json").write_text(json.dumps(status))
    root_first = read_json(parent / "checkpoints" / "last" / "state.json")["train"]["initial_eval"]
    child = train(fork_config(parent, at_loss=2.28, overrides=["optim.momentum=0.5"]))
    assert {"2.25"} <= set(read_json(child / "status.json")["targets_reached"])
    assert read_metrics(child)[0]["eval_loss"] != root_first  # the child's first line: its fork point
    grandchild = train(fork_config(child, at_loss=2.25, overrides=["optim.lr=/2"]))
    for run in (child, grandchild):
        assert read_json(run / "checkpoints" / "last" / "state.json")["train"]["initial_eval"] == root_first


def test_a_fork_of_a_parent_that_read_its_whole_stream_says_why_it_cannot_run(tmp_path):
    """An offline parent with no budget reads its data to the end: its fork, which reads on from there and may
    not change data.*, has nothing left; the error names the parent and the fix, not budget.samples."""
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=p", "data.train_size=320",
                                      "data.epochs=2", "budget.samples=null", "checkpoint.steps=[3]",
                                      "checkpoint.targets=[]"]))
    assert read_json(parent / "status.json")["state"] == "completed"
    with pytest.raises(ConfigError, match="fork.parent: .* read its whole stream .*; fork a run whose budget"):
        train(fork_config(parent, at_step=3, overrides=["optim.lr=/2"]))


def test_a_fork_that_another_run_already_computes_is_refused_and_compare_refuses_duplicates(tmp_path):
    # the sweep names its fork by the override as written (bs=x2), the CLI by the resolved value (bs=64): one
    # run under two names would enter compare as two seeds at distance 0
    parent = train(load_config(None, [*TINY_TEACHER, f"out={tmp_path}", "name=p", "budget.samples=1280",
                                      "checkpoint.targets=[2.28]", "checkpoint.eval_every=5"]))
    assert "2.28" in read_json(parent / "status.json")["targets_reached"]

    def fork(*args):
        return subprocess.run([sys.executable, "-m", "goldenpath", "fork", str(parent), "--at-loss", "2.28", *args,
                               "budget.samples=1600"], capture_output=True, text=True, timeout=300, cwd=ROOT)

    first = fork("optim.batch_size=x2", "--name=p+fork-loss=2.28-bs=x2")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in tmp_path.iterdir())
    again = fork("optim.batch_size=64")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("goldenpath: fork: ")
    assert str(tmp_path / "p+fork-loss=2.28-bs=x2") in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    other = fork("optim.batch_size=x4")  # a different fork is fine
    assert other.returncode == 0, other.stderr[-2000:]

    from goldenpath.comparison.compare import compare
    shutil.copytree(parent, tmp_path / "p-copy")
    with pytest.raises(ConfigError, match="p-copy is p again"):
        compare(tmp_path)


def test_a_sweep_of_two_process_runs_goes_through_accelerate_launch(tmp_path):
    path = write_sweep(tmp_path, "set: {cpu: true, budget.samples: 640, checkpoint.targets: []}\n"
                                 "grid: {optim.lr: [0.05]}\nseeds: [0]\nprocesses: 2\n")
    out = sweep_cli(path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    status = read_json(tmp_path / "out" / "s" / "lr=0.05_rep=0" / "status.json")
    assert status["state"] == "completed" and status["processes"] == 2 and status["replicas_in_sync"] is True
    run = tmp_path / "out" / "s" / "lr=0.05_rep=0"
    r0, r1 = ids(run / "samples" / "rank0.i64"), ids(run / "samples" / "rank1.i64")
    assert len(r0) == len(r1) == 320 and not set(r0.tolist()) & set(r1.tolist())


def test_more_jobs_than_gpus_share_them_and_each_run_gets_its_part_of_the_memory(monkeypatch, capsys):
    import torch

    from goldenpath.training import runtime
    from goldenpath.training.sweep import _slots

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    one_each = _slots(2, 1)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in one_each] == ["0", "1"]
    assert all(runtime.MEMORY_FRACTION_ENV not in s for s in one_each) and capsys.readouterr().out == ""
    shared = _slots(5, 1)  # 5 runs on 2 GPUs: up to 3 on one of them
    assert [s["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0", "1", "0", "1", "0"]
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # a container's host: its cores are not this process's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)  # those are shared out
    assert [s["OMP_NUM_THREADS"] for s in _slots(14, 1)] == ["1"] * 14 and _slots(2, 1)[0]["OMP_NUM_THREADS"] == "8"
    assert [float(s[runtime.MEMORY_FRACTION_ENV]) for s in shared] == pytest.approx([0.95 / 3] * 5, abs=1e-4)
    assert "3 share each GPU" in capsys.readouterr().out
    pairs = _slots(4, 2)  # two-process runs: four of them on two GPUs, each process a GPU of its own
    assert [s["CUDA_VISIBLE_DEVICES"] for s in pairs] == ["0,1"] * 4
    assert float(pairs[0][runtime.MEMORY_FRACTION_ENV]) == pytest.approx(0.95 / 4, abs=1e-4)

    # a parent that sees some GPUs only hands its children those, by the names it was given them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f2c, GPU-9a1e")
    assert [s["CUDA_VISIBLE_DEVICES"] for s in _slots(3, 1)] == ["GPU-5f2c", "GPU-9a1e", "GPU-5f2c"]
    assert [s["CUDA_VISIBLE_DEVICES"] for s in _slots(1, 2)] == ["GPU-5f2c,GPU-9a1e"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")

    # the run process applies its share to every visible GPU, and refuses a share that is not a fraction
    applied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: applied.append((f, d)))
    monkeypatch.setenv(runtime.MEMORY_FRACTION_ENV, shared[0][runtime.MEMORY_FRACTION_ENV])
    assert runtime.gpu_memory_share() == pytest.approx(0.95 / 3, abs=1e-4)
    assert [d for _, d in applied] == [0, 1] and [f for f, _ in applied] == pytest.approx([0.95 / 3] * 2, abs=1e-4)
    monkeypatch.setenv(runtime.MEMORY_FRACTION_ENV, "1.5")
    with pytest.raises(ValueError, match=f"{runtime.MEMORY_FRACTION_ENV}: got '1.5'; use a fraction"):
        runtime.gpu_memory_share()
    monkeypatch.delenv(runtime.MEMORY_FRACTION_ENV)
    assert runtime.gpu_memory_share() is None
