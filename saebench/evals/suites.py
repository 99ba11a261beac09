"""The registry of evaluation suites, and running some of them into each SAE's eval.json."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from saebench.errors import ConfigError
from saebench.evals.core import core
from saebench.evals.inputs import EvalInputs
from saebench.evals.prefixes import prefixes

Suite = Callable[[EvalInputs], dict]
SUITES: dict[str, Suite] = {"core": core, "prefixes": prefixes}
DEFAULT_SUITES = ("core",)


def check_suites(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise ConfigError(f"--suite: unknown {', '.join(unknown) or 'empty list'}; use some of {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def run_suites(inputs: EvalInputs, names: Sequence[str], previous: dict | None = None) -> dict:
    """eval.json for one SAE: `previous` (its last eval.json) with the named suites' sections replaced."""
    result = {**(previous or {}), "run": str(inputs.home.path), "hook": inputs.hook, "split": inputs.config.eval.split}
    for name in check_suites(names):
        section = SUITES[name](inputs)
        if name == "core":
            result.update(section)
        else:
            result[name] = section
    return result
