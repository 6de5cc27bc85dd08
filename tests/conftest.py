"""Shared fixtures: tiny configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import tempfile

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
