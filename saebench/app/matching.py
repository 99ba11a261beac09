"""The Feature page's views across SAEs: a latent's best match in every other SAE of the runs, and how it
splits through wider ones (sb.match_features, sb.splitting_tree), on a shared held-out token sample."""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go
import state
import streamlit as st

import saebench as sb

SAMPLE_TOKENS = 4096


def _label(views, sae: tuple[int, str]) -> str:
    return f"{views[sae[0]].name} · {sae[1]}"


def comparable(views, run_index: int, key: str) -> list[tuple[int, str]]:
    """The other SAEs of the runs on this SAE's model and hook, as (run index, name); the others are named in a
    message."""
    me = state.run_sae(views[run_index], key)
    out, skipped = [], []
    for i, view in enumerate(views):
        for name in view.saes:
            if (i, name) == (run_index, key):
                continue
            other = state.run_sae(view, name)
            same = (other.cfg.model, other.cfg.hook, other.cfg.d_in) == (me.cfg.model, me.cfg.hook, me.cfg.d_in)
            (out if same else skipped).append((i, name))
    if skipped:
        st.caption(
            "Not compared (another model or hook): "
            + ", ".join(f"{_label(views, (i, n))} on {state.run_sae(views[i], n).cfg.hook}" for i, n in skipped)
        )
    return out


@st.cache_resource(show_spinner="harvesting a token sample")
def _sample(run_path: str, hook: str, _view):
    return sb.token_sample(state.run_model(_view), _view.config, hook, SAMPLE_TOKENS)


def token_sample(view, hook: str):
    """SAMPLE_TOKENS held-out activations of the run's text at `hook`, harvested once per process."""
    return _sample(str(view.path), hook, view)


def matches_section(views, run_index: int, key: str, feature: int) -> None:
    """'In the other SAEs of these runs': the best latent of each by decoder cosine and by activation correlation."""
    st.subheader("In the other SAEs of these runs")
    others = comparable(views, run_index, key)
    if not others:
        st.info("No other SAE of this model and hook among the runs given to the app.")
        return
    me = state.run_sae(views[run_index], key)
    sample = token_sample(views[run_index], me.cfg.hook or "")
    rows = []
    for i, name in others:
        m = sb.match_features(me, state.run_sae(views[i], name), sample, latents=[feature])
        (dec, cos), (act, corr) = m.best("decoder"), m.best("activation")
        rows.append(
            {
                "sae": _label(views, (i, name)),
                "latents": state.run_sae(views[i], name).cfg.n_latents,
                "decoder match": state.feature_url(i, name, int(dec[0])),
                "cosine": float(cos[0]),
                "activation match": state.feature_url(i, name, int(act[0])),
                "correlation": float(corr[0]),
            }
        )
    link = r"feature=(\d+)"
    st.dataframe(
        pd.DataFrame(rows),
        hide_index=True,
        column_config={
            "decoder match": st.column_config.LinkColumn(display_text=link),
            "activation match": st.column_config.LinkColumn(display_text=link),
        },
    )
    st.caption(f"Correlation of the codes over {len(sample):,} held-out tokens; cosine of the decoder rows.")


def _top_tokens(view, name: str, latent: int) -> str:
    path = view.saes[name].store_path
    if not path.exists():
        return ""
    return " ".join(repr(t) for t, _ in sb.FeatureStore(path).feature(latent).top_tokens[:3])


