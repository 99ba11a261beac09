"""Runs, stores and models, loaded once per process; page state <-> the URL's query string.

Only the runs named on the command line (SAEBENCH_APP_RUNS) are ever opened: the URL names a
run by its position in that list, never by a path.
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Callable
from typing import TypeVar

import pandas as pd
import streamlit as st

import saebench as sb
from saebench.app_launcher import RUNS_ENV
from saebench.config import parse_dtype
from saebench.errors import SAEBenchError
from saebench.runs import Run

_D = TypeVar("_D", int, None)


@st.cache_resource
def load_runs(spec: str) -> list[Run]:
    return [Run(raw) for raw in spec.split(os.pathsep) if raw]


def runs() -> list[Run]:
    found = load_runs(os.environ.get(RUNS_ENV, ""))
    if not found:
        st.error("No runs given: start the app with `saebench app RUN [RUN ...]`.")
        st.stop()
    return found


def problem(run: Run) -> str | None:
    """What keeps the app from showing the run's SAEs (a damaged file, no trained SAE), or None."""
    try:
        return None if run.saes and run.config else f"{run.path} holds no trained SAE: train it with `saebench train`"
    except SAEBenchError as e:
        return str(e)


def shown(read: Callable, *args):
    """read(*args), or None with its error as a message in the page (a damaged file)."""
    try:
        return read(*args)
    except SAEBenchError as e:
        st.error(str(e))
        return None


@st.cache_resource
def _store(path: str) -> sb.FeatureStore:
    return sb.FeatureStore(path, writable=True)


def store(run: Run, hook: str) -> sb.FeatureStore | None:
    """The hook's feature store, or None with a message in the page saying how to make one."""
    path = run.saes[hook].store_path
    if not path.exists():
        st.info(
            f"{run.name} ({hook}) has no feature analysis yet: "
            f"run `saebench analyze {run.path}` to browse its features."
        )
        return None
    return shown(_store, str(path))


def _number_param(name: str, default, cast):
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        st.warning(f"`{name}={raw}` in the URL is not a number; using {default}.")
        return default


def int_param(name: str, default: _D = None) -> int | _D:
    return _number_param(name, default, int)


def float_param(name: str, default: float) -> float:
    return _number_param(name, default, float)


def pick_run_and_hook(all_runs: list[Run]) -> tuple[Run, str | None]:
    """Run and hook selectors bound to ?run= and ?hook=; no hook for a run with a problem."""
    i = index_param("run", len(all_runs), 0, "run")
    i = st.sidebar.selectbox("run", range(len(all_runs)), index=i, format_func=lambda k: all_runs[k].name)
    run = all_runs[i]
    hooks = [] if problem(run) else list(run.saes)
    if not hooks:
        return run, None
    want = st.query_params.get("hook", hooks[0])
    hook = st.sidebar.selectbox("SAE (hook)", hooks, index=hooks.index(want) if want in hooks else 0)
    st.query_params["run"], st.query_params["hook"] = str(i), hook
    return run, hook


def feature_url(run_index: int, hook: str, feature: int) -> str:
    return f"./Feature?run={run_index}&hook={hook}&feature={feature}"


def feature_link(run_index: int, hook: str, feature: int, text: str | None = None) -> str:
    """HTML link to a feature's page that opens in this tab (markdown links open a new one)."""
    href = html.escape(feature_url(run_index, hook, feature))
    return f'<a href="{href}" target="_self">{html.escape(text or str(feature))}</a>'


def k_param(sae: sb.SAE) -> int | None:
    """k' (latents per token) for a hierarchical SAE, a sidebar slider bound to ?k= (default: its k);
    None for the others, which encode by their own rule."""
    if not sae.cfg.family.hierarchical:
        return None
    top = sae.cfg.k
    k = int_param("k", top)
    if not 1 <= k <= top:
        st.warning(f"k'={k} in the URL is outside 1..{top}; using {top}.")
        k = top
    k = st.sidebar.select_slider("k′ (latents per token)", options=list(range(1, top + 1)), value=k, key="k")
    st.query_params["k"] = str(k)
    return k


@st.cache_resource
def _model(name: str, device: str, dtype: str):
    return sb.load_model(name, device, parse_dtype(dtype))


@st.cache_resource
def _sae(path: str, device: str) -> sb.SAE:
    return sb.load_sae(path, device)


def run_model(run: Run):
    """The run's model, loaded once per process (runs on the same model share it)."""
    return _model(run.config.model, run.config.device, run.config.dtype)


def run_sae(run: Run, hook: str) -> sb.SAE:
    """The hook's SAE, loaded once per process; a damaged file stops the page with a message."""
    sae = shown(_sae, str(run.saes[hook].sae_dir), run.config.device)
    if sae is None:
        st.stop()
    return sae


