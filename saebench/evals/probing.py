"""Sparse probing (Gurnee et al. 2023, "Finding neurons in a haystack"; SAEBench's sparse_probing).

Per task and class, one-vs-rest on balanced samples (evals.tasks.balanced): the k latents with the largest
|class mean difference| of the mean-pooled codes on the train split, an L2 logistic probe on them, its test
accuracy; beside it the same probe on all raw activations ("dense") and the random SAE's sparse probes.
The probe is sklearn's LogisticRegression(C) as SAEBench fits it (C * sum log-loss + |w|^2 / 2, bias not
penalised), solved here by Newton's method in float64. SAEBench fits its dense probe with Adam and keeps
the epoch of best test accuracy; here it is the same L2 probe as the sparse ones.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saebench.errors import ConfigError
from saebench.evals.inputs import EvalInputs
from saebench.evals.settings import ProbingSettings
from saebench.evals.tasks import ProbeTask, class_splits, masked_activations, pooled, probing_tasks
from saebench.evaluate import random_baseline
from saebench.sae import SAE

CONVENTION = (
    "SAEBench sparse_probing: one-vs-rest per class on balanced samples, each a context mean-pooled over its "
    "non-special tokens (token tasks: one token); top-k latents by |class mean difference| on the train split; "
    "L2 logistic probe (sklearn LogisticRegression objective); figures: test accuracy, the mean over classes "
    "(dense: the same probe on all raw activations, not SAEBench's Adam probe)"
)


class Probe(NamedTuple):
    w: torch.Tensor  # [d] float64
    b: float

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """x [n d], y [n] in {0, 1}: the fraction with (x w + b > 0) == y."""
        return ((x.double() @ self.w + self.b > 0) == (y > 0)).double().mean().item()


def fit_probe(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, tol: float = 1e-9, max_iter: int = 100) -> Probe:
    """L2 logistic regression: minimises C * sum log(1 + exp(-s (x w + b))) + |w|^2 / 2 over samples x [n d] with
    labels y [n] in {0, 1} (s = 2y - 1), as sklearn's LogisticRegression(C=C); Newton steps with backtracking."""
    X = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    t = y.double()
    reg = torch.full((X.shape[1],), 1 / C, dtype=torch.float64)
    reg[-1] = 0.0

    def loss(th: torch.Tensor) -> float:
        z = X @ th
        return float((F.softplus(z) - t * z).sum() + 0.5 * (reg * th * th).sum())

    theta = torch.zeros(X.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (p - t) + reg * theta
        if grad.abs().max() < tol:
            break
        hess = X.T @ (X * (p * (1 - p))[:, None]) + torch.diag(reg + 1e-12)
        step, now, rate = torch.linalg.solve(hess, grad), loss(theta), 1.0
        while loss(theta - rate * step) > now - 1e-4 * rate * float(grad @ step) and rate > 1e-10:
            rate /= 2
        theta = theta - rate * step
    return Probe(theta[:-1], float(theta[-1]))


def top_k_by_mean_difference(z: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """SAEBench's get_top_k_mean_diff_mask: the k columns of z [n f] with the largest |mean over y = 1 - mean
    over y = 0| -> indices [k], largest first (ties by index)."""
    diff = (z[y > 0].mean(0) - z[y == 0].mean(0)).abs()
    return diff.argsort(descending=True, stable=True)[:k]


def probe_scores(
    task: ProbeTask, x: torch.Tensor, saes: dict[str, SAE], settings: ProbingSettings, show_progress: bool = True
) -> dict:
    """One task's figures from x [m d], the activations of its masked positions (tasks.masked_activations):
    {"dense": acc, name: {"<k>": acc} for each SAE, "classes": {class: the same and n_train, n_test}}, the
    top-level figures being the mean over classes."""
    dense = pooled(x, task)
    codes = {name: pooled(x, task, sae) for name, sae in saes.items()}
    classes = {}
    splits = class_splits(task, settings.seed)
    for cls, ((tr, y_tr), (te, y_te)) in zip(tqdm(task.classes, disable=not show_progress), splits, strict=True):
        out: dict = {"dense": fit_probe(dense[tr], y_tr, settings.C).accuracy(dense[te], y_te)}
        for name, z in codes.items():
            out[name] = {}
            for k in settings.ks:
                keep = top_k_by_mean_difference(z[tr], y_tr, k)
                out[name][str(k)] = fit_probe(z[tr][:, keep], y_tr, settings.C).accuracy(z[te][:, keep], y_te)
        classes[cls] = {**out, "n_train": len(tr) // 2, "n_test": len(te) // 2}
    return {**mean_of(list(classes.values()), list(saes)), "classes": classes}


def mean_of(entries: list[dict], names: list[str]) -> dict:
    """The mean of entries' "dense" and of each name's "<k>" figures."""
    out: dict = {"dense": sum(e["dense"] for e in entries) / len(entries)}
    for name in names:
        out[name] = {k: sum(e[name][k] for e in entries) / len(entries) for k in entries[0][name]}
    return out


def check(settings: ProbingSettings) -> None:
    if not settings.ks or min(settings.ks) < 1 or settings.n_train < 2 or settings.n_test < 1 or settings.C <= 0:
        raise ConfigError(
            "eval.probing: ks must be a list of latent counts >= 1, n_train >= 2, n_test >= 1 and C > 0; "
            f"got ks={settings.ks}, n_train={settings.n_train}, n_test={settings.n_test}, C={settings.C}"
        )


def sparse_probing(
    model,
    sae: SAE,
    hook: str,
    tasks: list[ProbeTask] | None = None,
    settings: ProbingSettings | None = None,
    baseline: SAE | None = None,
    show_progress: bool = True,
) -> dict:
    """The probing section for one SAE at `hook` of `model`: per task (default: probing_tasks of the bundled
    corpus' held-out split) the dense probe's accuracy and the SAE's and the random SAE's k-sparse probes'
    ({"dense": acc, "sae": {"1": acc, ...}, "random": {...}}, per class under "classes"); "mean" over tasks;
    "settings". `baseline` defaults to evaluate.random_baseline(sae) at the scale of the first task's activations."""
    settings = settings or ProbingSettings()
    check(settings)
    tasks = tasks if tasks is not None else probing_tasks(model.tokenizer, "test", settings)
    xs = masked_activations(model, hook, tasks, show_progress=show_progress)
    saes = {"sae": sae, "random": baseline if baseline is not None else random_baseline(sae, xs[0])}
    section = {
        task.name: probe_scores(task, x, saes, settings, show_progress) for task, x in zip(tasks, xs, strict=True)
    }
    section["mean"] = mean_of([section[t.name] for t in tasks], ["sae", "random"])
    return {**section, "settings": {**dataclasses.asdict(settings), "convention": CONVENTION}}


def probing(inputs: EvalInputs) -> dict:
    """The probing suite: sparse_probing on the bundled corpus' test split, next to the run's random baseline."""
    return sparse_probing(
        inputs.model, inputs.sae, inputs.hook, None, inputs.config.eval.probing, inputs.baseline, inputs.show_progress
    )
