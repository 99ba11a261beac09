"""The core suite: reconstruction, sparsity and spliced-in CE / KL (saebench.evaluate), SAE and baseline."""

from __future__ import annotations

from saebench.evals.inputs import EvalInputs
from saebench.evaluate import evaluate_sae, spliced_losses


def core(inputs: EvalInputs) -> dict:
    """-> {"sae": {...}, "random_baseline": {...}}: the figures of EVAL_METRICS and their parts."""
    few = inputs.splice_contexts
    return {
        name: {**evaluate_sae(sae, inputs.acts), **spliced_losses(inputs.model, sae, inputs.hook, few)}
        for name, sae in (("sae", inputs.sae), ("random_baseline", inputs.baseline))
    }
