"""Steering a transformer-lens model with SAE features.

    with sb.steer(model, sae, features={123: 8.0}, mode="add", positions="generated") as s:
        text = sb.generate(model, "In the beginning", steering=s, max_new_tokens=30)

Modes (x: the hook's activation, d_i = W_dec[i]):
  add          x + a * d_i                    (unit=True uses d_i / ||d_i||)
  clamp        decode(z with z_i := a) + (x - decode(z))   the SAE error is kept
  conditional  clamp only where z_i was already active
  ablate       clamp to 0
  orthogonal   x - (x . u) u + a u,  u = d_i / ||d_i||; several features are set jointly (x . u_i = a_i each)
Positions: "all", "prompt" (< prompt_len) or "generated" (>= prompt_len); `generate` sets
prompt_len and runs without a KV cache, so every position is visible to the hook.
A transcoder's edit is of what it writes (x: its output hook's activation), its codes of what it reads
(its input hook's, earlier in the same pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch

from saebench.errors import ConfigError, HookError, SAEBenchError
from saebench.harvest import Harvester, InputTap, flatten_heads
from saebench.models import prompt_tokens
from saebench.sae import SAE

MODES = ("add", "clamp", "conditional", "ablate", "orthogonal")
POSITIONS = ("all", "prompt", "generated")


@dataclass
class Steering:
    """An installed steering edit; `prompt_len` decides which positions count as the prompt."""

    sae: SAE
    hook: str
    features: dict[int, float]
    mode: str = "add"
    positions: str = "all"
    unit: bool = False
    prompt_len: int | None = None
    last_latents: torch.Tensor | None = field(default=None, repr=False)  # clamp modes: edited z of the last call
    tap: InputTap | None = field(default=None, repr=False)  # a transcoder's input, read earlier in the same pass

    def position_mask(self, n_pos: int, device) -> torch.Tensor:
        """[pos] bool: where the edit applies."""
        pos = torch.arange(n_pos, device=device)
        if self.positions == "all":
            return torch.ones(n_pos, dtype=torch.bool, device=device)
        if self.prompt_len is None:
            raise ConfigError(f"positions={self.positions!r} needs prompt_len (sb.generate sets it)")
        return pos < self.prompt_len if self.positions == "prompt" else pos >= self.prompt_len

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch pos d] -> edited [batch pos d]."""
        W = self.sae.W_dec.to(x.dtype)
        idx = torch.tensor(list(self.features), device=x.device)
        vals = torch.tensor(list(self.features.values()), dtype=x.dtype, device=x.device)
        if self.mode == "add":
            dirs = W[idx] / W[idx].norm(dim=-1, keepdim=True) if self.unit else W[idx]
            out = x + vals @ dirs
        elif self.mode == "orthogonal":
            # set every component at once: out = x + c U with U out^T = a, c = (a - x U^T) G^+, G = U U^T
            # (sequential projections would undo one another when the directions are not orthogonal)
            U = W[idx] / W[idx].norm(dim=-1, keepdim=True)
            c = (vals - x @ U.T) @ torch.linalg.pinv(U @ U.T)
            out = x + c @ U
        else:
            x_in = x if self.tap is None else self.tap.take(self.sae.cfg.output_hook)
            z = self.sae.encode(x_in)
            error = x - self.sae.decode(z, x_in)
            new = z.clone()
            target = torch.zeros_like(vals) if self.mode == "ablate" else vals
            if self.mode == "conditional":
                new[..., idx] = torch.where(z[..., idx] != 0, target.expand_as(z[..., idx]), z[..., idx])
            else:
                new[..., idx] = target.expand_as(new[..., idx])
            self.last_latents = new.detach()
            out = self.sae.decode(new, x_in) + error
        mask = self.position_mask(x.shape[-2], x.device)[:, None]
        return torch.where(mask, out, x)

    def hook_fn(self, act: torch.Tensor, hook) -> torch.Tensor:
        return self.edit(flatten_heads(act)).reshape(act.shape)


