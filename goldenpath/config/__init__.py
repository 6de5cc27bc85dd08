"""Run configuration: the :mod:`goldenpath.config.sections` dataclass tree, loaded from YAML plus dotted
``key=value`` overrides (``load_config``), and written back as plain mappings (``to_dict``).

Every field is typed; unknown keys and wrong types raise :class:`ConfigError` naming the field, which the
CLI prints as one line (``goldenpath: <field>: <problem>; <fix>``) with exit code 2. The sections, their
checks and the data and model families are re-exported here, so ``from goldenpath.config import ...``
names every part of a config.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from goldenpath.config.sections import (  # noqa: F401  (re-exported: the config's whole vocabulary in one place)
    DATA_SOURCES, FAMILY_MODULES, MODEL_FAMILIES, BudgetConfig, CheckpointConfig, Config, ConfigError, DataConfig,
    ForkConfig, LogConfig, ModelConfig, NoiseConfig, OptimConfig, _family, _names, accumulation_steps, data_source,
    model_family, require)

__all__ = [
    "BudgetConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LogConfig",
    "ModelConfig", "OptimConfig", "auto_precision", "data_source", "load_config", "model_family", "to_dict",
]


# ----------------------------------------------------------------------------- loading

class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed: ~10x faster
    """SafeLoader that also reads 1e-3 as a float (YAML 1.1 needs a dot: 1.0e-3)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str) -> Any:
    """Check ``value`` (from YAML) against the annotation ``tp`` and return it in the field's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return _convert(value, alternative, where)
            except ConfigError:
                pass
        return _convert(value, inner[-1], where)
    if origin is dict:
        require(isinstance(value, dict), where, f"expected a mapping, got {value!r}", "write {key: value, ...}")
        return {_convert(k, args[0], where): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        require(value in args, where, f"unknown value {value!r}", f"use one of {list(args)}")
        return value
    if origin is tuple:
        require(isinstance(value, (list, tuple)), where, f"expected a list, got {value!r}", "write [a, b, ...]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        require(len(value) == len(args), where, f"expected {len(args)} values, got {len(value)}",
                f"write {len(args)} values")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        require(isinstance(value, bool), where, f"expected true/false, got {value!r}", "write true or false")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 samples
        require(ok, where, f"expected an integer, got {value!r}", "write a whole number")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, where, f"expected a number, got {value!r}", "write a number such as 0.1 or 1e-3")
        return float(value)
    if tp is str:
        require(isinstance(value, str), where, f"expected a string, got {value!r}", "quote the value")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {where}")


@functools.cache
def _hints(cls) -> dict:
    """A config class's resolved field annotations (resolving them is most of reading a config)."""
    return typing.get_type_hints(cls)


def _build(cls, raw: Any, where: str):
    """Build dataclass ``cls`` from a mapping, naming the field of any error."""
    label = where or "config"
    require(isinstance(raw, dict), label, f"expected a mapping, got {raw!r}", "write key: value lines")
    if cls in (DataConfig, ModelConfig):
        section, key = ("data", "source") if cls is DataConfig else ("model", "name")
        choice = raw.get(key, cls.__dataclass_fields__[key].default)
        family = _family(section, choice) if isinstance(choice, str) else None
        require(family is not None, f"{where}.{key}", f"unknown {key} {choice!r}", f"use one of {_names(section)}")
        cls = family
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        require(key in fields, f"{where}.{key}".lstrip("."), "unknown key",
                f"valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        sub = f"{where}.{name}".lstrip(".")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, sub)
        else:
            kwargs[name] = _convert(value, tp, sub)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.1'`` -> (['optim', 'lr'], 0.1); the value is read as YAML."""
    key, sep, value = text.partition("=")
    require(bool(sep) and bool(key.strip()), f"override {text!r}", "expected key=value",
            "write overrides as section.key=value, e.g. optim.lr=0.1")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot read value {value!r} ({e.problem})", "write a YAML scalar or list") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides) -> dict:
    """The raw mapping with dotted ``key=value`` overrides applied to a copy of it (itself when there are none)."""
    import copy

    if not overrides:
        return raw
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            require(isinstance(child, dict), ".".join(keys[: i + 1]), "is a value, not a section",
                    f"override a key inside it, not {text!r}")
            node = child
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning unreadable files into ConfigError."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found", "check the path to the config file") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory", "give the path of a YAML config file") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not a text file", "give the path of a YAML config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{at}", "fix the YAML syntax") from None
    raw = {} if raw is None else raw
    require(isinstance(raw, dict), str(path), "is not a mapping", "write key: value lines")
    return raw


def auto_precision(*, cuda: bool) -> str:
    """What ``precision: auto`` means: bf16 autocast on a CUDA GPU, float32 elsewhere."""
    return "bf16" if cuda else "fp32"


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a plain mapping (as read from YAML)."""
    raw = {k: v for k, v in raw.items() if k != "goldenpath"}  # provenance written into run directories
    config = _build(Config, raw, "")
    if config.precision == "auto":  # resolved here, so a run's config.yaml says what it computes in
        import torch

        cuda = not config.cpu and torch.cuda.is_available()
        config = dataclasses.replace(config, precision=auto_precision(cuda=cuda))
    config.check()
    return config


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Load a Config from a YAML file (or the defaults when ``path`` is None) plus dotted overrides.

    Raises:
        ConfigError: naming the first bad field and how to fix it.
    """
    raw = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return config_from_dict(apply_overrides(raw, overrides))


def to_dict(config) -> dict:
    """Plain nested dict (tuples as lists) of a config or section, ready for YAML or JSON (new containers;
    the leaves are the config's own immutable values)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(x) for x in config]
    if isinstance(config, dict):
        return {k: to_dict(x) for k, x in config.items()}
    return config

