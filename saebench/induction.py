"""An induction head's QK score at repeated tokens, traced through SAE features.

On a prompt [BOS s s] (s: a span of text), the induction head at a token of the second copy (the
query) attends to the token after the query token's first occurrence (the key). `trace_induction`
traces that score and the score of a control key (`control_offset` positions earlier) and splits the
advantage, score(key) - score(control), by component on each side: which upstream SAE features make
the key stand out ("previous token was X", from a layer-0 previous-token head), and which make the
query look for it ("current token is X"). `token_profile` says what a feature's top examples share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saebench.circuits import parse_component, trace_attention_cached
from saebench.harvest import Harvester
from saebench.sae import SAE


@dataclass
class InductionTrace:
    """One query position: advantage = pair-score sum at the key minus at the control key."""

    query_pos: int
    key_pos: int
    control_pos: int
    query_token: str
    advantage: float
    attention: float  # the head's weight on the key
    key_side: dict[str, float]  # key-side component -> its share of the advantage (sums to 1 with the rest)
    query_side: dict[str, float]


def repeated_prompt(tokens: torch.Tensor, bos: int) -> torch.Tensor:
    """[1 1+2*span]: [BOS s s] from s = tokens [span]."""
    return torch.cat([torch.tensor([bos]), tokens, tokens])[None]


def _side_diffs(names_a: list[str], vals_a: torch.Tensor, names_b: list[str], vals_b: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, v in zip(names_a, vals_a.tolist(), strict=False):
        out[name] = out.get(name, 0.0) + v
    for name, v in zip(names_b, vals_b.tolist(), strict=False):
        out[name] = out.get(name, 0.0) - v
    return out


@torch.no_grad()
def trace_induction(
    model,
    prompt: torch.Tensor,
    layer: int,
    head: int,
    saes: dict[str, SAE],
    query_positions: list[int] | None = None,
    control_offset: int = 3,
) -> list[InductionTrace]:
    """prompt: [1 1+2*span] from `repeated_prompt`. One InductionTrace per second-copy query position
    whose control key lies after BOS; one forward pass serves them all (the model is causal)."""
    span = (prompt.shape[1] - 1) // 2
    positions = query_positions or list(range(span + 1, 2 * span + 1))
    _, cache = model.run_with_cache(prompt)
    out = []
    for q in positions:
        k = q - span + 1
        c = k - control_offset
        if c < 1:
            continue
        hit = trace_attention_cached(model, cache, prompt, layer, head, query_pos=q, key_pos=k, saes=saes)
        ctrl = trace_attention_cached(model, cache, prompt, layer, head, query_pos=q, key_pos=c, saes=saes)
        advantage = hit.score - ctrl.score
        key = _side_diffs(hit.k_names, hit.key_marginals(), ctrl.k_names, ctrl.key_marginals())
        query = _side_diffs(hit.q_names, hit.query_marginals(), ctrl.q_names, ctrl.query_marginals())
        out.append(
            InductionTrace(
                q,
                k,
                c,
                hit.tokens[q],
                advantage,
                hit.pattern,
                {n: v / advantage for n, v in key.items()},
                {n: v / advantage for n, v in query.items()},
            )
        )
    return out


def share_by_group(
    traces: list[InductionTrace], side: str, group=lambda name: parse_component(name)[0]
) -> dict[str, float]:
    """Summed advantage by component group, over the summed advantage: {group: share}, over all traces."""
    total = sum(t.advantage for t in traces)
    out: dict[str, float] = {}
    for t in traces:
        for name, share in getattr(t, side).items():
            g = group(name)
            out[g] = out.get(g, 0.0) + share * t.advantage / total
    return dict(sorted(out.items(), key=lambda kv: -abs(kv[1])))


@torch.no_grad()
def hook_activations(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """tokens [batch pos] -> {hook: [batch pos d]} at every position (hook_z flattened to (head d_head)),
    one forward pass."""
    rows, _ = Harvester(model, hooks, exclude_special=False).activations(
        tokens, torch.zeros_like(tokens, dtype=torch.bool)
    )
    return {hook: r.reshape(*tokens.shape, -1) for hook, r in rows.items()}


@torch.no_grad()
def token_profile(
    model, sae: SAE, acts: torch.Tensor, tokens: torch.Tensor, feature: int, offset: int = -1, top: int = 20
) -> tuple[str, float]:
    """The token at `offset` from the feature's `top` strongest activations over tokens [batch pos]
    (offset -1: the previous token), and the share of those examples where it is that token.
    acts: [batch pos d] the SAE's input at those tokens (`hook_activations`)."""
    z = sae.encode(acts.reshape(-1, acts.shape[-1]))[:, feature].reshape(tokens.shape)
    z[:, : max(0, -offset) + 1] = 0  # BOS, and positions whose offset token would fall before the context
    vals, flat = z.flatten().topk(top)
    flat = flat[vals > 0]
    if len(flat) == 0:
        return "", 0.0
    b, p = flat // tokens.shape[1], flat % tokens.shape[1]
    at = tokens[b, p + offset].tolist()
    token, count = Counter(at).most_common(1)[0]
    return model.tokenizer.decode([token]), count / len(at)


@dataclass
class CircuitSummary:
    """trace_induction over several repeated held-out spans, summed."""

    layer: int
    head: int
    n_traces: int
    mean_attention: float  # the head's weight on the induction key
    key_groups: dict[str, float]  # share of the summed advantage by component group, key side
    query_groups: dict[str, float]
    key_features: list[
        tuple[str, float, str, str, float]
    ]  # (component, share, query token it served most, its top examples' previous token, how often)
    query_features: list[tuple[str, float, str, str, float]]  # the same with the current token


@torch.no_grad()
def summarize_induction(
    model,
    saes: dict[str, SAE],
    layer: int,
    head: int,
    contexts: torch.Tensor,
    span: int = 32,
    n_prompts: int = 4,
    n_features: int = 5,
    profile_contexts: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> CircuitSummary:
    """contexts: [n ctx] held-out tokens; prompt i repeats contexts[i, 1:1+span]. Feature profiles read
    the first `profile_contexts` contexts. progress(done, total) after each prompt."""
    bos = model.tokenizer.bos_token_id
    traces = []
    for i in range(n_prompts):
        traces += trace_induction(model, repeated_prompt(contexts[i, 1 : 1 + span], bos), layer, head, saes)
        if progress is not None:
            progress(i + 1, n_prompts)
    profile_tokens = contexts[:profile_contexts]
    profile_acts = hook_activations(model, profile_tokens, list(saes))

    def top_features(side: str, offset: int):
        per_component = share_by_group(traces, side, group=lambda name: name)
        rows = []
        for name, share in sorted(per_component.items(), key=lambda kv: -kv[1]):
            hook, feature = parse_component(name)
            if feature is None:
                continue
            served = max(traces, key=lambda t: getattr(t, side).get(name, 0.0) * t.advantage)
            token, how_often = token_profile(
                model, saes[hook], profile_acts[hook], profile_tokens, feature, offset=offset
            )
            rows.append((name, share, served.query_token, token, how_often))
            if len(rows) == n_features:
                break
        return rows

    return CircuitSummary(
        layer,
        head,
        len(traces),
        sum(t.attention for t in traces) / len(traces),
        share_by_group(traces, "key_side"),
        share_by_group(traces, "query_side"),
        top_features("key_side", -1),
        top_features("query_side", 0),
    )