def _check(model, sae: SAE, hook: str | None, features: dict[int, float], mode: str, positions: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")
    if positions not in POSITIONS:
        raise ConfigError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")
    for name in (hook, sae.cfg.output_hook):
        if name is not None and name not in model.hook_dict:
            raise HookError(f"model has no hook {name!r}")
    if sae.cfg.hook is not None and sae.cfg.hook != hook:
        raise HookError(
            f"the SAE was trained on {sae.cfg.hook}, not {hook}: pass hook={sae.cfg.hook!r} or leave hook out"
        )
    bad = [i for i in features if not 0 <= int(i) < sae.cfg.n_latents]
    if bad:
        raise ConfigError(
            f"feature index {bad[0]} is out of range: "
            f"the SAE has {sae.cfg.n_latents} latents (0..{sae.cfg.n_latents - 1})"
        )


@contextmanager
def steer(
    model,
    sae: SAE,
    features: dict[int, float],
    hook: str | None = None,
    mode: str = "add",
    positions: str = "all",
    unit: bool = False,
    prompt_len: int | None = None,
):
    """Install a steering hook for the duration of the block; removed on exit, also on error."""
    hook = hook or sae.cfg.hook
    if hook is None:
        raise HookError("the SAE does not record its hook: pass hook=...")
    features = {int(k): float(v) for k, v in features.items()}
    _check(model, sae, hook, features, mode, positions)
    tap = InputTap(hook) if sae.cfg.transcoder else None
    steering = Steering(sae, hook, features, mode, positions, unit, prompt_len, tap=tap)
    point = model.hook_dict[sae.cfg.output_hook or hook]
    handles = [point.register_forward_hook(lambda module, inputs, output: steering.hook_fn(output, point))]
    if tap is not None:
        handles.append(model.hook_dict[hook].register_forward_hook(lambda module, inputs, output: tap.keep(output)))
    try:
        yield steering
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generate(
    model,
    prompt: str | torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    steering: Steering | list[Steering] | None = None,
    return_tokens: bool = False,
):
    """Sample a continuation without a KV cache (the hook sees every position each step).

    temperature 0 is greedy. Returns the generated text (or the full token tensor [1 pos]).
    """
    tokens = prompt_tokens(model, prompt)
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] + max_new_tokens > n_ctx:
        raise ConfigError(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's context of {n_ctx}"
        )
    for s in [steering] if isinstance(steering, Steering) else steering or []:
        s.prompt_len = tokens.shape[1]
    gen = torch.Generator().manual_seed(seed)
    start = tokens.shape[1]
    for _ in range(max_new_tokens):
        logits = model(tokens)[:, -1].float().cpu()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        tokens = torch.cat([tokens, nxt.to(tokens.device)], dim=1)
    return tokens if return_tokens else model.tokenizer.decode(tokens[0, start:])


def logit_lens_tokens(model, sae: SAE, feature: int, k: int = 10) -> torch.Tensor:
    """The k token ids that W_dec[feature], through the final norm and W_U, promotes most: [k]
    (the feature store's logit lens, as Arad et al. 2025)."""
    from saebench.analysis import logit_lens

    return logit_lens(model, sae.W_dec[feature : feature + 1].detach(), k)[0][0].to(model.W_U.device)


