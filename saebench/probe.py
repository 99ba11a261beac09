"""Live probing: which SAE features fire on a prompt, encoded on the spot (the store holds only analysed text).

result = sb.features_firing_on(model, sae, "blocks.1.hook_resid_post", "In the beginning", vocab=store.vocab)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saebench.harvest import Harvester
from saebench.models import prompt_tokens
from saebench.sae import SAE


@dataclass
class TokenFeatures:
    position: int
    token: int
    piece: str
    special: bool
    features: list[tuple[int, float]]  # (feature, code), largest |code| first


@dataclass
class PromptFeatures:
    tokens: list[TokenFeatures]
    truncated: bool  # the prompt was cut to the model's context


@torch.no_grad()
def features_firing_on(
    model, sae: SAE, hook: str, prompt: str, top: int = 10, vocab: list[str] | None = None, k: int | None = None
) -> PromptFeatures:
    """Encode `prompt` (BOS first, cut to the model's context) at `hook` and list per token its `top`
    features by |code|. Special tokens (BOS) are listed with no features, as in the analysis.
    k: encode at k' latents per token (a per-token SAE, e.g. a hierarchical one; SAE.check_k).

    vocab: each token id's text (a store's `FeatureStore.vocab`, so pieces read as in its cards);
    ids beyond it, or all ids when None, are decoded by the model's tokenizer."""
    tok = model.tokenizer
    vocab = vocab or []
    ids = prompt_tokens(model, prompt)[0].tolist()
    n_ctx = int(getattr(model.cfg, "n_ctx", len(ids)) or len(ids))
    truncated = len(ids) > n_ctx
    ids = ids[:n_ctx]
    acts = Harvester(model, [hook], exclude_special=False).forward(torch.tensor([ids]))[hook][0]
    z = sae.encode(acts.to(sae.W_enc.dtype), k=k)
    special = set(tok.all_special_ids)
    vals, idx = z.abs().topk(min(top, z.shape[-1]), dim=-1)
    out = []
    for p, t in enumerate(ids):
        feats = (
            [] if t in special else [(int(j), float(z[p, j])) for v, j in zip(vals[p], idx[p], strict=True) if v > 0]
        )
        out.append(TokenFeatures(p, t, vocab[t] if t < len(vocab) else tok.decode([t]), t in special, feats))
    return PromptFeatures(out, truncated)
