"""Interpretability without a hub: each sampled feature's explanation, from its examples in the feature store,
scored by detection and fuzzing (Bills et al. 2023; EleutherAI delphi; SAEBench's autointerp).

examples   per feature, from the store: windows of `window` tokens either side of an example's token; a token
           is active where |z| > active_fraction x the feature's max. A seeded draw splits the top examples and
           the examples across the activation range (the store's intervals) into the ones the explainer reads
           and held-out ones (not within a window of a read one); non-activating windows come from held-out
           contexts where the feature stays at or below that threshold
detection  held-out windows and as many non-activating ones, shuffled: which does the feature fire on?
fuzzing    each held-out activating window twice, its active tokens marked, or as many inactive ones at random:
           which marks are right?
           Both scores are balanced accuracies (the mean of the hit rates on the two classes: 0.5 is chance,
           1.0 perfect), delphi's convention; SAEBench reports plain accuracy over 4 active and 10 random windows.
The random SAE's examples come from an analysis pass of its own over the same held-out tokens.
Scores depend on the explainer: the offline one gives a floor, an LLM the usual figures.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saebench.analysis import AnalysisConfig, accumulate, whole_contexts
from saebench.data import TokenContexts
from saebench.errors import ConfigError, DataError
from saebench.evals.explainers import BadAnswer, ChatExplainer, Excerpt, Explainer, OfflineExplainer
from saebench.evals.inputs import EvalInputs
from saebench.evals.settings import InterpSettings
from saebench.harvest import Harvester
from saebench.models import token_pieces
from saebench.sae import SAE
from saebench.store import FeatureStore, write_store


@dataclass
class Window:
    pieces: list[str]
    acts: list[float]  # the feature's |z| at each token
    where: tuple[int, int] = (-1, -1)  # (context, token) of the example it is cut around

    def active(self, threshold: float) -> list[bool]:
        return [a > threshold for a in self.acts]


@dataclass
class FeatureExamples:
    feature: int
    threshold: float  # |z| above it is active
    explain: list[Window]  # what the explainer reads, strongest first
    held_out: list[Window]  # examples kept for scoring
    random: list[Window]  # windows where the feature stays at or below threshold


@dataclass
class Background:
    """Windows of held-out contexts: tokens [w L] and each SAE latent's peak |z| in each window [w n]."""

    tokens: torch.Tensor
    peak: torch.Tensor


def make_explainer(s: InterpSettings) -> Explainer:
    if s.explainer:
        return ChatExplainer(s.explainer, s.explainer_model, s.timeout, s.seed)
    return OfflineExplainer(s.n_terms)


def check_settings(s: InterpSettings) -> None:
    if min(s.n_features, s.window, s.explain_top + s.explain_quantile, s.n_random, s.random_contexts, s.workers) < 1:
        raise ConfigError(
            "eval.interp: n_features, window, explain_top + explain_quantile, n_random, random_contexts "
            "and workers must be at least 1"
        )


@torch.no_grad()
def background(model, saes: list[SAE], hook: str, contexts: TokenContexts, s: InterpSettings) -> list[Background]:
    """Cut `random_contexts` seeded-random held-out contexts into windows of 2 window + 1 tokens (BOS left
    out) and find each latent's peak |z| in each, for every SAE: one model pass."""
    L, gen = 2 * s.window + 1, torch.Generator().manual_seed(s.seed)
    pick = torch.randperm(len(contexts), generator=gen)[: s.random_contexts]
    tokens, special = contexts.tokens[pick], contexts.special_mask[pick]
    start = int(bool(special[:, 0].all()))
    n_win = (tokens.shape[1] - start) // L
    harvester = Harvester(model, [hook], exclude_special=False)
    peaks: list[list[torch.Tensor]] = [[] for _ in saes]
    for a in range(0, len(tokens), 16):
        x = harvester.forward(tokens[a : a + 16])[hook][:, start : start + n_win * L]
        for sae, out in zip(saes, peaks, strict=True):
            z = sae.encode(x.to(sae.W_dec.dtype)).abs()
            out.append(z.reshape(len(x), n_win, L, -1).amax(2).flatten(0, 1).float().cpu())
    windows = tokens[:, start : start + n_win * L].reshape(-1, L)
    return [Background(windows, torch.cat(p)) for p in peaks]


def _window(ex, w: int, first: int) -> Window:
    lo, hi = max(first, ex.position - w), min(len(ex.tokens), ex.position + w + 1)
    return Window(ex.pieces[lo:hi], [abs(a) for a in ex.acts[lo:hi]], (ex.context, ex.position))


