"""Sweeps: a grid of SAEs trained from one model pass, then evaluated (and optionally analysed).

    saebench sweep configs/tiny.yaml --grid sae.k=16,32,64 --grid sae.expansion=8,16 [--zip ...] [--suite ...]

The cells are the cartesian product of the --grid axes; --zip axes pair up value by value and make one
axis of the product. A cell may set `sae.*`, `harvest.hooks` (one hook each) and the train knobs that
are an SAE's own (PER_SAE_TRAIN); the rest (model, data, batches, token budget, seed) is the pass's and
every cell's. Each cell is a run folder of its own, runs/<name>/<cell>/ (its config.yaml, sae/,
eval.json, features.sqlite), so every command that takes a RUN takes RUN/<cell>; RUN itself names its
SAEs by cell (`saebench eval RUN` evaluates every cell from one model pass).

What bounds the SAEs of one pass is memory: each holds its weights, gradients and Adam state at once
(16 bytes per parameter), the steps run one after another (train.memory_needed); a grid that will not
fit is refused before the model runs. Under torchrun, train.distribute: hooks deals the cells to ranks.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from saebench import distributed as dist
from saebench.analysis import AnalysisConfig
from saebench.config import RunConfig, from_dict, load_config, to_dict
from saebench.errors import ConfigError, DataError
from saebench.evals.suites import DEFAULT_SUITES, check_suites
from saebench.pipeline import analyze, eval_from_config, train_from_config
from saebench.runs import Run
from saebench.train import refuse_overwrite

# the train knobs only an SAE's own trainer reads (train.SAETrainer); the others shape the shared batches
PER_SAE_TRAIN = (
    "lr warmup_steps decay_fraction grad_clip adam_betas normalize_activations b_dec_init enc_init_scale "
    "autocast_bf16 fused_step".split()
)


def parse_axis(item: str, flag: str = "--grid") -> tuple[str, list]:
    """ "sae.k=16,32,64" -> ("sae.k", [16, 32, 64]); the values are read as one YAML flow list, so
    "sae.matryoshka=[96,384],[192,384]" gives two lists."""
    key, sep, raw = item.partition("=")
    try:
        values = yaml.safe_load(f"[{raw}]") if sep and raw else None
    except yaml.YAMLError:
        values = None
    if not values:
        raise ConfigError(f"{flag} {item!r}: write it as key=v1,v2,..., e.g. {flag} sae.k=16,32,64")
    section, _, leaf = key.partition(".")
    if not (section == "sae" and leaf or key == "harvest.hooks" or section == "train" and leaf in PER_SAE_TRAIN):
        raise ConfigError(
            f"{flag} {key}: a sweep's cells share one model pass, so only sae.*, harvest.hooks and "
            f"train.{{{','.join(PER_SAE_TRAIN)}}} vary; set {key} for the whole sweep with --set"
        )
    return key, values


def cell_name(settings: dict[str, Any]) -> str:
    """{"sae.k": 16, "sae.activation": "topk"} -> "k16_topk": each value after its key's last part (a word
    value alone; null as "no" + that part: "nomatryoshka"), safe as a folder name."""
    parts = []
    for key, value in settings.items():
        leaf = key.rsplit(".", 1)[-1]
        if value is None:
            parts.append(f"no{leaf}")
            continue
        text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(text if re.fullmatch(r"[A-Za-z_][\w.]*", text) else leaf + text)
    return re.sub(r"[^\w.+-]", "_", "_".join(parts))


def grid_cells(grid: Sequence[str] = (), zipped: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The --grid and --zip axes -> cell name -> its settings {key: value}, in grid order."""
    axes = [[{key: v} for v in values] for key, values in (parse_axis(g) for g in grid)]
    if zipped:
        pairs = [parse_axis(z, "--zip") for z in zipped]
        if len({len(values) for _, values in pairs}) > 1:
            sizes = ", ".join(f"{key} has {len(values)}" for key, values in pairs)
            raise ConfigError(f"--zip lists pair up value by value, so they need one length ({sizes})")
        axes.append(
            [dict(zip([k for k, _ in pairs], vals, strict=True)) for vals in zip(*[v for _, v in pairs], strict=True)]
        )
    keys = [k for axis in axes for k in axis[0]]
    if not axes or len(set(keys)) < len(keys):
        raise ConfigError("a sweep needs one --grid or --zip axis per key, e.g. --grid sae.k=16,32,64")
    cells: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*axes):
        settings = {k: v for part in combo for k, v in part.items()}
        name = cell_name(settings)
        if name in cells:
            raise ConfigError(f"two cells would both be named {name}: give each axis distinct values")
        cells[name] = settings
    return cells