@torch.no_grad()
def steering_sweep(
    model,
    sae: SAE,
    feature: int | dict[int, float],
    scales: list[float],
    prompt: str,
    hook: str | None = None,
    mode: str = "add",
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    seed: int = 0,
    n_lens_tokens: int = 10,
    positions: str = "all",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Per scale: the text, concept presence and fluency.

    feature: one feature (strength = scale) or {feature: strength} (strengths x scale).
    concept: mean log-prob (under the steered model) of the features' logit-lens tokens over the
    generated positions; fluency: perplexity of the generated tokens under the unsteered model.
    progress(done, total) is called after each scale.
    """
    features = {feature: 1.0} if isinstance(feature, int) else {int(f): float(v) for f, v in feature.items()}
    lens = torch.cat([logit_lens_tokens(model, sae, f, n_lens_tokens) for f in features]).unique()  # [m]
    rows = []
    for n, scale in enumerate(scales):
        with steer(
            model, sae, {f: v * scale for f, v in features.items()}, hook=hook, mode=mode, positions=positions
        ) as s:
            tokens = generate(model, prompt, max_new_tokens, temperature, seed=seed, steering=s, return_tokens=True)
            start = s.prompt_len
            assert start is not None
            steered = model(tokens).float().log_softmax(-1)
        clean = model(tokens).float().log_softmax(-1)
        gen_pos = torch.arange(start - 1, tokens.shape[1] - 1, device=tokens.device)
        concept = float(steered[0, gen_pos][:, lens].logsumexp(-1).mean() - math.log(len(lens)))
        nll = -clean[0, gen_pos].gather(-1, tokens[0, start:, None]).squeeze(-1)
        rows.append(
            {
                "scale": scale,
                "text": model.tokenizer.decode(tokens[0, start:]),
                "concept": concept,
                "fluency_ppl": float(nll.mean().exp()),
            }
        )
        if progress is not None:
            progress(n + 1, len(scales))
    return rows


@dataclass
class Generation:
    """A continuation of a prompt. logprobs: log p(token) under the model that generated it
    (steered or not, at temperature 1); clean_logprobs: under the unsteered model."""

    token_ids: list[int]
    pieces: list[str]
    logprobs: list[float]
    clean_logprobs: list[float]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def perplexity(self) -> float:
        """Perplexity of the continuation under the unsteered model (fluency)."""
        return math.exp(-sum(self.clean_logprobs) / max(1, len(self.clean_logprobs)))


@dataclass
class SteeringComparison:
    prompt_pieces: list[str]
    default: Generation
    steered: Generation

    def table(self):
        """One row per generated position: default and steered token with their log-probs."""
        import pandas as pd

        d, s = self.default, self.steered
        return pd.DataFrame(
            {
                "position": range(len(d.pieces)),
                "default": d.pieces,
                "default_logprob": d.logprobs,
                "steered": s.pieces,
                "steered_logprob": s.logprobs,
                "steered_clean_logprob": s.clean_logprobs,
            }
        )


@torch.no_grad()
def compare_steering(
    model,
    sae: SAE,
    features: dict[int, float],
    prompt: str,
    hook: str | None = None,
    mode: str = "add",
    positions: str = "all",
    unit: bool = False,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> SteeringComparison:
    """Generate with and without the steering edit from the same seed; per generated token its
    log-prob under the generating model and under the unsteered model."""

    def continuation(tokens: torch.Tensor, own: torch.Tensor | None) -> Generation:
        """own: [1 pos vocab] log-probs of the steered model; None for the unsteered continuation."""
        clean = model(tokens).float().log_softmax(-1)
        gen_pos = torch.arange(start - 1, tokens.shape[1] - 1, device=tokens.device)
        target = tokens[0, start:, None]
        ids = tokens[0, start:].tolist()
        clean_lp = clean[0, gen_pos].gather(-1, target).squeeze(-1).tolist()
        own_lp = clean_lp if own is None else own[0, gen_pos].gather(-1, target).squeeze(-1).tolist()
        return Generation(ids, [model.tokenizer.decode([t]) for t in ids], own_lp, clean_lp)

    start_tokens = prompt_tokens(model, prompt)
    start = start_tokens.shape[1]
    default = continuation(
        generate(model, start_tokens, max_new_tokens, temperature, top_k, seed, return_tokens=True), None
    )
    with steer(model, sae, features, hook=hook, mode=mode, positions=positions, unit=unit) as s:
        tokens = generate(model, start_tokens, max_new_tokens, temperature, top_k, seed, steering=s, return_tokens=True)
        own = model(tokens).float().log_softmax(-1)
    steered = continuation(tokens, own)
    return SteeringComparison([model.tokenizer.decode([t]) for t in start_tokens[0].tolist()], default, steered)


NEUTRAL_PROMPT = "From my experience,"


@torch.no_grad()
def input_score(
    model,
    sae: SAE,
    feature: int,
    contexts,
    hook: str | None = None,
    n_examples: int = 100,
    n_lens_tokens: int = 20,
    min_examples: int = 10,
) -> float | None:
    """Arad, Mueller & Belinkov (2025): over the feature's top-activating contexts (up to
    n_examples), the share whose max-activating token is among its n_lens_tokens logit-lens
    tokens. None when fewer than min_examples contexts activate it."""
    hook = cast(str, hook or sae.cfg.hook)
    harvester = Harvester(model, [hook], exclude_special=False)
    best = []
    for i in range(0, len(contexts), 32):
        toks = contexts.tokens[i : i + 32]
        acts = harvester.forward(toks)[hook]
        z = sae.encode(acts)[..., feature].masked_fill(contexts.special_mask[i : i + 32].to(acts.device), 0)
        val, pos = (z.abs() if sae.cfg.family.signed else z).max(-1)  # a signed family's strong codes may be < 0
        best += [(float(v), int(toks[j, p])) for j, (v, p) in enumerate(zip(val, pos, strict=True)) if v > 0]
    if len(best) < min_examples:
        return None
    top = sorted(best, key=lambda vt: -vt[0])[:n_examples]
    lens = set(logit_lens_tokens(model, sae, feature, n_lens_tokens).tolist())
    return sum(tok in lens for _, tok in top) / len(top)


def rank_prob_score(probs: torch.Tensor, tokens: torch.Tensor) -> float:
    """(1 - min_rank / |V|) * max_prob over `tokens` in the distribution probs [V]; a token's
    rank is the number of tokens strictly more probable (0 for the top one)."""
    ranks = (probs[None, :] > probs[tokens, None]).sum(-1)
    return float((1 - ranks.min() / probs.numel()) * probs[tokens].max())


@torch.no_grad()
def output_score(
    model,
    sae: SAE,
    feature: int,
    prompt: str = NEUTRAL_PROMPT,
    hook: str | None = None,
    amp_factor: float = 10.0,
    n_lens_tokens: int = 20,
) -> float:
    """Arad, Mueller & Belinkov (2025): at the last token of a neutral prompt, the feature's code is
    raised by amp_factor x the largest code (|code| for a signed family) of any feature there (decode + the
    SAE error, which is adding that much of W_dec[feature]); score = (1 - min_rank / |V|) * max_prob of its
    logit-lens tokens in the next-token distribution."""
    hook = cast(str, hook or sae.cfg.hook)
    _check(model, sae, hook, {feature: 0.0}, "add", "all")
    tokens = prompt_tokens(model, prompt)
    lens = logit_lens_tokens(model, sae, feature, n_lens_tokens)

    tap = InputTap(hook)

    def boost(act: torch.Tensor, hook) -> torch.Tensor:
        flat = flatten_heads(act).clone()
        x = tap.take(sae.cfg.output_hook) if sae.cfg.transcoder else flat
        z = sae.encode(x[:, -1].to(sae.W_dec.dtype))
        top = (z.abs() if sae.cfg.family.signed else z).max(-1).values  # [batch]
        flat[:, -1] += (amp_factor * top)[:, None].to(flat.dtype) * sae.W_dec[feature].to(flat.dtype)
        return flat.reshape(act.shape)

    reads = [(hook, tap.keep)] if sae.cfg.transcoder else []
    with model.hooks(fwd_hooks=[*reads, (sae.cfg.output_hook or hook, boost)]):
        probs = model(tokens)[0, -1].float().softmax(-1)
    return rank_prob_score(probs, lens.to(probs.device))


@torch.no_grad()
def lens_mass_gain(
    model, sae: SAE, feature: int, scale: float, prompt: str = "", hook: str | None = None, n_lens_tokens: int = 10
) -> float:
    """Probability mass the next-token distribution gains on the feature's logit-lens tokens when
    the feature is added (at `scale`, every position) to the prompt (a saebench variant, not the paper's)."""
    tokens = prompt_tokens(model, prompt)
    lens = logit_lens_tokens(model, sae, feature, n_lens_tokens)
    clean = model(tokens)[0, -1].float().softmax(-1)[lens].sum()
    with steer(model, sae, {feature: scale}, hook=hook):
        steered = model(tokens)[0, -1].float().softmax(-1)[lens].sum()
    return float(steered - clean)


def rank_by_output_score(
    model,
    sae: SAE,
    features: list[int],
    prompt: str = NEUTRAL_PROMPT,
    hook: str | None = None,
    amp_factor: float = 10.0,
    n_lens_tokens: int = 20,
    progress: Callable[[int, int], None] | None = None,
):
    """Candidate features for steering, best output score first: -> table of feature, output_score."""
    import pandas as pd

    rows = []
    for n, f in enumerate(features):
        rows.append(
            {
                "feature": int(f),
                "output_score": output_score(model, sae, int(f), prompt, hook, amp_factor, n_lens_tokens),
            }
        )
        if progress is not None:
            progress(n + 1, len(features))
    return pd.DataFrame(rows, columns=["feature", "output_score"]).sort_values(
        "output_score", ascending=False, ignore_index=True
    )


__all__ = [
    "Generation",
    "Steering",
    "SteeringComparison",
    "compare_steering",
    "generate",
    "rank_by_output_score",
    "NEUTRAL_PROMPT",
    "input_score",
    "lens_mass_gain",
    "output_score",
    "rank_prob_score",
    "steer",
    "steering_sweep",
    "SAEBenchError",
]
