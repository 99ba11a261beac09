"""The registry of evaluation suites, and running some of them into each SAE's eval.json."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from saebench.errors import ConfigError
from saebench.evals.absorption import absorption_suite
from saebench.evals.consistency import consistency
from saebench.evals.core import core
from saebench.evals.inputs import EvalInputs
from saebench.evals.interp import interp_suite
from saebench.evals.prefixes import prefixes
from saebench.evals.probing import probing
from saebench.evals.tpp import tpp_suite

CORE_KEYS = ("sae", "random_baseline", "sae_without_gradients", "ce_convention", "by_k")
Suite = Callable[[EvalInputs], dict]
SUITES: dict[str, Suite] = {
    "core": core,
    "probing": probing,
    "tpp": tpp_suite,
    "absorption": absorption_suite,
    "interp": interp_suite,
    "consistency": consistency,
    "prefixes": prefixes,
}
DEFAULT_SUITES = ("core",)
INPUT_SPACE = ("tpp", "absorption")  # they read decoder rows in the space of the SAE's input: not a transcoder's


def check_suites(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise ConfigError(f"--suite: unknown {', '.join(unknown) or 'empty list'}; use some of {', '.join(SUITES)}")
    return list(dict.fromkeys(names))


def run_suites(inputs: EvalInputs, names: Sequence[str], previous: dict | None = None) -> dict:
    """eval.json for one SAE: `previous` (its last eval.json) with the named suites' sections replaced; "seconds"
    holds each suite's last run time (the model pass that every suite shares is not in it)."""
    result = {**(previous or {}), "run": str(inputs.home.path), "hook": inputs.hook, "split": inputs.config.eval.split}
    names = check_suites(names)
    if inputs.sae.cfg.transcoder and (bad := [n for n in names if n in INPUT_SPACE]):
        raise ConfigError(
            f"--suite {bad[0]} reads decoder rows where the SAE reads, but a transcoder writes elsewhere: "
            f"use {', '.join(n for n in SUITES if n not in INPUT_SPACE)}"
        )
    for name in names:
        started = time.perf_counter()
        section = SUITES[name](inputs)
        if name == "core":  # its figures sit at the top level; a rerun replaces all of them
            result = {k: v for k, v in result.items() if k not in CORE_KEYS} | section
        else:
            result[name] = section
        result["seconds"] = {**result.get("seconds", {}), name: round(time.perf_counter() - started, 1)}
    return result


RANDOM_KEYS = ("random", "random_baseline")


def section_rows(section: dict, prefix: str = "") -> list[dict]:
    """A suite's section of eval.json as table rows {"metric", "sae", "random SAE", "value"}, whatever its shape:
    the leaves under "sae" pair with those under "random" (or "random_baseline") at the same path; other numbers
    (a dense probe's accuracy, ...) go in "value". "settings" and text are left out."""
    rows = []
    flat = {side: _leaves(section.get(key)) for side, key in (("sae", "sae"), ("random SAE", _random_key(section)))}
    for leaf in dict.fromkeys([*flat["sae"], *flat["random SAE"]]):
        rows.append(
            {"metric": _join(prefix, leaf), "sae": flat["sae"].get(leaf), "random SAE": flat["random SAE"].get(leaf)}
        )
    for key, value in section.items():
        if key in ("sae", "settings", *RANDOM_KEYS):
            continue
        if isinstance(value, dict):
            rows += section_rows(value, _join(prefix, str(key)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append({"metric": _join(prefix, str(key)), "value": value})
    return rows


def _random_key(section: dict) -> str:
    return next((k for k in RANDOM_KEYS if k in section), RANDOM_KEYS[0])


def _leaves(node, prefix: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, _join(prefix, str(key))).items()}
    return {prefix: node} if isinstance(node, (int, float)) and not isinstance(node, bool) else {}


def _join(prefix: str, key: str) -> str:
    return f"{prefix} · {key}" if prefix and key else prefix or key
