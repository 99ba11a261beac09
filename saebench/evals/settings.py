"""The settings of each evaluation suite, one small dataclass per suite, nested in config.EvalSection under
the suite's name (`--set eval.consistency.against=runs/tiny-seed1`). Imports nothing from saebench: config.py
imports this module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ConsistencySettings:
    # the run folder of a second seed of this run's config; None: the sibling run folder (same runs_dir)
    # whose config differs from this one's only in seed and name, the first by name when there are several
    against: str | None = None
