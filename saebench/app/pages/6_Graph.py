"""An attribution graph of a prompt through the runs' transcoders (sb.attribution_graph): the pruned graph drawn
by layer and position, node size by influence, thresholds as sliders; a node's feature card and inputs; an
attention edge's heads, each with its QK score split into (query-side, key-side) feature pairs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st
import torch

import saebench as sb
from saebench.errors import SAEBenchError
from saebench.graph import split_dictionaries

st.set_page_config(page_title="saebench · graph", layout="wide")
runs = state.runs()
qp = st.query_params
base_index = state.index_param("run", len(runs), 0, "run")
base = runs[base_index]
if state.problem(base):
    st.error(
        f"{base.name} holds no trained SAE: train transcoders with `saebench train configs/tiny-transcoders.yaml`."
    )
    st.stop()
model = state.run_model(base)
saes = state.saes_on_model(runs, base)
owners = {hook: i for hook, (i, _) in saes.items()}
transcoders, others = split_dictionaries({h: sae for h, (_, sae) in saes.items()})
st.title("Graph")
if not transcoders:
    st.error(
        "These runs hold no transcoder (blocks.L.ln2 -> blocks.L.hook_mlp_out): train one per layer with "
        "`saebench train configs/tiny-transcoders.yaml` and open its run."
    )
    st.stop()
st.caption(
    "transcoders on " + ", ".join(f"`{h}`" for h in transcoders) + "; attention edges explained through "
    "those and " + (", ".join(f"`{h}`" for h in others) or "no other SAE")
)

prompt = st.text_area("prompt", value=qp.get("prompt", "The cat sat on the mat. The cat sat on the"), key="prompt")
if not prompt.strip():
    st.info("Type a prompt to trace.")
    st.stop()
n = len(sb.prompt_tokens(model, prompt)[0])
if n > model.cfg.n_ctx:
    st.error(f"The prompt is {n} tokens; the model's context is {model.cfg.n_ctx}. Shorten it.")
    st.stop()
c1, c2 = st.columns(2)
node_t = c1.slider("node threshold (share of the influence kept)", 0.0, 1.0, state.float_param("node", 0.8), 0.01)
edge_t = c2.slider("edge threshold (share of the edge influence kept)", 0.0, 1.0, state.float_param("edge", 0.98), 0.01)
qp.update({"run": str(base_index), "prompt": prompt, "node": f"{node_t:g}", "edge": f"{edge_t:g}"})

slot = st.empty()
try:
    graph = state.attribution_graph(
        base,
        transcoders,
        others,
        prompt,
        lambda done, total: slot.progress(done / total, text=f"building the graph: {done}/{total} target nodes"),
    )
except SAEBenchError as e:
    st.error(str(e))
    st.stop()
slot.empty()
kept = graph.prune(node_t, edge_t)
replacement, completeness = graph.scores()
m = st.columns(4)
m[0].metric("nodes kept", f"{int(kept.node_mask.sum())} of {len(graph.nodes)}")
m[1].metric("edges kept", f"{int(kept.edge_mask.sum())} of {int((graph.adjacency != 0).sum())}")
m[2].metric("replacement score", f"{replacement:.3f}", help="share of the influence on the logits not through errors")
m[3].metric("completeness score", f"{completeness:.3f}", help="influence-weighted share of inputs not from errors")

# -- the drawing: x the position, y the layer (embeddings below, logits above), size by influence -----------------
index = kept.node_mask.nonzero().squeeze(-1).tolist()
L, nodes = graph.n_layers, graph.nodes
share = graph.influence()
share = share / share.max().clamp(min=1e-10)
probability = {
    len(nodes) - len(graph.logit_probabilities) + j: p for j, p in enumerate(graph.logit_probabilities.tolist())
}
cells: dict[tuple[int, int], list[int]] = {}
for i in index:
    cells.setdefault((nodes[i].layer, nodes[i].position), []).append(i)
xy = {i: (p + 0.8 * (j + 0.5) / len(c) - 0.4, layer) for (layer, p), c in cells.items() for j, i in enumerate(c)}
COLOURS = {"embedding": "#888", "feature": "#e67e22", "error": "#3498db", "logit": "#27ae60"}
fig = go.Figure()
targets, sources = kept.edge_mask.nonzero(as_tuple=True)
edges = list(zip(sources.tolist(), targets.tolist(), strict=True))
for sign, colour, name in ((1, "rgba(39,174,96,0.35)", "positive edges"), (-1, "rgba(192,57,43,0.35)", "negative")):
    ex, ey = [], []
    for s, t in edges:
        if (graph.adjacency[t, s] > 0) == (sign > 0):
            ex += [xy[s][0], xy[t][0], None]
            ey += [xy[s][1], xy[t][1], None]
    fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color=colour, width=1), hoverinfo="skip", name=name))
crossing = [(s, t) for s, t in edges if nodes[s].position != nodes[t].position]
fig.add_trace(
    go.Scatter(
        x=[(xy[s][0] + xy[t][0]) / 2 for s, t in crossing],
        y=[(xy[s][1] + xy[t][1]) / 2 for s, t in crossing],
        mode="markers",
        marker=dict(symbol="diamond", size=6, color="#8e44ad"),
        customdata=[f"edge {nodes[s].id} {nodes[t].id}" for s, t in crossing],
        hovertext=[f"{nodes[s].id} → {nodes[t].id}: {float(graph.adjacency[t, s]):.3f}" for s, t in crossing],
        hoverinfo="text",
        name="attention edges",
    )
)
for kind, colour in COLOURS.items():
    ids = [i for i in index if nodes[i].kind == kind]
    fig.add_trace(
        go.Scatter(
            x=[xy[i][0] for i in ids],
            y=[xy[i][1] for i in ids],
            mode="markers",
            marker=dict(
                size=[6 + 24 * float(probability[i] if kind == "logit" else share[i]) ** 0.5 for i in ids],
                color=colour,
                line=dict(width=0.5, color="black"),
            ),
            customdata=[f"node {nodes[i].id}" for i in ids],
            hovertext=[f"{nodes[i].id} {graph.pieces[nodes[i].position]!r} value {nodes[i].value:.3f}" for i in ids],
            hoverinfo="text",
            name=kind,
        )
    )
fig.update_xaxes(
    tickvals=list(range(n)), ticktext=[f"{p} {piece!r}" for p, piece in enumerate(graph.pieces)], tickangle=-45
)
fig.update_yaxes(tickvals=list(range(-1, L + 1)), ticktext=["embeddings", *(f"layer {i}" for i in range(L)), "logits"])
fig.update_layout(height=200 + 110 * L, margin=dict(t=20, b=10), clickmode="event+select")
event = st.plotly_chart(fig, width="stretch", on_select="rerun", selection_mode="points", key="graph_chart")
clicked = [str(p.get("customdata")) for p in (event.selection.points if event else []) if p.get("customdata")]
if clicked and clicked != st.session_state.get("clicked"):  # a new click on the drawing, not the last one kept
    st.session_state["clicked"] = clicked
    kind, *ids = clicked[0].split()
    qp["sel"], qp["attn"] = (ids[0], "") if kind == "node" else (ids[1], ids[0])
    qp.pop("head", None)

# -- the selected node: its card, its inputs, the heads behind each input from another position -------------------
ids = [nodes[i].id for i in index]
by_id = {x.id: i for i, x in enumerate(nodes)}
default = next(i for i, x in enumerate(ids) if nodes[by_id[x]].kind == "logit")
chosen = str(
    st.selectbox(
        "node",
        ids,
        index=ids.index(qp["sel"]) if qp.get("sel") in ids else default,
        format_func=lambda x: f"{x} at {graph.pieces[nodes[by_id[x]].position]!r}",
    )
)
qp["sel"] = chosen
t = by_id[chosen]
node = nodes[t]
m = st.columns(4)
m[0].metric("value", f"{node.value:.3f}", help="a feature's activation, a logit minus the mean logit, a vector's norm")
m[1].metric("bias", f"{node.bias:.3f}", help="the part of the value that no node explains")
if node.kind == "logit":
    m[2].metric("probability", f"{probability[t]:.3f}")
else:
    m[2].metric("influence on the logits", f"{float(graph.influence()[t]):.3f}")
m[3].metric("cumulative influence share", f"{float(kept.cumulative[t]):.3f}")
if node.kind == "feature":
    hook = graph.hooks[node.layer]
    st.markdown(
        f"feature {state.feature_link(owners[hook], hook, int(node.feature or 0), f'{hook} #{node.feature}')}",
        unsafe_allow_html=True,
    )
    run = runs[owners[hook]]
    store = state.store(run, hook)
    card = state.shown(store.feature, node.feature) if store else None
    if card is not None:
        lens = ", ".join(piece for piece, _ in card.logit_lens[0][:8]) if card.logit_lens else "—"
        st.markdown(
            f"{card.label or '*(no label)*'} · density {card.density:.3%} · top tokens "
            f"{', '.join(repr(p) for p, _ in card.top_tokens[:8])} · output logit lens {lens}"
        )

inputs = [s for s, tt in edges if tt == t]
inputs.sort(key=lambda s: -abs(float(graph.adjacency[t, s])))
across = [(s, t) for s in inputs if nodes[s].position != node.position]
heads = graph.attention(across) if across else torch.zeros(0)
table = pd.DataFrame(
    {
        "source": [nodes[s].id for s in inputs],
        "token": [graph.pieces[nodes[s].position] for s in inputs],
        "weight": [float(graph.adjacency[t, s]) for s in inputs],
    }
)
if across:
    top = {s: divmod(int(h.abs().argmax()), h.shape[1]) for (s, _), h in zip(across, heads, strict=True)}
    table["top head"] = [f"L{top[s][0]}H{top[s][1]}" if s in top else "" for s in inputs]
st.subheader(f"Inputs of {chosen} kept by pruning")
st.dataframe(table, hide_index=True, width="stretch")

# -- one attention edge: the heads that carry it, and why the chosen head attended -----------------------------------
if not across:
    st.caption("No kept input of this node comes from another position: no attention edge to explain.")
    st.stop()
sources = [nodes[s].id for s, _ in across]
source = str(
    st.selectbox(
        "attention edge from",
        sources,
        index=sources.index(qp["attn"]) if qp.get("attn") in sources else 0,
        format_func=lambda x: f"{x} → {chosen}",
    )
)
if qp.get("attn") != source:  # another edge: its own top head
    qp.pop("head", None)
    qp["attn"] = source
split = heads[sources.index(source)]
s = by_id[source]
order = [divmod(j, split.shape[1]) for j in split.abs().flatten().argsort(descending=True)[:10].tolist()]
carried = pd.DataFrame(
    [{"head": f"L{i}H{h}", "layer": i, "index": h, "weight": float(split[i, h])} for i, h in order if split[i, h] != 0]
)
st.caption(
    f"edge weight {float(graph.adjacency[t, s]):.3f}; the part carried by paths that move from position "
    f"{nodes[s].position} to {node.position} through one head (and stay at their position otherwise)"
)
if carried.empty:
    st.info("No single head carries this edge: every path of it moves between positions more than once.")
    st.stop()
st.dataframe(carried.drop(columns=["layer", "index"]), hide_index=True, width="stretch")
head_names = carried["head"].tolist()
head_name = str(
    st.selectbox("head", head_names, index=head_names.index(qp["head"]) if qp.get("head") in head_names else 0)
)
qp["head"] = head_name
row = carried.iloc[head_names.index(head_name)]
r = graph.qk(int(row["layer"]), int(row["index"]), node.position, nodes[s].position)
m = st.columns(3)
m[0].metric("attention weight", f"{r.pattern:.3f}")
m[1].metric("pre-softmax score", f"{r.score:.3f}")
m[2].metric("sum of the QK pairs", f"{float(r.pair_scores.sum()):.3f}")
st.subheader(f"Why {head_name} attended from {node.position} to {nodes[s].position}: top QK pairs")
pairs = state.component_links(r.top_pairs(20), "query_component", owners, into="query page")
pairs = state.component_links(pairs, "key_component", owners, into="key page")
st.dataframe(pairs, hide_index=True, width="stretch", column_config=state.link_columns("query page", "key page"))
st.plotly_chart(r.pairs_figure(), width="stretch")