def splitting_section(views, run_index: int, key: str, feature: int) -> None:
    """The latent's splitting tree through the wider SAEs chosen (sb.splitting_tree), drawn and tabled."""
    st.subheader("Splitting across widths")
    me = state.run_sae(views[run_index], key)
    wider = [
        (i, n)
        for i, n in comparable(views, run_index, key)
        if state.run_sae(views[i], n).cfg.n_latents > me.cfg.n_latents
    ]
    if not wider:
        st.info("No wider SAE of this model and hook among the runs given to the app.")
        return
    tokens = {f"{i}:{n}": (i, n) for i, n in wider}
    default, widths = [], set()
    for i, n in sorted(
        wider,
        key=lambda w: (
            state.run_sae(views[w[0]], w[1]).cfg.n_latents,
            state.run_sae(views[w[0]], w[1]).cfg.activation != me.cfg.activation,
        ),
    ):
        width = state.run_sae(views[i], n).cfg.n_latents
        if width not in widths:
            widths.add(width)
            default.append(f"{i}:{n}")
    given = [t for t in (st.query_params.get("wider") or "").split(",") if t]
    unknown = [t for t in given if t not in tokens]
    if unknown:
        st.warning(f"`wider={','.join(unknown)}` in the URL names no wider SAE of these runs; ignored.")
    chosen = st.multiselect(
        "wider SAEs",
        list(tokens),
        default=[t for t in given if t in tokens] or default,
        format_func=lambda t: _label(views, tokens[t]),
    )
    by = st.radio(
        "match by", ("decoder", "activation"), index=int(st.query_params.get("by") == "activation"), horizontal=True
    )
    min_score = st.slider("lowest score kept", 0.0, 1.0, state.float_param("min", 0.3), 0.05)
    st.query_params.update(wider=",".join(chosen), by=by, min=str(min_score))
    chain = [
        (run_index, key),
        *sorted((tokens[t] for t in chosen), key=lambda w: state.run_sae(views[w[0]], w[1]).cfg.n_latents),
    ]
    saes = [state.run_sae(views[i], n) for i, n in chain]
    acts = token_sample(views[run_index], me.cfg.hook or "") if by == "activation" else None
    tree = sb.splitting_tree(saes, feature, acts, by, min_score)
    tree["sae"] = [_label(views, chain[level]) for level in tree.level]
    tree["top tokens"] = [
        _top_tokens(views[chain[lv][0]], chain[lv][1], lat) for lv, lat in zip(tree.level, tree.latent, strict=True)
    ]
    tree["open"] = [
        state.feature_url(chain[lv][0], chain[lv][1], lat) for lv, lat in zip(tree.level, tree.latent, strict=True)
    ]
    ys = _tree_rows(tree)
    fig = go.Figure()
    for row, node in tree.iterrows():
        if node.parent >= 0:
            fig.add_trace(
                go.Scatter(
                    x=[node.level - 1, node.level],
                    y=[ys[int(node.parent)], ys[int(str(row))]],
                    mode="lines",
                    line=dict(color="#bbb"),
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
    labels = [
        f'<a href="{html.escape(u)}" target="_self">{lat}</a> {html.escape(t)}'
        for u, lat, t in zip(tree.open, tree.latent, tree["top tokens"], strict=True)
    ]
    fig.add_trace(
        go.Scatter(
            x=tree.level,
            y=[ys[r] for r in tree.index],
            mode="markers+text",
            text=labels,
            textposition="middle right",
            customdata=tree.score,
            hovertemplate="score %{customdata:.3f}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_layout(
        height=max(200, 40 * len(tree)),
        xaxis=dict(tickvals=list(range(len(chain))), ticktext=[_label(views, c) for c in chain]),
        yaxis=dict(visible=False),
        margin=dict(t=20),
    )
    st.plotly_chart(fig, width="stretch", key="split")
    st.dataframe(tree, hide_index=True, column_config={"open": st.column_config.LinkColumn(display_text="open")})


def _tree_rows(tree: pd.DataFrame) -> dict[int, float]:
    """A vertical position per node: leaves one apart in depth-first order, a parent at its children's mean."""
    ys: dict[int, float] = {}

    def place(row: int) -> float:
        kids = tree.index[tree.parent == row].tolist()
        ys[row] = sum(place(k) for k in kids) / len(kids) if kids else -float(sum(1 for r in ys if r not in parents))
        return ys[row]

    parents = set(tree.parent)
    place(0)
    return ys
