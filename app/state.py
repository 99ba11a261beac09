"""Runs, stores and models, loaded once per process; page state <-> the URL's query string.

Only the runs named on the command line (SAEBENCH_APP_RUNS) are ever opened: the URL names a
run by its position in that list, never by a path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import streamlit as st

import saebench as sb
from saebench.app_launcher import RUNS_ENV
from saebench.errors import SAEBenchError
from saebench.pipeline import run_sae_dirs


@dataclass
class RunView:
    name: str
    path: Path
    saes: dict[str, Path]  # hook -> folder holding sae/ (and eval.json, features.sqlite)
    problems: list[str] = field(default_factory=list)

    def eval(self, hook: str) -> dict | None:
        path = self.saes[hook] / "eval.json"
        return json.loads(path.read_text()) if path.exists() else None

    def metrics(self, hook: str) -> pd.DataFrame | None:
        path = next((p for p in (self.saes[hook] / "metrics.jsonl", self.path / "metrics.jsonl") if p.exists()), None)
        if path is None:
            return None
        return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


@st.cache_resource
def load_runs(spec: str) -> list[RunView]:
    views = []
    for raw in [s for s in spec.split(os.pathsep) if s]:
        path = Path(raw)
        saes = {}
        for d in run_sae_dirs(path):
            cfg = json.loads((d / "cfg.json").read_text())
            saes[cfg.get("hook") or d.parent.name] = d.parent
        views.append(RunView(path.name, path, saes, [] if saes else [f"{path} holds no trained SAE: train it with `saebench train`"]))
    return views


def runs() -> list[RunView]:
    views = load_runs(os.environ.get(RUNS_ENV, ""))
    if not views:
        st.error("No runs given: start the app with `saebench app RUN [RUN ...]`.")
        st.stop()
    return views


@st.cache_resource
def _store(path: str) -> sb.FeatureStore:
    return sb.FeatureStore(path, writable=True)


def store(run: RunView, hook: str) -> sb.FeatureStore | None:
    """The hook's feature store, or None with a message in the page saying how to make one."""
    path = run.saes[hook] / "features.sqlite"
    if not path.exists():
        st.info(f"{run.name} ({hook}) has no feature analysis yet: run `saebench analyze {run.path}` to browse its features.")
        return None
    try:
        return _store(str(path))
    except SAEBenchError as e:
        st.error(str(e))
        return None


def int_param(name: str, default: int | None = None) -> int | None:
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        st.warning(f"`{name}={raw}` in the URL is not a number; using {default}.")
        return default


def pick_run_and_hook(views: list[RunView]) -> tuple[RunView, str | None]:
    """Run and hook selectors bound to ?run= and ?hook=."""
    i = int_param("run", 0)
    if not 0 <= i < len(views):
        st.warning(f"There is no run {i}; showing run 0.")
        i = 0
    i = st.sidebar.selectbox("run", range(len(views)), index=i, format_func=lambda k: views[k].name)
    run = views[i]
    hooks = list(run.saes)
    if not hooks:
        return run, None
    want = st.query_params.get("hook", hooks[0])
    hook = st.sidebar.selectbox("SAE (hook)", hooks, index=hooks.index(want) if want in hooks else 0)
    st.query_params["run"], st.query_params["hook"] = str(i), hook
    return run, hook


def feature_url(run_index: int, hook: str, feature: int) -> str:
    return f"./Feature?run={run_index}&hook={hook}&feature={feature}"


@st.cache_resource
def model(name: str, device: str = "cpu"):
    return sb.load_model(name, device)


def live_store(run: RunView, hook: str) -> sb.FeatureStore | None:
    """The store with the run's model attached (loaded once per process), for live encoding."""
    s = store(run, hook)
    if s is not None:
        s.attach(model=model(s.meta["model"], s.meta.get("device", "cpu")))
    return s


def feature_page(title: str, live: bool = False) -> tuple[int, str, sb.FeatureStore]:
    """The start of a page that needs one SAE's store: page config, run and hook selectors, the
    store (with the model attached if `live`); stops the page with a message when there is none.
    -> (index of the chosen run, hook, store)."""
    st.set_page_config(page_title=f"saebench · {title}", layout="wide")
    views = runs()
    run, hook = pick_run_and_hook(views)
    if hook is None:
        st.error(f"{run.name} holds no trained SAE.")
        st.stop()
    s = live_store(run, hook) if live else store(run, hook)
    if s is None:
        st.stop()
    return views.index(run), hook, s
