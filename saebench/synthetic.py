"""Planted-feature data with known directions, and how well an SAE recovers them.

x = sum_i a_i f_i + noise over n_true random unit directions f_i in d dims (superposition when
n_true > d), after SynthSAEBench (SAELens `sae_lens.synthetic`):
- frequencies: Zipf over the root features, scaled so the expected L0 is `true_l0`;
- hierarchy: a share of the features form trees of one parent and `children` children; when the
  parent fires, one child (mutually exclusive, chosen uniformly) fires with probability
  `child_prob`, and a child never fires without its parent (the setting in which SAEs absorb);
- correlation: root features are dealt into groups of `corr_group` whose firing shares a Gaussian
  factor (a Gaussian copula: marginal probabilities unchanged, pairwise latent correlation `correlation`);
- magnitudes: lognormal with mean 1 (`magnitude_sigma`), or uniform in [0.5, 1.5];
- isotropic noise of std `noise_std`;
- `rank` > 0: the directions lie in a random rank-dimensional subspace of the d dims (as attention outputs do,
  Wang et al. 2025), the noise still in all d.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from saebench.evaluate import evaluate_sae, random_baseline
from saebench.sae import FAMILIES, SAE, SAEConfig
from saebench.train import TrainConfig, train_sae

DIRECTIONS_SEED = 104_729
# planted data has no model, so no loss to take a gradient of: the gradient families are left out
PLANTED_ACTIVATIONS = tuple(name for name, family in FAMILIES.items() if not family.gradients)


@dataclass
class SyntheticConfig:
    d: int = 128
    n_true: int = 2048
    true_l0: float = 8.0  # expected active features per token
    zipf_exponent: float = 0.5
    children: int = 0  # children per parent; 0 = no hierarchy
    tree_fraction: float = 0.5  # share of the features in trees (parents and children)
    child_prob: float = 0.5  # P(one child fires | parent fires)
    correlation: float = 0.0  # latent correlation of root features within a group
    corr_group: int = 8
    magnitude: str = "uniform"  # uniform | lognormal
    magnitude_sigma: float = 0.5
    noise_std: float = 0.0
    rank: int = 0  # > 0: the directions span a random subspace of this dimension; 0: all d
    seed: int = 0

    def __post_init__(self) -> None:
        if self.magnitude not in ("uniform", "lognormal"):
            raise ValueError(f"magnitude must be uniform or lognormal, not {self.magnitude!r}")
        if not 0 <= self.correlation < 1:
            raise ValueError("correlation must be in [0, 1)")
        if not 0 <= self.rank <= self.d:
            raise ValueError(f"rank must be in [0, d={self.d}] (0: all d)")


class PlantedFeatures:
    """Draws batches from one fixed set of true features.

    directions: [n_true d]; parent: [n_true] (-1 for roots); probs: [n_true] marginal firing
    probabilities. Features are laid out as the roots (parents first, then lone features), then
    the children: parent j's are n_roots + j*children ... n_roots + (j+1)*children - 1.
    """

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        # not manual_seed(seed): a trainer seeded alike would draw these very directions as its init
        gen = torch.Generator().manual_seed(DIRECTIONS_SEED + cfg.seed)
        directions = torch.randn(cfg.n_true, cfg.d, generator=gen)
        if cfg.rank:  # projected onto the subspace (still isotropic there); the other draws stay as at full rank
            sub = torch.Generator().manual_seed(DIRECTIONS_SEED + cfg.seed + 1)
            basis = torch.linalg.qr(torch.randn(cfg.d, cfg.rank, generator=sub)).Q  # [d rank]
            directions = directions @ basis @ basis.T
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        c = cfg.children
        self.n_parents = int(cfg.n_true * cfg.tree_fraction) // (1 + c) if c > 0 else 0
        self.n_children = self.n_parents * c
        self.n_roots = cfg.n_true - self.n_children
        roots = self.roots = torch.arange(self.n_roots)
        self.parent = torch.full((cfg.n_true,), -1, dtype=torch.long)
        self.parent[self.n_roots :] = torch.arange(self.n_parents).repeat_interleave(c)
        # Zipf over the roots in a random order, so trees are not all the most frequent features
        rank = torch.randperm(len(roots), generator=gen).double() + 1
        weight = rank**-cfg.zipf_exponent
        per_fire = torch.ones(len(roots), dtype=torch.float64)
        per_fire[: self.n_parents] += cfg.child_prob  # a parent's firing brings a child with it
        root_p = weight / (weight * per_fire).sum() * cfg.true_l0
        probs = torch.zeros(cfg.n_true, dtype=torch.float64)
        probs[roots] = root_p.clamp(max=1)
        if c > 0:
            probs[self.n_roots :] = probs[: self.n_parents].repeat_interleave(c) * cfg.child_prob / c
        self.probs = probs.float()
        self.group = torch.randperm(len(roots), generator=gen) // cfg.corr_group  # [n_roots] copula group
        self.thresholds = torch.special.ndtri(1 - self.probs[roots].double()).float()

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x [n d], codes [n n_true])."""
        cfg = self.cfg
        t = self.thresholds  # [n_roots]: root i fires when its latent normal exceeds t_i
        if (
            cfg.correlation > 0
        ):  # given the group factor u, roots fire independently w.p. Phi((sqrt(rho) u - t) / sqrt(1 - rho))
            shared = torch.randn(n, int(self.group.max()) + 1, generator=gen)
            p_root = torch.special.ndtr(
                (math.sqrt(cfg.correlation) * shared[:, self.group] - t) / math.sqrt(1 - cfg.correlation)
            )
        else:
            p_root = self.probs[: self.n_roots]
        on = torch.empty(n, cfg.n_true, dtype=torch.bool)
        on[:, : self.n_roots] = torch.rand(n, self.n_roots, generator=gen) < p_root
        if self.n_parents:
            c = cfg.children
            fires = on[:, : self.n_parents] & (torch.rand(n, self.n_parents, generator=gen) < cfg.child_prob)
            which = torch.randint(c, (n, self.n_parents, 1), generator=gen)
            on[:, self.n_roots :] = ((which == torch.arange(c)) & fires.unsqueeze(-1)).reshape(n, -1)
        count = int(on.sum())
        if cfg.magnitude == "lognormal":  # mean exp(mu + sigma^2 / 2) = 1
            s = cfg.magnitude_sigma
            mags = torch.exp(-s * s / 2 + s * torch.randn(count, generator=gen))
        else:
            mags = 0.5 + torch.rand(count, generator=gen)
        codes = torch.zeros(n, cfg.n_true).masked_scatter_(on, mags)
        x = codes @ self.directions
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(n, cfg.d, generator=gen)
        return x, codes

    def stream(self, batch_size: int, seed: int):
        """A factory for BatchSource: epoch -> iterator of [batch d] (fresh samples forever)."""

        def batches(epoch: int):
            gen = torch.Generator().manual_seed(seed * 7919 + epoch)
            while True:
                yield self.sample(batch_size, gen)[0]

        return batches


