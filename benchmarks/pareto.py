"""The Pareto figure for tiny: every family at three k and two widths, from one sweep (one model pass).

    python benchmarks/pareto.py [--tokens 1000000] [--k 16 32 64] [--expansion 8 16] [--activations ...] \
[--runs-dir runs] [--out docs/pareto_tiny.png] [--resume]

Trains RUNS/pareto (`saebench sweep`: --grid sae.activation=... --grid sae.k=... --grid sae.expansion=...),
evaluates every cell (core: FVU, L0, CE-loss recovered, each next to its random baseline), then draws FVU and
CE-loss recovered against L0, one line per family and width through its k, the random baselines in grey.
One JSON line per SAE (sb.compare). The PNG is made with plotly + kaleido when kaleido is installed, else by
headless Chromium (the browser tests' `chromium`) from the figure's HTML, which is always written beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

import saebench as sb
from saebench.sae import FAMILIES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
HEIGHT = 700
PANELS = (("sae.fvu", "FVU (lower is better)"), ("sae.ce_recovered", "CE-loss recovered (higher is better)"))


def figure(table) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=[title for _, title in PANELS])
    colours = dict(
        zip(
            sorted(set(table.activation)),
            ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"),
            strict=False,
        )
    )
    for col, (y, _) in enumerate(PANELS, start=1):
        for (activation, n), part in table.sort_values("k").groupby(["activation", "n_latents"]):
            dash = "solid" if n == table.n_latents.max() else "dot"  # the wider solid, the narrower dotted
            fig.add_trace(
                go.Scatter(
                    x=part["sae.l0"],
                    y=part[y],
                    mode="lines+markers",
                    name=f"{activation} n={n}",
                    legendgroup=f"{activation}{n}",
                    showlegend=col == 1,
                    line=dict(color=colours[activation], dash=dash),
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=table["random_baseline.l0"],
                y=table[y.replace("sae.", "random_baseline.")],
                mode="markers",
                name="random SAE",
                showlegend=col == 1,
                marker=dict(symbol="x", color="grey"),
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="L0 (active latents per token)", type="log", row=1, col=col)
    fig.update_layout(
        width=1300,
        height=HEIGHT,
        title="tiny, blocks.1.hook_resid_post: one sweep, each family at three k and two widths",
        legend=dict(orientation="h", y=-0.22, x=0),
        margin=dict(b=170),
    )
    return fig


def write_png(fig: go.Figure, out: Path) -> str:
    """-> how the PNG was made (or what is needed to make it); the HTML is written either way."""
    out.parent.mkdir(parents=True, exist_ok=True)
    html = out.with_suffix(".html")
    fig.write_html(html, include_plotlyjs=True, config={"displayModeBar": False})
    try:
        fig.write_image(out, width=1300, height=HEIGHT)
        return "plotly + kaleido"
    except (ImportError, ValueError, RuntimeError):
        pass
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        return f"no PNG: pip install kaleido (or apt-get install chromium); open {html}"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={profile}",
                f"--screenshot={out.resolve()}",
                f"--window-size=1360,{HEIGHT + 60}",
                "--hide-scrollbars",
                "--virtual-time-budget=5000",
                html.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return "headless chromium"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--expansion", type=int, nargs="+", default=[8, 16])
    default = [name for name, family in FAMILIES.items() if not family.gradients]
    p.add_argument("--activations", nargs="+", default=default, help="families (default: all without gradients)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--name", default="pareto")
    p.add_argument("--out", default="docs/pareto_tiny.png")
    p.add_argument("--resume", action="store_true", help="continue (or just redraw) an earlier run of this script")
    p.add_argument("--set", nargs="*", default=[], help="more run-config overrides")
    args = p.parse_args()
    overrides = [f"runs_dir={args.runs_dir}", f"name={args.name}", f"train.n_tokens={args.tokens}", *args.set]
    grid = [
        f"sae.activation={','.join(args.activations)}",
        f"sae.k={','.join(map(str, args.k))}",
        f"sae.expansion={','.join(map(str, args.expansion))}",
    ]
    out = sb.sweep_from_config(CONFIG, grid, overrides=overrides, resume=args.resume)
    table = sb.compare([out["run_dir"]])
    for row in table.to_dict("records"):
        keep = ("sae", "activation", "k", "n_latents", "sae.l0", "sae.fvu", "sae.ce_recovered", "sae.dead_fraction")
        print(json.dumps({k: row[k] for k in keep}), flush=True)
    how = write_png(figure(table), Path(args.out))
    print(json.dumps({"figure": args.out, "made_with": how}))


if __name__ == "__main__":
    main()
