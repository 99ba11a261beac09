"""Each evaluation suite's settings: `eval.<suite>` in a run config (YAML or --set eval.probing.ks=[1,5]).

Only dataclasses and typing here: saebench.config imports this module. The suites check values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ProbingSettings:
    """Sparse probing (SAEBench's variant of Gurnee et al. 2023) on tasks from the bundled corpus."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])  # latents per sparse probe
    tasks: list[Literal["source", "code", "text"]] = field(default_factory=lambda: ["source", "code", "text"])
    n_train: int = 150  # samples per class in the probes' train split (contexts for source, tokens otherwise)
    n_test: int = 50  # samples per class in the test split
    context_size: int = 128  # SAEBench's context_length
    C: float = 1.0  # inverse L2 strength of the logistic probe (sklearn's C, SAEBench's value)
    seed: int = 42  # SAEBench's random_seed


@dataclass
class TPPSettings:
    """Targeted probe perturbation (SAEBench) on the probing suite's document-source task, data and probes."""

    n_ablated: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])  # SAEBench's n_values


@dataclass
class ConsistencySettings:
    # the run folder of a second seed of this run's config; None: the sibling run folder (same runs_dir)
    # whose config differs from this one's only in seed and name, the first by name when there are several
    against: str | None = None
