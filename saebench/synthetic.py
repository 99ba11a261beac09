"""Planted-feature data with known directions, and how well an SAE recovers them.

x = sum_i a_i f_i + noise, over n_true unit directions f_i in d dims; feature i fires with a
Zipf-shaped probability p_i; magnitudes a_i ~ U(0.5, 1.5); optionally the second half of the
features are children that fire only when their parent (in the first half) fires.
"""

from __future__ import annotations

from collections.abc import Iterator

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class SyntheticConfig:
    d: int = 128
    n_true: int = 2048
    true_l0: float = 8.0  # expected active features per token
    zipf_exponent: float = 0.5
    hierarchy: bool = False
    child_prob: float = 0.3  # P(child fires | parent fires)
    noise_std: float = 0.0
    seed: int = 0


class PlantedFeatures:
    """Draws batches from one fixed set of true features. directions: [n_true d], probs: [n_true]."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        directions = torch.randn(cfg.n_true, cfg.d, generator=gen)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        weights = torch.arange(1, cfg.n_true + 1, dtype=torch.float64) ** -cfg.zipf_exponent
        if cfg.hierarchy:
            half = cfg.n_true // 2
            parents = weights[:half] / weights[:half].sum() * cfg.true_l0 / (1 + cfg.child_prob)
            self.parent = torch.arange(cfg.n_true) - half  # child i >= half has parent i - half
            self.probs = torch.cat([parents, parents * cfg.child_prob]).clamp(max=1).float()
        else:
            self.parent = None
            self.probs = (weights / weights.sum() * cfg.true_l0).clamp(max=1).float()

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x [n d], codes [n n_true])."""
        cfg = self.cfg
        if cfg.hierarchy:
            half = cfg.n_true // 2
            parent_on = torch.rand(n, half, generator=gen) < self.probs[:half]
            child_on = parent_on & (torch.rand(n, half, generator=gen) < cfg.child_prob)
            on = torch.cat([parent_on, child_on], dim=1)
        else:
            on = torch.rand(n, cfg.n_true, generator=gen) < self.probs
        codes = on * (0.5 + torch.rand(n, cfg.n_true, generator=gen))
        x = codes @ self.directions
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(n, cfg.d, generator=gen)
        return x, codes

    def stream(self, batch_size: int, seed: int):
        """A factory for BatchSource: epoch -> iterator of [batch d] (fresh samples forever)."""

        def batches(epoch: int):
            gen = torch.Generator().manual_seed(seed * 7919 + epoch)
            while True:
                yield self.sample(batch_size, gen)[0]

        return batches


def recovery_metrics(W_dec: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9) -> dict:
    """W_dec: [n_latents d]; directions: [n_true d].

    mcc: mean |cos| over a one-to-one (Hungarian) matching of latents to true features;
    mmcs: mean over true features of the best |cos| of any latent;
    recovered: share of true features whose best |cos| exceeds `threshold`.
    """
    dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (directions @ dec.T).abs().double().numpy()  # [n_true n_latents]
    rows, cols = linear_sum_assignment(cos, maximize=True)
    best = cos.max(axis=1)
    return {"mcc": float(cos[rows, cols].mean()), "mmcs": float(best.mean()), "recovered": float((best > threshold).mean())}


def run_synthetic_bench(*args, **kwargs) -> list[dict]:
    """Train each family on the same planted features; one row of recovery metrics per family."""
    return list(iter_synthetic_bench(*args, **kwargs))


def iter_synthetic_bench(
    activations: tuple[str, ...] = ("topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice"),
    data: SyntheticConfig = SyntheticConfig(), n_latents: int | None = None, k: int | None = None,
    n_tokens: int = 8_000_000, batch_size: int = 4096, lr: float = 2e-3, matryoshka: bool = False, seed: int = 0,
) -> Iterator[dict]:
    """run_synthetic_bench, yielding each family's row as soon as it is trained."""
    from saebench.evaluate import evaluate_sae
    from saebench.sae import SAEConfig
    from saebench.train import TrainConfig, train_sae

    planted = PlantedFeatures(data)
    n_latents = n_latents or data.n_true
    k = k or round(data.true_l0)
    held_out, codes = planted.sample(50_000, torch.Generator().manual_seed(seed + 99))
    for activation in activations:
        prefixes = [n_latents // 8, n_latents // 4, n_latents // 2, n_latents] if matryoshka else None
        cfg = SAEConfig(d_in=data.d, n_latents=n_latents, activation=activation, k=k, matryoshka=prefixes, dead_tokens=200_000)
        sae, report = train_sae(cfg, planted.stream(batch_size, seed), TrainConfig(n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed))
        metrics = evaluate_sae(sae, held_out)
        yield {
            "activation": activation, "matryoshka": bool(prefixes), **recovery_metrics(sae.W_dec.detach().cpu(), planted.directions),
            "fvu": round(metrics["fvu"], 4), "l0": round(metrics["l0"], 2), "true_l0": round(float((codes > 0).sum(-1).float().mean()), 2),
            "dead_fraction": metrics["dead_fraction"], "train_tokens_per_s": report.get("tokens_per_s"),
        }
