"""Shared fixtures and helpers: tiny configs that train in seconds on a CPU, a tiny sweep file, and readers
of a finished run."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["GOLDENPATH_CACHE"] = tempfile.mkdtemp(prefix="goldenpath-test-cache-")  # never the user's cache
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_TEACHER = [
    "data.source=teacher", "data.image_size=16", "data.eval_size=256", "data.probe_size=64",
    "model.name=cnn", "model.width=8", "model.depth=2",
    "optim.lr=0.05", "optim.batch_size=32", "log.progress=false",
    "budget.min_progress=null",  # tiny runs barely leave chance: only tests of stalling use the default
]
TINY_MARKOV = [
    "data.source=markov", "data.vocab_size=16", "data.order=2", "data.seq_len=16", "data.eval_size=32",
    "data.probe_size=16", "model.name=gpt2", "model.width=32", "model.depth=1", "model.heads=2",
    "optim.name=adamw", "optim.lr=0.003", "optim.batch_size=8", "log.progress=false", "budget.min_progress=null",
]


@pytest.fixture
def tiny_teacher(tmp_path):
    """Overrides for a tiny teacher-CNN run writing under tmp_path."""
    return [*TINY_TEACHER, f"out={tmp_path}", "name=run"]


@pytest.fixture
def tiny_markov(tmp_path):
    return [*TINY_MARKOV, f"out={tmp_path}", "name=run"]


@pytest.fixture
def bars():
    """A tqdm class to patch in for a module's own: it always draws (into a string, whatever the terminal) and
    keeps each bar's label, count, total, unit and drawn text in ``.closed`` when the bar closes."""
    from tqdm.auto import tqdm

    closed = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            self.out = io.StringIO()
            super().__init__(*args, **{**kwargs, "disable": False, "file": self.out})

        def close(self):
            if not self.disable:  # once: a closed bar is disabled
                closed.append({"desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                               "text": self.out.getvalue()})
            super().close()

    Recorded.closed = closed
    return Recorded


@pytest.fixture
def computed_pairs(monkeypatch):
    """The pairs of runs compare computes distances for (its pair cache serves the others), in a list that
    grows as compare runs; clear it to count from a point on."""
    from goldenpath.comparison import compare as cmp

    computed = []
    real = cmp.pair_table

    def counting(models, probe, pairs, *args, **kwargs):
        computed.extend(pairs)
        return real(models, probe, pairs, *args, **kwargs)

    monkeypatch.setattr(cmp, "pair_table", counting)
    return computed


def write_sweep(tmp_path: Path, body: str, name: str = "s") -> Path:
    """A sweep file ``<tmp_path>/<name>.yaml`` over a tiny teacher-CNN base, with ``body`` (grid, seeds, forks)."""
    base = tmp_path / "base.yaml"
    base.write_text("data: {source: teacher, image_size: 16, eval_size: 128, probe_size: 32}\n"
                    "model: {name: cnn, width: 8, depth: 2}\n"
                    "optim: {lr: 0.05, batch_size: 32}\n"
                    "budget: {samples: 1280, min_progress: null}\n"
                    "checkpoint: {targets: [2.28, 2.2], eval_every: 5}\n"
                    "log: {progress: false, sample_ids: true}\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\nout: {tmp_path / 'out'}\n" + body)
    return path


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def trained_model(config, run_dir: Path, which: str = "last") -> torch.nn.Module:
    """The weights of checkpoint ``which`` of a run, in a model built from its config."""
    from goldenpath.store import rundir as ckpt
    from goldenpath.models import build_model

    model = build_model(config.model, config.data.build().info, seed=config.seed)
    if config.precision == "fp64":
        model = model.double()
    return ckpt.load_weights(model, run_dir / "checkpoints" / which).requires_grad_(False)
