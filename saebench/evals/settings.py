"""Each evaluation suite's settings, nested in the run config's `eval:` section under the suite's name
(`--set eval.interp.n_features=100`). This module imports nothing from saebench: config.py imports it."""

from __future__ import annotations

from dataclasses import dataclass


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