def cell_config(base: RunConfig, name: str, settings: dict[str, Any]) -> RunConfig:
    """The config of one cell: the sweep's with the cell's settings, a run folder inside the sweep's."""
    data = to_dict(base)
    for key, value in settings.items():
        section, leaf = key.split(".", 1)
        data[section][leaf] = value
    data.update(name=name, runs_dir=str(base.run_dir))
    cfg = from_dict(RunConfig, data)
    if len(cfg.harvest.hooks) != 1:
        raise ConfigError(
            f"cell {name} has {len(cfg.harvest.hooks)} hooks: a sweep trains one SAE per cell, so put the hooks "
            f"on an axis, e.g. --grid harvest.hooks={','.join(cfg.harvest.hooks)}"
        )
    return cfg


def sweep_from_config(
    cfg: RunConfig | str | Path,
    grid: Sequence[str] = (),
    zipped: Sequence[str] = (),
    overrides: Sequence[str] = (),
    resume: bool = False,
    suites: Sequence[str] = DEFAULT_SUITES,
    analysis: AnalysisConfig | None = None,
    stop_after_steps: int | None = None,
) -> dict:
    """`saebench sweep`: train the grid's cells from one model pass into runs/<name>/<cell>/, then evaluate
    them (`suites`, one model pass for all) and analyse them when `analysis` is given (one pass too).

    resume: continue a killed sweep where it stopped (training from the last checkpoint common to every
    cell; the eval and the analysis pass are rerun or resumed). Under torchrun only the training runs (each
    rank's cells with train.distribute: hooks); evaluate afterwards with `saebench eval RUN`.
    -> {"run_dir", "cells": name -> settings, "evaluated", "analysed"}."""
    base = cfg if isinstance(cfg, RunConfig) else load_config(cfg, list(overrides))
    check_suites(suites)
    cells = grid_cells(grid, zipped)
    configs = {name: cell_config(base, name, settings) for name, settings in cells.items()}
    dist.init(base.device)
    run = Run(base.run_dir)
    previous = run.sweep if resume else None
    if previous is not None and previous["cells"] != json.loads(json.dumps(cells)):
        raise ConfigError(
            f"{run.path} is a sweep of other cells ({', '.join(previous['cells'])}): resume it with its own "
            "--grid / --zip, or start another sweep with --set name=..."
        )
    if not resume and not dist.restarted():
        if run.sweep is not None:
            raise DataError(f"{run.path} already holds a sweep: pass --resume to continue it, or choose another name")
        refuse_overwrite(run.path / name for name in cells)
    dist.barrier()  # every rank has checked before rank 0 writes
    if dist.is_main():
        run.write_sweep({"grid": list(grid), "zip": list(zipped), "cells": cells})
    done = resume and all(run.cell(name).saes for name in cells)
    if not done:
        train_from_config(base, resume=resume, stop_after_steps=stop_after_steps, cells=configs)
    out = {"run_dir": str(run.path), "cells": cells, "evaluated": False, "analysed": False}
    if stop_after_steps is not None or dist.world() > 1:
        return out
    eval_from_config(run.path, suites)
    if analysis is not None:
        analyze(run.path, analysis, resume=resume)
    return {**out, "evaluated": True, "analysed": analysis is not None}


__all__ = ["PER_SAE_TRAIN", "cell_config", "cell_name", "grid_cells", "parse_axis", "sweep_from_config"]
