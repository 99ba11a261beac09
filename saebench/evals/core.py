"""The core suite: reconstruction, sparsity and spliced-in CE / KL (saebench.evaluate), SAE and baseline."""

from __future__ import annotations

from saebench.evals.inputs import EvalInputs
from saebench.evaluate import evaluate_sae, random_baseline, spliced_losses


def core(inputs: EvalInputs) -> dict:
    """-> {"sae": {...}, "random_baseline": {...}, "ce_convention": ...}: the figures of EVAL_METRICS and their
    parts, CE and KL in the convention eval.ce_convention names.

    An SAE that ranks by the loss gradient is evaluated with the held-out gradients ("sae": CE/KL with the
    clean run's gradients) and without them ("sae_without_gradients": plain TopK). With inputs.ks, "by_k" holds
    the same figures of the SAE at each k' and of a random baseline at that k'. A transcoder's figures are of its
    output: FVU of the output hook's activations, CE and KL with its prediction in place of the MLP's output."""
    few, model, hook, grads = inputs.splice_contexts, inputs.model, inputs.hook, inputs.grads
    convention = inputs.config.eval.ce_convention

    def figures(sae, grads=None, k=None) -> dict:
        spliced = spliced_losses(model, sae, hook, few, gradients=grads is not None, convention=convention, k=k)
        return {**evaluate_sae(sae, inputs.acts, grads=grads, k=k, targets=inputs.targets), **spliced}

    out = {"sae": figures(inputs.sae, grads), "random_baseline": figures(inputs.baseline), "ce_convention": convention}
    if grads is not None:
        out["sae_without_gradients"] = figures(inputs.sae)
    if inputs.ks:
        out["by_k"] = {
            str(k): {
                "sae": figures(inputs.sae, grads, k),
                "random_baseline": figures(random_baseline(inputs.sae, inputs.acts, k=k, targets=inputs.targets)),
            }
            for k in inputs.ks
        }
    return out