def match_latents(W_dec: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one (Hungarian) matching of true features to latents by |cos|.

    W_dec: [n_latents d]; directions: [n_true d] -> (latent [n_true] (-1 where unmatched, when
    n_latents < n_true), |cos| [n_true] of the match (0 where unmatched))."""
    dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (directions @ dec.T).abs().double().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    latent = torch.full((len(directions),), -1, dtype=torch.long)
    latent[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    sim = torch.zeros(len(directions), dtype=torch.float64)
    sim[torch.as_tensor(rows)] = torch.as_tensor(cos[rows, cols])
    return latent, sim


def recovery_metrics(W_dec: torch.Tensor, directions: torch.Tensor, threshold: float = 0.9) -> dict:
    """W_dec: [n_latents d]; directions: [n_true d].

    mcc: mean |cos| over the one-to-one matching, over min(n_true, n_latents) pairs;
    mmcs: mean over true features of the best |cos| of any latent;
    recovered: share of true features whose best |cos| exceeds `threshold`.
    """
    _, sim = match_latents(W_dec, directions)
    dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best = (directions @ dec.T).abs().max(dim=1).values.double()
    pairs = min(len(directions), len(W_dec))
    return {
        "mcc": float(sim.sum() / pairs),
        "mmcs": float(best.mean()),
        "recovered": float((best > threshold).float().mean()),
    }


def absorption(
    acts: torch.Tensor,
    codes: torch.Tensor,
    parent: torch.Tensor,
    latent: torch.Tensor,
    sim: torch.Tensor,
    W_dec: torch.Tensor,
    directions: torch.Tensor,
    min_cos: float = 0.5,
    min_count: int = 20,
    carry_cos: float = 0.3,
) -> dict:
    """How often a parent's latent goes silent because a child's latent took the parent's direction over.

    acts: [n n_latents] the SAE's latents on held-out data; codes: [n n_true] true activations;
    parent: [n_true] (-1 for roots); latent, sim: match_latents' output; W_dec: [n_latents d];
    directions: [n_true d]. As Chanin et al. (2024) require, a token counts as absorbed only when the
    parent's latent is silent and another active latent carries the parent's direction: sign(code) x
    cos(decoder row, parent) >= carry_cos (a random direction's cosine has std 1/sqrt(d): 0.125 at d 64);
    a parent's latent merely crowded out by the k budget is not absorption. For each parent p whose
    matched latent has |cos| >= min_cos: absorbed_child = P(absorbed | p and a child fire), absorbed_alone
    = P(absorbed | p fires alone) (a split parent); its absorption is max(0, absorbed_child - absorbed_alone),
    averaged over the parents with min_count tokens of each kind. Also `parents_matched`: the share of
    parents with a latent at |cos| >= min_cos (an unmatched parent is one whose direction the SAE lost,
    often into its children's latents).
    """
    parents = torch.unique(parent[parent >= 0])
    if len(parents) == 0:
        return {"absorption": None, "parents_matched": None}
    on = codes > 0
    child_on = torch.zeros(len(codes), int(parents.max()) + 1, dtype=torch.bool)
    for j in torch.nonzero(parent >= 0).squeeze(1).tolist():
        child_on[:, parent[j]] |= on[:, j]
    cos = directions @ (W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)).T  # [n_true n_latents]
    sign = acts.sign()
    scores, matched = [], 0
    for p in parents.tolist():
        if latent[p] < 0 or sim[p] < min_cos:
            continue
        matched += 1
        rows = on[:, p]  # the tokens where p fires
        carries = sign[rows] * cos[p] >= carry_cos  # [rows n_latents]: active latents carrying p's direction
        carries[:, latent[p]] = False
        absorbed = (acts[rows, latent[p]] == 0) & carries.any(-1)
        with_child = child_on[rows, p]
        if with_child.sum() < min_count or (~with_child).sum() < min_count:
            continue
        rate = absorbed[with_child].float().mean() - absorbed[~with_child].float().mean()
        scores.append(float(rate.clamp(min=0)))
    return {"absorption": sum(scores) / len(scores) if scores else None, "parents_matched": matched / len(parents)}


def score_sae(
    encode,
    W_dec: torch.Tensor,
    planted: PlantedFeatures,
    held_out: torch.Tensor,
    codes: torch.Tensor,
    block: int = 4096,
) -> dict:
    """Every recovery metric for one trained SAE. encode: [b d] -> [b n_latents] dense latents.

    mcc_live: MCC with only the latents that fire on the held-out set (under this encode) matched, over the
    same min(n_true, n_latents) pairs: a latent that never fires recovers nothing (e.g. at a small k')."""
    latent, sim = match_latents(W_dec, planted.directions)
    with torch.no_grad():
        acts = torch.cat([encode(held_out[i : i + block]) for i in range(0, len(held_out), block)])
    true_l0 = float((codes > 0).sum(-1).float().mean())
    l0 = float((acts != 0).sum(-1).float().mean())
    freq = (acts != 0).float().mean(0)  # [n_latents] share of held-out tokens each latent fires on
    live = freq > 0
    return {
        **recovery_metrics(W_dec, planted.directions),
        "mcc_live": float(match_latents(W_dec[live], planted.directions)[1].sum() / min(len(sim), len(W_dec))),
        **absorption(acts, codes, planted.parent, latent, sim, W_dec, planted.directions),
        "l0": round(l0, 2),
        "true_l0": round(true_l0, 2),
        "l0_error": round((l0 - true_l0) / true_l0, 3),
        "dead_fraction": float((freq == 0).float().mean()),
        "dense_fraction": float((freq > 0.1).float().mean()),  # as evaluate_sae's: fires on > 10% of tokens
    }


def random_row(planted: PlantedFeatures, n_latents: int, k: int, held_out: torch.Tensor, codes: torch.Tensor) -> dict:
    """The floor of every planted-feature table: random unit decoder directions with TopK codes at matched
    scale (evaluate.random_baseline), scored like a trained SAE."""
    sae = random_baseline(SAE(SAEConfig(d_in=planted.cfg.d, n_latents=n_latents, k=k)), held_out)
    return {
        "activation": "random",
        "matryoshka": False,
        "n_latents": n_latents,
        "k": k,
        **score_sae(sae.encode, sae.W_dec.detach(), planted, held_out, codes),
        "fvu": round(evaluate_sae(sae, held_out)["fvu"], 4),
    }


def iter_synthetic_bench(
    activations: tuple[str, ...] = PLANTED_ACTIVATIONS,
    data: SyntheticConfig | None = None,
    n_latents: int | None = None,
    k: int | None = None,
    n_tokens: int = 8_000_000,
    batch_size: int = 4096,
    lr: float | None = None,
    matryoshka: bool = False,
    seed: int = 0,
    held_out_tokens: int = 16_384,
    train_overrides: dict | None = None,
    sae_overrides: dict | None = None,
    ks: tuple[int, ...] = (),
) -> Iterator[dict]:
    """Train each family on the same planted features, yielding its row of recovery metrics as soon as it is
    trained (lr None = the trainer's default), then the random decoder's row (random_row), the floor.

    train_overrides / sae_overrides: TrainConfig / SAEConfig fields to change from their defaults.
    ks: a per-token family's row also scores the one SAE at each k' (SAE.check_k): "by_k" {k': metrics}."""
    if data is None:
        data = SyntheticConfig()
    planted = PlantedFeatures(data)
    n_latents = n_latents or data.n_true
    k = k or round(data.true_l0)
    held_out, codes = planted.sample(held_out_tokens, torch.Generator().manual_seed(seed + 99))
    for activation in activations:
        prefixes = [n_latents // 8, n_latents // 4, n_latents // 2, n_latents] if matryoshka else None
        cfg = SAEConfig(
            **{
                "d_in": data.d,
                "n_latents": n_latents,
                "activation": activation,
                "k": k,
                "matryoshka": prefixes,
                "dead_tokens": 200_000,
                **(sae_overrides or {}),
            }
        )
        train = TrainConfig(
            n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed, log_every=10**9, **(train_overrides or {})
        )
        sae, report = train_sae(cfg, planted.stream(batch_size, seed), train, show_progress=False)
        sae.eval()

        def scores(k_prime: int | None = None, sae=sae) -> dict:
            return {
                **score_sae(lambda x: sae.encode(x, k=k_prime), sae.W_dec.detach().cpu(), planted, held_out, codes),
                "fvu": round(evaluate_sae(sae, held_out, k=k_prime)["fvu"], 4),
            }

        row = {"activation": activation, "matryoshka": bool(prefixes), "n_latents": n_latents, "k": k, **scores()}
        if ks and not cfg.family.threshold:
            row["by_k"] = {str(k_prime): scores(k_prime) for k_prime in ks}
        yield {**row, "train_tokens_per_s": report.get("tokens_per_s")}
    yield random_row(planted, n_latents, k, held_out, codes)
