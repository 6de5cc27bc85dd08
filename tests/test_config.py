"""Config: YAML + dotted overrides, round trips, and one-line errors that name the field (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from goldenpath import cli
from goldenpath.config import ConfigError, config_from_dict, load_config, to_dict


def test_yaml_and_overrides_take_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3, batch_size: 16}\ncheckpoint: {targets: [2, 1.5]}\n")
    c = load_config(path, ["optim.momentum=0.9", "data.eval_size=100", "budget.samples=1e5"])
    assert c.name == "c"  # from the file name
    assert c.optim.lr == pytest.approx(1e-3) and isinstance(c.optim.lr, float)
    assert c.optim.batch_size == 16 and c.optim.momentum == 0.9
    assert c.checkpoint.targets == (2.0, 1.5)
    assert c.budget.samples == 100_000 and isinstance(c.budget.samples, int)
    assert c.data.eval_size == 100


def test_family_sections_switch_with_their_selector():
    c = load_config(None, ["data.source=markov", "data.vocab_size=7", "model.name=llama", "model.kv_heads=2",
                           "budget.steps=1"])
    assert type(c.data).__name__ == "MarkovData" and c.data.vocab_size == 7
    assert type(c.model).__name__ == "LlamaConfig" and c.model.kv_heads == 2


def test_round_trip_through_dict_is_identity():
    c = load_config(None, ["data.source=markov", "model.name=gpt2", "checkpoint.targets=[3, 2]",
                           "optim.betas=[0.8, 0.95]", "budget.samples=1000"])
    assert config_from_dict(to_dict(c)) == c


BAD = [
    # (arguments after `train CONFIG`, the field the message must name)
    (["optim.lrr=0.1"], "optim.lrr"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.batch_size=30", "optim.micro_batch_size=8"], "optim.batch_size"),
    (["checkpoint.targets=[1.0, 2.0]"], "checkpoint.targets"),
    (["checkpoint.targets=[2.0, -1.0]"], "checkpoint.targets"),
    (["checkpoint.target_eval_every=0"], "checkpoint.target_eval_every"),
    (["checkpoint.target_eval_every=10", "checkpoint.eval_min_every=20"], "checkpoint.eval_min_every"),
    (["data.source=imagenet"], "data.source"),
    (["model.name=transformer"], "model.name"),
    (["cpu=maybe"], "cpu"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["data.epochs=3"], "data.train_size"),
    (["foo.bar=1"], "foo"),
    (["data.vocab_size=10"], "data.vocab_size"),  # a markov key on the teacher source
    (["data.source=markov", "model.name=gpt2", "model.width=30", "model.heads=4"], "model.heads"),
    (["model.name=gpt2"], "model.name"),  # a language model on image data
    (["optim.lr"], "override 'optim.lr'"),
    (["budget.samples=10", "optim.batch_size=64"], "budget.samples"),
    (["seed=-3"], "seed"),
    (["optim.momentum=1.5"], "optim.momentum"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["name=../escape"], "name"),
    (["noise.kind=dp", "noise.sigma=1", "model.norm=group"], "noise.clip"),
    (["noise.sigma=1"], "noise.sigma"),  # sigma with noise.kind none
    (["noise.kind=gaussian", "noise.sigma=-1"], "noise.sigma"),
    (["noise.kind=dp", "noise.clip=1", "model.norm=batch"], "model.norm"),
    (["noise.kind=dp", "noise.clip=1", "model.norm=group", "noise.delta=2"], "noise.delta"),
    (["noise.kind=laplace"], "noise.kind"),
    (["log.noise_scale=true"], "log.noise_scale"),  # needs a micro-batch below the batch
    (["log.trackers=[mlflow]"], "log.trackers"),
    (["compile=true", "noise.kind=dp", "noise.sigma=1", "noise.clip=1"], "compile"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f for _, f in BAD])
def test_bad_config_is_one_line_naming_the_field(overrides, field, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("budget: {samples: 1000}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config), f"out={tmp_path}", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"goldenpath: {field}: "), lines[0]
    assert "; " in lines[0]  # ... and the fix


@pytest.mark.parametrize("text, field", [("optim: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "is not a mapping")])
def test_bad_yaml_file(text, field, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=field):
        load_config(path)


def test_missing_file_and_real_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "goldenpath", "train", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"goldenpath: {tmp_path / 'nope.yaml'}: file not found; "
                                               "check the path to the config file"]


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_registered_family_is_named_in_the_module_table_and_none_is_imported_by_config():
    import subprocess
    import sys

    probe = ("import sys\nimport goldenpath.config as c\n"
             "assert 'goldenpath.data' not in sys.modules and 'goldenpath.models' not in sys.modules\n"
             "c.load_config(None, ['model.name=mlp'])\n"
             "assert 'goldenpath.models' in sys.modules\n")
    subprocess.run([sys.executable, "-c", probe], check=True)  # config imports a family's module on first use
    import importlib

    from goldenpath.config import DATA_SOURCES, FAMILY_MODULES, MODEL_FAMILIES

    for module in {m for section in FAMILY_MODULES.values() for m in section.values()}:
        importlib.import_module(module)  # the one way a built-in registers: its module is imported
    for section, registry in (("data", DATA_SOURCES), ("model", MODEL_FAMILIES)):
        assert set(FAMILY_MODULES[section]) == set(registry)
        assert {name: cls.__module__ for name, cls in registry.items()} == FAMILY_MODULES[section]
