"""The prefixes suite: a Matryoshka SAE's core figures at each of its nested prefixes.

A prefix of m latents reconstructs from the full SAE's codes with every latent >= m set to 0, the
reconstruction its training loss scores (losses.sae_loss, Selection.prefix); so its L0 is the number of
the SAE's active latents below m, and the prefixes trace a curve in the L0 plane. The random baseline
(the full SAE's, at matched scale) is cut the same way. eval.json["prefixes"] = {"<m>": {"sae": {...},
"random_baseline": {...}}} for each m of sae.matryoshka; {} for any other SAE.
"""

from __future__ import annotations

import torch

from saebench.evals.inputs import EvalInputs
from saebench.evaluate import evaluate_sae, spliced_losses
from saebench.sae import SAE


class PrefixSAE(SAE):
    """An SAE whose codes stop at latent `size` (a Matryoshka prefix); it shares the SAE's weights."""

    def __init__(self, sae: SAE, size: int):
        torch.nn.Module.__init__(self)
        self.cfg, self.size = sae.cfg, size
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        self.W_skip = sae.W_skip
        self.register_buffer("threshold", sae.threshold)

    def encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        z = super().encode(x, *args, **kwargs)
        z[..., self.size :] = 0
        return z


def prefixes(inputs: EvalInputs) -> dict:
    """-> {"<m>": {"sae": {...}, "random_baseline": {...}}}: the core figures of each prefix m of the SAE."""
    out = {}
    for size in inputs.sae.cfg.matryoshka or []:
        out[str(size)] = {
            part: {
                **evaluate_sae(PrefixSAE(sae, size), inputs.acts),
                **spliced_losses(inputs.model, PrefixSAE(sae, size), inputs.hook, inputs.splice_contexts),
            }
            for part, sae in (("sae", inputs.sae), ("random_baseline", inputs.baseline))
        }
    return out
