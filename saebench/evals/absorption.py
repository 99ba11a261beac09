"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for absorption"), as SAEBench
0.6.0's absorption eval defines it, on the run's model and its vocabulary.

words    the vocabulary's tokens made of ASCII letters only after an optional leading space, both cases
         (SAEBench's get_alpha_tokens); a word's class is its first letter, lower-cased
prompts  "\\n" + n_icl lines "{example} has the first letter: {X}\\n" + "{word} has the first letter:", built
         from token ids so that the word is one token; the activation is read at the word (SAEBench reads the
         same position). The same prompts give the probe's data and the absorption figures (SAEBench draws
         new in-context examples for the second)
probe    a one-vs-rest logistic probe for the 26 letters on the activations of 1 - test_fraction of the words
         (SAEBench's train_multi_probe: BCE with pos_weight, Adam, lr 1e-2 decaying to 1e-5, weight decay 1e-4,
         batches of 64, 50 epochs; from zero weights, SAEBench's from nn.Linear's random init); its F1 on the
         held-out words decides which letters are evaluated (> min_probe_f1)
main latents  an L1 probe on the SAE's codes (the same trainer: l1 0.01, weight decay 1e-6, batches of 4096)
         ranks the latents per letter; for k = 1..max_k a logistic probe (sklearn's LogisticRegression with
         class_weight="balanced": L2 with C = 1, unpenalised intercept) on the top k; the main latents are
         the top k of the last k whose held-out F1 beat the best so far by more than f1_jump
absorption  per held-out word of the letter that the probe finds (score > 0), with d the unit probe direction,
         p = x . d and latent j's share z_j cos(W_dec[j], d):
         fraction = 0 if the main latents' share >= p, or if the largest 3 shares of other latents with
         cos >= 0.1 sum to less than 0.4 p; else 1 if the main share <= 0; else
         a / (a + main) with a = min(those shares, p - main)
         full absorption: no main latent fires, the latent of the largest share has cos >= 0.025, p >= 0,
         and its share is >= 0.4 p
         per letter: the sums over its words / its probe's true positives; the means over evaluated letters
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saebench.errors import ConfigError
from saebench.evals.inputs import EvalInputs
from saebench.evals.settings import AbsorptionSettings
from saebench.harvest import Harvester
from saebench.models import token_pieces
from saebench.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter:"
FULL_ABSORPTION_COS = 0.025  # SAEBench's FULL_ABSORPTION_PROBE_COS_THRESHOLD
FRACTION_COS = 0.1  # ABSORPTION_FRACTION_PROBE_COS_THRESHOLD
PROPORTION = 0.4  # ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD
MAX_ABSORBERS = 3  # ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS
EPS = 1e-8


