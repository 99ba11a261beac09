"""Overview: each run's SAEs, eval figures next to the random baseline, training curves, the
distribution of feature densities and a sortable, filterable feature table."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd
import plotly.express as px
import state
import streamlit as st

from saebench.evals.suites import section_rows
from saebench.evaluate import EVAL_METRICS

SIDES = (("sae", "sae"), ("random", "random_baseline"))

st.set_page_config(page_title="saebench", layout="wide")
runs = state.runs()
run, hook = state.pick_run_and_hook(runs)
st.title(f"saebench · {run.name}")
if problem := state.problem(run):
    st.error(problem)
if hook is None:
    st.stop()

st.subheader(f"SAE on `{hook}`")
result = state.shown(run.eval, hook)
if result is None:
    st.info(f"No evaluation yet: run `saebench eval {run.path}` for FVU, L0, dead fraction and CE-loss recovered.")
else:
    keys = [k for k in EVAL_METRICS if k in result.get("sae", {})]
    columns = {"sae": "sae", "sae_without_gradients": "sae without gradients", "random_baseline": "random SAE"}
    if keys:
        table = {name: [result[c][k] for k in keys] for c, name in columns.items() if c in result}
        st.dataframe(
            pd.DataFrame({"metric": keys, **table, "what it is": [EVAL_METRICS[k] for k in keys]}), hide_index=True
        )
        st.caption(f"CE and KL in the `{result.get('ce_convention', 'non_special')}` convention (saebench.evaluate)")
    for suite, section in result.items():
        if isinstance(section, dict) and suite not in (*columns, "seconds", "by_k"):
            st.markdown(f"**{suite}**")
            st.dataframe(pd.DataFrame(section_rows(section)), hide_index=True)
            if section.get("settings"):
                st.caption(f"settings: {json.dumps(section['settings'])}")
    if "by_k" in result:
        st.caption("The same figures at each k′ (latents per token), as `saebench eval --k` wrote them")
        table = {
            f"{who} k′={k}": [r[part].get(m) for m in keys] for k, r in result["by_k"].items() for who, part in SIDES
        }
        st.dataframe(pd.DataFrame({"metric": keys, **table}), hide_index=True)
    if result.get("seconds"):
        st.caption("seconds per suite: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))

metrics = pd.DataFrame(state.shown(run.metrics, hook))
if "step" in metrics:
    curves = [c for c in ("fvu", "l0", "dead_fraction", "loss") if c in metrics]
    if curves:
        st.plotly_chart(
            px.line(
                metrics, x="step", y=curves, facet_row="variable" if len(curves) > 1 else None, height=160 * len(curves)
            ).update_yaxes(matches=None),
            width="stretch",
        )

store = state.store(run, hook)
if store is None:
    st.stop()
table = store.table()
at_k = f" at k′={store.meta['inference_k']}" if store.meta.get("inference_k") else ""
st.caption(
    f"{store.n_features} features, analysed{at_k} on {store.meta['n_tokens']:,} tokens "
    f"of the {store.meta['split']!r} split"
)
fired = table[table.density > 0]
dead = len(table) - len(fired)
st.plotly_chart(
    px.histogram(
        x=np.log10(fired.density),
        nbins=60,
        labels={"x": "log10 density (fires per token)"},
        title=f"feature densities ({dead} never fired)",
    ),
    width="stretch",
)

st.subheader("Features")
col1, col2 = st.columns([2, 1])
query = col1.text_input("filter by label or top token", key="filter")
lo, hi = col2.slider("log10 density (never fired: -12)", -12.0, 0.0, (-12.0, 0.0), 0.5)
shown = table.copy()
shown["log10_density"] = np.log10(shown.density.clip(lower=1e-12))
shown = shown[(shown.log10_density >= lo) & (shown.log10_density <= hi)]
if query:
    q = query.lower()
    shown = shown[
        shown.label.str.lower().str.contains(q, regex=False) | shown.top_token.str.lower().str.contains(q, regex=False)
    ]
assert isinstance(shown, pd.DataFrame)
run_index = runs.index(run)
shown.insert(0, "open", [state.feature_url(run_index, hook, f) for f in shown.feature])
st.dataframe(
    shown.drop(columns=["log10_density"]),
    hide_index=True,
    width="stretch",
    column_config={"open": st.column_config.LinkColumn("open", display_text="feature page")},
)
st.caption(f"{len(shown)} of {len(table)} features")
