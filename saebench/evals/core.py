"""The core suite: reconstruction, sparsity and spliced-in CE / KL (saebench.evaluate), SAE and baseline."""

from __future__ import annotations

from saebench.evals.inputs import EvalInputs
from saebench.evaluate import evaluate_sae, spliced_losses


def core(inputs: EvalInputs) -> dict:
    """-> {"sae": {...}, "random_baseline": {...}, "ce_convention": ...}: the figures of EVAL_METRICS and their
    parts, CE and KL in the convention eval.ce_convention names."""
    few, convention = inputs.splice_contexts, inputs.config.eval.ce_convention
    return {
        **{
            name: {
                **evaluate_sae(sae, inputs.acts),
                **spliced_losses(inputs.model, sae, inputs.hook, few, convention=convention),
            }
            for name, sae in (("sae", inputs.sae), ("random_baseline", inputs.baseline))
        },
        "ce_convention": convention,
    }
