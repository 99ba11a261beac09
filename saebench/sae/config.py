"""SAEConfig: the shape and sparsifier of one sparse autoencoder."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Literal

from saebench.errors import ConfigError
from saebench.sae.families import ACTIVATIONS, FAMILIES, Activation, Family

MATRYOSHKA_REDUCE = ("sum", "prefix_mean", "bussmann_mean")
INITS = ("random", "subspace")
KINDS = ("sae", "transcoder", "skip_transcoder")
DEFAULT_OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"


@dataclass
class SAEConfig:
    """d_in -> n_latents -> d_out (d_out = d_in for an SAE). `k` is the mean number of active latents per token.

    A run config's `sae:` section is this spec with d_in left at 0: `resolve` fills it from the
    hook's width (and n_latents from `expansion`, a transcoder's output_hook and d_out) when the run is built."""

    d_in: int = 0  # 0: the hook's width, set by `resolve`
    n_latents: int = 0  # 0: expansion * d_in
    # sae: reconstructs its hook's activations; transcoder: predicts output_hook's from them (Dunefsky et al. 2024);
    # skip_transcoder: plus a linear skip term x W_skip (Paulo et al. 2025)
    kind: Literal["sae", "transcoder", "skip_transcoder"] = "sae"
    # a transcoder's output hook; "{layer}" stands for the block number of its input hook
    output_hook: str | None = None  # None: blocks.{layer}.hook_mlp_out for a transcoder
    d_out: int = 0  # 0: d_in, or for a transcoder of a run the output hook's width (set by `resolve`)
    activation: Activation = "topk"  # the family (saebench.sae.families)
    k: int = 32
    expansion: int = 16  # n_latents = expansion * d_in where n_latents is 0
    matryoshka: list[int] | None = None  # nested prefix sizes, ascending, last == n_latents
    # sum: the prefixes' errors summed (Bussmann et al. 2025's equation); prefix_mean: their mean; bussmann_mean:
    # Bussmann et al.'s code, the mean over the prefixes and a b_dec-only reconstruction (n + 1 terms); the
    # old name "mean" is read as prefix_mean, with a warning
    matryoshka_reduce: Literal["sum", "prefix_mean", "bussmann_mean", "mean"] = "sum"
    # > 0: each step draws this many prefix sizes at random (Nabeshima), log-uniform in
    # [matryoshka[0], n_latents), plus n_latents; 0: the fixed `matryoshka` sizes
    matryoshka_random: int = 0
    aux_coef: float = 1 / 32  # weight of the family's auxiliary loss (AuxK or aux_zipf)
    k_aux: int | None = None  # default d_out // 2, clamped to the number of dead latents
    dead_tokens: int = 10_000_000  # a latent that has not fired in this many tokens is dead
    zipf_exponent: float = 1.0  # feature choice capacities and aux_zipf's expected shares
    threshold_decay: float = 0.99  # EMA of the smallest kept value, the inference threshold
    # gradient_topk's beta (Olmo et al. 2025), for the trainer's inputs (normalised to mean norm sqrt(d_in)); an
    # exported SAE holds beta / input scale, for raw inputs (SAE.fold_input_scale)
    gradient_beta: float = 1.0
    # decoder rows: Gaussian in all d_in dims, or Gaussian in the init sample's principal subspace (Wang et al. 2025)
    init: Literal["random", "subspace"] = "random"
    subspace_variance: float = 0.99  # subspace init keeps the smallest rank holding this share of the variance
    # JumpReLU: the loss adds l0_coef * (mean L0) / k; None = adapted every step so the mean L0 reaches k
    l0_coef: float | None = None
    # JumpReLU's rectangle kernel width per unit of input norm (`epsilon` = bandwidth * sqrt(d_in) on the trainer's
    # inputs of mean norm sqrt(d_in)); 10x the paper's 0.001, which leaves most latents without a sample in the
    # kernel in a batch of 4096 (docs/benchmarks.md, "JumpReLU")
    bandwidth: float = 0.01
    # JumpReLU: the straight-through pseudo-gradients reach the pre-activations (so the encoder) as well as the
    # thresholds (Anthropic's setup, SAELens' jumprelu_ste_to_input); False: the thresholds alone (DeepMind's, whose
    # mean L0 ends 25% under k on tiny at 2M tokens with 17% of the latents dead; docs/benchmarks.md, "JumpReLU")
    ste_to_input: bool = True
    hook: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"sae.activation: unknown {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.d_in < 0 or self.n_latents < 0 or self.expansion < 1:
            raise ConfigError(
                "sae: d_in, n_latents and expansion must be positive "
                f"(got {self.d_in}, {self.n_latents}, {self.expansion})"
            )
        if self.d_in and not self.n_latents:
            self.n_latents = self.expansion * self.d_in
        if self.kind not in KINDS:
            raise ConfigError(f"sae.kind: unknown {self.kind!r}; use one of {', '.join(KINDS)}")
        if not self.transcoder and (self.output_hook or (self.d_in and self.d_out not in (0, self.d_in))):
            raise ConfigError(
                "sae.output_hook and sae.d_out are a transcoder's: set sae.kind: transcoder (or skip_transcoder), "
                "or drop them"
            )
        if self.d_in and not self.d_out:
            self.d_out = self.d_in
        if self.k < 1 or (self.n_latents and self.k > self.n_latents):
            raise ConfigError(f"sae.k must lie in [1, n_latents={self.n_latents}], got {self.k}")
        if self.matryoshka is not None:
            m = list(self.matryoshka)
            if not m or m != sorted(set(m)) or m[0] < 1 or (self.n_latents and m[-1] != self.n_latents):
                raise ConfigError(
                    f"sae.matryoshka must be strictly ascending sizes ending at n_latents={self.n_latents}, got {m}"
                )
        if self.gradient_beta < 0:
            raise ConfigError(f"sae.gradient_beta must be >= 0, got {self.gradient_beta}")
        if self.matryoshka_reduce == "mean":
            warnings.warn(
                "sae.matryoshka_reduce: 'mean' is now called 'prefix_mean' (the mean of the prefixes' errors), read as "
                "such; Bussmann et al.'s code also averages in a b_dec-only term: that is 'bussmann_mean'",
                stacklevel=3,
            )
            self.matryoshka_reduce = "prefix_mean"
        if self.init not in INITS:
            raise ConfigError(f"sae.init must be random or subspace, got {self.init!r}")
        if not 0 < self.subspace_variance <= 1:
            raise ConfigError(f"sae.subspace_variance must lie in (0, 1], got {self.subspace_variance}")
        if self.bandwidth <= 0 or (self.l0_coef is not None and self.l0_coef < 0):
            raise ConfigError(
                f"sae.bandwidth must be > 0 and sae.l0_coef >= 0 or null, got {self.bandwidth} and {self.l0_coef}"
            )
        if self.matryoshka is not None and self.family.hierarchical:
            raise ConfigError(
                f"sae.matryoshka does not combine with {self.activation}, which already nests its reconstructions "
                "(by rank, not by latent index): drop sae.matryoshka, or use activation: topk with it"
            )
        if self.matryoshka_reduce not in MATRYOSHKA_REDUCE:
            raise ConfigError(
                "sae.matryoshka_reduce: a sum or mean of the prefixes' errors, one of sum, prefix_mean, bussmann_mean; "
                f"got {self.matryoshka_reduce!r}"
            )
        if self.matryoshka_random < 0 or (self.matryoshka_random and not self.matryoshka):
            raise ConfigError(
                "sae.matryoshka_random needs sae.matryoshka (its first size is the smallest prefix drawn) "
                "and a count >= 0"
            )

    @property
    def family(self) -> Family:
        return FAMILIES[self.activation]

    @property
    def transcoder(self) -> bool:
        return self.kind != "sae"

    @property
    def skip(self) -> bool:
        """A linear skip term W_skip [d_in d_out] beside the features."""
        return self.kind == "skip_transcoder"

    def output_hook_for(self, hook: str) -> str:
        """The output hook of this spec's transcoder on input `hook` ("{layer}" filled from blocks.{layer}.)."""
        template = self.output_hook or DEFAULT_OUTPUT_HOOK
        if "{layer}" not in template:
            return template
        block = re.match(r"blocks\.(\d+)\.", hook)
        if block is None:
            raise ConfigError(
                f"sae.output_hook {template!r} takes the layer from the input hook, but {hook!r} names no "
                "blocks.{layer}.: give the output hook in full"
            )
        return template.replace("{layer}", block.group(1))

    def resolve(
        self, d_in: int, hook: str | None = None, model: str | None = None, d_out: int | None = None
    ) -> SAEConfig:
        """This spec for a hook of width d_in (a d_in set here must agree); a transcoder's output hook
        (`output_hook_for(hook)`) has width d_out."""
        if self.d_in and self.d_in != d_in:
            raise ConfigError(
                f"sae.d_in is {self.d_in} but {hook} of {model} has width {d_in}: set sae.d_in={d_in} or remove it"
            )
        if not self.transcoder:
            return dataclasses.replace(self, d_in=d_in, hook=hook, model=model)
        output_hook = self.output_hook_for(hook) if hook is not None else self.output_hook
        if d_out is None:
            raise ConfigError(f"a transcoder needs its output width: resolve(d_in, hook, model, d_out={output_hook}'s)")
        if self.d_out and self.d_out != d_out:
            raise ConfigError(
                f"sae.d_out is {self.d_out} but {output_hook} of {model} has width {d_out}: "
                f"set sae.d_out={d_out} or remove it"
            )
        return dataclasses.replace(self, d_in=d_in, hook=hook, model=model, output_hook=output_hook, d_out=d_out)

    @property
    def epsilon(self) -> float:
        """JumpReLU's kernel width on the trainer's inputs (mean norm sqrt(d_in))."""
        return self.bandwidth * math.sqrt(self.d_in)

    @property
    def aux_k(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_out // 2)
