"""Targeted probe perturbation (SAEBench's TPP, scr_and_tpp with perform_scr=False).

On the probing suite's document-source task: a dense probe per class (one-vs-rest, balanced, the probing
suite's probe on mean-pooled raw activations). For class c, each latent's effect is its mean pooled code
on c minus on the rest (train split; clamped at 0 for an unsigned family, as SAEBench does; a signed
family's latent counts in the orientation where the difference is positive, so no clamp) times the probe's
weight along its decoder row; the n latents of largest nonzero effect are zero-ablated with the SAE error
kept, x' = x - z_S W_dec[S] at every position, and every class's probe is scored on its test set of
mean-pooled x'. TPP(c) = (c's accuracy drop) - (the mean drop of the other classes' probes); the figure is
its mean over classes, per n. Positions are pooled over non-special tokens only (SAEBench's ablation also
adds the masked positions' ablated codes); SAEBench trains its probes with Adam and an L1 penalty.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from saebench.errors import ConfigError
from saebench.evals.inputs import EvalInputs
from saebench.evals.probing import check, fit_probe
from saebench.evals.settings import ProbingSettings, TPPSettings
from saebench.evals.tasks import ProbeTask, class_splits, masked_activations, pooled, probing_tasks
from saebench.evaluate import random_baseline
from saebench.sae import SAE


def tpp_differences(clean: list[float], ablated: list[float], c: int) -> dict[str, float]:
    """SAEBench's create_tpp_plotting_dict for one ablated class c: clean [classes] and ablated [classes] are
    each class's probe accuracy before and after ablating c's latents."""
    drops = [a - b for a, b in zip(clean, ablated, strict=True)]
    unintended = sum(d for j, d in enumerate(drops) if j != c) / (len(drops) - 1)
    return {"total": drops[c] - unintended, "intended": drops[c], "unintended": unintended}


def top_effects(effects: torch.Tensor, n: int) -> torch.Tensor:
    """SAEBench's select_top_n_features: the largest min(n, number of nonzero) effects [f] -> indices."""
    return effects.topk(min(n, int((effects != 0).sum()))).indices


def latent_effects(
    z: torch.Tensor, y: torch.Tensor, W_dec: torch.Tensor, w: torch.Tensor, signed: bool
) -> torch.Tensor:
    """SAEBench's get_effects_per_class_precomputed_acts: (mean code on y = 1 - on y = 0, clamped at 0 unless
    signed) times the probe weight w [d] along each decoder row. z [n f] pooled codes, W_dec [f d] -> [f]."""
    diff = z[y > 0].mean(0) - z[y == 0].mean(0)
    return (diff if signed else diff.clamp(min=0)) * (W_dec.double() @ w.double()).float()


KEYS = ("total", "intended", "unintended")
CONVENTION = (
    "SAEBench TPP: per class, zero-ablate the n latents of largest effect (class mean code difference, clamped "
    "at 0 for unsigned families, times the dense probe's weight along the decoder row), keeping the SAE error; "
    "total = the class probe's accuracy drop - the mean drop of the other classes' probes, mean over classes; "
    "pooling over non-special tokens only; probes: the probing suite's dense L2 probes (SAEBench: Adam with L1)"
)


def tpp_scores(
    task: ProbeTask, x: torch.Tensor, saes: dict[str, SAE], n_ablated: list[int], settings, show_progress=True
) -> dict:
    """TPP of each SAE on a task, from x [m d] the activations of its masked positions; settings: the probing
    suite's (C, seed). -> {name: {"total" | "intended" | "unintended": {"<n>": mean over classes}},
    "classes": {class: {"clean": accuracy, name: the same figures for that class}}}."""
    dense = pooled(x, task)
    splits = class_splits(task, settings.seed)
    probes = [fit_probe(dense[tr], y_tr, settings.C) for (tr, y_tr), _ in splits]

    def accuracies(acts: torch.Tensor) -> list[float]:
        return [p.accuracy(acts[te], y_te) for p, (_, (te, y_te)) in zip(probes, splits, strict=True)]

    clean = accuracies(dense)
    classes: dict = {cls: {"clean": clean[c]} for c, cls in enumerate(task.classes)}
    bar = tqdm(total=len(saes) * len(splits), desc="tpp", disable=not show_progress)
    for name, sae in saes.items():
        z = pooled(x, task, sae)
        W_dec = sae.W_dec.detach().float().cpu()
        for c, ((tr, y_tr), _) in enumerate(splits):
            effects = latent_effects(z[tr], y_tr, W_dec, probes[c].w, sae.cfg.family.signed)
            drops = {}
            for n in n_ablated:
                keep = top_effects(effects, n)
                drops[str(n)] = tpp_differences(clean, accuracies(dense - z[:, keep] @ W_dec[keep]), c)
            classes[task.classes[c]][name] = {key: {n: d[key] for n, d in drops.items()} for key in KEYS}
            bar.update()
    bar.close()
    means = {
        name: {
            key: {str(n): sum(e[name][key][str(n)] for e in classes.values()) / len(classes) for n in n_ablated}
            for key in KEYS
        }
        for name in saes
    }
    return {**means, "classes": classes}


def tpp(
    model,
    sae: SAE,
    hook: str,
    task: ProbeTask | None = None,
    settings: TPPSettings | None = None,
    probing: ProbingSettings | None = None,
    baseline: SAE | None = None,
    show_progress: bool = True,
) -> dict:
    """The TPP section for one SAE at `hook` of `model`, next to a random SAE (`baseline`, by default
    evaluate.random_baseline at the task's scale): {"sae": {"total": {"<n>": ...}, "intended": ..., "unintended":
    ...}, "random": ..., "classes": ..., "settings": ...}. task: default the probing suite's source task
    (data and probes by `probing` settings)."""
    settings, probing = settings or TPPSettings(), probing or ProbingSettings()
    check(probing)
    if not settings.n_ablated or min(settings.n_ablated) < 1:
        raise ConfigError(f"eval.tpp.n_ablated must be a list of latent counts >= 1, got {settings.n_ablated}")
    if task is None:
        (task,) = probing_tasks(model.tokenizer, "test", dataclasses.replace(probing, tasks=["source"]))
    (x,) = masked_activations(model, hook, [task], show_progress=show_progress)
    saes = {"sae": sae, "random": baseline if baseline is not None else random_baseline(sae, x)}
    section = tpp_scores(task, x, saes, settings.n_ablated, probing, show_progress)
    settings_used = {**dataclasses.asdict(settings), "task": task.name, "probing": dataclasses.asdict(probing)}
    return {**section, "settings": {**settings_used, "convention": CONVENTION}}


def tpp_suite(inputs: EvalInputs) -> dict:
    """The tpp suite: tpp on the bundled corpus' document-source task, next to the run's random baseline."""
    config = inputs.config.eval
    return tpp(
        inputs.model, inputs.sae, inputs.hook, None, config.tpp, config.probing, inputs.baseline, inputs.show_progress
    )
