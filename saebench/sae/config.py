"""SAEConfig: the shape and sparsifier of one sparse autoencoder."""

from __future__ import annotations

from dataclasses import dataclass

from saebench.errors import ConfigError

ACTIVATIONS = ("topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice")
BATCH_ACTIVATIONS = ("batchtopk", "mutual_choice", "feature_choice")
MATRYOSHKA_REDUCE = ("sum", "mean")


@dataclass
class SAEConfig:
    """d_in -> n_latents -> d_in. `k` is the mean number of active latents per token."""

    d_in: int
    n_latents: int
    activation: str = "topk"
    k: int = 32
    matryoshka: list[int] | None = None  # nested prefix sizes, ascending, last == n_latents
    matryoshka_reduce: str = "sum"  # sum (Bussmann et al. 2025) or mean of the prefixes' normalised errors
    # > 0: each step draws this many prefix sizes at random (Nabeshima), log-uniform in
    # [matryoshka[0], n_latents), plus n_latents; 0: the fixed `matryoshka` sizes
    matryoshka_random: int = 0
    aux_coef: float = 1 / 32  # AuxK (topk, abstopk, batchtopk) or aux_zipf (mutual/feature choice)
    k_aux: int | None = None  # default d_in // 2, clamped to the number of dead latents
    dead_tokens: int = 10_000_000  # a latent that has not fired in this many tokens is dead
    zipf_exponent: float = 1.0  # feature choice capacities and aux_zipf's expected shares
    threshold_decay: float = 0.99  # EMA of the smallest kept value, the inference threshold
    hook: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"sae.activation: unknown {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.d_in < 1 or self.n_latents < 1:
            raise ConfigError(f"sae: d_in and n_latents must be positive (got {self.d_in}, {self.n_latents})")
        if not 1 <= self.k <= self.n_latents:
            raise ConfigError(f"sae.k must lie in [1, n_latents={self.n_latents}], got {self.k}")
        if self.matryoshka is not None:
            m = list(self.matryoshka)
            if not m or m != sorted(set(m)) or m[-1] != self.n_latents or m[0] < 1:
                raise ConfigError(
                    f"sae.matryoshka must be strictly ascending sizes ending at n_latents={self.n_latents}, got {m}"
                )
        if self.matryoshka_reduce not in MATRYOSHKA_REDUCE:
            raise ConfigError(f"sae.matryoshka_reduce must be sum or mean, got {self.matryoshka_reduce!r}")
        if self.matryoshka_random < 0 or (self.matryoshka_random and not self.matryoshka):
            raise ConfigError(
                "sae.matryoshka_random needs sae.matryoshka (its first size is the smallest prefix drawn) and a count >= 0"
            )

    @property
    def uses_threshold(self) -> bool:
        return self.activation in BATCH_ACTIVATIONS

    @property
    def aux_k(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)
