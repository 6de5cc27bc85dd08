"""Checkpoint files: atomic directory swaps survive a crash at any point; resume state round-trips."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from goldenpath.store import files, rundir as ckpt


def test_a_crash_while_filling_keeps_the_previous_directory(tmp_path):
    path = tmp_path / "last"
    files.replace_dir(path, lambda d: (d / "a.txt").write_text("old"))

    def crash(d):
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        files.replace_dir(path, crash)
    assert (path / "a.txt").read_text() == "old"
    files.replace_dir(path, lambda d: (d / "a.txt").write_text("new"))  # the leftover temp dir is no obstacle
    assert (path / "a.txt").read_text() == "new" and not (tmp_path / "last.tmp").exists()


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    path = tmp_path / "last"
    files.replace_dir(path, lambda d: (d / "a.txt").write_text("old"))
    path.rename(tmp_path / "last.old")  # the first rename happened, the second did not
    assert files.resolve_dir(path) == path and (path / "a.txt").read_text() == "old"


def test_atomic_write_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "status.json"
    files.write_json(path, {"a": 1})

    def torn(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(path, torn)
    assert json.loads(path.read_text()) == {"a": 1}


def test_atomic_writes_sync_every_file_and_the_directory_once_and_keep_the_old_files_on_a_crash(tmp_path, monkeypatch):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    files.atomic_writes({a: lambda tmp: tmp.write_text("old a"), b: lambda tmp: tmp.write_text("old b")})
    synced = []
    monkeypatch.setattr(files.os, "fsync", synced.append)
    files.atomic_writes({a: lambda tmp: tmp.write_text("new a"), b: lambda tmp: tmp.write_text("new b")})
    assert (a.read_text(), b.read_text()) == ("new a", "new b") and len(synced) == 3  # two files, one directory

    def torn(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_writes({a: lambda tmp: tmp.write_text("newer a"), b: torn})
    assert (a.read_text(), b.read_text()) == ("new a", "new b")  # nothing is renamed before every file is whole


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: torch.optim.AdamW(p, lr=0.01)])
def test_resume_state_round_trip_continues_identically(tmp_path, make):
    def setup():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, make(model.parameters())

    def step(model, opt):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model, opt = setup()
    for _ in range(3):
        step(model, opt)
    ckpt.write_rank_state(tmp_path, 0, {"position": 48})
    ckpt.write_shared_state(tmp_path, model, opt, {"step": 3})
    random.random(), np.random.rand()
    expected_py, expected_np = random.random(), np.random.rand()
    step(model, opt)  # the reference continues
    reference = [p.detach().clone() for p in model.parameters()]

    fresh, fresh_opt = setup()
    train_state, stream_state = ckpt.load_resume_state(tmp_path, 0, fresh, fresh_opt)
    assert train_state == {"step": 3} and stream_state == {"position": 48}
    random.random(), np.random.rand()
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    step(fresh, fresh_opt)  # draws its batch from the restored torch RNG
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), reference))


def test_metrics_log_drops_lines_after_the_resumed_step_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(0, 50, 10)) + '{"step": 5')
    log = ckpt.MetricsLog(path, resume_step=20)
    log.write({"step": 21})
    log.close()
    assert [r["step"] for r in ckpt.read_metrics(tmp_path)] == [0, 10, 20, 21]


def test_tied_weights_save_and_load(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    a, b = Tied(), Tied()
    ckpt.save_checkpoint(tmp_path / "target-1", a, {"target": 1.0})
    ckpt.load_weights(b, tmp_path / "target-1")
    assert torch.equal(a.emb.weight, b.emb.weight) and b.out.weight is b.emb.weight
    assert json.loads((tmp_path / "target-1" / "meta.json").read_text()) == {"target": 1.0}


def test_run_dir_names_every_path_of_a_run_and_reads_what_the_trainer_wrote(tiny_teacher, tmp_path):
    from goldenpath.config import load_config
    from goldenpath.training.trainer import train

    run_dir = train(load_config(None, [*tiny_teacher, "budget.samples=640", "checkpoint.targets=[2.3]",
                                       "checkpoint.steps=[10]", "checkpoint.best=true",
                                       "budget.stop_at_last_target=false"]))
    run = ckpt.RunDir(run_dir)
    assert run.exists() and run.config == run_dir / "config.yaml" and run.state() == "completed"
    assert run.checkpoint(at_loss=2.3) == run_dir / "checkpoints" / "target-2.3" == run.target_dirs()[0]
    assert run.checkpoint(at_step=10).is_dir() and run.best.is_dir() and run.last.is_dir()
    assert ckpt.read_meta(run.checkpoint(at_step=10))["step"] == 10
    assert run.resume_stream(0)["position"] == 640 and run.resume_stream(1) is None
    assert ckpt.read_metrics(run)[-1]["step"] == 20 and not ckpt.RunDir(tmp_path / "nothing").exists()
    # what a kill leaves while a checkpoint is filled (.tmp) or swapped (.old) is no checkpoint: compare and
    # noise read them as targets "2.tmp" and a second 2.3, and crashed
    import shutil

    for leftover in ("target-2.tmp", "target-2.3.old", "step-10.tmp"):
        shutil.copytree(run.checkpoint(at_loss=2.3), run_dir / "checkpoints" / leftover)
    assert run.target_dirs() == [run_dir / "checkpoints" / "target-2.3"]
    assert run.saved("step") == [run_dir / "checkpoints" / "step-10"]
