"""Steer the model with SAE features: default and steered generations side by side with per-token
log-probs, a sweep of concept presence and fluency against strength, and candidate features ranked
by output score."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st
from plotly.subplots import make_subplots
from widgets import logprob_tokens

import saebench as sb
from saebench.errors import SAEBenchError
from saebench.steering import MODES, POSITIONS

run, run_index, hook, store = state.feature_page("steer", need_store=False)
model, sae = state.run_model(run), state.run_sae(run, hook)
qp = st.query_params
st.title("Steer")
if store is None:
    st.info(
        "Without a feature analysis there are no labels, search or ranking: "
        f"run `saebench analyze {run.path}` for them."
    )


def default_strength(f: int) -> float:
    """The feature's largest analysed activation (a natural unit), or 1 without a store."""
    return round(store.feature(f).max_activation or 1.0, 2) if store is not None else 1.0


def describe(f: int) -> str:
    label = store.label(f) if store is not None and 0 <= f < store.n_features else ""
    return f"{f}" + (f" · {label}" if label else "")


features = state.strengths_param("features")
prompt = st.text_area("prompt", value=qp.get("prompt", "In the beginning"), key="prompt", height=80)

add = st.text_input(
    "add a feature: its id" + (", or words to search the feature store" if store is not None else ""), key="add"
)
if add.strip().isdigit():
    hits = [int(add.strip())]
elif add.strip() and store is not None:
    hits = store.search(add, limit=8).feature.tolist()
    if not hits:
        st.info(f"No feature matches {add!r}.")
else:
    hits = []
if hits:
    cols = st.columns(min(len(hits), 4))
    for n, f in enumerate(hits):
        if cols[n % len(cols)].button(f"add {describe(f)}", key=f"add_{f}"):
            features[f] = default_strength(f) if 0 <= f < sae.cfg.n_latents else 1.0
for f in [f for f in features if not 0 <= f < sae.cfg.n_latents]:
    st.error(
        f"feature {f} is out of range: this SAE has {sae.cfg.n_latents} features (0-{sae.cfg.n_latents - 1}); left out."
    )
    del features[f]

strengths = {}
for f, v in list(features.items()):
    name_col, value_col, drop_col = st.columns([4, 2, 1])
    name_col.markdown(state.feature_link(run_index, hook, f, f"feature {describe(f)}"), unsafe_allow_html=True)
    strengths[f] = value_col.number_input(
        "strength", value=float(v), step=1.0, key=f"strength_{f}", label_visibility="collapsed"
    )
    if drop_col.button("remove", key=f"drop_{f}"):
        del strengths[f]

with st.sidebar:
    multiplier = st.number_input("global multiplier", value=state.float_param("mult", 1.0), step=0.5, key="mult")
    mode = st.selectbox("mode", MODES, index=state.choice_param("mode", MODES, "add"), key="mode")
    positions = st.selectbox(
        "positions", POSITIONS, index=state.choice_param("positions", POSITIONS, "all"), key="positions"
    )
    temperature = st.number_input(
        "temperature", min_value=0.0, value=state.float_param("temp", 0.0), step=0.1, key="temp"
    )
    seed = st.number_input("seed", min_value=0, value=state.int_param("seed", 0), step=1, key="seed")
    n_tokens = st.number_input(
        "tokens", min_value=1, max_value=int(model.cfg.n_ctx), value=state.int_param("tokens", 32), key="tokens"
    )

qp.update(
    {
        "prompt": prompt,
        "features": state.format_strengths(strengths),
        "mult": f"{multiplier:g}",
        "mode": mode,
        "positions": positions,
        "temp": f"{temperature:g}",
        "seed": str(int(seed)),
        "tokens": str(int(n_tokens)),
    }
)

if not strengths:
    st.info("Add features to steer with (by id or by searching), or open Steer from a feature's page.")
elif not prompt.strip():
    st.info("Type a prompt to continue.")
