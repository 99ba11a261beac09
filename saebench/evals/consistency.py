"""The consistency suite: do two seeds of one config learn the same dictionary? (Paulo and Belrose 2025)

MCC between the two decoders, as planted-feature recovery computes it (saebench.synthetic): mean |cos|
over the one-to-one (Hungarian) matching of latents, over min(n_a, n_b) pairs; beside it each latent's
best match in the other SAE. The random baseline is the same figure between two random decoders of the
same shape. The second seed is another run folder (eval.consistency.against), or found beside this one.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saebench.config import RunConfig, to_dict
from saebench.errors import ConfigError, DataError
from saebench.evals.inputs import EvalInputs
from saebench.evaluate import random_baseline
from saebench.runs import Run
from saebench.sae import SAE
from saebench.synthetic import match_latents

SECOND_RANDOM_SEED = 54321  # the second random decoder's (the first is the eval's random baseline)


class Consistency(NamedTuple):
    """Latent i of SAE a against SAE b; match, match_cos, best, best_cos: [n_a]."""

    mcc: float  # mean |cos| over the one-to-one matching, over min(n_a, n_b) pairs
    mean_best_cos: float  # mean over a's latents of the largest |cos| with any of b's
    match: torch.Tensor  # b's latent matched one-to-one to each of a's (-1 where none: n_a > n_b)
    match_cos: torch.Tensor  # its |cos| (0 where none)
    best: torch.Tensor  # b's latent of largest |cos|
    best_cos: torch.Tensor  # that cosine, signed

    def figures(self) -> dict:
        return {"mcc": self.mcc, "mean_best_cos": self.mean_best_cos}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"match": self.match, "match_cos": self.match_cos, "best": self.best, "best_cos": self.best_cos}


@torch.no_grad()
def decoder_consistency(sae_a: SAE, sae_b: SAE) -> Consistency:
    """How alike two SAEs' decoders are (two seeds of one config, or any two SAEs of the same d_in)."""
    a, b = (F.normalize(s.W_dec.detach().float().cpu(), dim=-1) for s in (sae_a, sae_b))
    if a.shape[1] != b.shape[1]:
        raise DataError(f"the two SAEs read different widths ({a.shape[1]} and {b.shape[1]}): compare SAEs of one hook")
    match, match_cos = match_latents(b, a)
    cos = a @ b.T  # [n_a n_b]
    best = cos.abs().argmax(-1)
    best_cos = cos.gather(1, best[:, None]).squeeze(1)
    mcc = float(match_cos.sum() / min(len(a), len(b)))
    return Consistency(mcc, float(best_cos.abs().mean()), match, match_cos.float(), best, best_cos)


def _same_but_seed(cfg: RunConfig) -> dict:
    d = to_dict(cfg)
    for key in ("name", "seed", "runs_dir", "device", "eval"):
        d.pop(key)
    for key in ("seed", "device"):
        d["train"].pop(key)
    return d


def second_seed(run: Run, cfg: RunConfig) -> Run:
    """cfg.eval.consistency.against, or the first sibling run (by name) of the same config and another seed."""
    if cfg.eval.consistency.against:
        other = Run.open(cfg.eval.consistency.against)
        if other.path.resolve() == run.path.resolve():
            raise ConfigError("eval.consistency.against names this run itself: name a run of another seed")
        return other
    want = _same_but_seed(cfg)
    for other in run.siblings():
        try:
            if other.config.seed != cfg.seed and _same_but_seed(other.config) == want:
                return other
        except DataError:  # a damaged neighbour is not this run's second seed
            continue
    raise ConfigError(
        f"consistency needs a second seed of {run.path}'s config and found none beside it: train one "
        f"(`saebench train {run.path}/config.yaml --set seed=1 --set name={run.name}-seed1`) "
        "or name one with --set eval.consistency.against=RUN"
    )


def consistency(inputs: EvalInputs) -> dict:
    """-> {"against", "seeds", "sae": {mcc, mean_best_cos}, "random": {...}, "matches", "settings"}; each latent's
    matches go to eval.consistency.safetensors (Consistency.tensors)."""
    other = second_seed(inputs.run, inputs.config)
    sae_b = other.load_sae(inputs.hook, inputs.sae.W_dec.device)
    pairs = {
        "sae": (inputs.sae, sae_b),
        "random": (inputs.baseline, random_baseline(inputs.sae, seed=SECOND_RANDOM_SEED)),
    }
    results = {
        name: decoder_consistency(a, b)
        for name, (a, b) in tqdm(pairs.items(), desc="consistency", disable=not inputs.show_progress)
    }
    path = inputs.run.write_eval_tensors(inputs.hook, "consistency", results["sae"].tensors())
    return {
        "against": str(other.path),
        "seeds": [inputs.config.seed, other.config.seed],
        "sae": results["sae"].figures(),
        "random": results["random"].figures(),
        "matches": path.name,
        "settings": dataclasses.asdict(inputs.config.eval.consistency),
    }
