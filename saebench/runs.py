"""A run folder, and the one owner of its layout:

    RUN/config.yaml              the resolved RunConfig
    RUN/activations/             the activation cache (harvest.py owns what is inside)
    RUN/.analysis/               an interrupted analysis pass (analysis.py owns what is inside)
    RUN/graphs/<prompt>.json     attribution graphs (`saebench graph`; the prompt's first words and a hash)
    one hook:   RUN/sae/ (cfg.json + sae.safetensors), RUN/checkpoints/, RUN/metrics.jsonl,
                RUN/eval.json (+ RUN/eval.<suite>.safetensors), RUN/features.sqlite
    several:    the same per SAE under RUN/<hook dir>/ (harvest.hook_dirname)
    a sweep:    RUN/sweep.json (its grid, cell name -> settings) and each cell's SAE under RUN/<cell>/, a run
                folder of its own (the cell's config.yaml, sae/, ...); the run's SAEs are named by cell
A transcoder's folder is keyed by its input hook, as an SAE's; SAEHome.output_hook names where it writes.

Every file read here that is damaged or half-written is one DataError naming it and the fix.

    run = sb.Run("runs/tiny")
    sae = run.load_sae()               # the run's SAE (pass a hook in a multi-hook run)
    run.eval(hook), run.metrics(hook)  # eval.json, metrics.jsonl (None when absent)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import yaml

from saebench.atomic import atomic_save_file, atomic_write_text
from saebench.config import RunConfig, from_dict, to_dict
from saebench.errors import ConfigError, DataError
from saebench.harvest import hook_dirname
from saebench.interop import load_sae
from saebench.models import load_model
from saebench.readers import damaged, read_json, read_jsonl, read_safetensors, read_yaml
from saebench.sae import SAE

CONFIG = "config.yaml"
SAE_DIR = "sae"
EVAL = "eval.json"
METRICS = "metrics.jsonl"
STORE_NAME = "features.sqlite"
ACTIVATIONS = "activations"
ANALYSIS_STATE = ".analysis"
SWEEP = "sweep.json"
GRAPHS = "graphs"


@dataclass(frozen=True)
class SAEHome:
    """The folder of one SAE of a run: RUN itself for a one-hook run, RUN/<hook dir> otherwise."""

    hook: str
    path: Path
    output_hook: str | None = None  # a transcoder's output hook (None for an SAE)

    @property
    def sae_dir(self) -> Path:
        return self.path / SAE_DIR

    @property
    def eval_path(self) -> Path:
        return self.path / EVAL

    def eval_tensors_path(self, suite: str) -> Path:
        """A suite's per-latent arrays beside eval.json: eval.<suite>.safetensors."""
        return self.path / f"eval.{suite}.safetensors"

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def store_path(self) -> Path:
        return self.path / STORE_NAME


