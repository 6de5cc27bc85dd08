"""Run directories: layout, safetensors checkpoints, metrics, status and the resume state.

Layout (:class:`RunDir` names every path; runs/README.md)::

    <run>/config.yaml  status.json  metrics.jsonl
    <run>/checkpoints/target-<loss>/   model.safetensors + meta.json   (first eval loss <= target)
    <run>/checkpoints/step-<step>/     model.safetensors + meta.json   (checkpoint.steps)
    <run>/checkpoints/best/            model.safetensors + meta.json   (checkpoint.best)
    <run>/checkpoints/last/            resume state: model, optimizer, train state, per-process RNG + stream
    <run>/samples/rank<r>.i64          the sample ids each process trained on (log.sample_ids)
    <run>/noise/                       goldenpath noise: tables and figures per checkpoint

Every file is written atomically and every checkpoint directory is filled under a temporary name and swapped
in (:mod:`goldenpath.store.files`), so a kill at any moment leaves the previous checkpoint whole. Tensors are
stored with safetensors, everything else as JSON: nothing in a run directory is ever unpickled.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model

import goldenpath
from goldenpath.config import ConfigError, config_from_dict, read_yaml, to_dict
from goldenpath.config.identity import RESUMABLE
from goldenpath.store.files import git_hash, read_json, replace_dir, write_json, write_text

# ----------------------------------------------------------------------------- the run directory

WEIGHTS = "model.safetensors"
FINISHED = ("completed", "diverged", "stalled")  # a run in one of these states is not run again
META = "meta.json"


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory (the layout above): readers and writers of a run go through it."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.checkpoints / "last")
    stream_end = property(lambda self: self.checkpoints / "stream-end")  # a diverged run's streams, where they stopped
    best = property(lambda self: self.checkpoints / "best")
    noise = property(lambda self: self.path / "noise")

    def exists(self) -> bool:
        """Whether this is a run directory (it holds config.yaml)."""
        return self.config.exists()

    @staticmethod
    def checkpoint_name(*, at_loss: float | None = None, at_step: int | None = None) -> str:
        """``target-<loss>`` (first eval loss <= at_loss) or ``step-<n>`` (checkpoint.steps)."""
        return f"target-{at_loss:g}" if at_loss is not None else f"step-{at_step}"

    def checkpoint(self, *, at_loss: float | None = None, at_step: int | None = None) -> Path:
        return self.checkpoints / self.checkpoint_name(at_loss=at_loss, at_step=at_step)

    def target_dirs(self) -> list[Path]:
        """The loss-target checkpoints that hold weights, in name order (not a checkpoint still being filled,
        ``target-<loss>.tmp``, nor the copy a swap keeps, ``.old``, that a kill can leave behind)."""
        return self.saved("target")

    def saved(self, kind: str) -> list[Path]:
        """The finished ``<kind>-<number>`` checkpoints (``kind``: target or step) that hold weights, in name
        order."""
        return [d for d in sorted(self.checkpoints.glob(f"{kind}-*"))
                if _number(d.name.split("-", 1)[1]) and has_weights(d)]

    def status(self) -> dict:
        """status.json, or {} before the run has written one."""
        return read_json(self.status_file) if self.status_file.exists() else {}

    def state(self) -> str | None:
        return self.status().get("state")

    def samples_file(self, rank: int) -> Path:
        return self.path / "samples" / f"rank{rank}.i64"

    def resume_stream(self, rank: int = 0) -> dict | None:
        """The stream state of process ``rank`` in the resume state, or None when there is none."""
        path = self.last / f"rank{rank}.json"
        return read_json(path)["stream"] if path.exists() else None

    def final_stream(self, rank: int = 0) -> dict | None:
        """Where process ``rank``'s stream stopped: as a diverged run saved it (``stream-end/``), else as its resume
        state holds it (a stopped run's); None when there is neither."""
        path = self.stream_end / f"rank{rank}.json"
        return read_json(path)["stream"] if path.exists() else self.resume_stream(rank)

    def resume_sums(self, rank: int = 0) -> list | None:
        """The step statistics process ``rank`` gathered since its last logged step, in the resume state (None
        when there is none, or it was written before they were kept)."""
        path = self.last / f"rank{rank}.json"
        return read_json(path).get("sums") if path.exists() else None

    def prepare(self, config) -> None:
        """Create the directory with config.yaml, or check that an existing one holds the same config
        (up to :data:`goldenpath.config.identity.RESUMABLE`)."""
        mine = to_dict(config)
        if self.config.exists():
            theirs = to_dict(config_from_dict(read_yaml(self.config)))
            diff = sorted(k for k in _diff(mine, theirs) if k not in RESUMABLE)
            if diff:
                raise ConfigError("name", f"{self.path} holds a run with another config (differs in "
                                  f"{', '.join(diff)})", "use another name= or out=, or delete that directory")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config, config_text(mine))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for k in keys:
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(prefix + k)
    return out


