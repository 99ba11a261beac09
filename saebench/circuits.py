"""Attention-circuit tracing through SAE features, without patching.

For a prompt, a layer L, a head h and a query position q, the residual stream feeding layer L
is split into components at every position: token and position embeddings, and for each
upstream sublayer (attn_out / mlp_out of layers < L, or a residual SAE at L's input) either
its SAE's active features (value x decoder row), the SAE's bias and its error term, or a transcoder's
that writes it (its features read from its input hook, plus a skip transcoder's skip term), or the
whole sublayer output when it has no SAE. With LayerNorm scales frozen from the clean run,
LN is affine, so

  score(q, k) = sum_{a, b} <LN(c_a(q)) W_Q + ..., LN(c_b(k)) W_K + ...> / sqrt(d_head)

is exactly a sum over (query-side, key-side) component pairs (LN's bias and b_Q / b_K are
components too), and with the pattern frozen the head's output at q is
sum_k A[q, k] (LN(r_k) W_V + b_V) W_O, a sum over (key position, component).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from saebench.errors import ConfigError, HookError
from saebench.models import prompt_tokens
from saebench.sae import SAE


@dataclass
class Components:
    """Contributions to one residual vector. vectors: [n_comp d_model]."""

    names: list[str]
    kinds: list[str]
    vectors: torch.Tensor

    def __add__(self, other: Components) -> Components:
        return Components(self.names + other.names, self.kinds + other.kinds, torch.cat([self.vectors, other.vectors]))


def _sae_components(
    sae: SAE,
    hook: str,
    act: torch.Tensor,
    out_proj: torch.Tensor | None = None,
    out_bias: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> Components:
    """act: [d_in] at one position -> features + bias (+ a skip transcoder's skip term) + error, mapped by
    out_proj [d_out d_model] if given; target: [d_out] a transcoder's output there (default act)."""
    z = sae.encode(act[None])[0]
    active = z.nonzero().squeeze(-1)
    skip = sae.skip(act[None])
    error = ((act if target is None else target) - sae.decode(z[None], act[None])[0])[None]
    vecs = torch.cat([z[active, None] * sae.W_dec[active], sae.b_dec[None], *([] if skip is None else [skip]), error])
    if out_proj is not None:
        assert out_bias is not None
        vecs = vecs @ out_proj
        vecs[len(active)] += out_bias
    extra = ["skip"] if skip is not None else []
    names = [f"{hook}:f{int(i)}" for i in active] + [f"{hook}:{n}" for n in ("bias", *extra, "error")]
    return Components(names, ["feature"] * len(active) + ["sae_bias", *extra, "error"], vecs)


def residual_components(
    model, cache, layer: int, pos: int, saes: dict[str, SAE] | None = None, batch: int = 0
) -> Components:
    """Split the residual stream entering block `layer` (layer = n_layers: before ln_final) at `pos`."""
    saes = saes or {}
    cfg = model.cfg
    resid_hooks = (
        {f"blocks.{layer}.hook_resid_pre", f"blocks.{layer - 1}.hook_resid_post"}
        if layer > 0
        else {"blocks.0.hook_resid_pre"}
    )
    for hook, sae in saes.items():
        if hook in resid_hooks:
            return _sae_components(sae, hook, cache[hook][batch, pos])
    writers = {sae.cfg.output_hook: sae for sae in saes.values() if sae.cfg.transcoder}
    parts = Components([], [], torch.zeros(0, cfg.d_model, device=cache["hook_embed"].device))
    parts += Components(["tok_embed"], ["embed"], cache["hook_embed"][batch, pos][None])
    if "hook_pos_embed" in cache:
        parts += Components(["pos_embed"], ["embed"], cache["hook_pos_embed"][batch, pos][None])
    for block in range(layer):
        for sub in ("attn", "mlp"):
            out_hook = f"blocks.{block}.hook_{sub}_out"
            z_hook = f"blocks.{block}.attn.hook_z"
            if sub == "attn" and z_hook in saes:
                W_O = model.W_O[block].reshape(cfg.n_heads * cfg.d_head, cfg.d_model)
                z = cache[z_hook][batch, pos].flatten()
                parts += _sae_components(saes[z_hook], z_hook, z, W_O, model.b_O[block])
            elif out_hook in saes:
                parts += _sae_components(saes[out_hook], out_hook, cache[out_hook][batch, pos])
            elif (tc := writers.get(out_hook)) is not None:  # a transcoder: its features read its input hook
                hook = tc.cfg.hook
                assert hook is not None
                parts += _sae_components(tc, hook, cache[hook][batch, pos], target=cache[out_hook][batch, pos])
            else:
                parts += Components([out_hook], ["sublayer"], cache[out_hook][batch, pos][None])
    return parts


def _ln(model, layer: int, name: str = "ln1"):
    """(weight, bias) of block `layer`'s ln1 (or `name`), or of ln_final for layer = n_layers."""
    module = model.ln_final if layer == model.cfg.n_layers else getattr(model.blocks[layer], name)
    inner = getattr(module, "original_component", None) or getattr(module, "_original_component", None) or module
    w = getattr(inner, "weight", None)
    w = w if w is not None else getattr(inner, "w", None)
    b = getattr(inner, "bias", None)
    b = b if b is not None else getattr(inner, "b", None)
    d = model.cfg.d_model
    return (w if w is not None else torch.ones(d)), (b if b is not None else torch.zeros(d))


def _frozen_ln(model, cache, layer: int, pos: int, comps: Components, batch: int) -> Components:
    """Each component through LN with the clean run's scale; LN's bias becomes a component."""
    w, b = _ln(model, layer)
    scale_hook = "ln_final.hook_scale" if layer == model.cfg.n_layers else f"blocks.{layer}.ln1.hook_scale"
    scale = cache[scale_hook][batch, pos]
    centred = (
        comps.vectors - comps.vectors.mean(-1, keepdim=True)
        if model.cfg.normalization_type in ("LN", "LNPre")
        else comps.vectors
    )
    vecs = centred / scale * w
    return Components(comps.names + ["ln_bias"], comps.kinds + ["bias"], torch.cat([vecs, b[None].to(vecs.dtype)]))


@dataclass
class TraceResult:
    """Everything `trace_attention` (or `trace_attention_cached`) found; tables via pandas, figures via plotly."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    tokens: list[str]
    score: float  # the model's own pre-softmax score
    pattern: float  # the model's attention weight A[q, k]
    q_names: list[str]
    k_names: list[str]
    pair_scores: torch.Tensor  # [n_q n_k], sums to score
    ov_names: list[str]
    ov_by_key: torch.Tensor  # [n_keys n_comp d_model] head output at q split by (key position, component)
    ov_projection: torch.Tensor | None = None  # [n_keys n_comp] onto a downstream feature's encoder row
    logit_names: list[str] = field(default_factory=list)
    logit_contrib: torch.Tensor | None = None  # [n_comp] direct logit attribution at query_pos
    logit_target: str = ""  # what logit_contrib explains, e.g. "logit(' light')"
    attention: torch.Tensor | None = None  # [pos pos] the head's pattern on the prompt

    def logit_table(self, n: int = 20):
        """Top components of the direct logit attribution, by |value|."""
        import pandas as pd

        if self.logit_contrib is None:
            return pd.DataFrame(columns=["component", "value"])
        order = self.logit_contrib.abs().argsort(descending=True)[:n].tolist()
        return pd.DataFrame(
            {"component": [self.logit_names[i] for i in order], "value": [float(self.logit_contrib[i]) for i in order]}
        )

    def attention_figure(self):
        import plotly.graph_objects as go

        assert self.attention is not None
        labels = [f"{i} {t!r}" for i, t in enumerate(self.tokens)]
        fig = go.Figure(go.Heatmap(z=self.attention.tolist(), x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1))
        fig.update_layout(
            title=f"L{self.layer}H{self.head} attention",
            xaxis_title="key",
            yaxis_title="query",
            yaxis_autorange="reversed",
        )
        return fig

    def query_marginals(self) -> torch.Tensor:
        return self.pair_scores.sum(1)

    def key_marginals(self) -> torch.Tensor:
        return self.pair_scores.sum(0)

    def top_pairs(self, n: int = 20):
        import pandas as pd

        flat = self.pair_scores.flatten()
        order = flat.abs().argsort(descending=True)[:n]
        nk = self.pair_scores.shape[1]
        return pd.DataFrame(
            {
                "query_component": [self.q_names[i // nk] for i in order.tolist()],
                "key_component": [self.k_names[i % nk] for i in order.tolist()],
                "score": flat[order].tolist(),
            }
        )

    def marginals(self):
        import pandas as pd

        q = pd.DataFrame({"component": self.q_names, "side": "query", "score": self.query_marginals().tolist()})
        k = pd.DataFrame({"component": self.k_names, "side": "key", "score": self.key_marginals().tolist()})
        return pd.concat([q, k]).sort_values("score", key=abs, ascending=False, ignore_index=True)

    def ov_table(self, n: int = 20):
        """Top (key position, component) terms, by projection on the downstream feature if given, else by norm."""
        import pandas as pd

        values = self.ov_projection if self.ov_projection is not None else self.ov_by_key.norm(dim=-1)
        flat = values.flatten()
        order = flat.abs().argsort(descending=True)[:n]
        nc = values.shape[1]
        return pd.DataFrame(
            {
                "key_pos": [i // nc for i in order.tolist()],
                "key_token": [self.tokens[i // nc] for i in order.tolist()],
                "component": [self.ov_names[i % nc] for i in order.tolist()],
                "value": flat[order].tolist(),
            }
        )

    def pairs_figure(self, n: int = 15):
        import plotly.graph_objects as go

        qi = self.query_marginals().abs().argsort(descending=True)[:n].tolist()
        ki = self.key_marginals().abs().argsort(descending=True)[:n].tolist()
        z = self.pair_scores[qi][:, ki].tolist()
        fig = go.Figure(
            go.Heatmap(z=z, x=[self.k_names[i] for i in ki], y=[self.q_names[i] for i in qi], colorscale="RdBu", zmid=0)
        )
        fig.update_layout(
            title=f"L{self.layer}H{self.head} score {self.score:.3f}: "
            f"q={self.query_pos} {self.tokens[self.query_pos]!r}, k={self.key_pos} {self.tokens[self.key_pos]!r}",
            xaxis_title="key-side component",
            yaxis_title="query-side component",
        )
        return fig

    def marginals_figure(self, n: int = 15):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("query side", "key side"))
        for col, (vals, names) in enumerate(
            ((self.query_marginals(), self.q_names), (self.key_marginals(), self.k_names)), start=1
        ):
            idx = vals.abs().argsort(descending=True)[:n].tolist()
            fig.add_trace(
                go.Bar(x=[vals[i].item() for i in idx], y=[names[i] for i in idx], orientation="h"), row=1, col=col
            )
        fig.update_layout(showlegend=False, title=f"L{self.layer}H{self.head} marginals")
        return fig


@torch.no_grad()
def trace_attention(
    model,
    prompt,
    layer: int,
    head: int,
    query_pos: int = -1,
    key_pos: int | None = None,
    saes: dict[str, SAE] | None = None,
    downstream: SAE | None = None,
    downstream_feature: int | None = None,
    logit_tokens: tuple[int, ...] | int | str | None = None,
    check: bool = True,
) -> TraceResult:
    """Trace head `head` of `layer` at `query_pos` (default: last). key_pos default: the most-attended key.

    saes: {hook: SAE} for upstream hooks (blocks.l.hook_attn_out / hook_mlp_out / attn.hook_z for
    l < layer, or a residual SAE at layer's input), or transcoders keyed by their input hook that write
    blocks.l.hook_mlp_out (their output_hook). downstream/downstream_feature: project the OV
    terms on that feature's encoder row (resid-space SAEs, or blocks.{layer}.attn.hook_z SAEs).
    logit_tokens: a token id, (a, b) for the logit difference a - b, or "top" for the model's own
    top prediction, for direct logit attribution at query_pos. check: assert the decompositions sum to the
    model's own numbers. One forward pass, then `trace_attention_cached`.
    """
    tokens = prompt_tokens(model, prompt)
    logits, cache = model.run_with_cache(tokens)
    return trace_attention_cached(
        model,
        cache,
        tokens,
        layer,
        head,
        query_pos,
        key_pos,
        saes=saes,
        downstream=downstream,
        downstream_feature=downstream_feature,
        logits=logits,
        logit_tokens=logit_tokens,
        check=check,
    )


@torch.no_grad()
def trace_attention_cached(
    model,
    cache,
    tokens: torch.Tensor,
    layer: int,
    head: int,
    query_pos: int = -1,
    key_pos: int | None = None,
    saes: dict[str, SAE] | None = None,
    downstream: SAE | None = None,
    downstream_feature: int | None = None,
    logits: torch.Tensor | None = None,
    logit_tokens: tuple[int, ...] | int | str | None = None,
    check: bool = True,
    ov: bool = True,
) -> TraceResult:
    """`trace_attention` on a run already made: cache from `model.run_with_cache(tokens)`, tokens [1 pos],
    logits [1 pos vocab] (that run's, needed only for logit_tokens). Since the model is causal, one run on a
    prompt serves every query position of it. ov=False: the QK split alone (an empty OV table, no downstream)."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise ConfigError(f"layer {layer} is out of range: the model has layers 0..{cfg.n_layers - 1}")
    if not 0 <= head < cfg.n_heads:
        raise ConfigError(f"head {head} is out of range: layer {layer} has heads 0..{cfg.n_heads - 1}")
    if logit_tokens is not None and logits is None:
        raise ConfigError("logit_tokens needs the run's logits: pass logits=... (model.run_with_cache returns them)")
    saes = saes or {}
    for hook, sae in saes.items():
        if hook not in model.hook_dict:
            raise HookError(f"model has no hook {hook!r}")
        if sae.cfg.hook is not None and sae.cfg.hook != hook:
            raise HookError(f"the SAE given for {hook} was trained on {sae.cfg.hook}")
    n = tokens.shape[1]
    q = query_pos % n
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head]
    k = int(pattern[q, : q + 1].argmax()) if key_pos is None else key_pos % n
    if k > q:
        raise ConfigError(f"key position {k} is after the query position {q}")

    comps = {
        p: _frozen_ln(model, cache, layer, p, residual_components(model, cache, layer, p, saes), 0)
        for p in (range(q + 1) if ov else {q, k})
    }
    W_Q, W_K, W_V, W_O = model.W_Q[layer, head], model.W_K[layer, head], model.W_V[layer, head], model.W_O[layer, head]
    b_Q, b_K, b_V = model.b_Q[layer, head], model.b_K[layer, head], model.b_V[layer, head]
    q_vecs = torch.cat([comps[q].vectors @ W_Q, b_Q[None]])
    k_vecs = torch.cat([comps[k].vectors @ W_K, b_K[None]])
    attn_scale = cfg.attn_scale if getattr(cfg, "attn_scale", -1) and cfg.attn_scale > 0 else math.sqrt(cfg.d_head)
    pair_scores = q_vecs @ k_vecs.T / attn_scale
    score = float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, q, k])

    # OV: components at every key position <= q share one name list only if the SAEs' active sets agree,
    # so each key position keeps its own components, padded into a common table.
    shown = range(q + 1) if ov else range(0)
    names = [*dict.fromkeys(name for p in shown for name in comps[p].names), "b_V"] if ov else []
    index = {name: i for i, name in enumerate(names)}
    rows = [torch.tensor([index[name] for name in comps[p].names], device=q_vecs.device) for p in shown]
    table = torch.zeros(len(shown), len(names), cfg.d_model, dtype=q_vecs.dtype, device=q_vecs.device)
    for p in shown:
        table[p, rows[p]] = pattern[q, p] * (comps[p].vectors @ W_V @ W_O)
    if ov:
        table[:, -1] = pattern[q, : q + 1, None] * (b_V @ W_O)[None]

    projection = None
    if downstream is not None and ov:
        if downstream_feature is None or not 0 <= downstream_feature < downstream.cfg.n_latents:
            raise ConfigError(f"downstream_feature must lie in 0..{downstream.cfg.n_latents - 1}")
        enc = downstream.W_enc[:, downstream_feature]
        if downstream.cfg.hook == f"blocks.{layer}.attn.hook_z":
            head_rows = enc[head * cfg.d_head : (head + 1) * cfg.d_head]
            projection = torch.zeros(table.shape[:2], device=table.device)
            for p in range(q + 1):
                projection[p, rows[p]] = pattern[q, p] * (comps[p].vectors @ W_V @ head_rows)
            projection[:, -1] = pattern[q, : q + 1] * (b_V @ head_rows)
        else:
            projection = table @ enc

    result = TraceResult(
        layer,
        head,
        q,
        k,
        [model.tokenizer.decode([t]) for t in tokens[0].tolist()],
        score,
        float(pattern[q, k]),
        comps[q].names + ["b_Q"],
        comps[k].names + ["b_K"],
        pair_scores,
        names,
        table,
        projection,
        attention=pattern.detach(),
    )
    if logit_tokens is not None and logits is not None:
        final = _frozen_ln(model, cache, cfg.n_layers, q, residual_components(model, cache, cfg.n_layers, q, saes), 0)
        if logit_tokens == "top":
            logit_tokens = int(logits[0, q].argmax())
        if isinstance(logit_tokens, str):
            raise ConfigError(f'logit_tokens is a token id, a pair (a, b) or "top", not {logit_tokens!r}')
        a, b = (logit_tokens, None) if isinstance(logit_tokens, int) else logit_tokens
        result.logit_target = " - ".join(f"logit({model.tokenizer.decode([t])!r})" for t in (a, b) if t is not None)
        direction = model.W_U[:, a] - (model.W_U[:, b] if b is not None else 0)
        bias = model.b_U[a] - (model.b_U[b] if b is not None else 0)
        result.logit_names = final.names + ["b_U"]
        result.logit_contrib = torch.cat([final.vectors @ direction, bias[None]])
        if check:
            want = logits[0, q, a] - (logits[0, q, b] if b is not None else 0)
            _close(result.logit_contrib.sum(), want, "logit attribution")
    if check:
        for p in (q, k):
            resid = residual_components(model, cache, layer, p, saes).vectors.sum(0)
            _close(resid, cache[f"blocks.{layer}.hook_resid_pre"][0, p], "residual decomposition")
        _close(pair_scores.sum(), torch.tensor(score), "QK pair sum")
        if ov:
            _close(table.sum((0, 1)), cache[f"blocks.{layer}.attn.hook_z"][0, q, head] @ W_O, "OV sum")
    return result


