"""Attribution graphs over transcoders (Ameisen et al. 2025, "Circuit tracing"; the definitions of
circuit-tracer 0.5.0's `attribute`, `prune_graph` and `compute_graph_scores`), with every edge that crosses
positions linked to the QK score of the heads that carry it, split into (query-side, key-side) feature
pairs by `circuits.trace_attention_cached` (what a frozen-attention graph cannot say: why the head attended).

The local replacement model of a prompt is the model with its attention patterns and normalisation scales
frozen at their values on the prompt and each MLP replaced by its transcoder (pre = x_in W_enc + b; output
z W_dec + b_dec + x_in W_skip) plus an error node, the rest of the MLP's output, per (layer, position); an
MLP without a transcoder is all error. It is linear in its nodes' outputs, so it gives the model's logits
exactly, and each node's value (a feature's pre-activation, a logit minus the mean logit) is the sum of its
incoming edges, the direct effects of source nodes through frozen paths that cross no other node, plus its
bias: what no node explains (position embeddings, the attention, normalisation, transcoder and unembedding
biases, and position 0's MLP output: as in circuit-tracer, position 0 (BOS) holds no feature and a zero
error node). A skip transcoder's skip term is a frozen path, not a node.

Nodes come in circuit-tracer's order: features (by layer, position, feature), errors (layer-major), token
embeddings, logits (the top ones up to `max_n_logits` covering `desired_logit_prob`). `adjacency[t, s]` is
the edge from node s to node t.

    graph = sb.attribution_graph(model, transcoders, "The cat sat on the")  # {hook: transcoder}
    pruned = graph.prune(0.8, 0.98); graph.scores(); graph.save("graph.json")
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from saebench.atomic import atomic_write_text
from saebench.circuits import TraceResult, _ln, trace_attention_cached
from saebench.errors import ConfigError, HookError
from saebench.models import is_causal, prompt_tokens
from saebench.sae import SAE

# a transcoder's input hook in block L -> whether it includes ln2's weight and bias (ln2.hook_normalized does not)
INPUTS = {"ln2.hook_normalized": False, "ln2.hook_out": True}
FORMAT = "saebench.graph/1"


def transcoder_layer(sae: SAE) -> int | None:
    """The block L whose MLP the dictionary replaces (a transcoder from blocks.L.ln2 to blocks.L.hook_mlp_out; any
    dictionary there before saebench knew transcoders), or None."""
    m = re.fullmatch(r"blocks\.(\d+)\.ln2\.hook_(normalized|out)", sae.cfg.hook or "")
    if m is None or getattr(sae.cfg, "kind", "transcoder") == "sae":
        return None
    out = f"blocks.{m.group(1)}.hook_mlp_out"
    return int(m.group(1)) if (getattr(sae.cfg, "output_hook", None) or out) == out else None


def split_dictionaries(saes: dict[str, SAE]) -> tuple[dict[str, SAE], dict[str, SAE]]:
    """{hook: dictionary} -> (the transcoders of MLPs, the other SAEs)."""
    transcoders = {h: s for h, s in saes.items() if transcoder_layer(s) is not None}
    return transcoders, {h: s for h, s in saes.items() if h not in transcoders}


def _skip(sae: SAE) -> torch.Tensor | None:
    return getattr(sae, "W_skip", None)  # [d_in d_out], skip transcoders only


@dataclass
class Node:
    """One node. layer: the block for features and errors, -1 for embeddings, n_layers for logits;
    value: a feature's activation (its pre-activation), a logit minus the mean logit, the norm of an error's
    or an embedding's vector; bias: the part of the value no node explains (the whole value of a source-only node)."""

    id: str
    kind: Literal["embedding", "feature", "error", "logit"]
    layer: int
    position: int
    feature: int | None = None
    token_id: int | None = None
    value: float = 0.0
    bias: float = 0.0


class Pruned(NamedTuple):
    node_mask: torch.Tensor  # [nodes] bool
    edge_mask: torch.Tensor  # [nodes nodes] bool, like adjacency
    cumulative: torch.Tensor  # [nodes] each node's cumulative share of the influence, in order of influence


