"""SAE metrics, each next to a random-SAE baseline. FVU comes in three conventions, named:

fvu               pooled: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, sums and mean over the whole set
explained_variance  1 - fvu
fvu_batched       SAEBench's `explained_variance` (as 1 - it): per batch of `batch_size` tokens
                  sum_i rss_i / sum_i tss_i with tss_i = ||x_i - batch mean||^2, averaged over batches
fvu_per_token     SAEBench's `explained_variance_legacy` (as 1 - it): rss_i / tss_i per token, averaged
cossim            mean over tokens of cos(x, x_hat)
relative_reconstruction_bias  E||x_hat||^2 / E[x_hat . x] (Rajamanoharan et al. 2024, eq. 10): 1 is
                  unbiased, < 1 shrinks
l0                mean active latents per token
dead_fraction     latents that never fire on the evaluation set; dense_fraction: fire on > 10% of tokens
shrinkage         mean ||x_hat|| / ||x|| (SAEBench's l2_ratio)
ce_recovered      (CE_zero - CE_sae) / (CE_zero - CE_clean), the SAE spliced in at its hook
kl_score          (KL_zero - KL_sae) / KL_zero, KL(clean || patched)
CE and KL average over the predictions SAEBench keeps: a special token (BOS, EOS, pad) is neither
the input nor the target; the SAE (or zero) replaces the activations at non-special positions only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from saebench.data import TokenContexts
from saebench.errors import DataError
from saebench.harvest import flatten_heads
from saebench.sae import SAE, SAEConfig

# the figures `saebench eval` prints and the app's Home shows, in this order
EVAL_METRICS = tuple(
    "fvu fvu_batched fvu_per_token cossim relative_reconstruction_bias l0 dead_fraction dense_fraction "
    "shrinkage ce_recovered kl_score".split()
)


@torch.no_grad()
def evaluate_sae(
    sae: SAE, acts: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 4096, k: int | None = None
) -> dict:
    """acts: [n d_in] tensor or iterable of [batch d_in] batches; k: encode at k' (SAE.check_k)."""
    sae = sae.eval()
    batches = (
        (acts[i : i + batch_size] for i in range(0, len(acts), batch_size)) if isinstance(acts, torch.Tensor) else acts
    )
    n = n_batches = 0
    sq_err = sum_sq = 0.0
    total = None
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.float64)
    l0_sum = shrink_sum = cos_sum = per_token_sum = batched_sum = hat_sq = hat_dot = 0.0
    dev = sae.W_dec.device
    for x in batches:
        x = x.to(dev, torch.float32)
        if not torch.isfinite(x).all():
            raise DataError("NaN or inf in the evaluation activations")
        z = sae.encode(x, k)
        x_hat = sae.decode(z)
        rss = (x - x_hat).double().pow(2).sum(-1)
        tss = (x - x.mean(0)).double().pow(2).sum(-1)
        sq_err += float(rss.sum())
        sum_sq += float(x.pow(2).sum(dtype=torch.float64))
        batched_sum += float(rss.sum() / tss.sum().clamp_min(1e-30))
        per_token_sum += float((rss / tss.clamp_min(1e-30)).sum())
        cos_sum += float(F.cosine_similarity(x.double(), x_hat.double(), dim=-1, eps=1e-12).sum())
        hat_sq += float(x_hat.double().pow(2).sum())
        hat_dot += float((x_hat.double() * x.double()).sum())
        n_batches += 1
        total = x.sum(0, dtype=torch.float64) if total is None else total + x.sum(0, dtype=torch.float64)
        active = z != 0
        fires += active.sum(0).double().cpu()
        l0_sum += float(active.sum())
        shrink_sum += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        n += len(x)
    if n == 0:
        raise DataError("no activations to evaluate")
    assert total is not None
    variance = sum_sq - float(total.pow(2).sum()) / n
    fvu = sq_err / variance
    freq = fires / n
    hist_edges = [-8, -7, -6, -5, -4, -3, -2, -1, 0.0001]
    log_freq = torch.log10(freq.clamp_min(1e-12))
    hist = torch.histogram(log_freq.float(), bins=torch.tensor(hist_edges, dtype=torch.float32)).hist
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "fvu_batched": batched_sum / n_batches,
        "fvu_per_token": per_token_sum / n,
        "cossim": cos_sum / n,
        "relative_reconstruction_bias": hat_sq / hat_dot if hat_dot else float("nan"),
        "l0": l0_sum / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > 0.1).double().mean()),
        "shrinkage": shrink_sum / n,
        "density_histogram": {
            "log10_edges": hist_edges,
            "counts": [int(c) for c in hist.tolist()],
            "never": int((freq == 0).sum()),
        },
        "tokens": n,
    }