else:
    try:
        with st.spinner("generating"):
            r = sb.compare_steering(
                model,
                sae,
                {f: v * multiplier for f, v in strengths.items()},
                prompt,
                hook=hook,
                mode=mode,
                positions=positions,
                max_new_tokens=int(n_tokens),
                temperature=temperature,
                seed=int(seed),
            )
    except SAEBenchError as e:
        st.error(str(e))
        st.stop()
    left, right = st.columns(2)
    for col, title, gen in ((left, "default", r.default), (right, "steered", r.steered)):
        col.subheader(title)
        col.markdown(
            logprob_tokens(gen.pieces, gen.logprobs, r.prompt_pieces[1:]),
            unsafe_allow_html=True,
            help="shaded by 1 - p under the model that generated it; hover for log p",
        )
        col.metric("perplexity under the unsteered model", f"{gen.perplexity:.2f}")
    with st.expander("per-token log-probs"):
        st.dataframe(r.table(), hide_index=True, width="stretch")

    st.subheader("Sweep")
    scales_text = st.text_input("strength multipliers", value=qp.get("sweep", "0,0.5,1,2,4"), key="sweep")
    try:
        scales = [float(x) for x in scales_text.split(",") if x.strip()]
    except ValueError:
        st.error(f"{scales_text!r}: write numbers separated by commas, e.g. 0,1,2,4")
        scales = []
    if scales and (st.button("run sweep") or "sweep" in qp):
        qp["sweep"] = ",".join(f"{s:g}" for s in scales)
        rows = sb.steering_sweep(
            model,
            sae,
            strengths,
            scales,
            prompt,
            hook=hook,
            mode=mode,
            max_new_tokens=int(n_tokens),
            temperature=temperature,
            seed=int(seed),
            positions=positions,
            progress=state.progress_callback("sweeping"),
        )
        sweep = pd.DataFrame(rows)
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(
            go.Scatter(x=sweep.scale, y=sweep.concept, name="concept (mean log p of lens tokens)", mode="lines+markers")
        )
        fig.add_trace(
            go.Scatter(x=sweep.scale, y=sweep.fluency_ppl, name="perplexity (unsteered model)", mode="lines+markers"),
            secondary_y=True,
        )
        fig.update_layout(height=320, margin=dict(t=30, b=10), xaxis_title="multiplier of the strengths")
        fig.update_yaxes(type="log", secondary_y=True)
        st.plotly_chart(fig, width="stretch")
        st.dataframe(sweep, hide_index=True, width="stretch")

if store is not None:
    st.subheader("Candidate features by output score")
    st.caption(
        "Output score (Arad, Mueller & Belinkov 2025): at the last token of the neutral prompt, "
        "each candidate's code is raised by 10 x the largest code there; "
        "score = (1 - best rank / vocabulary) x top probability of its 20 logit-lens tokens "
        "at the next token. Features scoring low rarely steer well."
    )
    query = st.text_input(
        "candidates: words to search, or empty for the densest features", value=qp.get("rank", ""), key="rank"
    )
    neutral = st.text_input("neutral prompt", value=sb.NEUTRAL_PROMPT, key="neutral")
    n_candidates = st.number_input("candidates", 1, 200, 20, key="n_candidates")
    if st.button("rank candidates") or "rank" in qp:
        qp["rank"] = query
        pool = (
            store.search(query, limit=int(n_candidates))
            if query.strip()
            else store.table().nlargest(int(n_candidates), "density")
        )
        ranked = sb.rank_by_output_score(
            model,
            sae,
            [int(f) for f in pool.feature],
            prompt=neutral,
            hook=hook,
            progress=state.progress_callback("scoring"),
        )
        ranked["label"] = [store.label(f) for f in ranked.feature]
        ranked["page"] = [state.feature_url(run_index, hook, f) for f in ranked.feature]
        st.dataframe(ranked, hide_index=True, width="stretch", column_config=state.LINK)
