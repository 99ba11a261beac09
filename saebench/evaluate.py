"""SAE metrics, each next to a random-SAE baseline (EVAL_METRICS says what each one is).

FVU comes in three conventions, named; none of them is SAEBench 0.6.0's reported `explained_variance`,
which divides by the variance about zero (less (E||x||^2 / d)^2) rather than about the mean (SAELens
issue 659, PR 665): saebench computes that one as well, as `explained_variance_sae_bench`, only so that
figures can be compared with SAEBench's. The per-token FVU is the one SAEBench's paper reported (as
1 - its `explained_variance_legacy`). A latent fires where its code is nonzero (SAEBench counts codes > 0:
the same for every family but a signed one).

CE-loss recovered and KL follow one of two conventions (`ce_convention`):
non_special  the SAE (or zero) replaces the activations at non-special positions only (the SAE never saw
             BOS, EOS or pad); CE and KL average over the predictions whose input and target are both
             non-special. The default: the spliced-in SAE is judged only where it was trained.
sae_bench    SAEBench 0.6.0's default (evals/core/main.py, get_recons_loss): splice the SAE and zero-ablate
             at every position, BOS included; CE averages over the predictions whose input token is
             non-special (the target may be special), KL over the non-special positions, the last included.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from saebench.data import TokenContexts
from saebench.errors import ConfigError, DataError
from saebench.harvest import Harvester, InputTap, check_hooks, flatten_heads
from saebench.sae import SAE, SAEConfig
from saebench.train import grad_key

# the figures `saebench eval` prints and the app's Home shows, in this order, with what each one is
EVAL_METRICS = {
    "fvu": "pooled: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole set (explained_variance = 1 - fvu)",
    "fvu_batched": "per batch of batch_size tokens, sum rss / sum ||x - batch mean||^2, averaged over batches",
    "fvu_per_token": "rss_i / ||x_i - batch mean||^2 averaged over tokens: 1 - SAEBench's explained_variance_legacy, "
    "the one its paper reported",
    "explained_variance_sae_bench": "SAEBench 0.6.0's explained_variance, 1 - E rss / (E||x||^2 - (E||x||^2 / d)^2): "
    "variance about zero, not the mean (SAELens #659); for comparison only",
    "cossim": "mean over tokens of cos(x, x_hat)",
    "relative_reconstruction_bias": "E||x_hat||^2 / E[x_hat . x] (Rajamanoharan et al. 2024, eq. 10): 1 unbiased, "
    "< 1 shrinks",
    "l0": "mean active latents per token",
    "dead_fraction": "latents that never fire on the evaluation set (1 - SAEBench's frac_alive)",
    "dense_fraction": "latents firing on > 10% of tokens (SAEBench's freq_over_10_percent)",
    "freq_over_1_percent": "latents firing on > 1% of tokens",
    "normalized_freq_over_1_percent": "share of all firings that belong to latents firing on > 1% of tokens",
    "normalized_freq_over_10_percent": "share of all firings that belong to latents firing on > 10% of tokens",
    "average_max_encoder_cosine_sim": "mean over latents of the largest cosine of its encoder column with another's",
    "average_max_decoder_cosine_sim": "mean over latents of the largest cosine of its decoder row with another's",
    "shrinkage": "mean ||x_hat|| / ||x|| (SAEBench's l2_ratio)",
    "ce_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean), the SAE spliced in at its hook (ce_convention)",
    "kl_score": "(KL_zero - KL_sae) / KL_zero, KL(clean || patched) (ce_convention)",
}
CE_CONVENTIONS = ("non_special", "sae_bench")


def max_cosine(rows: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """rows: [n d] -> [n], each row's largest cosine with any other row (signed, as SAEBench's)."""
    unit = F.normalize(rows.detach().float(), dim=-1)
    out = []
    for i in range(0, len(unit), block):
        sims = unit[i : i + block] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(i, i + len(sims))] = -torch.inf
        out.append(sims.max(-1).values)
    return torch.cat(out)


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    acts: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 4096,
    grads: torch.Tensor | None = None,
    k: int | None = None,
    targets: torch.Tensor | None = None,
) -> dict:
    """acts: [n d_in] tensor or iterable of [batch d_in] batches. grads: [n d_out], the model's loss gradient
    where the SAE writes at each row of a tensor `acts`, for the families that rank by it (encoded without: plain
    TopK); k: encode at k' (SAE.check_k). targets: [n d_out] a transcoder's output at each row of a tensor `acts`:
    the figures are then of its prediction of them (output FVU, ...)."""
    sae = sae.eval()
    if sae.cfg.transcoder and (targets is None or not isinstance(acts, torch.Tensor)):
        raise DataError("a transcoder's figures compare its output with the model's: pass acts and targets as tensors")
    if isinstance(acts, torch.Tensor):
        rows = range(0, len(acts), batch_size)
        batches = (tuple(None if t is None else t[i : i + batch_size] for t in (acts, grads, targets)) for i in rows)
    else:
        batches = ((x, None, None) for x in acts)
    n = n_batches = 0
    sq_err = sum_sq = 0.0
    total = None
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.float64)
    l0_sum = shrink_sum = cos_sum = per_token_sum = batched_sum = hat_sq = hat_dot = 0.0
    dev = sae.W_dec.device
    for x_in, grad, target in batches:
        assert x_in is not None
        x_in = x_in.to(dev, torch.float32)
        x = x_in if target is None else target.to(dev, torch.float32)  # what the SAE reconstructs
        if not torch.isfinite(x_in).all() or not torch.isfinite(x).all():
            raise DataError("NaN or inf in the evaluation activations")
        z = sae.encode(x_in, None if grad is None else grad.to(dev, torch.float32), k=k)
        x_hat = sae.decode(z, x_in)
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
    mean_sq = sum_sq / n  # SAEBench's total variance: E||x||^2 - (mean over tokens and dims of x^2)^2
    sae_bench_ev = 1 - (sq_err / n) / (mean_sq - (mean_sq / sae.cfg.d_out) ** 2)
    hist_edges = [-8, -7, -6, -5, -4, -3, -2, -1, 0.0001]
    log_freq = torch.log10(freq.clamp_min(1e-12))
    hist = torch.histogram(log_freq.float(), bins=torch.tensor(hist_edges, dtype=torch.float32)).hist
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "fvu_batched": batched_sum / n_batches,
        "fvu_per_token": per_token_sum / n,
        "explained_variance_sae_bench": sae_bench_ev,
        "cossim": cos_sum / n,
        "relative_reconstruction_bias": hat_sq / hat_dot if hat_dot else float("nan"),
        "l0": l0_sum / n,
        "dead_fraction": float((freq == 0).double().mean()),
        "dense_fraction": float((freq > 0.1).double().mean()),
        "freq_over_1_percent": float((freq > 0.01).double().mean()),
        "normalized_freq_over_1_percent": float(freq[freq > 0.01].sum() / freq.sum()) if freq.sum() else 0.0,
        "normalized_freq_over_10_percent": float(freq[freq > 0.1].sum() / freq.sum()) if freq.sum() else 0.0,
        "average_max_encoder_cosine_sim": float(max_cosine(sae.W_enc.T).mean()),
        "average_max_decoder_cosine_sim": float(max_cosine(sae.W_dec).mean()),
        "shrinkage": shrink_sum / n,
        "density_histogram": {
            "log10_edges": hist_edges,
            "counts": [int(c) for c in hist.tolist()],
            "never": int((freq == 0).sum()),
        },
        "tokens": n,
    }


@torch.no_grad()
def random_baseline(
    sae: SAE,
    acts: torch.Tensor | None = None,
    seed: int = 12345,
    k: int | None = None,
    targets: torch.Tensor | None = None,
) -> SAE:
    """Same shape and k (or k'), random unit directions (tied encoder), trained b_dec; the family's per-token
    baseline rule (TopK, or AbsTopK for a signed family). A transcoder's baseline is a transcoder with random
    encoder columns and decoder rows, its trained b_dec and W_skip.

    Matched scale: given acts [n d_in], the codes are scaled (through W_enc) by the least-squares
    factor g = sum <x - b_dec, z W_dec> / sum ||z W_dec||^2, the best single scale for these random
    directions, so the baseline is a floor no worse than predicting b_dec (unscaled unit-norm
    codes overshoot: FVU > 1 on tiny); for a transcoder x is its output (targets [n d_out]) less the skip
    term. Without acts the codes stay unscaled."""
    c = sae.cfg
    cfg = SAEConfig(
        d_in=c.d_in,
        n_latents=c.n_latents,
        activation=c.family.baseline,
        k=k or c.k,
        kind=c.kind,
        d_out=c.d_out,
        output_hook=c.output_hook,
    )
    base = SAE(cfg, device=sae.W_dec.device, seed=seed)
    base.b_dec.copy_(sae.b_dec)
    if base.W_skip is not None and sae.W_skip is not None:
        base.W_skip.copy_(sae.W_skip)
    if acts is not None and len(acts):
        x = acts.to(base.W_dec.device, torch.float32)
        y = x if targets is None else targets.to(x.device, torch.float32)
        fixed = base.b_dec if (skip := base.skip(x)) is None else base.b_dec + skip  # the output of no feature
        part = base.decode(base.encode(x), x) - fixed
        dot, sq = float((part.double() * (y - fixed).double()).sum()), float(part.double().pow(2).sum())
        base.W_enc.mul_(max(dot, 0.0) / sq if sq > 0 else 0.0)
    return base.eval()


@torch.no_grad()
def spliced_losses(
    model,
    sae: SAE,
    hook: str,
    contexts: TokenContexts,
    batch_size: int = 16,
    convention: str = "non_special",
    gradients: bool = False,
    k: int | None = None,
) -> dict:
    """CE and KL with the SAE's reconstruction (and zero-ablation) replacing `hook`'s output, in one of
    CE_CONVENTIONS (the module docstring says what each splices and counts); k: the SAE at k' (SAE.check_k).
    A transcoder replaces its output hook's activations (the MLP's output) by its prediction from `hook`'s
    in the same forward pass, and zero-ablation zeroes the output hook.
    gradients: the SAE encodes each activation with the clean run's loss gradient where it writes (one more
    forward and a backward per batch; the gradient reads the true next tokens, as in training)."""
    out_hook = sae.cfg.output_hook or hook
    grads_at = Harvester(model, [out_hook], gradients=True) if gradients else None
    check_hooks(model, [hook, out_hook])
    if convention not in CE_CONVENTIONS:
        raise ConfigError(f"eval.ce_convention: unknown {convention!r}; use one of {', '.join(CE_CONVENTIONS)}")
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    ce_count = kl_count = 0
    dev = next(model.parameters()).device
    tap = InputTap(hook)  # a transcoder's input, read earlier in the same pass
    for i in range(0, len(contexts), batch_size):
        tokens = contexts.tokens[i : i + batch_size].to(dev)
        keep = ~contexts.special_mask[i : i + batch_size].to(dev)
        grad = None if grads_at is None else grads_at.forward(tokens, ~keep)[grad_key(out_hook)]
        every = convention == "sae_bench"
        where = torch.ones_like(keep) if every else keep  # the positions spliced or zero-ablated

        def patch(kind, where=where, grad=grad):
            def fn(act, hook):
                flat = flatten_heads(act)
                x = tap.take(out_hook) if sae.cfg.transcoder else flat
                new = sae(x, grad, k=k) if kind == "sae" else torch.zeros_like(flat)
                return torch.where(where[..., None], new.to(flat.dtype), flat).reshape(act.shape)

            return fn

        clean = model(tokens).float()
        logp_clean = clean.log_softmax(-1)
        results = {"clean": clean}
        for kind in ("sae", "zero"):
            reads = [(hook, tap.keep)] if sae.cfg.transcoder else []
            with model.hooks(fwd_hooks=[*reads, (out_hook, patch(kind))]):
                results[kind] = model(tokens).float()
        targets = tokens[:, 1:]
        ce_mask = (keep[:, :-1] if every else keep[:, :-1] & keep[:, 1:]).float()  # [b ctx-1]
        kl_mask = keep.float() if every else F.pad(ce_mask, (0, 1))  # [b ctx]
        for kind, logits in results.items():
            ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            totals[f"ce_{kind}"] += float((ce * ce_mask).sum())
            if kind != "clean":
                kl = (logp_clean.exp() * (logp_clean - logits.log_softmax(-1))).sum(-1)
                totals[f"kl_{kind}"] += float((kl * kl_mask).sum())
        ce_count += int(ce_mask.sum())
        kl_count += int(kl_mask.sum())
    if ce_count == 0:
        raise DataError("no prediction from a non-special token in the evaluation contexts")
    out = {k: v / (kl_count if k.startswith("kl") else ce_count) for k, v in totals.items()}
    out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["kl_score"] = (out["kl_zero"] - out["kl_sae"]) / out["kl_zero"]
    return out