def feature_examples(store: FeatureStore, feature: int, s: InterpSettings, bg: Background | None = None):
    """One feature's windows to explain and to score (its non-activating windows from `bg`). The draw is
    seeded by (seed, feature), so separate calls split alike."""
    card = store.feature(feature)
    rng = random.Random(s.seed * 1_000_003 + feature)
    first = int(store.meta.get("data", {}).get("prepend_bos", True))
    top = [_window(e, s.window, first) for e in card.top_examples]
    spread = [_window(e, s.window, first) for iv in card.quantile_examples for e in iv.examples]
    rng.shuffle(top)
    rng.shuffle(spread)
    explain = top[: s.explain_top] + spread[: s.explain_quantile]
    seen = [w.where for w in explain]

    def apart(w: Window) -> bool:
        return all(c != w.where[0] or abs(p - w.where[1]) > s.window for c, p in seen)

    held = [w for w in top[s.explain_top :] if apart(w)][: s.score_top]
    held += [w for w in spread[s.explain_quantile :] if apart(w)][: s.score_quantile]
    threshold = s.active_fraction * card.max_activation
    quiet = []
    if bg is not None:
        rows = (bg.peak[:, feature] <= threshold).nonzero().squeeze(1).tolist()
        quiet = [
            Window(store.pieces(bg.tokens[r].tolist()), [0.0] * bg.tokens.shape[1])
            for r in rng.sample(rows, min(s.n_random, len(rows)))
        ]
    explain.sort(key=lambda w: -max(w.acts, default=0))
    return FeatureExamples(feature, threshold, explain, held, quiet)


def balanced_accuracy(predicted: list[bool], truth: list[bool]) -> float:
    """The mean over the classes present of the share predicted right (0.5 for a constant or random guess)."""
    rates = [
        sum(p == t for p, t in zip(predicted, truth, strict=True) if t == cls) / truth.count(cls)
        for cls in (True, False)
        if cls in truth
    ]
    return sum(rates) / len(rates)


def score(fx: FeatureExamples, explanation: str, explainer: Explainer, seed: int = 0) -> dict:
    """Detection and fuzzing of one explanation on the feature's held-out and non-activating windows."""
    rng = random.Random(seed * 1_000_003 + fx.feature)
    shown = fx.held_out + fx.random
    rng.shuffle(shown)
    truth = [any(w.active(fx.threshold)) for w in shown]
    detected = explainer.detect(explanation, [(w.pieces, [False] * len(w.pieces)) for w in shown]) if shown else []
    fuzzed: list[tuple[Excerpt, bool]] = []
    for w in fx.held_out:
        right = w.active(fx.threshold)
        off = [i for i, a in enumerate(right) if not a]
        if any(right) and off:
            wrong = set(rng.sample(off, min(sum(right), len(off))))
            fuzzed += [((w.pieces, right), True), ((w.pieces, [i in wrong for i in range(len(right))]), False)]
    rng.shuffle(fuzzed)
    marked = explainer.fuzz(explanation, [e for e, _ in fuzzed]) if fuzzed else []
    return {
        "detection": balanced_accuracy(detected, truth) if shown else None,
        "fuzzing": balanced_accuracy(marked, [t for _, t in fuzzed]) if fuzzed else None,
    }


def live_features(store: FeatureStore, s: InterpSettings) -> list[int]:
    """A seeded sample of n_features of the features that fired at least min_fires times, ascending."""
    table = store.table()
    live = table.feature[table.n_fires >= s.min_fires].tolist()
    return sorted(random.Random(s.seed).sample(live, min(s.n_features, len(live))))


def explain_features(
    store: FeatureStore, features: list[int], explainer: Explainer | None = None, settings: InterpSettings | None = None
) -> dict[int, str]:
    """feature -> its explanation, from the examples the explainer reads (offline unless `explainer`).

    sb.explain_features(sb.FeatureStore("runs/tiny"), [3, 17])"""
    s = settings or InterpSettings()
    explainer = explainer or make_explainer(s)
    out = {}
    for f in features:
        fx = feature_examples(store, f, s)
        out[f] = explainer.explain([(w.pieces, w.active(fx.threshold)) for w in fx.explain])
    return out


def score_explanations(
    model,
    sae: SAE,
    hook: str,
    store: FeatureStore,
    contexts: TokenContexts,
    explanations: dict[int, str],
    explainer: Explainer | None = None,
    settings: InterpSettings | None = None,
) -> dict[int, dict]:
    """feature -> {"detection", "fuzzing"} of the given explanations on its held-out examples and on
    non-activating windows of `contexts` (held-out text; the model and SAE find where the feature is quiet).

    sb.score_explanations(model, sae, hook, store, contexts, {3: '" the"'})"""
    s = settings or InterpSettings()
    explainer = explainer or make_explainer(s)
    (bg,) = background(model, [sae], hook, contexts, s)
    return {f: score(feature_examples(store, f, s, bg), e, explainer, s.seed) for f, e in explanations.items()}


