"""Which features fire on my text: per token its top features; pick a token to list all of them."""

import html
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import state
import streamlit as st

import saebench as sb

run, run_index, hook, store = state.feature_page("prompt")
assert store is not None  # feature_page stops the page without one

k = state.k_param(state.run_sae(run, hook))
prompt = st.text_area("text", value=st.query_params.get("prompt", ""), key="prompt", height=100)
top = st.slider("features per token", 1, 20, 5)
if not prompt.strip():
    st.info("Type some text to see which features fire on each token.")
    st.stop()
st.query_params["prompt"] = prompt

with st.spinner("encoding"):
    result = sb.features_firing_on(
        state.run_model(run), state.run_sae(run, hook), hook, prompt, top=max(top, 64), vocab=store.vocab, k=k
    )
if result.truncated:
    st.warning(f"The text is longer than the model's context: only its first {len(result.tokens)} tokens are encoded.")


rows = [
    {
        "position": t.position,
        "token": t.piece,
        "features": "" if t.special else ", ".join(f"{f} ({v:.2f})" for f, v in t.features[:top]),
    }
    for t in result.tokens
]
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

choices = [t.position for t in result.tokens if not t.special]
position = st.selectbox("token", choices, format_func=lambda p: f"{p}: {result.tokens[p].piece!r}", key="token")
chosen = result.tokens[position]
st.subheader(f"All features on {chosen.piece!r} (position {position})")
st.markdown(
    "\n".join(
        f"- {state.feature_link(run_index, hook, f)} **{v:.3f}** {html.escape(store.label(f))}"
        for f, v in chosen.features
    )
    or "none",
    unsafe_allow_html=True,
)
