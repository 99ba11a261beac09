"""The SAE families: what each sparsifier is, declared once. Nothing else tests family names.

Adding a family is one `Family` entry in FAMILIES (and its selection function in sparsify.py);
`SAEConfig.family` looks it up, and the SAE, the losses, the trainer, the evaluation, the analysis
and the SAELens export read its properties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from saebench.distributed import LOCAL, Reducer
from saebench.sae import sparsify

if TYPE_CHECKING:
    from saebench.sae.config import SAEConfig

Activation = Literal[
    "topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice", "hierarchical_topk", "gradient_topk", "jumprelu"
]


@dataclass(frozen=True)
class SelectContext:
    """What a selection may read besides pre: the ranks whose batches a batch sparsifier selects over
    together (data parallelism), and any per-step state a family's rule needs."""

    reduce: Reducer = LOCAL
    # [batch n] d_i . grad_x L: the model's loss gradient at the input along each decoder row (Family.gradients;
    # None where no gradient is known)
    latent_grads: torch.Tensor | None = None
    # [n] recent fires per token (the trainer's all-reduced EMA: the same on every rank); None before any step
    freq: torch.Tensor | None = None
    threshold: torch.Tensor | None = None  # [n] a learned threshold, differentiable (JumpReLU's exp(log_threshold))


SelectFn = Callable[[torch.Tensor, "SAEConfig", SelectContext], sparsify.Selection]


@dataclass(frozen=True)
class Family:
    """One sparsifier's properties. `select(pre [batch n], cfg, ctx)` is its training-time selection."""

    name: Activation
    select: SelectFn
    signed: bool = False  # codes keep their sign (no ReLU); ranked by |pre|
    # the inference threshold: for a batch selection (the choice depends on the whole batch), "global" (one value)
    # or "per_feature", an EMA of the smallest kept value; "learned": a trained parameter; None: per-token rule
    threshold: Literal["global", "per_feature", "learned"] | None = None
    aux: Literal["auxk", "aux_zipf"] = "auxk"  # AuxK on dead latents, or on latents under their Zipf share
    # W_enc = enc_init_scale * W_dec^T, chosen on the defaults suite (docs/benchmarks.md, "Choosing the defaults")
    enc_init_scale: float = 0.3
    # the per-token family of a random baseline at matched scale (evaluate.random_baseline)
    baseline: Activation = "topk"
    gradients: bool = False  # selection ranks by the model's loss gradient (harvest.gradients), TopK without it
    # the selection is sorted by value and the loss averages the error of each of its prefixes
    # (losses.PrefixErrors), so that inference at any k' <= k truncates it (Balagansky et al. 2025)
    hierarchical: bool = False

    @property
    def batch_selection(self) -> bool:
        return self.threshold in ("global", "per_feature")


def _topk(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    return sparsify.topk(pre, cfg.k)


def _abstopk(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    return sparsify.abstopk(pre, cfg.k)


def _batchtopk(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    return sparsify.batchtopk(pre, cfg.k, ctx.reduce)


def _hierarchical_topk(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    return sparsify.topk(pre, cfg.k, sorted=True)


def _feature_choice(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    return sparsify.feature_choice(pre, cfg.k, cfg.zipf_exponent, ctx.reduce, ctx.freq)


def _gradient_topk(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    if ctx.latent_grads is None:
        return sparsify.topk(pre, cfg.k)
    return sparsify.gradient_topk(pre, ctx.latent_grads, cfg.k, cfg.gradient_beta)


def _jumprelu(pre: torch.Tensor, cfg: SAEConfig, ctx: SelectContext) -> sparsify.Selection:
    assert ctx.threshold is not None, "JumpReLU's training selection needs the learned threshold"
    return sparsify.jumprelu(pre, ctx.threshold, cfg.epsilon, cfg.ste_to_input)


BATCH_INIT = 0.1  # the batch sparsifiers' encoder init (0.3 costs them 0.02-0.04 planted MCC)
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("topk", _topk),
        Family("abstopk", _abstopk, signed=True, baseline="abstopk"),
        Family("batchtopk", _batchtopk, threshold="global", enc_init_scale=BATCH_INIT),
        Family("mutual_choice", _batchtopk, threshold="global", aux="aux_zipf", enc_init_scale=BATCH_INIT),
        Family("feature_choice", _feature_choice, threshold="per_feature", aux="aux_zipf", enc_init_scale=BATCH_INIT),
        Family("gradient_topk", _gradient_topk, gradients=True),
        Family("jumprelu", _jumprelu, threshold="learned"),
        Family("hierarchical_topk", _hierarchical_topk, hierarchical=True),
    )
}
ACTIVATIONS = tuple(FAMILIES)
