"""Comparing SAEs: one table of their settings and eval figures, Pareto fronts, and their features matched.

    table = sb.compare(["runs/sweep"])                  # one row per SAE (a sweep's cells each)
    m = sb.match_features(sae_a, sae_b, acts, top=3)    # each latent of A: its best latents of B, with scores
    tree = sb.splitting_tree([narrow, wide, wider], root=12, acts=acts)

Figures are eval.json flattened: "sae.fvu", "random_baseline.l0", "probing.sae.1", ..., whatever suites
wrote. The sections holding one figure set per k' or per Matryoshka prefix (CURVES) are curves, read by
`compare_curves`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from saebench.config import RunConfig
from saebench.data import load_contexts
from saebench.errors import DataError
from saebench.harvest import Harvester
from saebench.pipeline import whole_contexts
from saebench.readers import read_json
from saebench.runs import Run
from saebench.sae import SAE, SAEConfig
from saebench.train import TrainConfig

CURVES = ("by_k", "prefixes")  # eval.json sections: {"<k' or prefix size>": {"sae": {...}, "random_baseline": {...}}}
SETTINGS = [f.name for f in dataclasses.fields(SAEConfig) if f.name not in ("hook", "model")]
LOWER_IS_BETTER = ("fvu", "dead", "dense", "ce_sae", "kl_sae", "loss", "absorption")  # figure names, by prefix


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested mapping, keyed by their dotted path."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = value
    return out


def _runs(runs: Sequence[str | Path | Run]) -> list[Run]:
    return [r if isinstance(r, Run) else Run.open(r) for r in runs]


def compare(runs: Sequence[str | Path | Run]) -> pd.DataFrame:
    """One row per SAE of the runs: where it is (run, sae: its name in the run, path, model, hook), its settings
    (SETTINGS from its cfg.json, expansion = n_latents / d_in, the lr it trained at) and every eval figure
    (eval.json flattened, CURVES aside; none for an SAE not evaluated)."""
    rows = []
    for run in _runs(runs):
        for name, home in run.trained_homes().items():
            meta = read_json(home.sae_dir / "cfg.json", "retrain the SAE or copy the folder again")
            settings = {k: meta.get(k) for k in SETTINGS}
            settings["expansion"] = meta["n_latents"] / meta["d_in"]
            settings["matryoshka"] = ",".join(map(str, meta.get("matryoshka") or [])) or None
            train = {k: v for k, v in (meta.get("train") or {}).items() if k in ("lr",)}
            settings["lr"] = TrainConfig(**train).resolved_lr(meta["n_latents"])
            figures = {k: v for k, v in (run.eval(name) or {}).items() if k not in CURVES}
            where = {"run": str(run.path), "sae": name, "path": str(home.path), "model": meta.get("model")}
            rows.append({**where, "hook": home.hook, **settings, **flatten(figures)})
    return pd.DataFrame(rows)


def compare_curves(runs: Sequence[str | Path | Run]) -> pd.DataFrame:
    """One row per point of an SAE's curve (CURVES: eval.json's figures at each k' of a hierarchical SAE, at each
    prefix of a Matryoshka SAE): run, sae, curve, point (k' or prefix size), and the figures as `compare` names them."""
    rows = []
    for run in _runs(runs):
        for name in run.trained_homes():
            result = run.eval(name) or {}
            for curve in CURVES:
                for at, figures in (result.get(curve) or {}).items():
                    rows.append(
                        {"run": str(run.path), "sae": name, "curve": curve, "point": int(at), **flatten(figures)}
                    )
    return pd.DataFrame(rows, columns=None if rows else ["run", "sae", "curve", "point"])


def lower_is_better(column: str) -> bool:
    return column.rsplit(".", 1)[-1].startswith(LOWER_IS_BETTER)


def pareto_front(table: pd.DataFrame, x: str, y: str, lower_y: bool | None = None) -> list:
    """The index labels of the rows no other row beats: lower or equal x (L0: sparser) and better or equal y
    (lower when lower_y, by default lower_is_better(y)), one of them strictly; sorted by x. Rows with a NaN
    in x or y are left out."""
    lower_y = lower_is_better(y) if lower_y is None else lower_y
    points = table[[x, y]].dropna()
    sign = 1 if lower_y else -1
    front = [
        i
        for i, (xi, yi) in points.iterrows()
        if not any(
            xj <= xi and sign * yj <= sign * yi and (xj < xi or sign * yj < sign * yi) for xj, yj in points.values
        )
    ]
    return sorted(front, key=lambda i: points.loc[i, x])


@dataclass
class Matches:
    """For each latent of A (`latents`), its `top` best latents of B, best first, with their scores: by
    decoder cosine, and by the correlation of their codes over a token sample (None without one)."""

    latents: torch.Tensor  # [m] latents of A
    decoder: torch.Tensor  # [m top] latents of B
    decoder_cos: torch.Tensor  # [m top]
    activation: torch.Tensor | None = None  # [m top] latents of B
    activation_corr: torch.Tensor | None = None  # [m top] Pearson correlation

    def best(self, by: str = "decoder") -> tuple[torch.Tensor, torch.Tensor]:
        """(latent of B [m], score [m]) of each latent's best match by decoder cosine or by activation."""
        latent, score = (self.decoder, self.decoder_cos) if by == "decoder" else (self.activation, self.activation_corr)
        if latent is None or score is None:
            raise DataError("matching by activation needs a token sample: pass acts=")
        return latent[:, 0], score[:, 0]


def check_comparable(sae_a: SAE, sae_b: SAE) -> None:
    """DataError unless both SAEs read the same activations (one model, one hook, one width)."""
    for key in ("model", "hook", "d_in"):
        a, b = getattr(sae_a.cfg, key), getattr(sae_b.cfg, key)
        if a and b and a != b:
            raise DataError(f"one SAE is on {key} {a} and the other on {b}: compare SAEs of one model and hook")


@torch.no_grad()
def match_features(
    sae_a: SAE,
    sae_b: SAE,
    acts: torch.Tensor | None = None,
    top: int = 1,
    latents: Sequence[int] | torch.Tensor | None = None,
    batch_size: int = 4096,
) -> Matches:
    """For each latent of A (or of `latents` only), its `top` best latents of B by decoder cosine and, given a
    shared token sample acts [n d_in], by the Pearson correlation of their codes (a latent that never fires
    there correlates 0). Memory: [m n_b] scores (m latents of A)."""
    check_comparable(sae_a, sae_b)
    rows = torch.arange(sae_a.cfg.n_latents) if latents is None else torch.as_tensor(latents, dtype=torch.long)
    top = min(top, sae_b.cfg.n_latents)
    dev = sae_b.W_dec.device
    dec_a = torch.nn.functional.normalize(sae_a.W_dec[rows.to(sae_a.W_dec.device)].float().to(dev), dim=-1)
    cos = dec_a @ torch.nn.functional.normalize(sae_b.W_dec.float(), dim=-1).T
    decoder_cos, decoder = cos.topk(top, dim=-1)
    out = Matches(rows, decoder.cpu(), decoder_cos.cpu())
    if acts is None:
        return out
    m, n_b = len(rows), sae_b.cfg.n_latents
    sums_a, sq_a = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    sums_b, sq_b = torch.zeros(n_b, dtype=torch.float64), torch.zeros(n_b, dtype=torch.float64)
    cross = torch.zeros(m, n_b, dtype=torch.float64)
    for i in range(0, len(acts), batch_size):
        x = acts[i : i + batch_size].float()
        za = sae_a.eval().encode(x.to(sae_a.W_dec.device))[:, rows].float().cpu()
        zb = sae_b.eval().encode(x.to(dev)).float().cpu()
        sums_a += za.sum(0).double()
        sq_a += za.pow(2).sum(0).double()
        sums_b += zb.sum(0).double()
        sq_b += zb.pow(2).sum(0).double()
        cross += torch.sparse.mm(za.T.to_sparse(), zb).double()  # the codes are sparse: k x n_b per token
    n = len(acts)
    cov = cross / n - torch.outer(sums_a / n, sums_b / n)
    std = torch.outer(
        (sq_a / n - (sums_a / n) ** 2).clamp_min(0).sqrt(), (sq_b / n - (sums_b / n) ** 2).clamp_min(0).sqrt()
    )
    corr = torch.where(std > 0, cov / std.clamp_min(1e-300), torch.zeros_like(cov))
    out.activation_corr, out.activation = corr.float().topk(top, dim=-1)
    return out


def splitting_tree(
    saes: Sequence[SAE],
    root: int,
    acts: torch.Tensor | None = None,
    by: str = "decoder",
    min_score: float = 0.3,
    max_children: int = 8,
) -> pd.DataFrame:
    """Latent `root` of saes[0] splitting through each wider SAE in turn: the children of a latent of saes[i]
    are the latents of saes[i+1] whose best match in saes[i] (match_features, by "decoder" cosine or
    "activation" correlation on acts) is it, at a score >= min_score, the best max_children first.
    -> one row per node: level (i), latent, parent (its parent's row, -1 at the root), score (of that match)."""
    nodes = [{"level": 0, "latent": int(root), "parent": -1, "score": 1.0}]
    frontier = [0]
    for level in range(1, len(saes)):
        best, score = match_features(saes[level], saes[level - 1], acts if by == "activation" else None).best(by)
        grown = []
        for row in frontier:
            kids = ((best == nodes[row]["latent"]) & (score >= min_score)).nonzero().flatten()
            for kid in kids[score[kids].argsort(descending=True, stable=True)][:max_children].tolist():
                nodes.append({"level": level, "latent": kid, "parent": row, "score": float(score[kid])})
                grown.append(len(nodes) - 1)
        frontier = grown
    return pd.DataFrame(nodes)


def token_sample(model, cfg: RunConfig, hook: str, n_tokens: int = 4096) -> torch.Tensor:
    """[n_tokens d] activations at `hook` of the run's held-out split (its first contexts), for matching."""
    contexts = load_contexts(dataclasses.replace(cfg.data, split=cfg.eval.split), model.tokenizer, show_progress=False)
    n_ctx, _ = whole_contexts(contexts, n_tokens)
    acts, _ = Harvester(model, [hook], cfg.harvest.exclude_special).activations(
        contexts.tokens[:n_ctx], contexts.special_mask[:n_ctx]
    )
    return acts[hook][:n_tokens]


__all__ = [
    "CURVES",
    "Matches",
    "compare",
    "compare_curves",
    "match_features",
    "pareto_front",
    "splitting_tree",
    "token_sample",
]
