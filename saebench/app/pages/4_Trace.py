"""Why does a head attend where it does: a head finder, then one head's QK score split into
(query-side, key-side) component pairs, its output split by (key position, component), and the
direct logit attribution, through every SAE of the given runs upstream of the head."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st
from plotly.subplots import make_subplots

import saebench as sb
from saebench.errors import SAEBenchError

st.set_page_config(page_title="saebench · trace", layout="wide")
runs = state.runs()  # all of them: a run's index is its index in the URL
qp = st.query_params
base_index = state.index_param("run", len(runs), 0, "run")
base = runs[base_index]
if state.problem(base):
    st.error(f"{base.name} holds no trained SAE to trace through: train one with `saebench train`.")
    st.stop()
model = state.run_model(base)
saes = state.saes_on_model(runs, base)
owners = {hook: i for hook, (i, _) in saes.items()}
skipped = [r.name for r in runs if not state.problem(r) and r.config.model != base.config.model]
st.title("Trace")
st.caption(
    f"model `{base.config.model}`; SAEs on "
    + ", ".join(f"`{h}`" for h in saes)
    + (f"; runs on other models are left out: {', '.join(skipped)}" if skipped else "")
)

L, H = model.cfg.n_layers, model.cfg.n_heads
with st.expander("head finder", expanded="layer" not in qp):
    with st.spinner("scoring heads on held-out text"):
        scores = state.head_scores(base)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("previous-token score", "induction score"))
    for col, key in ((1, "prev_token"), (2, "induction")):
        fig.add_trace(
            go.Heatmap(
                z=scores[key].tolist(),
                x=list(range(H)),
                y=list(range(L)),
                colorscale="Blues",
                zmin=0,
                zmax=1,
                showscale=col == 2,
                hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=col,
        )
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=1)
    fig.update_layout(height=120 + 60 * L, margin=dict(t=40, b=10))
    st.plotly_chart(fig, width="stretch")
best = divmod(int(scores["induction"].argmax()), H)

prompt = st.text_area(
    "prompt", value=qp.get("prompt", "The cat sat on the mat. The cat sat on the mat."), key="prompt", height=80
)
if not prompt.strip():
    st.info("Type a prompt to trace.")
    st.stop()
tokens = sb.prompt_tokens(model, prompt)[0].tolist()
n = len(tokens)
if n > model.cfg.n_ctx:
    st.error(f"The prompt is {n} tokens; the model's context is {model.cfg.n_ctx}. Shorten it.")
    st.stop()
pieces = [model.tokenizer.decode([t]) for t in tokens]


def label(p: int) -> str:
    return f"{p} {pieces[p]!r}"


c1, c2, c3, c4 = st.columns(4)
layer = c1.selectbox("layer", range(L), index=state.index_param("layer", L, best[0], "layer"), key="layer")
head = c2.selectbox("head", range(H), index=state.index_param("head", H, best[1], "head"), key="head")
q = c3.selectbox(
    "query position", range(n), index=state.index_param("q", n, n - 1, "query position"), format_func=label, key="q"
)
keys = [None, *range(q + 1)]
k_param = state.int_param("k")
k = c4.selectbox(
    "key position",
    keys,
    index=keys.index(k_param) if k_param in keys else 0,
    format_func=lambda p: "most attended" if p is None else label(p),
    key="k",
)

downstream_hooks = [
    h
    for h in saes
    if h == f"blocks.{layer}.attn.hook_z"
    or ("resid" in h and h not in (f"blocks.{layer}.hook_resid_pre",) and int(h.split(".")[1]) >= layer)
]
d1, d2 = st.columns(2)
down_hook = d1.selectbox(
    "project the head's output on a feature of",
    [None, *downstream_hooks],
    index=([None, *downstream_hooks].index(qp.get("down")) if qp.get("down") in downstream_hooks else 0),
    format_func=lambda h: "(none: rank by norm)" if h is None else h,
    key="down",
)
down_sae = saes[down_hook][1] if down_hook else None
last = down_sae.cfg.n_latents - 1 if down_sae else 0
down_feature = d2.number_input(
    "downstream feature", 0, last, min(state.int_param("down_f", 0), last), key="down_f", disabled=down_sae is None
)

qp.update({"run": str(base_index), "prompt": prompt, "layer": str(layer), "head": str(head), "q": str(q)})
for name, value in (("k", k), ("down", down_hook), ("down_f", down_feature if down_hook else None)):
    if value is None:
        if name in qp:
            del qp[name]
    else:
        qp[name] = str(value)

upstream = {h: sae for h, (_, sae) in saes.items()}
try:
    with st.spinner("tracing"):
        r = sb.trace_attention(
            model,
            prompt,
            layer,
            head,
            q,
            k,
            saes=upstream,
            downstream=down_sae,
            downstream_feature=int(down_feature) if down_sae else None,
            logit_tokens="top",
        )
except SAEBenchError as e:
    st.error(str(e))
    st.stop()

m = st.columns(4)
m[0].metric(
    "query → key", f"{r.query_pos} → {r.key_pos}", help=f"{r.tokens[r.query_pos]!r} attends to {r.tokens[r.key_pos]!r}"
)
m[1].metric("attention weight", f"{r.pattern:.3f}")
m[2].metric("pre-softmax score", f"{r.score:.3f}")
m[3].metric("sum of the QK pairs", f"{float(r.pair_scores.sum()):.3f}")

left, right = st.columns(2)
left.plotly_chart(r.attention_figure(), width="stretch")
right.plotly_chart(r.pairs_figure(), width="stretch")
st.plotly_chart(r.marginals_figure(), width="stretch")

t1, t2 = st.columns(2)
with t1:
    st.subheader("Top QK pairs")
    pairs = state.component_links(r.top_pairs(20), "query_component", owners, into="query page")
    pairs = state.component_links(pairs, "key_component", owners, into="key page")
    st.dataframe(pairs, hide_index=True, width="stretch", column_config=state.link_columns("query page", "key page"))
with t2:
    st.subheader("Marginals")
    st.dataframe(
        state.component_links(r.marginals().head(20), "component", owners),
        hide_index=True,
        width="stretch",
        column_config=state.LINK,
    )
t3, t4 = st.columns(2)
with t3:
    st.subheader("Head output by (key position, component)")
    st.caption(
        f"projection on {down_hook} feature {down_feature}"
        if down_hook
        else "norm of each term of the head's output at the query"
    )
    st.dataframe(
        state.component_links(r.ov_table(20), "component", owners),
        hide_index=True,
        width="stretch",
        column_config=state.LINK,
    )
with t4:
    st.subheader("Direct logit attribution")
    st.caption(f"{r.logit_target} at position {r.query_pos}, the model's top prediction there")
    st.dataframe(
        state.component_links(r.logit_table(20), "component", owners),
        hide_index=True,
        width="stretch",
        column_config=state.LINK,
    )

st.subheader("Induction circuit")
st.caption(
    f"L{layer}H{head} at every second-copy token of 8 held-out spans of 32 tokens, each repeated ([BOS s s]): "
    "the advantage of the induction key (the token after the query token's first occurrence) over the key "
    "3 positions earlier, split by component on each side (examples/induction_circuit.py prints the same)"
)
if st.button("trace the induction circuit", key="induction") or st.session_state.get("induction_for") == (layer, head):
    st.session_state["induction_for"] = (layer, head)
    try:
        s = state.induction_circuit(base, upstream, layer, head, state.progress_callback("tracing repeated spans"))
    except SAEBenchError as e:
        st.error(str(e))
        st.stop()
    m = st.columns(3)
    m[0].metric("second-copy tokens traced", s.n_traces)
    m[1].metric("attention on the induction key", f"{s.mean_attention:.3f}")
    m[2].metric("key side from SAE features", f"{sum(v for g, v in s.key_groups.items() if g in upstream):.3f}")
    g1, g2 = st.columns(2)
    for col, side, groups in ((g1, "key", s.key_groups), (g2, "query", s.query_groups)):
        col.dataframe(
            pd.DataFrame({"component group": list(groups), f"{side}-side share": list(groups.values())}),
            hide_index=True,
            width="stretch",
        )
    f1, f2 = st.columns(2)
    for col, side, rows, what in (
        (f1, "key", s.key_features, "previous token"),
        (f2, "query", s.query_features, "current token"),
    ):
        table = pd.DataFrame(
            rows, columns=["component", "share", "query token served most", f"top examples' {what}", "how often"]
        )
        col.caption(f"top {side}-side features")
        col.dataframe(
            state.component_links(table, "component", owners),
            hide_index=True,
            width="stretch",
            column_config=state.LINK,
        )