class LetterData(NamedTuple):
    """Activations at the word of each prompt: x_train [n d], y_train [n] (letter index), x_test, y_test,
    and the held-out words' text."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    words_test: list[str]


class Probe(NamedTuple):
    W: torch.Tensor  # [classes d]
    b: torch.Tensor  # [classes]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + self.b


def letter_words(pieces: list[str]) -> tuple[list[int], list[str]]:
    """The token ids and texts of the vocabulary's letter words (SAEBench's get_alpha_tokens)."""
    ok = [(t, p) for t, p in enumerate(pieces) if p.removeprefix(" ").isascii() and p.removeprefix(" ").isalpha()]
    return [t for t, _ in ok], [p for _, p in ok]


@torch.no_grad()
def first_letter_data(model, hook: str, s: AbsorptionSettings, show_progress: bool = True) -> LetterData:
    """The prompts of every letter word through the model; a seeded split into train and held-out words."""
    tok = model.tokenizer
    ids, words = letter_words(token_pieces(model))
    if len(ids) < 2 * len(LETTERS):
        raise ConfigError(f"the absorption suite needs a vocabulary of words; this tokenizer has {len(ids)} of them")
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    suffix, newline = encode(TEMPLATE), encode("\n")
    answer = {c: encode(" " + c.upper()) for c in LETTERS}
    label = [LETTERS.index(w.strip()[0].lower()) for w in words]
    rng = random.Random(s.seed)
    order = rng.sample(range(len(ids)), len(ids))
    n_train = int(len(ids) * (1 - s.test_fraction))
    train, test = order[:n_train], order[n_train:]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    harvester = Harvester(model, [hook], exclude_special=False)

    def activations(split: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = []
        for i in split:  # in-context examples from the same split, as SAEBench's create_dataset_probe_training
            shots = [j for j in rng.sample(split, s.n_icl + 1) if j != i][: s.n_icl]
            lines = [[ids[j], *suffix, *answer[LETTERS[label[j]]], *newline] for j in shots]
            prompts.append(newline + sum(lines, []) + [ids[i], *suffix])
        longest = max(map(len, prompts))  # answers of several tokens: pad with newlines after BOS
        tokens = torch.tensor([bos + newline[-1:] * (longest - len(p)) + p for p in prompts])
        x = [
            harvester.forward(tokens[a : a + s.batch_size])[hook][:, -len(suffix) - 1].float().cpu()
            for a in tqdm(range(0, len(tokens), s.batch_size), desc="absorption prompts", disable=not show_progress)
        ]
        return torch.cat(x), torch.tensor([label[i] for i in split])

    return LetterData(*activations(train), *activations(test), [words[i] for i in test])


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    weight_decay: float,
    l1: float = 0.0,
    epochs: int = 50,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    seed: int = 0,
) -> Probe:
    """SAEBench's train_multi_probe: one-vs-rest logistic probes, x [n d], y [n] class index -> Probe [c d]."""
    target = F.one_hot(y, len(LETTERS)).float()
    pos_weight = (len(y) - target.sum(0)) / target.sum(0).clamp_min(1)
    W = torch.zeros(len(LETTERS), x.shape[1], requires_grad=True)
    b = torch.zeros(len(LETTERS), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(y), generator=gen).split(batch_size):
                opt.zero_grad()
                logits = x[idx] @ W.T + b
                loss = F.binary_cross_entropy_with_logits(logits, target[idx], pos_weight=pos_weight)
                (loss + l1 * W.abs().sum(-1).mean() if l1 else loss).backward()
                opt.step()
            sched.step()
    return Probe(W.detach(), b.detach())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, C: float = 1.0, iters: int = 100) -> Probe:
    """Independent L2 logistic regressions with balanced class weights (sklearn's LogisticRegression(
    class_weight="balanced"), solved exactly by damped Newton in float64). x [p n k], y [p n] bool -> Probe
    with W [p k], b [p]."""
    x = torch.cat([x.double(), torch.ones_like(x[..., :1], dtype=torch.float64)], -1)
    y = y.double()
    n, pos = y.shape[1], y.sum(1, keepdim=True)
    w = torch.where(y > 0, n / (2 * pos.clamp_min(1)), n / (2 * (n - pos).clamp_min(1)))
    reg = torch.ones(x.shape[-1], dtype=torch.float64) / C
    reg[-1] = 0

    def loss(theta):
        z = torch.einsum("pnk,pk->pn", x, theta)
        return (w * (F.softplus(z) - y * z)).sum(1) + 0.5 * (reg * theta**2).sum(1)

    theta = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float64)
    for _ in range(iters):
        prob = torch.sigmoid(torch.einsum("pnk,pk->pn", x, theta))
        grad = torch.einsum("pnk,pn->pk", x, w * (prob - y)) + reg * theta
        if float(grad.abs().max()) < 1e-9 * n:
            break
        hess = (x * (w * prob * (1 - prob))[..., None]).transpose(1, 2) @ x + torch.diag(reg + 1e-12)
        step = torch.linalg.solve(hess, grad)
        before, t = loss(theta), torch.ones(len(theta), 1, dtype=torch.float64)
        for _ in range(30):  # halve each problem's step until its loss does not rise
            worse = loss(theta - t * step) > before + 1e-12 * before.abs()
            if not worse.any():
                break
            t = torch.where(worse[:, None], t / 2, t)
        theta = theta - t * step
    return Probe(theta[:, :-1].float(), theta[:, -1].float())