class Run:
    """A run folder (see the module docstring for its layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """An existing run folder; DataError when there is none."""
        run = cls(path)
        if not (run.path / CONFIG).exists():
            raise DataError(f"{run.path} is not a run directory (no {CONFIG}): train one with `saebench train CONFIG`")
        return run

    def siblings(self) -> list[Run]:
        """The other run folders beside this one (the same runs_dir), by name."""
        here = self.path.resolve()
        return [Run(p) for p in sorted(here.parent.iterdir()) if p != here and (p / CONFIG).is_file()]

    @classmethod
    def homes_for(cls, run_dir: str | Path, hooks: list[str] | dict[str, str]) -> dict[str, SAEHome]:
        """Where each hook's SAE goes: RUN for one hook, RUN/<hook dir> for several; given sweep cells
        (cell name -> its hook), RUN/<cell> each."""
        run_dir = Path(run_dir)
        if isinstance(hooks, dict):
            return {name: SAEHome(hook, run_dir / name) for name, hook in hooks.items()}
        if len(hooks) == 1:
            return {hooks[0]: SAEHome(hooks[0], run_dir)}
        return {h: SAEHome(h, run_dir / hook_dirname(h)) for h in hooks}

    # -- the config ----------------------------------------------------------------------------
    @cached_property
    def config(self) -> RunConfig:
        path = self.path / CONFIG
        if not path.exists():
            raise DataError(f"{self.path} is not a run directory (no {CONFIG}): train one with `saebench train CONFIG`")
        data = read_yaml(path, "copy the run again or retrain it")
        if not isinstance(data, dict):
            raise damaged(path, "copy the run again or retrain it", "not a mapping of keys")
        sae = data.get("sae") or {}
        for key in ("d_in", "n_latents"):  # runs written before the sae section was an SAEConfig
            if key in sae and sae[key] is None:
                del sae[key]
        try:
            return from_dict(RunConfig, data)
        except ConfigError as e:
            raise DataError(f"{path}: {e}; fix the key or retrain the run") from None

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    @cached_property
    def sweep(self) -> dict | None:
        """sweep.json of a sweep (its grid and cells, name -> settings); None for any other run."""
        path = self.path / SWEEP
        return read_json(path, "rerun the sweep with --resume") if path.exists() else None

    def write_sweep(self, spec: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / SWEEP, json.dumps(spec, indent=1) + "\n")

    def cell(self, name: str) -> Run:
        """A sweep's cell: a run folder of its own."""
        return Run(self.path / name)

    @property
    def analysis_state_dir(self) -> Path:
        return self.path / ANALYSIS_STATE

    def graph_path(self, prompt: str) -> Path:
        """Where `saebench graph` writes a prompt's attribution graph by default."""
        slug = "-".join(re.findall(r"[A-Za-z0-9]+", prompt)[:6])[:48] or "prompt"
        return self.path / GRAPHS / f"{slug}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}.json"

    # -- its SAEs ------------------------------------------------------------------------------
    @cached_property
    def saes(self) -> dict[str, SAEHome]:
        """hook (a sweep: cell name) -> the folder of its trained SAE, in sorted folder order (empty before
        training ends)."""
        one = (self.path / SAE_DIR / "cfg.json").exists()
        folders = [self.path] if one else sorted(p.parent.parent for p in self.path.glob(f"*/{SAE_DIR}/cfg.json"))
        homes = {}
        for folder in folders:
            meta = read_json(folder / SAE_DIR / "cfg.json", "retrain the SAE or copy the folder again")
            hook = meta.get("hook") or (folder.name if folder != self.path else self.config.harvest.hooks[0])
            homes[folder.name if self.sweep else hook] = SAEHome(hook, folder, meta.get("output_hook"))
        return homes

    def trained_homes(self) -> dict[str, SAEHome]:
        """The SAEs of a finished training run; DataError naming the fix otherwise."""
        if not (self.path / CONFIG).exists() or not self.saes:
            raise DataError(
                f"{self.path} is not a finished training run: it holds no trained SAE (needs {CONFIG} and {SAE_DIR}/); "
                "train one with `saebench train CONFIG`"
            )
        return self.saes

    def home(self, hook: str | None = None) -> SAEHome:
        """One SAE's folder; `hook` picks one of a run of several (its name, hook or folder name)."""
        homes = self.trained_homes()
        if hook is None and len(homes) == 1:
            return next(iter(homes.values()))
        if hook in homes:
            return homes[hook]
        for home in homes.values():
            if hook in (home.hook, home.path.name):
                return home
        raise DataError(
            f"{self.path} holds SAEs on {', '.join(homes)}: pass --hook (hook=...) to pick one"
            if hook is None
            else f"{self.path} has no SAE on {hook!r}; it has {', '.join(homes)}"
        )

    def load_sae(self, hook: str | None = None, device: str | torch.device | None = None) -> SAE:
        return load_sae(self.home(hook).sae_dir, device or self.config.device)

    def load_saes(self, device: str | torch.device | None = None) -> dict[str, SAE]:
        """hook -> SAE, every SAE of the run (on the run's device unless `device` says otherwise)."""
        homes = self.saes or self.trained_homes()
        return {h: load_sae(home.sae_dir, device or self.config.device) for h, home in homes.items()}

    def load_model(self):
        return load_model(self.config.model, self.config.device, self.config.torch_dtype)

    # -- what was written about them -----------------------------------------------------------
    def eval(self, hook: str | None = None) -> dict | None:
        """eval.json of the hook's SAE (None before `saebench eval`)."""
        path = self.home(hook).eval_path
        return read_json(path, f"rerun `saebench eval {self.path}`") if path.exists() else None

    def write_eval(self, hook: str, result: dict) -> Path:
        path = self.home(hook).eval_path
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        return path

    def eval_tensors(self, suite: str, hook: str | None = None) -> dict[str, torch.Tensor] | None:
        """The per-latent arrays a suite wrote beside eval.json (None when it wrote none)."""
        path = self.home(hook).eval_tensors_path(suite)
        fix = f"rerun `saebench eval {self.path} --suite {suite}`"
        return read_safetensors(path, "cpu", fix) if path.exists() else None

    def write_eval_tensors(self, hook: str, suite: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.home(hook).eval_tensors_path(suite)
        atomic_save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return path

    def metrics(self, hook: str | None = None) -> list[dict] | None:
        """The training log of the hook's SAE, one dict per logging step (None when there is none)."""
        path = next((p for p in (self.home(hook).metrics_path, self.path / METRICS) if p.exists()), None)
        fix = f"resume the training (`saebench train CONFIG --resume`) to rewrite {METRICS}"
        return read_jsonl(path, fix) if path else None


def activations_dir(cfg: RunConfig) -> Path:
    """Where a run config's activation cache goes: harvest.cache_dir, else RUN/activations."""
    return Path(cfg.harvest.cache_dir) if cfg.harvest.cache_dir else cfg.run_dir / ACTIVATIONS