@torch.no_grad()
def random_baseline(sae: SAE, acts: torch.Tensor | None = None, seed: int = 12345, k: int | None = None) -> SAE:
    """Same shape and k (or k'), random unit directions (tied encoder), trained b_dec; the family's per-token
    baseline rule (TopK, or AbsTopK for a signed family).

    Matched scale: given acts [n d_in], the codes are scaled (through W_enc) by the least-squares
    factor g = sum <x - b_dec, z W_dec> / sum ||z W_dec||^2, the best single scale for these random
    directions, so the baseline is a floor no worse than predicting b_dec (unscaled unit-norm
    codes overshoot: FVU > 1 on tiny). Without acts the codes stay unscaled."""
    cfg = SAEConfig(
        d_in=sae.cfg.d_in,
        n_latents=sae.cfg.n_latents,
        activation=sae.cfg.family.baseline,
        k=k or sae.cfg.k,
    )
    base = SAE(cfg, device=sae.W_dec.device, seed=seed)
    base.b_dec.copy_(sae.b_dec)
    if acts is not None and len(acts):
        x = acts.to(base.W_dec.device, torch.float32)
        part = base.decode(base.encode(x)) - base.b_dec
        dot, sq = float((part.double() * (x - base.b_dec).double()).sum()), float(part.double().pow(2).sum())
        base.W_enc.mul_(max(dot, 0.0) / sq if sq > 0 else 0.0)
    return base.eval()


@torch.no_grad()
def spliced_losses(
    model, sae: SAE, hook: str, contexts: TokenContexts, batch_size: int = 16, k: int | None = None
) -> dict:
    """CE and KL with the SAE's reconstruction (at k', given k) and zero-ablation replacing `hook`'s output.

    Special positions (BOS, ...) keep their clean activations, as the SAE never saw them, and
    CE and KL(clean || patched) average over the predictions from a non-special token to a
    non-special token (SAEBench's mask)."""
    from saebench.harvest import check_hooks

    check_hooks(model, [hook])
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    count = 0
    dev = next(model.parameters()).device
    for i in range(0, len(contexts), batch_size):
        tokens = contexts.tokens[i : i + batch_size].to(dev)
        keep = ~contexts.special_mask[i : i + batch_size].to(dev)

        def patch(kind, keep=keep):
            def fn(act, hook):
                flat = flatten_heads(act)
                new = sae(flat, k) if kind == "sae" else torch.zeros_like(flat)
                out = torch.where(keep[..., None], new.to(flat.dtype), flat)
                return out.reshape(act.shape)

            return fn

        clean = model(tokens).float()
        logp_clean = clean.log_softmax(-1)
        results = {"clean": clean}
        for kind in ("sae", "zero"):
            with model.hooks(fwd_hooks=[(hook, patch(kind))]):
                results[kind] = model(tokens).float()
        targets = tokens[:, 1:]
        counted = (keep[:, :-1] & keep[:, 1:]).float()  # [b ctx-1]
        for kind, logits in results.items():
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            totals[f"ce_{kind}"] += float((ce * counted).sum())
            if kind != "clean":
                lp = logits.log_softmax(-1)
                totals[f"kl_{kind}"] += float(((logp_clean.exp() * (logp_clean - lp)).sum(-1)[:, :-1] * counted).sum())
        count += int(counted.sum())
    if count == 0:
        raise DataError("no prediction between two non-special tokens in the evaluation contexts")
    out = {k: v / count for k, v in totals.items()}
    out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["kl_score"] = (out["kl_zero"] - out["kl_sae"]) / out["kl_zero"]
    return out