def f1_scores(score: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """score [n c] (predicted where > 0), y [n] class index -> F1 per class [c] (sklearn's f1_score; 0 if undefined)."""
    pred, true = score > 0, F.one_hot(y, score.shape[1]).bool()
    tp = (pred & true).sum(0).float()
    return 2 * tp / (pred.sum(0) + true.sum(0)).clamp_min(1)


def main_latents(
    z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor, s: AbsorptionSettings
) -> tuple[list[list[int]], torch.Tensor]:
    """Each letter's main latents by k-sparse probing (SAEBench's train_k_sparse_probes and
    add_feature_splits_to_metrics_df). z: codes [n n_latents] -> (latents per letter, held-out F1 [max_k c])."""
    l1_probe = train_probe(z_train, y_train, batch_size=4096, weight_decay=1e-6, l1=0.01, seed=s.seed)
    ranked = l1_probe.W.topk(s.max_k, dim=-1).indices  # [c max_k]: positive weights first, as SAEBench
    f1 = torch.zeros(s.max_k, len(LETTERS))
    for k in range(1, s.max_k + 1):
        feats = ranked[:, :k]  # [c k]
        probe = fit_logistic(z_train[:, feats].permute(1, 0, 2), y_train[None] == torch.arange(len(LETTERS))[:, None])
        f1[k - 1] = f1_scores(torch.einsum("ncK,cK->nc", z_test[:, feats], probe.W) + probe.b, y_test)
    chosen = []
    for c in range(len(LETTERS)):
        best, k_best = -100.0, 0
        for k in range(1, s.max_k + 1):
            if float(f1[k - 1, c]) <= best + s.f1_jump:
                break
            best, k_best = float(f1[k - 1, c]), k
        chosen.append(ranked[c, :k_best].tolist())
    return chosen, f1


class WordAbsorption(NamedTuple):
    fraction: torch.Tensor  # [n] absorption fraction
    full: torch.Tensor  # [n] bool, full absorption
    absorber: torch.Tensor  # [n] the other latent of the largest share (-1 if none)


def word_absorption(x: torch.Tensor, z: torch.Tensor, W_dec: torch.Tensor, direction: torch.Tensor, main: list[int]):
    """SAEBench's FeatureAbsorptionCalculator.calculate_absorption on given activations x [n d] and codes
    z [n n_latents] for one letter: probe direction [d], its main latents. -> WordAbsorption."""
    d = direction / direction.norm()
    cos = F.cosine_similarity(d[None], W_dec, dim=-1)  # [n_latents]
    share = z * cos  # [n n_latents]
    p = x @ d
    is_main = torch.zeros(z.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_share = share[:, is_main].sum(1)
    others = torch.where(~is_main & (cos >= FRACTION_COS) & (share > 0), share, torch.zeros_like(share))
    absorbing = others.topk(min(MAX_ABSORBERS, z.shape[1]), dim=1).values.sum(1)
    a = torch.minimum(absorbing, p - main_share)
    fraction = torch.where(main_share <= 0, torch.ones_like(p), (a / (a + main_share)).clamp(0, 1))
    fraction = torch.where((main_share >= p) | (absorbing / p < PROPORTION), torch.zeros_like(p), fraction)
    top = share.argmax(1)
    top_share = share.gather(1, top[:, None]).squeeze(1)
    full = (z[:, is_main].abs() < EPS).all(1) & (cos[top] >= FULL_ABSORPTION_COS) & (p >= 0)
    full &= top_share / p >= PROPORTION
    best_other = others.max(1)
    absorber = torch.where(best_other.values > 0, best_other.indices, torch.full_like(top, -1))
    return WordAbsorption(fraction, full, absorber)


@torch.no_grad()
def absorption_rates(sae: SAE, data: LetterData, probe: Probe, letters: list[int], s: AbsorptionSettings) -> dict:
    """One SAE's absorption on the letters evaluated: the means and each letter's figures and absorbing latents."""
    encode = lambda x: torch.cat([sae.encode(b.to(sae.W_dec.device)).float().cpu() for b in x.split(4096)])  # noqa: E731
    z_train, z_test = encode(data.x_train), encode(data.x_test)
    main = main_latents(z_train, data.y_train, z_test, data.y_test, s)[0] if letters else []
    found = probe(data.x_test) > 0  # [n c]
    W_dec = sae.W_dec.detach().float().cpu()
    per_letter = {}
    for c in letters:
        rows = ((data.y_test == c) & found[:, c]).nonzero().squeeze(1)
        if not len(rows):
            continue
        r = word_absorption(data.x_test[rows], z_test[rows], W_dec, probe.W[c], main[c])
        absorbers: dict[int, list[float]] = {}
        for j, f in zip(r.absorber.tolist(), r.fraction.tolist(), strict=True):
            if j >= 0 and f > 0:
                absorbers.setdefault(j, []).append(f)
        cos = F.cosine_similarity(probe.W[c][None], W_dec, dim=-1)
        per_letter[LETTERS[c]] = {
            "absorption_fraction": float(r.fraction.mean()),
            "full_absorption_rate": float(r.full.float().mean()),
            "n_probe_true_positives": len(rows),
            "main_latents": main[c],
            "absorbing_latents": [
                {"latent": j, "words": len(fs), "mean_fraction": sum(fs) / len(fs), "probe_cos": float(cos[j])}
                for j, fs in sorted(absorbers.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:10]
            ],
        }

    def mean(key: str):
        values = [len(v[key]) if key == "main_latents" else v[key] for v in per_letter.values()]
        return sum(values) / len(values) if len(values) >= s.min_letters else None

    return {
        "mean_absorption_fraction": mean("absorption_fraction"),
        "mean_full_absorption_rate": mean("full_absorption_rate"),
        "mean_num_split_features": mean("main_latents"),
        "letters": per_letter,
    }


def absorption(
    model,
    sae: SAE,
    hook: str,
    settings: AbsorptionSettings | None = None,
    baseline: SAE | None = None,
    show_progress: bool = True,
) -> dict:
    """The absorption suite's section for one SAE (and its random baseline): SAEBench 0.6.0's first-letter
    absorption on `model`'s vocabulary at `hook`.

    sb.absorption(model, sae, "blocks.1.hook_resid_post")["sae"]["mean_absorption_fraction"]"""
    s = settings or AbsorptionSettings()
    if not 0 < s.test_fraction < 1 or s.max_k < 1 or s.n_icl < 0:
        raise ConfigError("eval.absorption: test_fraction must lie in (0, 1), max_k >= 1 and n_icl >= 0")
    data = first_letter_data(model, hook, s, show_progress)
    probe = train_probe(data.x_train, data.y_train, batch_size=64, weight_decay=1e-4, seed=s.seed)
    f1 = f1_scores(probe(data.x_test), data.y_test)
    letters = [c for c in range(len(LETTERS)) if f1[c] > s.min_probe_f1]
    note = None
    if len(letters) < s.min_letters:
        note = (
            f"the first-letter probe reaches F1 > {s.min_probe_f1} on {len(letters)} of 26 letters at {hook} "
            f"(at least {s.min_letters} needed): the model does not represent first letters linearly there"
        )
    saes = {"sae": sae} if baseline is None else {"sae": sae, "random": baseline}
    return {
        **{name: absorption_rates(m, data, probe, letters, s) for name, m in saes.items()},
        "probe": {
            "f1": {LETTERS[c]: round(float(f1[c]), 4) for c in range(len(LETTERS))},
            "letters": [LETTERS[c] for c in letters],
            "n_train_words": len(data.y_train),
            "n_test_words": len(data.y_test),
        },
        "note": note,
        "settings": dataclasses.asdict(s),
        "convention": "SAEBench 0.6.0 absorption (first letter); fractions and rates per letter over the held-out "
        "words its probe finds, means over letters with probe F1 > min_probe_f1",
    }


def absorption_suite(inputs: EvalInputs) -> dict:
    return absorption(
        inputs.model, inputs.sae, inputs.hook, inputs.config.eval.absorption, inputs.baseline, inputs.show_progress
    )