def feature_page(title: str, need_store: bool = True) -> tuple[Run, int, str, sb.FeatureStore | None]:
    """The start of a page about one SAE: page config, run and hook selectors, the store; stops the
    page with a message when there is no store and the page needs one. -> (run, index of the run,
    hook, store or None)."""
    st.set_page_config(page_title=f"saebench · {title}", layout="wide")
    all_runs = runs()
    run, hook = pick_run_and_hook(all_runs)
    if hook is None:
        st.error(f"{run.name} holds no trained SAE.")
        st.stop()
    if not need_store and not run.saes[hook].store_path.exists():
        return run, all_runs.index(run), hook, None
    s = store(run, hook)
    if s is None and need_store:
        st.stop()
    return run, all_runs.index(run), hook, s


def strengths_param(name: str = "features") -> dict[int, float]:
    """?features=12:8,40:-4 -> {12: 8.0, 40: -4.0}; malformed entries are dropped with a warning."""
    out = {}
    for item in (st.query_params.get(name) or "").split(","):
        if not item.strip():
            continue
        f, _, v = item.partition(":")
        try:
            out[int(f)] = float(v or 0)
        except ValueError:
            st.warning(f"`{item}` in ?{name}= is not FEATURE:STRENGTH; ignored.")
    return out


def format_strengths(strengths: dict[int, float]) -> str:
    return ",".join(f"{f}:{v:g}" for f, v in strengths.items())


def choice_param(name: str, options: tuple[str, ...] | list[str], default: str) -> int:
    """Index of ?name= in options (default's index when absent or unknown)."""
    raw = st.query_params.get(name, default)
    return list(options).index(raw if raw in options else default)


def progress_callback(text: str) -> Callable[[int, int], None]:
    """A progress bar and a callback(done, total) that moves it."""
    bar = st.progress(0.0, text=text)

    def move(done: int, total: int) -> None:
        bar.progress(done / max(1, total), text=f"{text} ({done}/{total})")

    return move


def saes_on_model(all_runs: list[Run], base: Run) -> dict[str, tuple[int, sb.SAE]]:
    """Every SAE of the runs on `base`'s model: hook -> (index of its run, SAE); the first run wins a hook."""
    out = {}
    for i, run in enumerate(all_runs):
        if problem(run) or run.config.model != base.config.model:
            continue
        for name, home in run.saes.items():
            out.setdefault(home.hook, (i, run_sae(run, name)))
    return out


_BY_PATH: dict = {Run: lambda run: str(run.path)}  # as a cache key, a run is its folder


@st.cache_resource(hash_funcs=_BY_PATH)
def head_scores(run: Run) -> dict:
    """Previous-token and induction scores per head on the run's held-out text, computed once per run."""
    data = dataclasses.replace(run.config.data, split="test", max_documents=200)
    contexts = sb.load_contexts(data, run_model(run).tokenizer, show_progress=False)
    return sb.head_scores(run_model(run), contexts)


@st.cache_resource(show_spinner=False, hash_funcs={**_BY_PATH, dict: lambda saes: sorted(saes)})
def induction_circuit(run: Run, saes: dict[str, sb.SAE], layer: int, head: int, _progress=None):
    """sb.summarize_induction of one head through the SAEs (known by their hooks), on 8 repeated held-out
    spans of 32 tokens."""
    from saebench.induction import summarize_induction

    data = dataclasses.replace(run.config.data, split="test", max_documents=300)
    contexts = sb.load_contexts(data, run_model(run).tokenizer, show_progress=False)
    return summarize_induction(
        run_model(run), saes, layer, head, contexts.tokens, span=32, n_prompts=8, progress=_progress
    )


def component_links(table: pd.DataFrame, column: str, owners: dict[str, int], into: str = "page") -> pd.DataFrame:
    """Add a column `into`: the feature page of each component that is an SAE feature of a known run."""
    links = []
    for name in table[column]:
        hook, feature = sb.parse_component(name)
        links.append(feature_url(owners[hook], hook, feature) if feature is not None and hook in owners else None)
    return table.assign(**{into: links})


def link_columns(*names: str) -> dict:
    """Column config showing these columns as "open" links."""
    return {c: st.column_config.LinkColumn(c, display_text="open") for c in names}


LINK = link_columns("page")


def index_param(name: str, n: int, default: int, what: str) -> int:
    """?name= as an index into n things; out of range -> a warning naming the range, and default."""
    i = int_param(name, default)
    if not 0 <= i < n:
        st.warning(f"There is no {what} {i} (they run 0..{n - 1}); showing {what} {default}.")
        return default
    return i


def attribution_graph(run: Run, transcoders: dict[str, sb.SAE], saes: dict[str, sb.SAE], prompt: str, progress=None):
    """sb.attribution_graph of the prompt through the transcoders (and the other SAEs for QK); the session keeps
    the last one (a cached function could not replay the progress bar)."""
    key = (str(run.path), sorted(transcoders), sorted(saes), prompt)
    if st.session_state.get("graph_key") != key:
        st.session_state["graph"] = sb.attribution_graph(
            run_model(run), transcoders, prompt, saes=saes, progress=progress
        )
        st.session_state["graph_key"] = key
    return st.session_state["graph"]
