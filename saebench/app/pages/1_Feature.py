"""One feature's dashboard: examples highlighted by activation, quantile intervals, histogram,
logit lens, neighbours, a label saved to the store, export; search by text or id."""

import dataclasses
import html
import json
import random
import sys
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matching
import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st
from widgets import highlighted_tokens

from saebench.errors import SAEBenchError

_, run_index, hook, store = state.feature_page("feature")
assert store is not None  # feature_page stops the page without one


feature = state.int_param("feature", 0)
search_col, prev_col, next_col, rand_col = st.columns([6, 1, 1, 1])
query = search_col.text_input(
    "search: a feature id, or words (top tokens, logit-lens tokens, examples, labels)", key="search"
)
if prev_col.button("previous"):
    feature = max(0, feature - 1)
if next_col.button("next"):
    feature = min(store.n_features - 1, feature + 1)
if rand_col.button("random"):
    feature = random.randrange(store.n_features)
if query.strip().isdigit():
    feature = int(query.strip())
elif query.strip():
    hits = store.search(query, limit=20)
    if hits.empty:
        st.info(f"No feature matches {query!r}.")
    else:
        st.markdown(
            "  ".join(
                state.feature_link(run_index, hook, f) + (f" <i>{html.escape(lab)}</i>" if lab else "")
                for f, lab in zip(hits.feature, hits.label, strict=True)
            ),
            unsafe_allow_html=True,
        )
st.query_params["feature"] = str(feature)

try:
    card = store.feature(feature)
except SAEBenchError as e:
    st.error(str(e))
    st.stop()

st.title(f"Feature {card.id}" + (f" · {card.label}" if card.label else ""))
if store.meta.get("output_hook"):
    st.caption(
        f"a {store.meta['kind']} feature: its examples are where it reads (`{hook}`), its logit lens what it writes "
        f"(`{store.meta['output_hook']}`)"
    )
cols = st.columns(5)
cols[0].metric("density", f"{card.density:.3%}")
cols[1].metric("fires", f"{card.n_fires:,}")
cols[2].metric("mean |z|", f"{card.mean_activation:.3f}")
cols[3].metric("max |z|", f"{card.max_activation:.3f}")
median = card.quantiles.get(0.5)
cols[4].metric("median |z|", "—" if median is None else f"{median:.3f}")

for e in store.explanations(card.id):
    scores = ", ".join(f"{k} {v:.2f}" for k, v in (("detection", e.detection), ("fuzzing", e.fuzzing)) if v is not None)
    st.markdown(
        f"**explanation** by {html.escape(e.explainer)} · {html.escape(scores or e.error or 'unscored')}",
        help="from `saebench eval RUN --suite interp`: detection and fuzzing are balanced accuracies (0.5 is chance) "
        "on held-out examples; they differ by explainer",
    )
    st.text(e.text)

steer_col, trace_col, _ = st.columns([1, 1, 4])
steer_col.link_button(
    "steer with it", f"./Steer?run={run_index}&hook={quote(hook)}&features={card.id}:{card.max_activation or 1:.3g}"
)
if card.top_examples:
    ex = card.top_examples[0]
    start = max(1 if store.meta["data"].get("prepend_bos", True) else 0, ex.position - 47)
    text = "".join(ex.pieces[start : ex.position + 1])
    trace_col.link_button(
        "trace it",
        f"./Trace?run={run_index}&prompt={quote(text)}",
        help="its top example, cut at the token where it fires most, opened in Trace with that token as the query",
    )

with st.form("label"):
    label = st.text_input("label", value=card.label)
    note = st.text_area("note", value=card.note, height=68)
    if st.form_submit_button("save label"):
        store.set_label(card.id, label, note)
        st.success("saved")

scale = card.max_activation or 1.0


def show(ex, caption: str) -> None:
    """An example's value and the tokens around it, highlighted by the feature's codes."""
    lo, hi = max(0, ex.position - 24), min(len(ex.tokens), ex.position + 8)
    st.markdown(caption, help="hover a token for its code")
    st.markdown(highlighted_tokens(ex.pieces[lo:hi], ex.acts[lo:hi], scale, ex.position - lo), unsafe_allow_html=True)


left, right = st.columns([3, 2])
with left:
    st.subheader("Top activations")
    if not card.top_examples:
        st.info("This feature never fired on the analysed tokens.")
    for ex in card.top_examples:
        show(ex, f"**{ex.value:.3f}** · context {ex.context}, position {ex.position}")
    st.subheader("Across the activation range")
    for iv in reversed(card.quantile_examples):
        with st.expander(
            f"|z| in [{iv.low:.3f}, {iv.high:.3f}]  (quantiles {iv.q_low:.0%}–{iv.q_high:.0%}), "
            f"{len(iv.examples)} examples"
        ):
            for ex in iv.examples:
                show(ex, f"**{ex.value:.3f}**")
with right:
    edges, counts = card.histogram
    if counts:
        mids = [(a * b) ** 0.5 if a > 0 else b / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        fig = go.Figure(go.Bar(x=mids, y=counts, width=[b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]))
        fig.update_layout(title="|z| histogram (fires)", xaxis_type="log", height=260, margin=dict(t=40, b=10))
        st.plotly_chart(fig, width="stretch")
    if card.logit_lens is None:
        st.info(store.meta.get("logit_lens_note", "No logit lens for this model."))
    else:
        top, bottom = card.logit_lens
        output_hook = store.meta.get("output_hook")
        st.subheader("Logit lens" if output_hook is None else f"Output logit lens ({output_hook})")
        st.dataframe(
            pd.DataFrame(
                {
                    "promoted": [p for p, _ in top],
                    "logit": [v for _, v in top],
                    "suppressed": [p for p, _ in bottom],
                    "logit ": [v for _, v in bottom],
                }
            ),
            hide_index=True,
        )
    st.subheader("Neighbours")
    st.markdown(
        "decoder cosine: "
        + ", ".join(f"{state.feature_link(run_index, hook, j)} ({c:.2f})" for j, c in card.decoder_neighbours),
        unsafe_allow_html=True,
    )
    st.markdown(
        "co-activation (Jaccard): "
        + (
            ", ".join(f"{state.feature_link(run_index, hook, j)} ({c:.2f})" for j, c in card.coactivation_neighbours)
            or "none"
        ),
        unsafe_allow_html=True,
    )
    st.caption(store.meta["coactivation_statistic"])
    st.download_button(
        "export card (JSON)",
        json.dumps(dataclasses.asdict(card)),
        file_name=f"feature_{card.id}.json",
        mime="application/json",
    )
    rows = [
        {
            "kind": "top",
            "value": ex.value,
            "context": ex.context,
            "position": ex.position,
            "token": ex.pieces[ex.position],
            "text": "".join(ex.pieces),
        }
        for ex in card.top_examples
    ]
    st.download_button(
        "export examples (CSV)",
        pd.DataFrame(rows).to_csv(index=False),
        file_name=f"feature_{card.id}.csv",
        mime="text/csv",
    )

matching.matches_section(state.runs(), run_index, hook, card.id)
matching.splitting_section(state.runs(), run_index, hook, card.id)
