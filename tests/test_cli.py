"""The command line as a new user meets it: default run names, --version, a --help that loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from goldenpath import __version__, cli
from goldenpath.store.files import read_json
from goldenpath.config import apply_overrides

from .conftest import TINY_TEACHER


def test_the_readme_s_training_commands_run_in_order_each_into_its_own_directory(tmp_path, capsys):
    raw = apply_overrides({"name": "teacher-cnn", "budget": {"samples": 1280}}, TINY_TEACHER)
    config = tmp_path / "teacher-cnn.yaml"
    config.write_text(yaml.safe_dump(raw))
    dirs = []
    for extra in ([], ["optim.lr=0.05", "optim.batch_size=16"], ["optim.lr=0.05", "optim.batch_size=16", "seed=1"],
                  ["log.progress=true"]):  # log.progress does not change the run: the first run, done
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", str(config), f"out={tmp_path}", *extra])
        assert exit_info.value.code == 0
        dirs.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert dirs == [str(tmp_path / n) for n in ("teacher-cnn", "teacher-cnn_lr=0.05_bs=16",
                                                "teacher-cnn_lr=0.05_bs=16_seed=1", "teacher-cnn")]
    assert all(read_json(f"{d}/status.json")["state"] == "completed" for d in dirs)


def test_default_run_names_carry_the_overrides_that_change_the_run():
    name = cli.default_run_name("teacher-cnn", ["optim.lr=0.05", "optim.batch_size=128", "seed=1", "out=/x",
                                                "log.progress=false", "threads=1"])
    assert name == "teacher-cnn_lr=0.05_bs=128_seed=1"
    assert cli.default_run_name("teacher-cnn", ["out=/x"]) == "teacher-cnn"


def test_version_and_help_load_no_torch():
    probe = ("import sys\nfrom goldenpath import cli\n"
             "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch' in sys.modules, code)")
    for args, wanted in ((["--version"], f"goldenpath {__version__}"), (["--help"], "train"),
                         (["train", "--help"], "Ctrl-C")):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
        assert wanted in out.stdout
        assert out.stdout.strip().splitlines()[-1] == "False 0"


def test_a_wrong_choice_names_the_choices_once(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", str(tmp_path / "none.yaml")])
    config = tmp_path / "c.yaml"
    config.write_text("optim: {name: adam}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err == "goldenpath: optim.name: unknown value 'adam'; use one of ['sgd', 'adamw']"


@pytest.mark.parametrize("argv, field", [
    (lambda d: ["train", str(d)], "is a directory"),  # these printed a Python traceback
    (lambda d: ["train", str(d / "binary.yaml")], "is not a text file"),
    (lambda d: ["train", str(d / "ok.yaml"), f"out={d / 'binary.yaml'}"], "Not a directory"),
    (lambda d: ["compare", str(d), "--metrics", " , "], "--metrics: no metric given"),  # it wiped the tables
    (lambda d: ["compare", str(d), "--device", "tpu"], "--device"),
    (lambda d: ["train", str(d / "ok.yaml"), "model.name=llama", "data.source=markov", "model.kv_heads=0"],
     "model.kv_heads"),  # trained with as many as heads, recorded as 0
    (lambda d: ["train", str(d / "ok.yaml"), "model.name=vit", "model.mlp_ratio=0"], "model.mlp_ratio"),
    (lambda d: ["train", str(d / "ok.yaml"), "model.name=gpt2", "data.source=markov", "model.depth=0"],
     "model.depth"),  # it named model.width
])
def test_bad_paths_and_values_exit_2_in_one_line(tmp_path, capsys, argv, field):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "ok.yaml").write_text("budget: {steps: 1}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and field in err[0], err


def test_a_bare_goldenpath_prints_help_and_train_requires_only_its_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: goldenpath") and "{train,sweep,fork" in out
    for verb, needed in (("train", "config"), ("toys", "which")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([verb])
        assert exit_info.value.code == 2  # the overrides are optional: only the positional before them is named
        assert capsys.readouterr().err == (f"goldenpath: the following arguments are required: {needed}; "
                                           f"see goldenpath {verb} --help\n")


def test_counts_in_printed_lines_agree_with_their_number(tmp_path, capsys):
    assert [cli._count(n, "warning") for n in (0, 1, 2)] == ["0 warnings", "1 warning", "2 warnings"]
    (tmp_path / "runs.csv").write_text("run,state\nlr=0.1_rep=0,completed\n")
    cli._runs_summary(tmp_path)
    assert capsys.readouterr().out.startswith("1 run: 1 completed;")