def has_weights(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / WEIGHTS).exists()


def read_meta(checkpoint_dir: str | Path) -> dict:
    return read_json(Path(checkpoint_dir) / META)


# ----------------------------------------------------------------------------- the run directory


def config_text(config_dict: dict) -> str:
    """config.yaml: the resolved config plus provenance (ignored when the file is loaded back)."""
    provenance = {"goldenpath": {"version": goldenpath.__version__, "git": git_hash()}}
    return yaml.safe_dump(config_dict, sort_keys=False) + yaml.safe_dump(provenance, sort_keys=False)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def target_name(target: float) -> str:
    return RunDir.checkpoint_name(at_loss=target)


def update_status(run_dir: str | Path, **fields) -> dict:
    """Merge ``fields`` into status.json (atomically) and return the whole status."""
    run = RunDir(run_dir)
    status = run.status()
    status.update(fields)
    write_json(run.status_file, status)
    return status


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: str | Path, *, resume_step: int | None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _complete(line) and json.loads(line)["step"] <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in keep))
        elif resume_step is None:
            write_text(self.path, "")
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _complete(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:  # a line torn by a kill
        return False


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and _complete(line)]


# ----------------------------------------------------------------------------- model checkpoints


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``model.safetensors`` + ``meta.json`` (+ the optimizer state) as one directory, atomically."""
    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / WEIGHTS))
        if optimizer is not None:
            tensors, plain = _optimizer_split(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(plain))
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    return replace_dir(path, fill)


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | Path) -> bool:
    """Load the optimizer state a checkpoint holds; False when it holds none."""
    path = Path(path)
    if not (path / "optimizer.safetensors").exists():
        return False
    plain = read_json(path / "optimizer.json")
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), plain))
    return True


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load ``<path>/model.safetensors`` into ``model`` (strict) and return it."""
    load_model(model, str(Path(path) / WEIGHTS), strict=True)
    return model


# ----------------------------------------------------------------------------- resume state


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(state), py_gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = plain["python"]
    random.setstate((version, tuple(state), py_gauss))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain["state"].setdefault(str(idx), {})[k] = v
    return tensors, plain


def _optimizer_join(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in plain["state"].items()}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": plain["param_groups"]}


def write_rank_state(directory: Path, rank: int, stream_state: dict, sums: list[float] | None = None) -> None:
    """This process's part of the resume state: its RNG states, stream position and the step statistics it
    gathered since its last logged step (``sums``; floats round-trip exactly through JSON)."""
    tensors, plain = rng_state()
    save_file(tensors, str(directory / f"rank{rank}.safetensors"))
    (directory / f"rank{rank}.json").write_text(json.dumps({"rng": plain, "stream": stream_state, "sums": sums}))


def write_shared_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       train_state: dict) -> None:
    """The part of the resume state all processes share: model, optimizer and loop counters."""
    save_model(model, str(directory / WEIGHTS))
    tensors, plain = _optimizer_split(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "state.json").write_text(json.dumps({"train": train_state, "optimizer": plain}, indent=1))


def load_resume_state(directory: Path, rank: int, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore model, optimizer and this process's RNG states; return (train state, stream state)."""
    load_weights(model, directory)
    state = read_json(directory / "state.json")
    device_state = _optimizer_join(load_file(str(directory / "optimizer.safetensors")), state["optimizer"])
    optimizer.load_state_dict(device_state)
    rank_plain = read_json(directory / f"rank{rank}.json")
    set_rng_state(load_file(str(directory / f"rank{rank}.safetensors")), rank_plain["rng"])
    return state["train"], rank_plain["stream"]