def interpret(
    store: FeatureStore, bg: Background, s: InterpSettings, explainer: Explainer, show_progress: bool = True
) -> tuple[dict, dict[int, dict]]:
    """Explain and score a sample of the store's live features -> (summary, feature -> record)."""
    features = live_features(store, s)

    def one(f: int) -> dict:
        fx = feature_examples(store, f, s, bg)
        try:
            text = explainer.explain([(w.pieces, w.active(fx.threshold)) for w in fx.explain])
            return {"explanation": text, **score(fx, text, explainer, s.seed)}
        except BadAnswer as e:
            return {"explanation": "", "detection": None, "fuzzing": None, "error": str(e)}

    with ThreadPoolExecutor(s.workers) as pool:
        done = pool.map(one, features)
        bar = tqdm(done, total=len(features), desc="interp", disable=not show_progress)
        records = dict(zip(features, bar, strict=True))

    def mean(key: str):
        values = [r[key] for r in records.values() if r[key] is not None]
        return sum(values) / len(values) if values else None

    summary = {
        "detection": mean("detection"),
        "fuzzing": mean("fuzzing"),
        "n_features": len(features),
        "n_errors": sum("error" in r for r in records.values()),
    }
    return summary, records


def random_store(
    model, sae: SAE, hook: str, contexts: TokenContexts, n_tokens: int, like: dict, folder: Path, show_progress=True
) -> FeatureStore:
    """An analysis pass of `sae` (e.g. the random baseline) over the first n_tokens of `contexts`, with the
    example settings of the store whose meta is `like`, written to folder/random.sqlite."""
    cfg = AnalysisConfig(
        n_tokens=n_tokens,
        **{k: like[k] for k in ("n_examples", "n_intervals", "per_interval", "n_samples", "seed")},
        coact_tokens=1024,
        checkpoint_tokens=1 << 62,
    )
    n_ctx, n_tokens = whole_contexts(contexts, n_tokens)
    harvester = Harvester(model, [hook])
    accs, _, _ = accumulate(
        harvester,
        {hook: (sae, hook)},
        contexts,
        n_ctx,
        n_tokens,
        cfg,
        folder / "state",
        "",
        show_progress=show_progress,
    )
    meta = {
        **{k: like[k] for k in ("n_intervals", "per_interval", "data")},
        "hook": hook,
        "signed": sae.cfg.family.signed,
    }
    path = write_store(
        folder / "random.sqlite", accs[hook].finish(n_tokens), contexts.tokens[:n_ctx], token_pieces(model), meta
    )
    return FeatureStore(path)


def interpretability(
    model,
    sae: SAE,
    hook: str,
    store: FeatureStore,
    contexts: TokenContexts,
    settings: InterpSettings | None = None,
    baseline: SAE | None = None,
    show_progress: bool = True,
) -> dict:
    """The interp suite's section: a sample of the store's live features (the store of `sae`) explained and
    scored, and the baseline's (e.g. the random SAE's) alike from an analysis pass of its own over `contexts`.
    A store opened writable keeps each sampled feature's explanation and scores.

    sb.interpretability(model, sae, hook, sb.FeatureStore("runs/tiny", writable=True), contexts)["sae"]"""
    s = settings or InterpSettings()
    check_settings(s)
    explainer = make_explainer(s)
    backgrounds = background(model, [sae] if baseline is None else [sae, baseline], hook, contexts, s)
    out, records = interpret(store, backgrounds[0], s, explainer, show_progress)
    if store.writable:
        store.set_explanations(explainer.name, records)
    section = {"sae": out}
    if baseline is not None:
        with tempfile.TemporaryDirectory() as tmp:
            n_tokens = s.random_tokens or store.meta["n_tokens"]
            args = (model, baseline, hook, contexts, n_tokens, store.meta, Path(tmp), show_progress)
            with random_store(*args) as rstore:
                section["random"] = interpret(rstore, backgrounds[1], s, explainer, show_progress)[0]
    return {
        **section,
        "explainer": explainer.name,
        "settings": dataclasses.asdict(s),
        "convention": "detection and fuzzing as balanced accuracy (0.5 chance) per feature, mean over the sampled "
        "live features; scores differ by explainer",
    }


def interp_suite(inputs: EvalInputs) -> dict:
    if not inputs.home.store_path.exists():
        raise DataError(f"the interp suite reads the feature store: run `saebench analyze {inputs.run.path}` first")
    with FeatureStore(inputs.home.store_path, writable=True) as store:
        s = inputs.config.eval.interp
        return interpretability(
            inputs.model, inputs.sae, inputs.hook, store, inputs.contexts, s, inputs.baseline, inputs.show_progress
        )
