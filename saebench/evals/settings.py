"""Each evaluation suite's settings: `eval.<suite>` in a run config (YAML or --set eval.probing.ks=[1,5]).

Only dataclasses and typing here: saebench.config imports this module. The suites check values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ProbingSettings:
    """Sparse probing (SAEBench's variant of Gurnee et al. 2023) on tasks from the bundled corpus."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])  # latents per sparse probe
    tasks: list[Literal["source", "code", "text"]] = field(default_factory=lambda: ["source", "code", "text"])
    n_train: int = 150  # samples per class in the probes' train split (contexts for source, tokens otherwise)
    n_test: int = 50  # samples per class in the test split
    context_size: int = 128  # SAEBench's context_length
    C: float = 1.0  # inverse L2 strength of the logistic probe (sklearn's C, SAEBench's value)
    seed: int = 42  # SAEBench's random_seed


@dataclass
class TPPSettings:
    """Targeted probe perturbation (SAEBench) on the probing suite's document-source task, data and probes."""

    n_ablated: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])  # SAEBench's n_values


@dataclass
class ConsistencySettings:
    # the run folder of a second seed of this run's config; None: the sibling run folder (same runs_dir)
    # whose config differs from this one's only in seed and name, the first by name when there are several
    against: str | None = None


@dataclass
class AbsorptionSettings:
    """The first-letter absorption eval (Chanin et al. 2024) as SAEBench 0.6.0 defines it."""

    n_icl: int = 10  # in-context lines "{word} has the first letter: X" before the word
    test_fraction: float = 0.2  # of the letter words, held out for F1 and absorption
    max_k: int = 10  # k-sparse probes with k = 1..max_k choose each letter's main latents
    f1_jump: float = 0.03  # k grows while the k-sparse probe's F1 rises by more than this
    min_probe_f1: float = 0.6  # a letter whose probe scores a lower test F1 is left out
    min_letters: int = 20  # fewer letters left: no mean (the model does not represent first letters)
    batch_size: int = 64  # prompts per model forward
    seed: int = 0


@dataclass
class InterpSettings:
    """Explanations of features from the feature store, scored by detection and fuzzing."""

    n_features: int = 256  # live features sampled per SAE (the random SAE's too)
    min_fires: int = 15  # a live feature fired at least this often in the analysed tokens
    window: int = 10  # tokens shown either side of an example's token
    explain_top: int = 10  # top examples the explainer reads
    explain_quantile: int = 5  # and examples across the activation range (the store's intervals)
    score_top: int = 5  # held-out activating examples scored: top ones
    score_quantile: int = 5  # and across the activation range
    n_random: int = 10  # windows where the feature does not fire, for detection
    active_fraction: float = 0.01  # a token is active where |z| > this share of the feature's max
    n_terms: int = 5  # the offline explainer's terms (tokens or n-grams) per explanation
    random_contexts: int = 128  # held-out contexts whose windows give the non-activating examples
    random_tokens: int | None = None  # the random SAE's examples come from this many tokens (None: the store's)
    explainer: str | None = None  # an OpenAI-compatible chat endpoint (base URL); None: the offline explainer
    explainer_model: str = ""  # the model name the endpoint serves
    timeout: float = 60.0  # seconds per request to the endpoint
    workers: int = 4  # requests in flight
    seed: int = 0