def parse_component(name: str) -> tuple[str, int | None]:
    """A component's name -> (hook or name, feature id or None):
    "blocks.0.attn.hook_z:f12" -> ("blocks.0.attn.hook_z", 12)."""
    hook, sep, rest = name.rpartition(":f")
    return (hook, int(rest)) if sep and rest.isdigit() else (name, None)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    err = float((got - want).abs().max())
    ref = float(want.abs().max()) + 1e-6
    if err > rtol * ref + 1e-5:
        raise AssertionError(f"{what} does not add up: error {err:.3g} against magnitude {ref:.3g}")


@torch.no_grad()
def head_scores(model, contexts, n_contexts: int = 32, repeat_len: int = 24) -> dict[str, torch.Tensor]:
    """How each head attends, to find previous-token and induction heads: [n_layers n_heads] each.

    prev_token: mean attention from position i to i-1 on real text (contexts, positions >= 2);
    induction: on [BOS, s, s] with s a span of real text, mean attention from the second copy's
    position i to the token after i's earlier occurrence (i - repeat_len + 1).
    """
    tokens = contexts.tokens[:n_contexts]
    span = tokens[:, 1 : 1 + repeat_len]
    repeated = torch.cat([tokens[:, :1], span, span], dim=1)
    idx = torch.arange(2, tokens.shape[1])
    q = torch.arange(1 + repeat_len + 1, 1 + 2 * repeat_len)
    prev = [p[:, :, idx, idx - 1].mean((0, 2)).cpu() for p in attention_patterns(model, tokens)[1]]
    induction = [p[:, :, q, q - repeat_len + 1].mean((0, 2)).cpu() for p in attention_patterns(model, repeated)[1]]
    return {"prev_token": torch.stack(prev).float(), "induction": torch.stack(induction).float()}


