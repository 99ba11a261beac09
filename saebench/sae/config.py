"""SAEConfig: the shape and sparsifier of one sparse autoencoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from saebench.errors import ConfigError
from saebench.sae.families import ACTIVATIONS, FAMILIES, Activation, Family

MATRYOSHKA_REDUCE = ("sum", "mean")


@dataclass
class SAEConfig:
    """d_in -> n_latents -> d_in. `k` is the mean number of active latents per token.

    A run config's `sae:` section is this spec with d_in left at 0: `resolve` fills it from the
    hook's width (and n_latents from `expansion`) when the run is built."""

    d_in: int = 0  # 0: the hook's width, set by `resolve`
    n_latents: int = 0  # 0: expansion * d_in
    activation: Activation = "topk"  # the family (saebench.sae.families)
    k: int = 32
    expansion: int = 16  # n_latents = expansion * d_in where n_latents is 0
    matryoshka: list[int] | None = None  # nested prefix sizes, ascending, last == n_latents
    matryoshka_reduce: Literal["sum", "mean"] = "sum"  # sum (Bussmann et al. 2025) or mean of the prefixes' errors
    # > 0: each step draws this many prefix sizes at random (Nabeshima), log-uniform in
    # [matryoshka[0], n_latents), plus n_latents; 0: the fixed `matryoshka` sizes
    matryoshka_random: int = 0
    aux_coef: float = 1 / 32  # weight of the family's auxiliary loss (AuxK or aux_zipf)
    k_aux: int | None = None  # default d_in // 2, clamped to the number of dead latents
    dead_tokens: int = 10_000_000  # a latent that has not fired in this many tokens is dead
    zipf_exponent: float = 1.0  # feature choice capacities and aux_zipf's expected shares
    threshold_decay: float = 0.99  # EMA of the smallest kept value, the inference threshold
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
        if self.k < 1 or (self.n_latents and self.k > self.n_latents):
            raise ConfigError(f"sae.k must lie in [1, n_latents={self.n_latents}], got {self.k}")
        if self.matryoshka is not None:
            m = list(self.matryoshka)
            if not m or m != sorted(set(m)) or m[0] < 1 or (self.n_latents and m[-1] != self.n_latents):
                raise ConfigError(
                    f"sae.matryoshka must be strictly ascending sizes ending at n_latents={self.n_latents}, got {m}"
                )
        if self.matryoshka is not None and self.family.hierarchical:
            raise ConfigError(
                f"sae.matryoshka does not combine with {self.activation}, which already nests its reconstructions "
                "(by rank, not by latent index): drop sae.matryoshka, or use activation: topk with it"
            )
        if self.matryoshka_reduce not in MATRYOSHKA_REDUCE:
            raise ConfigError(f"sae.matryoshka_reduce must be sum or mean, got {self.matryoshka_reduce!r}")
        if self.matryoshka_random < 0 or (self.matryoshka_random and not self.matryoshka):
            raise ConfigError(
                "sae.matryoshka_random needs sae.matryoshka (its first size is the smallest prefix drawn) "
                "and a count >= 0"
            )

    @property
    def family(self) -> Family:
        return FAMILIES[self.activation]

    def resolve(self, d_in: int, hook: str | None = None, model: str | None = None) -> SAEConfig:
        """This spec for a hook of width d_in (a d_in set here must agree)."""
        if self.d_in and self.d_in != d_in:
            raise ConfigError(
                f"sae.d_in is {self.d_in} but {hook} of {model} has width {d_in}: set sae.d_in={d_in} or remove it"
            )
        return dataclasses.replace(self, d_in=d_in, hook=hook, model=model)

    @property
    def aux_k(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)