def normalize(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with rows summing to 1 (each target's inputs as shares)."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """weights @ (A + A^2 + ...) = weights @ ((I - A)^-1 - I) for a nilpotent A (a DAG)."""
    current = weights @ a
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ a
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the adjacency is not a DAG")


def _threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The score at which the scores, sorted descending, reach `share` of their sum."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum()
    return ordered[min(int(torch.searchsorted(cumulative, share)), len(ordered) - 1)]


def _detach(tensors) -> list[torch.Tensor]:
    return [t.detach() for t in tensors]


class _Frozen:
    """The local replacement model's maps at one prompt; `forward` runs it on [batch pos d] node outputs."""

    def __init__(self, model, cache, layers: dict[int, SAE]):
        cfg = model.cfg
        self.n_layers, self.center = cfg.n_layers, cfg.normalization_type in ("LN", "LNPre")
        embed = cache["hook_embed"][0]
        self.pos = cache["hook_pos_embed"][0] if "hook_pos_embed" in cache else torch.zeros_like(embed)
        block = range(cfg.n_layers)
        self.scale1 = [cache[f"blocks.{i}.ln1.hook_scale"][0] for i in block]
        self.scale2 = [cache[f"blocks.{i}.ln2.hook_scale"][0] for i in block]
        self.scale_f = cache["ln_final.hook_scale"][0]
        self.ln1, self.ln_f = [_detach(_ln(model, i)) for i in block], _detach(_ln(model, cfg.n_layers))
        affine = [i in layers and INPUTS[layers[i].cfg.hook.split(".", 2)[2]] for i in block]  # type: ignore[union-attr]
        ones, zeros = torch.ones_like(embed[0]), torch.zeros_like(embed[0])
        self.ln2 = [_detach(_ln(model, i, "ln2")) if affine[i] else (ones, zeros) for i in block]
        self.pattern = [cache[f"blocks.{i}.attn.hook_pattern"][0] for i in block]  # [head q k]
        self.W_V, self.b_V, self.W_O, self.b_O = _detach((model.W_V, model.b_V, model.W_O, model.b_O))
        self.skip = [
            (w.detach() if (w := _skip(layers[i])) is not None else None) if i in layers else None for i in block
        ]
        self.mlp_const: list[torch.Tensor] = []  # [pos d] per layer: b_dec, position 0's whole output less its skip

    def _norm(self, r: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (r - r.mean(-1, keepdim=True) if self.center else r) / scale

    def forward(
        self,
        embed: torch.Tensor,
        mlp: list[torch.Tensor],
        attn: list[torch.Tensor] | None = None,
        diagonal: bool = False,
        constants: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """embed: [batch pos d] the token embeddings' outputs; mlp: [batch pos d] per layer, the outputs of each
        MLP's nodes; attn: [batch pos d] per layer added to the attention's output (zeros to read gradients there);
        diagonal: keep each pattern's diagonal only (no move between positions); constants: add the biases.
        -> (each transcoder's input [batch pos d_in] per layer, ln_final's output [batch pos d], each ln1's output)."""
        r = embed + self.pos if constants else embed
        ins, ln1 = [], []
        for i in range(self.n_layers):
            w, b = self.ln1[i]
            x = self._norm(r, self.scale1[i]) * w + (b if constants else 0)
            ln1.append(x)
            v = torch.einsum("bkd,hde->bkhe", x, self.W_V[i]) + (self.b_V[i] if constants else 0)
            pattern = self.pattern[i].diagonal(dim1=-2, dim2=-1).diag_embed() if diagonal else self.pattern[i]
            z = torch.einsum("hqk,bkhe->bqhe", pattern, v)
            r = r + torch.einsum("bqhe,hed->bqd", z, self.W_O[i]) + (self.b_O[i] if constants else 0)
            if attn is not None:
                r = r + attn[i]
            w, b = self.ln2[i]
            x_in = self._norm(r, self.scale2[i]) * w + (b if constants else 0)
            ins.append(x_in)
            skip = self.skip[i]
            r = r + mlp[i] + (x_in @ skip if skip is not None else 0) + (self.mlp_const[i] if constants else 0)
        w, b = self.ln_f
        return ins, self._norm(r, self.scale_f) * w + (b if constants else 0), ln1


@dataclass
class AttributionGraph:
    """The unpruned graph of one prompt (see the module docstring); `prune`, `scores`, `attention`, `qk`, `to_json`."""

    prompt: str
    tokens: list[int]
    pieces: list[str]  # each token's text
    nodes: list[Node]
    adjacency: torch.Tensor  # [target source]
    logit_probabilities: torch.Tensor  # [n_logits] the model's probability of each logit node's token
    settings: dict
    hooks: dict[int, str]  # layer -> its transcoder's input hook
    n_layers: int
    _ctx: dict = field(default_factory=dict, repr=False)  # model, cache, frozen model, vectors; for attention and QK

    # -- node index ranges --------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return len(self.nodes) - self.n_layers * len(self.tokens) - len(self.tokens) - len(self.logit_probabilities)

    def _logit_weights(self) -> torch.Tensor:
        w = torch.zeros(len(self.nodes), dtype=self.adjacency.dtype)
        w[-len(self.logit_probabilities) :] = self.logit_probabilities.to(w.dtype)
        return w

    def influence(self) -> torch.Tensor:
        """[nodes] each node's indirect influence on the logits (weighted by their probabilities)."""
        return influence(normalize(self.adjacency), self._logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
        """circuit-tracer's prune_graph: keep the nodes holding `node_threshold` of the influence on the logits
        (embeddings and logits always), then the edges holding `edge_threshold` of the edge influence, then drop
        feature and error nodes left without outgoing (features: or incoming) edges, until none is."""
        for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0 <= t <= 1:
                raise ConfigError(f"{name} is a share of the influence in [0, 1], got {t}")
        n_fixed, n_feat = len(self.tokens) + len(self.logit_probabilities), self.n_features
        weights = self._logit_weights()
        node_influence = self.influence()
        node_mask = node_influence >= _threshold(node_influence, node_threshold)
        node_mask[-n_fixed:] = True
        pruned = self.adjacency * node_mask[:, None] * node_mask[None, :]
        a = normalize(pruned)
        edge_scores = a * (influence(a, weights) + weights)[:, None]
        edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
        while True:
            old = node_mask.clone()
            node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
            node_mask[:n_feat] &= edge_mask[:n_feat].any(1)
            edge_mask &= node_mask[:, None] & node_mask[None, :]
            if torch.equal(node_mask, old):
                break
        ordered, order = node_influence.sort(descending=True)
        cumulative = torch.zeros_like(node_influence)
        cumulative[order] = ordered.cumsum(0) / ordered.sum()
        return Pruned(node_mask, edge_mask, cumulative)

    def scores(self) -> tuple[float, float]:
        """(replacement, completeness), circuit-tracer's compute_graph_scores: the share of the embeddings' influence
        on the logits that flows through no error node, and the influence-weighted share of each node's (normalised)
        inputs that comes from no error node."""
        n_feat, n_err = self.n_features, self.n_layers * len(self.tokens)
        a, weights = normalize(self.adjacency), self._logit_weights()
        node_influence = influence(a, weights)
        tokens = node_influence[n_feat + n_err : n_feat + n_err + len(self.tokens)].sum()
        errors = node_influence[n_feat : n_feat + n_err].sum()
        non_error = 1 - a[:, n_feat : n_feat + n_err].sum(-1)
        out = node_influence + weights
        return float(tokens / (tokens + errors)), float((non_error * out).sum() / out.sum())

    @torch.no_grad()
    def replacement_logits(self) -> torch.Tensor:
        """[pos vocab] the local replacement model's logits: its frozen model run on every node's output."""
        model, frozen = self._ctx["model"], self._ctx["frozen"]
        embed, mlp = _writes(frozen, [list(zip(self.nodes, self._ctx["vectors"], strict=False))])
        return frozen.forward(embed, mlp, constants=True)[1][0] @ model.W_U + model.b_U

    # -- why an edge crossed positions -------------------------------------------------------------
    @torch.no_grad()
    def attention(self, edges: list[tuple[int, int]]) -> torch.Tensor:
        """For edges (source, target) between nodes at positions q <= p: [edges n_layers n_heads] the part of each
        edge's weight carried by paths that move from q to p once, through that head (q -> p), and otherwise stay
        at their position (through each pattern's diagonal). For q < p the rest of the weight moves more than
        once; where the source's output meets one attention layer before the target (e.g. from the MLP of the
        layer before the target's) the heads sum to the edge's weight."""
        ctx, frozen = self._ctx, self._ctx["frozen"]
        sources, targets = sorted({s for s, _ in edges}), sorted({t for _, t in edges})
        writes = _writes(frozen, [[(self.nodes[s], ctx["vectors"][s])] for s in sources])
        ln1 = frozen.forward(*writes, diagonal=True)[2]
        x = torch.stack([layer[torch.arange(len(sources)), [self.nodes[s].position for s in sources]] for layer in ln1])
        grads = _pull(frozen, [(self.nodes[t], ctx["readouts"][t]) for t in targets], diagonal=True)[2]
        p_t = [self.nodes[t].position for t in targets]
        u = torch.stack([g[torch.arange(len(targets)), p_t] for g in grads])  # [layer target d]
        si, ti = [sources.index(s) for s, _ in edges], [targets.index(t) for _, t in edges]
        q = torch.tensor([self.nodes[s].position for s, _ in edges])
        p = torch.tensor([self.nodes[t].position for _, t in edges])
        out = []
        for i in range(self.n_layers):
            values = torch.einsum("ed,hdk->ehk", x[i, si], frozen.W_V[i])
            reads = torch.einsum("ed,hkd->ehk", u[i, ti], frozen.W_O[i])
            out.append(frozen.pattern[i][:, p, q].T * (values * reads).sum(-1))
        return torch.stack(out, 1)

    def qk(self, layer: int, head: int, query_pos: int, key_pos: int) -> TraceResult:
        """The head's score at (query_pos, key_pos) split into (query-side, key-side) component pairs through the
        transcoders' and the SAEs' features (`circuits.trace_attention_cached`: the pairs sum to the score)."""
        key = (layer, head, query_pos, key_pos)
        cache = self._ctx.setdefault("qk", {})
        if key not in cache:
            ctx = self._ctx
            cache[key] = trace_attention_cached(
                ctx["model"],
                ctx["cache"],
                ctx["tokens"],
                layer,
                head,
                query_pos,
                key_pos,
                saes=ctx["dictionaries"],
                ov=False,
            )
        return cache[key]

    # -- the JSON file --------------------------------------------------------------------------
    def to_json(
        self, node_threshold: float = 0.8, edge_threshold: float = 0.98, head_share: float = 0.1, n_pairs: int = 10
    ) -> dict:
        """The pruned graph as a dict (docs/formats.md): prompt, settings, nodes, edges, logit_centered, scores, and
        for each edge across positions the heads carrying at least `head_share` of its weight (by |weight|), each
        with the id of its QK explanation in `qk` (the score, its top `n_pairs` pairs, the rest of the score)."""
        kept = self.prune(node_threshold, edge_threshold)
        targets, sources = kept.edge_mask.nonzero(as_tuple=True)
        pairs = [(int(s), int(t)) for s, t in zip(sources, targets, strict=True)]
        crossing = [e for e in pairs if self.nodes[e[0]].position != self.nodes[e[1]].position]
        by_head = self.attention(crossing) if crossing else torch.zeros(0, self.n_layers, 1)
        heads: dict[tuple[int, int], list[dict]] = {}
        qk: dict[str, dict] = {}
        for (s, t), split in zip(crossing, by_head, strict=True):
            total = split.abs().sum()
            for i, h in (split.abs() >= head_share * total).nonzero().tolist() if total > 0 else []:
                p, q = self.nodes[t].position, self.nodes[s].position
                name = f"L{i}H{h} q{p} k{q}"
                if name not in qk:
                    r = self.qk(i, h, p, q)
                    top = r.top_pairs(n_pairs)
                    qk[name] = {
                        "layer": i,
                        "head": h,
                        "query_pos": p,
                        "key_pos": q,
                        "score": r.score,
                        "pattern": r.pattern,
                        "pairs": top.values.tolist(),
                        "rest": r.score - sum(top["score"].tolist()),
                    }
                heads.setdefault((s, t), []).append({"layer": i, "head": h, "weight": float(split[i, h]), "qk": name})
        node_ids = kept.node_mask.nonzero().squeeze(-1).tolist()
        return {
            "format": FORMAT,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "token_strings": self.pieces,
            "settings": {
                **self.settings,
                "node_threshold": node_threshold,
                "edge_threshold": edge_threshold,
                "transcoders": {str(i): h for i, h in self.hooks.items()},
            },
            "logit_centered": True,
            "scores": dict(zip(("replacement", "completeness"), self.scores(), strict=True)),
            "nodes": [
                {**vars(self.nodes[i]), "influence": float(kept.cumulative[i])}
                | (
                    {"probability": float(self.logit_probabilities[i - len(self.nodes)])}
                    if self.nodes[i].kind == "logit"
                    else {}
                )
                for i in node_ids
            ],
            "edges": [
                {
                    "source": self.nodes[s].id,
                    "target": self.nodes[t].id,
                    "weight": float(self.adjacency[t, s]),
                    **({"attention": heads[(s, t)]} if (s, t) in heads else {}),
                }
                for s, t in pairs
            ],
            "qk": qk,
        }

    def save(self, path: str | Path, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
        """Write `to_json` atomically to path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json(node_threshold, edge_threshold), indent=1) + "\n")
        return path


def _writes(frozen: _Frozen, rows: list[list[tuple[Node, torch.Tensor]]]):
    """Per batch row, the source nodes' output vectors at their places -> (embeddings [batch pos d], each MLP's)."""
    embed = torch.zeros(len(rows), *frozen.pos.shape, dtype=frozen.pos.dtype, device=frozen.pos.device)
    mlp = [torch.zeros_like(embed) for _ in range(frozen.n_layers)]
    for row, items in enumerate(rows):
        for node, vec in items:
            (embed if node.kind == "embedding" else mlp[node.layer])[row, node.position] += vec
    return embed, mlp


def _pull(frozen: _Frozen, readouts: list[tuple[Node, torch.Tensor]], diagonal: bool = False):
    """One batch row per target node: the gradient of (its readout vector . what it reads at its place) at every
    place a node writes -> (embeddings [batch pos d], per layer at the MLP's output, per layer at the attention's)."""
    embed = torch.zeros(len(readouts), *frozen.pos.shape, dtype=frozen.pos.dtype, device=frozen.pos.device)
    leaves = [embed.clone().requires_grad_(True) for _ in range(1 + 2 * frozen.n_layers)]
    L = frozen.n_layers
    with torch.enable_grad():
        ins, final, _ = frozen.forward(leaves[0], leaves[1 : 1 + L], leaves[1 + L :], diagonal=diagonal)
        cot_ins, cot_final = [torch.zeros_like(x) for x in ins], torch.zeros_like(final)
        for row, (node, vec) in enumerate(readouts):
            (cot_final if node.kind == "logit" else cot_ins[node.layer])[row, node.position] = vec
        grads = torch.autograd.grad([*ins, final], leaves, [*cot_ins, cot_final], allow_unused=True)
    grads = [embed if g is None else g for g in grads]
    return grads[0], grads[1 : 1 + L], grads[1 + L :]


@torch.no_grad()
def attribution_graph(
    model,
    transcoders: dict[str, SAE] | Iterable[SAE],
    prompt: str | torch.Tensor,
    saes: dict[str, SAE] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> AttributionGraph:
    """The attribution graph of `prompt` (text, BOS added; or token ids [1 pos]) through `transcoders`, at most one
    per layer (an MLP without one is all error). saes: {hook: SAE} of other hooks (attention outputs: attn.hook_z,
    hook_attn_out) that, with the transcoders, split the QK scores of `AttributionGraph.qk`. Logit nodes: the top
    tokens at the last position, up to max_n_logits, until their probability reaches desired_logit_prob.
    batch_size: targets per backward pass; progress(done, total) after each."""
    cfg = model.cfg
    if not is_causal(model):
        raise ConfigError("attribution graphs explain a causal LM's next-token logits; this model is no causal LM")
    if getattr(cfg, "parallel_attn_mlp", False) or getattr(cfg, "original_architecture", "") == "GPTNeoXForCausalLM":
        raise ConfigError(
            "attribution graphs need sequential blocks (attention, then the MLP): this model runs them in parallel"
        )
    layers: dict[int, SAE] = {}
    for tc in transcoders.values() if isinstance(transcoders, dict) else transcoders:
        layer = transcoder_layer(tc)
        if layer is None or not 0 <= layer < cfg.n_layers:
            raise ConfigError(
                f"the dictionary on {tc.cfg.hook} is no transcoder of this model's MLPs: a graph needs transcoders "
                f"from blocks.L.{' or blocks.L.'.join(INPUTS)} to blocks.L.hook_mlp_out (L < {cfg.n_layers})"
            )
        if layer in layers:
            raise ConfigError(
                f"two transcoders replace layer {layer}'s MLP ({layers[layer].cfg.hook}, {tc.cfg.hook}): give one"
            )
        layers[layer] = tc
    for hook in saes or {}:
        if hook not in model.hook_dict:
            raise HookError(f"model has no hook {hook!r}")
    tokens = prompt_tokens(model, prompt)
    if tokens.shape[0] != 1:
        raise ConfigError(f"one prompt at a time: got {tokens.shape[0]} rows of tokens")
    if not 2 <= tokens.shape[1] <= cfg.n_ctx:
        raise ConfigError(f"the prompt is {tokens.shape[1]} tokens with BOS: give 2 to {cfg.n_ctx} (the context)")
    n, L = tokens.shape[1], cfg.n_layers
    logits, cache = model.run_with_cache(tokens)
    frozen = _Frozen(model, cache, layers)

    # each MLP's features, error and constant part (b_dec; all of position 0's output but its skip term)
    feats, dec_vecs, enc_rows, biases_f, errors = [], [], [], [], []
    for i in range(L):
        out = cache[f"blocks.{i}.hook_mlp_out"][0]
        tc = layers.get(i)
        skip = None if tc is None else _skip(tc)
        x_in = None if tc is None else cache[tc.cfg.hook][0]  # type: ignore[index]
        skip_out = x_in @ skip if x_in is not None and skip is not None else torch.zeros_like(out)
        const = torch.zeros_like(out) if tc is None else tc.b_dec.expand_as(out).clone()
        const[0] = out[0] - skip_out[0]
        frozen.mlp_const.append(const)
        if tc is None or x_in is None:
            errors.append(out - const)
            continue
        z = tc.encode(x_in)
        z[0] = 0
        errors.append(out - (z @ tc.W_dec + const + skip_out))
        pos, f = z.nonzero(as_tuple=True)
        feats += [(i, int(p), int(k), float(z[p, k])) for p, k in zip(pos, f, strict=True)]
        dec_vecs.append(z[pos, f, None] * tc.W_dec[f])
        enc_rows.append(tc.W_enc[:, f].T)
        biases_f.append(tc.pre_acts(torch.zeros_like(x_in[:1]))[0, f])

    # logit targets: circuit-tracer's salient logits, demeaned unembedding
    last = logits[0, -1]
    probs = last.softmax(-1)
    top_p, top_i = probs.topk(min(max_n_logits, len(probs)))
    top_i = top_i[: int(torch.searchsorted(top_p.cumsum(0), desired_logit_prob)) + 1]
    W_U, b_U = model.W_U, model.b_U
    unembed = (W_U - W_U.mean(1, keepdim=True))[:, top_i].T  # [logits d]
    centred = last - last.mean()

    # nodes; the vector each writes and the vector each reads
    embed = cache["hook_embed"][0]
    vectors = torch.cat([*dec_vecs, *errors, embed])
    nodes = [Node(f"L{i}/p{p}/f{k}", "feature", i, p, feature=k, value=v) for i, p, k, v in feats]
    nodes += [
        Node(f"L{i}/p{p}/error", "error", i, p, value=float(errors[i][p].norm())) for i in range(L) for p in range(n)
    ]
    nodes += [
        Node(f"emb/p{p}", "embedding", -1, p, token_id=int(t), value=float(embed[p].norm()))
        for p, t in enumerate(tokens[0].tolist())
    ]
    nodes += [
        Node(f"logit/{int(t)}", "logit", L, n - 1, token_id=int(t), value=float(centred[t])) for t in top_i.tolist()
    ]
    n_feat, n_src = len(feats), len(feats) + L * n + n
    readouts = torch.cat([*enc_rows, torch.zeros_like(vectors[n_feat:]), unembed])

    # biases: the frozen model on no node at all
    ins, final, _ = frozen.forward(torch.zeros_like(embed)[None], [torch.zeros_like(embed)[None]] * L, constants=True)
    for j, ((i, p, _, _), b) in enumerate(zip(feats, torch.cat([*biases_f, b_U[:0]]).tolist(), strict=True)):
        nodes[j].bias = float(ins[i][0, p] @ readouts[j]) + b
    for j, t in enumerate(top_i.tolist()):
        node = nodes[n_src + j]
        node.bias = float(final[0, n - 1] @ unembed[j] + b_U[t] - b_U.mean())
    for node in nodes[n_feat:n_src]:
        node.bias = node.value

    # edges: one backward pass per batch of targets (features, then logits)
    adjacency = torch.zeros(len(nodes), len(nodes))
    targets = list(range(n_feat)) + list(range(n_src, len(nodes)))
    positions = torch.tensor([node.position for node in nodes[:n_feat]], dtype=torch.long)
    feature_layers = torch.tensor([node.layer for node in nodes[:n_feat]], dtype=torch.long)
    err_vecs = torch.stack(errors)  # [layer pos d]
    for start in range(0, len(targets), batch_size):
        rows = targets[start : start + batch_size]
        g_embed, g_mlp, _ = _pull(frozen, [(nodes[t], readouts[t]) for t in rows])
        block = torch.zeros(len(rows), len(nodes), dtype=embed.dtype, device=embed.device)
        for i in range(L):
            for p in range(1, n):
                cols = ((feature_layers == i) & (positions == p)).nonzero().squeeze(-1)
                if len(cols):
                    block[:, cols] = g_mlp[i][:, p] @ vectors[cols].T
            block[:, n_feat + i * n : n_feat + (i + 1) * n] = torch.einsum("bpd,pd->bp", g_mlp[i], err_vecs[i])
        block[:, n_feat + L * n : n_src] = torch.einsum("bpd,pd->bp", g_embed, embed)
        adjacency[rows] = block.cpu()
        if progress is not None:
            progress(min(start + batch_size, len(targets)), len(targets))

    dictionaries = {**(saes or {}), **{tc.cfg.hook: tc for tc in layers.values()}}
    return AttributionGraph(
        prompt if isinstance(prompt, str) else model.tokenizer.decode(tokens[0].tolist()),
        tokens[0].tolist(),
        [model.tokenizer.decode([t]) for t in tokens[0].tolist()],
        nodes,
        adjacency,
        probs[top_i].float().cpu(),
        {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob},
        {i: str(tc.cfg.hook) for i, tc in layers.items()},
        L,
        {
            "model": model,
            "cache": cache,
            "tokens": tokens,
            "frozen": frozen,
            "vectors": vectors,
            "readouts": readouts,
            "dictionaries": dictionaries,
        },
    )
