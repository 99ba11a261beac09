"""Shared view pieces: tokens highlighted by a feature's codes."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence


def highlighted_tokens(pieces: list[str], acts: list[float], scale: float, focus: int | None = None) -> str:
    """HTML: each token's background is orange in proportion to its code / scale (blue if negative);
    hovering shows the code; `focus` is underlined."""
    spans = []
    for i, (piece, a) in enumerate(zip(pieces, acts, strict=False)):
        alpha = min(1.0, abs(a) / scale) if scale > 0 else 0.0
        colour = f"rgba(255,140,0,{alpha:.2f})" if a >= 0 else f"rgba(60,120,255,{alpha:.2f})"
        style = f"background:{colour};white-space:pre-wrap;" + ("border-bottom:2px solid black;" if i == focus else "")
        text = html.escape(piece).replace("\n", "↵")
        spans.append(f'<span title="{a:.3f}" style="{style}">{text}</span>')
    return '<div style="font-family:monospace;line-height:1.7">' + "".join(spans) + "</div>"


def logprob_tokens(pieces: list[str], logprobs: list[float], prefix: Sequence[str] = ()) -> str:
    """HTML: generated tokens shaded red by how unlikely they were (1 - p); hovering shows log p.
    `prefix` (the prompt) is shown plain before them."""
    spans = [
        f'<span style="color:#777;white-space:pre-wrap">{html.escape(p).replace(chr(10), "↵")}</span>' for p in prefix
    ]
    for piece, lp in zip(pieces, logprobs, strict=False):
        alpha = 1.0 - math.exp(lp)
        text = html.escape(piece).replace("\n", "↵")
        style = f"background:rgba(220,50,50,{alpha:.2f});white-space:pre-wrap"
        spans.append(f'<span title="log p = {lp:.3f}" style="{style}">{text}</span>')
    return '<div style="font-family:monospace;line-height:1.7">' + "".join(spans) + "</div>"
