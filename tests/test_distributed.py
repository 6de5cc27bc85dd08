"""Two CPU processes under `accelerate launch`: disjoint samples, weights in sync, same update as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from goldenpath.config import load_config
from goldenpath.training.trainer import train
from tests.conftest import TINY_TEACHER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(config_path, *overrides):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "goldenpath", "train", str(config_path), "cpu=true",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def ids(path):
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.int64)


def test_two_processes_see_disjoint_samples_and_stay_in_sync(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("budget: {samples: 640}\n")
    common = [*TINY_TEACHER, "precision=fp64", "optim.batch_size=32", "log.sample_ids=true", f"out={tmp_path}"]
    out = launch_two(config, *common, "name=two")
    assert out.returncode == 0, out.stderr[-3000:]
    two = tmp_path / "two"
    assert out.stdout.strip().splitlines()[-1] == str(two)
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "completed" and status["processes"] == 2 and status["replicas_in_sync"] is True

    # One process, two micro-batches of 16 per step: the same logical batches, so the same weights.
    one = train(load_config(config, [*common, "name=one", "optim.micro_batch_size=16"]))
    r0, r1 = ids(two / "samples" / "rank0.i64"), ids(two / "samples" / "rank1.i64")
    assert len(r0) == len(r1) == 320 and not set(r0.tolist()) & set(r1.tolist())
    assert sorted(torch.cat([r0, r1]).tolist()) == sorted(ids(one / "samples" / "rank0.i64").tolist())
    a, b = weights(two), weights(one)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12


def test_two_processes_normalise_by_the_tokens_of_the_whole_logical_batch(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "y" * (2 + (11 * i) % 23)}) + "\n" for i in range(200)))
    config = tmp_path / "lm.yaml"
    config.write_text("budget: {steps: 3}\n")
    common = ["data.source=hf_text", "data.path=json", f"data.data_files={docs}", "data.pack=false",
              "data.seq_len=24", "data.eval_size=4", "data.probe_size=2", "data.shuffle_buffer=16",
              "model.name=gpt2", "model.width=16", "model.heads=2", "model.depth=1", "precision=fp64",
              "optim.lr=0.5", "optim.batch_size=16", "log.progress=false", "budget.min_progress=null",
              f"out={tmp_path}"]
    out = launch_two(config, *common, "name=two")
    assert out.returncode == 0, out.stderr[-3000:]
    # Each rank reads every other example of the same shuffled stream, so the logical batches match
    # one process reading 16 in a row; ranks hold different token counts, which the all-reduce must fix.
    one = train(load_config(config, [*common, "name=one"]))
    a, b = weights(tmp_path / "two"), weights(one)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-12
    s_two = json.loads((tmp_path / "two" / "status.json").read_text())
    assert s_two["tokens"] == json.loads((one / "status.json").read_text())["tokens"]


def test_processes_whose_shards_run_out_unevenly_stop_together(tmp_path):
    """Two files of 30 and 50 documents, two processes: each reads its own file, and the one with fewer runs out
    first. Both stop at the last step every process has a full share of (they agree on it each step), so the
    run completes with the data exhausted, its replicas in sync."""
    for i, n in enumerate((30, 50)):
        (tmp_path / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"d{i}.{j} " + "z" * (j % 9)}) + "\n"
                                                         for j in range(n)))
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"text": "held out " * k}) + "\n" for k in range(1, 9)))
    files = json.dumps({"train": str(tmp_path / "part*.jsonl"), "validation": str(tmp_path / "heldout.jsonl")})
    config = tmp_path / "lm.yaml"
    config.write_text("budget: {steps: 100}\n")
    common = ["data.source=hf_text", "data.path=json", f"data.data_files={files}", "data.eval_split=validation",
              "data.pack=false", "data.seq_len=12", "data.eval_size=4", "data.probe_size=2", "data.shuffle_buffer=4",
              "model.name=gpt2", "model.width=16", "model.heads=2", "model.depth=1", "precision=fp64",
              "optim.lr=0.1", "optim.batch_size=8", "log.progress=false", "log.every=1",
              "budget.min_progress=null", f"out={tmp_path}", "name=two"]
    out = launch_two(config, *common)
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads((tmp_path / "two" / "status.json").read_text())
    assert status["state"] == "completed" and status["reason"] == "data exhausted", status
    assert status["step"] == 30 // 4 and status["replicas_in_sync"] is True


@pytest.mark.parametrize("noise", [["noise.kind=gaussian", "noise.sigma=4"],
                                   ["noise.kind=dp", "noise.sigma=1", "noise.clip=0.5", "model.norm=group"]],
                         ids=["gaussian", "dp"])
def test_two_processes_add_the_same_noise_once_per_step(tmp_path, noise):
    """The noise is drawn after the all-reduce, identically on both processes: the run equals one process."""
    config = tmp_path / "c.yaml"
    config.write_text("budget: {samples: 320}\n")
    common = [*TINY_TEACHER, "precision=fp64", "optim.batch_size=32", f"out={tmp_path}", *noise]
    out = launch_two(config, *common, "name=two")
    assert out.returncode == 0, out.stderr[-3000:]
    status = json.loads((tmp_path / "two" / "status.json").read_text())
    assert status["replicas_in_sync"] is True
    one = train(load_config(config, [*common, "name=one", "optim.micro_batch_size=16"]))
    quiet = train(load_config(config, [*common, "name=quiet", "optim.micro_batch_size=16", "noise.sigma=0"]))
    a, b, c = weights(tmp_path / "two"), weights(one), weights(quiet)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-10
    assert max(float((b[k] - c[k]).abs().max()) for k in a) > 1e-3  # the noise did something
