"""The core suite: reconstruction, sparsity and spliced-in CE / KL (saebench.evaluate), SAE and baseline."""

from __future__ import annotations

from saebench.evals.inputs import EvalInputs
from saebench.evaluate import evaluate_sae, spliced_losses


def core(inputs: EvalInputs) -> dict:
    """-> {"sae": {...}, "random_baseline": {...}}: the figures of EVAL_METRICS and their parts.

    An SAE that ranks by the loss gradient is evaluated with the held-out gradients ("sae": CE/KL with the
    clean run's gradients) and without them ("sae_without_gradients": plain TopK)."""
    few, model, hook, grads = inputs.splice_contexts, inputs.model, inputs.hook, inputs.grads
    out = {
        "sae": {
            **evaluate_sae(inputs.sae, inputs.acts, grads=grads),
            **spliced_losses(model, inputs.sae, hook, few, gradients=grads is not None),
        },
        "random_baseline": {
            **evaluate_sae(inputs.baseline, inputs.acts),
            **spliced_losses(model, inputs.baseline, hook, few),
        },
    }
    if grads is not None:
        out["sae_without_gradients"] = {
            **evaluate_sae(inputs.sae, inputs.acts),
            **spliced_losses(model, inputs.sae, hook, few),
        }
    return out