def attention_patterns(model, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass that keeps only the attention: (logits, [batch head q k] per layer)."""
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    return logits, [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)]


def repeated_random_tokens(n_seq: int, span: int, vocab_size: int, bos: int, seed: int = 0) -> torch.Tensor:
    """[n_seq 1+2*span]: [BOS r r] with r `span` tokens drawn uniformly from every id but BOS."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab_size - 1, (n_seq, span), generator=gen)
    r = r + (r >= bos).long()
    return torch.cat([torch.full((n_seq, 1), bos), r, r], dim=1)


def induction_summary(patterns: list[torch.Tensor], logits: torch.Tensor, tokens: torch.Tensor, span: int) -> dict:
    """From [batch head q k] patterns per layer and [batch pos vocab] logits on repeated_random_tokens:
    induction [n_layers n_heads], the mean attention from each second-copy token to the token after its
    first occurrence; the mean next-token loss on each copy, leaving out each copy's unpredictable first token."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none"
    )  # [seq pos]
    q = torch.arange(span + 1, 2 * span + 1)
    induction = torch.stack([p[:, :, q, q - span + 1].float().mean((0, 2)).cpu() for p in patterns])
    return {
        "induction": induction,
        "loss_first_copy": float(nll[:, 1:span].mean()),
        "loss_second_copy": float(nll[:, span + 1 :].mean()),
    }


@torch.no_grad()
def induction_report(model, n_seq: int = 64, span: int = 40, seed: int = 0) -> dict:
    """induction_summary for a hooked model on `n_seq` repeated random-token sequences."""
    tokens = repeated_random_tokens(n_seq, span, model.cfg.d_vocab, model.tokenizer.bos_token_id, seed).to(
        model.cfg.device
    )
    logits, patterns = attention_patterns(model, tokens)
    return induction_summary(patterns, logits, tokens, span)
