"""Dataclass configs loaded from YAML; keys map 1:1 to fields, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from saebench.data import DataConfig
from saebench.errors import ConfigError
from saebench.evals.settings import (
    AbsorptionSettings,
    ConsistencySettings,
    InterpSettings,
    ProbingSettings,
    TPPSettings,
)
from saebench.sae import SAEConfig
from saebench.train import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, key: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"{key}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class HarvestConfig:
    """Which activations to collect and how (stream into training, or write a disk cache)."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.1.hook_resid_post"])
    n_tokens: int = 1_000_000
    batch_size: int = 64  # contexts per model forward
    exclude_special: bool = True  # leave out BOS / EOS / pad / CLS / SEP positions
    store_dtype: str = "float32"
    buffer_tokens: int = 262_144  # streaming: shuffling buffer size (per hook)
    cache_dir: str | None = None  # cache mode: default runs/<name>/activations
    shard_contexts: int = 512  # cache mode: contexts per shard
    # also the gradient of the model's summed next-token loss at each hook (Harvester): one full forward and
    # one backward per batch; needed by the families that rank by it (gradient_topk)
    gradients: bool = False


@dataclass
class EvalSection:
    n_tokens: int = 100_000  # held-out activations for the core metrics
    n_contexts: int = 64  # held-out contexts for CE / KL with the SAE spliced in
    split: str = "test"
    # non_special: splice at non-special positions, count predictions between non-special tokens;
    # sae_bench: SAEBench 0.6.0's (every position spliced; mask by the input token; KL keeps the last position)
    ce_convention: Literal["non_special", "sae_bench"] = "non_special"
    consistency: ConsistencySettings = field(default_factory=ConsistencySettings)
    probing: ProbingSettings = field(default_factory=ProbingSettings)
    tpp: TPPSettings = field(default_factory=TPPSettings)
    absorption: AbsorptionSettings = field(default_factory=AbsorptionSettings)
    interp: InterpSettings = field(default_factory=InterpSettings)


@dataclass
class RunConfig:
    """One YAML file: the model, its text, what to harvest, the SAE, and how to train and evaluate it."""

    name: str = "tiny"
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)  # d_in and n_latents from the hook (SAEConfig.resolve)
    train: TrainConfig = field(default_factory=TrainConfig)  # its seed and device are the run's
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        defaults = TrainConfig()
        for knob in ("seed", "device"):
            given, run = getattr(self.train, knob), getattr(self, knob)
            if given != getattr(defaults, knob) and given != run:
                raise ConfigError(f"train.{knob} is the run's {knob}: set `{knob}: {given}` at the top level instead")
            setattr(self.train, knob, run)
        if self.sae.family.gradients and not self.harvest.gradients:
            raise ConfigError(
                f"sae.activation {self.sae.activation} ranks latents by the model's loss gradient: "
                "set harvest.gradients: true"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    obj = cls(**kwargs)
    for name in ("dtype", "store_dtype"):
        if name in fields:
            parse_dtype(getattr(obj, name), f"{where + '.' if where else ''}{name}")
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        options = typing.get_args(tp)
        if value not in options:
            close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{path}: unknown {value!r}; {hint}use one of {', '.join(map(str, options))}")
        return value
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ConfigError(f"{path}: expected a list of {len(items)}, got {value!r}")
        return tuple(_coerce(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(items, value, strict=True)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if dataclasses.is_dataclass(tp):
        return from_dict(typing.cast(type, tp), value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            value = float(value.replace("_", ""))  # YAML reads 1e4 (no dot) as a string
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def load_config(path: str | Path, overrides: Sequence[str] = (), cls: type = RunConfig) -> Any:
    """Read a YAML config; `overrides` are "a.b=value" strings applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(cls, apply_overrides(data, overrides))


def apply_overrides(data: dict, overrides: Sequence[str] = (), example: str = "harvest.n_tokens=100000") -> dict:
    """Set each "a.b=value" string (value read as YAML) in the nested mapping `data`, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as key=value, e.g. {example}")
        key, raw = item.split("=", 1)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
