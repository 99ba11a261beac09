"""Each evaluation suite's settings, nested in the run config's `eval:` section under the suite's name
(`--set eval.absorption.max_k=5`). This module imports nothing from saebench: config.py imports it."""

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
