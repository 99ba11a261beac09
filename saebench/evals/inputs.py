"""What every suite of one SAE reads, computed once per run by `pipeline.eval_from_config`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from saebench.config import RunConfig
from saebench.data import TokenContexts
from saebench.runs import Run, SAEHome
from saebench.sae import SAE


@dataclass
class EvalInputs:
    """One SAE of a run, with its held-out data and its random baseline at matched scale."""

    run: Run
    home: SAEHome
    config: RunConfig
    model: Any  # the run's hooked model
    sae: SAE
    baseline: SAE  # evaluate.random_baseline(sae, acts)
    acts: torch.Tensor  # [n d_in] held-out activations at the SAE's hook (config.eval.n_tokens)
    contexts: TokenContexts  # the held-out split (config.eval.split)
    grads: torch.Tensor | None = None  # [n d_out] loss gradients where it writes, for an SAE that ranks by them
    ks: Sequence[int] = ()  # the core suite also at these k' latents per token (eval.json "by_k")
    show_progress: bool = True
    targets: torch.Tensor | None = None  # [n d_out] a transcoder's output hook's rows, beside acts

    @property
    def hook(self) -> str:
        return self.home.hook

    @property
    def splice_contexts(self) -> TokenContexts:
        """The first config.eval.n_contexts held-out contexts, for CE / KL with the SAE spliced in."""
        n = min(self.config.eval.n_contexts, len(self.contexts))
        return TokenContexts(self.contexts.tokens[:n], self.contexts.special_mask[:n])
