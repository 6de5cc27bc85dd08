"""The project's own promises: every shipped config loads, CI runs the README's test command, the demo works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from goldenpath.store.rundir import read_metrics

from goldenpath.store.files import read_json
from goldenpath.config import load_config
from goldenpath.training.trainer import train

from .conftest import TINY_TEACHER

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    config = load_config(path)
    assert config.optim.lr > 0 and config.checkpoint.targets, path


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    readme_cmd = re.search(r"^(python -m pytest[^#\n]*?)\s*(#|$)", readme, re.M).group(1).strip()
    ci_cmds = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    assert ci_cmds[-1] == readme_cmd


def test_bf16_autocast_run_trains_on_cpu(tmp_path):
    config = load_config(ROOT / "configs" / "teacher-cnn.yaml",
                         [*TINY_TEACHER, "precision=bf16", "budget.samples=640", "checkpoint.targets=[]",
                          f"out={tmp_path}", "name=bf16"])
    run_dir = train(config)
    status = read_json(run_dir / "status.json")
    assert status["state"] == "completed" and status["samples"] == 640
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0]  # bf16 autocast steps still learn


@pytest.mark.slow  # the whole demo: about 4 CPU minutes
def test_demo_sweeps_compares_and_draws(tmp_path):
    out = subprocess.run([sys.executable, "-m", "goldenpath", "demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    sweep_dir = tmp_path / "demo"
    assert out.stdout.strip().splitlines()[-1] == str(sweep_dir)
    import pandas as pd

    runs = pd.read_csv(sweep_dir / "runs.csv")
    assert len(runs) == 40 and set(runs.state) == {"completed"}
    assert set(runs["data.epochs"]) == {1, 5} and set(runs["replicate"]) == set(range(5))
    assert runs.seed.nunique() == 40  # independent seeds: every setting and replicate its own
    # the least-noisy setting gets past 60% of the way from chance to the Bayes floor
    ref = runs[(runs["optim.lr"] == 0.01) & (runs["optim.batch_size"] == 128) & (runs["data.epochs"] == 1)]
    chance = read_json(sweep_dir / ref.run.iloc[0] / "status.json")["chance_loss"]
    assert ((chance - ref.best_eval_loss) / (chance - ref.loss_floor)).min() > 0.6
    distances = pd.read_parquet(sweep_dir / "compare" / "distances.parquet")
    assert {"floor", "reference", "pair"} <= set(distances.kind)
    summary = pd.read_csv(sweep_dir / "compare" / "summary.csv")
    valid = summary.dropna(subset=["ratio"])  # the reference setting has no ratio of its own
    assert set(summary.reference) == {"lr=0.01_bs=128_epochs=1_n=none", "lr=0.01_bs=128_epochs=5_n=8192"}
    assert len(valid) > len(summary) / 2 and not summary.trivial.any()  # targets below the linear model's loss
    family = pd.read_csv(sweep_dir / "compare" / "family.csv")
    assert (family[family.metric == "tv"].smallest_adjusted < 0.05).all()  # the design can decide
    assert list(dict.fromkeys(summary.metric)) == ["tv", "kl", "js", "top1", "cka", "lmc"]  # every lens, tv first
    # a setting with one seed at a target has a ratio (against the reference's floor) and no interval
    bounded = valid[valid.n_seeds >= 2]
    assert bounded.ci_low.notna().all() and valid[valid.n_seeds < 2].ci_low.isna().all()
    assert (bounded.ci_low <= bounded.ratio).all() and (bounded.ratio <= bounded.ci_high).all()
    assert ((valid.p_value > 0) & (valid.p_value <= 1)).all()
    for target in distances.target.unique():
        assert (sweep_dir / "figures" / f"heatmap-tv-target-{target:g}.png").exists()
        assert (sweep_dir / "figures" / f"ratios-tv-target-{target:g}.png").exists()
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("online: ") for line in lines) and any(line.startswith("offline: ") for line in lines)
    assert f"report: {sweep_dir / 'report.html'}" in out.stdout and (sweep_dir / "report.html").exists()
    # the README's gradient-noise example is this run and this command, with the numbers it prints
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^goldenpath noise runs/demo/demo/(\S+) (.*)$", readme, re.M)
    said = re.search(r"pooled index is about ([0-9.]+) and the per-coordinate median about ([0-9.]+)", readme)
    noise = subprocess.run([sys.executable, "-m", "goldenpath", "noise", str(sweep_dir / command.group(1)),
                            *command.group(2).split()], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert noise.returncode == 0, noise.stderr[-2000:]
    got = re.search(r"tail index pooled ([0-9.]+), per coordinate \(median\) ([0-9.]+)", noise.stdout)
    assert abs(float(got.group(1)) - float(said.group(1))) <= 0.05, (got.group(0), said.group(0))
    assert abs(float(got.group(2)) - float(said.group(2))) <= 0.05, (got.group(0), said.group(0))
    page = (sweep_dir / "report.html").read_text()
    assert page.index("<h2>The answer</h2>") < page.index("<h2>Setting x setting ratios</h2>") < \
        page.index("<h2>Compute to target</h2>")


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_expands_into_valid_runs(path):
    from goldenpath.config.grid import expand, load_sweep

    sweep = load_sweep(path)
    points = expand(sweep)
    assert len(points) >= 4 and len({p.name for p in points}) == len(points)
    for p in points:
        if p.fork is None:
            load_config(sweep.base, p.overrides)


def test_the_readme_makes_each_run_directory_before_a_command_reads_it():
    from goldenpath.config.grid import load_sweep

    made = []
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("goldenpath demo"):
            made.append("runs/demo/demo")  # --out runs/demo, then the sweep's name
        elif sweep := re.match(r"goldenpath sweep (configs/sweeps/\S+\.yaml)", line):
            spec = load_sweep(ROOT / sweep.group(1))
            made.append(f"{spec.out}/{spec.name}")
        for read in re.findall(r"^goldenpath (?:compare|report|fork|noise) (runs/\S+)", line):
            assert any(read == d or read.startswith(d + "/") for d in made), f"{line!r} reads what no line above makes"
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## The two commands")]
    assert "apt-get install dataset-fashion-mnist" in install  # the Debian package of the Fashion-MNIST source


def test_the_public_api_keeps_its_import_paths():
    """The functions of the design's contract import from goldenpath as documented, in a fresh interpreter:
    train, fork and compare are the functions (no module of that name shadows them)."""
    probe = ("import goldenpath.training.trainer, goldenpath.comparison.compare, inspect\n"
             "from goldenpath import load_config, train, fork, compare\n"
             "from goldenpath import distances, lmc, noise, privacy, gradnoise, toys\n"
             "import goldenpath.toys.dln, goldenpath.toys.lls\n"
             "assert all(inspect.isfunction(f) for f in (load_config, train, fork, compare))\n"
             "for f in (distances.tv, distances.kl, distances.js, distances.top1, distances.linear_cka, lmc.barrier,\n"
             "          gradnoise.tail_index, gradnoise.noise_scale, noise.clipped_grad_sum, privacy.epsilon,\n"
             "          toys.dln.q_alpha, toys.dln.flow_limit, toys.lls.flow_limit):\n"
             "    assert inspect.isfunction(f), f\n")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)
