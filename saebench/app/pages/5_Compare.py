"""Compare the SAEs of the runs: a Pareto plot of any two eval figures (one point per SAE, each next to its
random baseline, a curve per hierarchical or Matryoshka SAE over its k' or prefixes) and a sortable table;
each point and row links to its SAE's Home. What is drawn is `sb.compare` / `sb.compare_curves`."""

import html
import sys
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st

import saebench as sb
from saebench.compare import lower_is_better

st.set_page_config(page_title="saebench · compare", layout="wide")
views = state.runs()
st.title("Compare SAEs")
for view in views:
    if not view.saes:
        st.error(f"{view.path} holds no trained SAE: it is left out.")
index = {str(view.path): i for i, view in enumerate(views)}
table = sb.compare([view.path for view in views if view.saes])
if table.empty:
    st.stop()
table.insert(0, "home", [f"./?run={index[r]}&hook={quote(s)}" for r, s in zip(table.run, table.sae, strict=True)])
table.insert(1, "label", [f"{Path(r).name} · {s}" for r, s in zip(table.run, table.sae, strict=True)])
evaluated = table["sae.l0"].notna() if "sae.l0" in table.columns else pd.Series(False, index=table.index)
for label, run in zip(table.label[~evaluated], table.run[~evaluated], strict=True):
    st.warning(f"{label} has no evaluation: run `saebench eval {run}`; it is left out of the plot.")

groups = sorted({(m, h) for m, h in zip(table.model, table.hook, strict=True)}, key=str)
labels = [f"{m} · {h}" for m, h in groups]
g = state.index_param("on", len(groups), 0, "group")
if len(groups) > 1:
    g = st.selectbox("SAEs on", range(len(groups)), index=g, format_func=lambda i: labels[i])
    st.info("SAEs of another model or hook are not compared with these: pick them above.")
st.query_params["on"] = str(g)
model, hook = groups[g]
shown = table[(table.model == model) & (table.hook == hook) & evaluated]
assert isinstance(shown, pd.DataFrame)
figures = [str(c) for c in shown.dropna(axis=1, how="all").select_dtypes("number").columns if "." in str(c)]
if shown.empty or not figures:
    st.stop()


def axis(name: str, default: str, col) -> str:
    want = st.query_params.get(name, default)
    if want not in figures:
        if name in st.query_params:
            st.warning(f"`{name}={want}` in the URL is no figure of these SAEs; showing {default}.")
        want = default if default in figures else figures[0]
    chosen = col.selectbox(name, figures, index=figures.index(want))
    st.query_params[name] = chosen
    return chosen


left, mid, right = st.columns([2, 2, 1])
x, y = axis("x", "sae.l0", left), axis("y", "sae.fvu", mid)
flip = right.checkbox("flip y's direction", value=st.query_params.get("flip") == "1")
st.query_params["flip"] = str(int(flip))
lower = lower_is_better(y) != flip
right.caption(f"{'lower' if lower else 'higher'} y is better")


def baseline(column: str) -> str:
    parts = column.split(".")
    return ".".join("random_baseline" if p == "sae" else p for p in parts)


fig = go.Figure()
for activation, part in shown.groupby("activation", sort=False):
    links = [
        f'<a href="{html.escape(u)}" target="_self">{html.escape(n)}</a>'
        for u, n in zip(part.home, part["label"], strict=True)
    ]
    fig.add_trace(
        go.Scatter(
            x=part[x],
            y=part[y],
            mode="markers+text",
            name=str(activation),
            text=links,
            textposition="top center",
            customdata=part["label"],
            hovertemplate="%{customdata}<br>%{x:.4g}, %{y:.4g}<extra></extra>",
        )
    )
bx, by = baseline(x), baseline(y)
if bx in shown and by in shown and (bx, by) != (x, y):
    fig.add_trace(
        go.Scatter(
            x=shown[bx],
            y=shown[by],
            mode="markers",
            name="random baseline",
            marker=dict(symbol="x", color="grey"),
            customdata=shown["label"],
            hovertemplate="random SAE of %{customdata}<br>%{x:.4g}, %{y:.4g}<extra></extra>",
        )
    )
curves = sb.compare_curves([view.path for view in views if view.saes])
mine = set(zip(shown.run, shown.sae, strict=True))
for (run, sae, curve), part in curves.groupby(["run", "sae", "curve"]) if x in curves and y in curves else []:  # pyright: ignore[reportGeneralTypeIssues]
    if (run, sae) not in mine:
        continue
    part = part.sort_values("point")
    what = "k′" if curve == "by_k" else "prefix"
    fig.add_trace(
        go.Scatter(
            x=part[x],
            y=part[y],
            mode="lines+markers",
            name=f"{Path(run).name} · {sae} by {what}",
            customdata=part.point,
            hovertemplate=f"{what} %{{customdata}}<br>%{{x:.4g}}, %{{y:.4g}}<extra></extra>",
        )
    )
front = shown.loc[sb.pareto_front(shown, x, y, lower)]
fig.add_trace(
    go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front", line=dict(dash="dot", color="black"))
)
fig.update_layout(xaxis_title=x, yaxis_title=y, height=560, margin=dict(t=30))
st.plotly_chart(fig, width="stretch", key="pareto")
st.caption("Click a point's name to open its SAE on Home; the table below sorts by any column.")

figures = [c for c in dict.fromkeys([x, y, "sae.fvu", "sae.l0", "sae.ce_recovered", "sae.dead_fraction"]) if c in shown]
columns = ["home", "label", "activation", "k", "n_latents", "expansion", "matryoshka", "lr", *figures]
st.dataframe(
    shown[columns],
    hide_index=True,
    width="stretch",
    column_config={"home": st.column_config.LinkColumn("home", display_text="open")},
)
