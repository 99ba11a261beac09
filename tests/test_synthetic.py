"""The planted-feature generator against closed forms, and the recovery metrics against hand-built cases."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
import torch
from scipy.stats import multivariate_normal, norm

from saebench.sae import SAE, SAEConfig
from saebench.synthetic import (
    PlantedFeatures,
    SyntheticConfig,
    absorption,
    iter_synthetic_bench,
    match_latents,
    random_row,
    recovery_metrics,
    score_sae,
)

TREES = SyntheticConfig(
    d=32,
    n_true=96,
    true_l0=6,
    children=3,
    tree_fraction=0.5,
    child_prob=0.6,
    correlation=0.5,
    corr_group=4,
    magnitude="lognormal",
    magnitude_sigma=0.7,
    seed=3,
)


@pytest.fixture(scope="module")
def drawn():
    planted = PlantedFeatures(TREES)
    _, codes = planted.sample(200_000, torch.Generator().manual_seed(0))
    return planted, codes


def test_each_feature_fires_at_its_probability_and_l0_is_the_target(drawn):
    planted, codes = drawn
    on = (codes > 0).double()
    rate, p = on.mean(0), planted.probs.double()
    z = (rate - p) / (p * (1 - p) / len(on)).sqrt().clamp_min(1e-12)
    assert z.abs().max() < 5
    assert on.sum(-1).mean().item() == pytest.approx(TREES.true_l0, rel=0.01)
    assert float(planted.probs.max()) < 1  # no clamping in this regime, so the target is exact


def test_children_fire_only_with_their_parent_and_one_at_a_time(drawn):
    planted, codes = drawn
    on = codes > 0
    c, n_par = TREES.children, planted.n_parents
    assert n_par == 96 // 2 // 4
    kids = on[:, planted.n_roots :].reshape(len(on), n_par, c)
    assert planted.n_roots + planted.n_children == TREES.n_true
    assert not (kids.any(-1) & ~on[:, :n_par]).any()
    assert kids.sum(-1).max() <= 1
    share = kids.any(-1)[on[:, :n_par]].float().mean()
    assert share.item() == pytest.approx(TREES.child_prob, abs=0.01)
    assert (planted.parent[planted.n_roots :] == torch.arange(n_par).repeat_interleave(c)).all()
    assert (planted.parent[planted.roots] == -1).all()


def test_grouped_roots_co_fire_as_the_gaussian_copula_says(drawn):
    planted, codes = drawn
    on = codes > 0
    roots, group = planted.roots, planted.group
    i, j = [int(r) for r in roots[group == group[0]][:2]]
    pi, pj = float(planted.probs[i]), float(planted.probs[j])
    rho = TREES.correlation
    both = cast(Any, multivariate_normal)(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([norm.ppf(pi), norm.ppf(pj)])
    assert (on[:, i] & on[:, j]).double().mean().item() == pytest.approx(both, rel=0.08)
    other = int(roots[group != group[0]][0])
    indep = pi * float(planted.probs[other])
    assert (on[:, i] & on[:, other]).double().mean().item() == pytest.approx(indep, rel=0.25)
    assert both > 1.5 * pi * pj  # the regime really is correlated


def test_lognormal_magnitudes_have_mean_one_and_the_set_spread(drawn):
    _, codes = drawn
    mags = codes[codes > 0].double()
    assert mags.mean().item() == pytest.approx(1.0, abs=0.01)
    assert mags.log().std().item() == pytest.approx(TREES.magnitude_sigma, abs=0.01)


def test_x_is_codes_times_directions_plus_noise():
    planted = PlantedFeatures(SyntheticConfig(d=8, n_true=20, true_l0=3, noise_std=0.1))
    x, codes = planted.sample(50_000, torch.Generator().manual_seed(1))
    residual = x - codes @ planted.directions
    assert residual.std().item() == pytest.approx(0.1, rel=0.02)
    assert planted.directions.norm(dim=-1).sub(1).abs().max() < 1e-6


def test_matching_recovers_a_permuted_sign_flipped_dictionary():
    planted = PlantedFeatures(SyntheticConfig(d=16, n_true=24))
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    signs = torch.where(torch.arange(24) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    W_dec = 3 * signs * planted.directions[perm]
    latent, sim = match_latents(W_dec, planted.directions)
    assert (perm[latent] == torch.arange(24)).all()
    assert sim.min() > 1 - 1e-6
    m = recovery_metrics(W_dec, planted.directions)
    assert m["mcc"] == pytest.approx(1.0) and m["recovered"] == 1.0
    half = recovery_metrics(W_dec[:12], planted.directions)  # 12 latents: 12 pairs, all exact
    assert half["mcc"] == pytest.approx(1.0) and half["recovered"] == 0.5


def test_mcc_live_counts_only_the_latents_that_fire():
    planted = PlantedFeatures(SyntheticConfig(d=16, n_true=24))
    x, codes = planted.sample(500, torch.Generator().manual_seed(0))
    half = torch.arange(24) < 12

    def encode(x):  # the exact dictionary, but only latents 0..11 ever fire
        return torch.ones(len(x), 24) * half

    got = score_sae(encode, planted.directions, planted, x, codes)
    assert got["mcc"] == pytest.approx(1.0) and got["mcc_live"] == pytest.approx(0.5)
    assert score_sae(lambda x: torch.zeros(len(x), 24), planted.directions, planted, x, codes)["mcc_live"] == 0


def test_the_bench_scores_a_per_token_sae_at_each_k_prime():
    from saebench.synthetic import iter_synthetic_bench

    data = SyntheticConfig(d=16, n_true=24, true_l0=3)
    rows = iter_synthetic_bench(
        ("hierarchical_topk", "batchtopk"), data, k=4, n_tokens=2048, batch_size=512, held_out_tokens=2000, ks=(1, 4)
    )
    hierarchical, batch, random = list(rows)  # the random floor ends every table
    assert random["activation"] == "random"
    assert list(hierarchical["by_k"]) == ["1", "4"] and "by_k" not in batch  # a batch family has no k'
    assert hierarchical["by_k"]["1"]["l0"] <= 1 < hierarchical["by_k"]["4"]["l0"] <= 4
    assert hierarchical["by_k"]["4"] == {k: hierarchical[k] for k in hierarchical["by_k"]["4"]}


def test_absorption_by_hand():
    """A token is absorbed when the parent's latent is silent and another active latent carries the parent's
    direction (Chanin et al.); a latent crowded out by the k budget alone is not absorption."""
    # features (directions e0, e1, e2): 0 = parent, 1 = its child, 2 = a lone feature
    parent = torch.tensor([-1, 0, -1])
    directions = torch.eye(4)[:3]
    r = math.sqrt(0.5)
    W_dec = torch.tensor(  # latents: 0 = the parent's; 1 = child + parent (absorbing); 2 = a split parent;
        [  # 3 = the child, barely touching the parent; 4 = latent 1 negated (a signed code's)
            [1.0, 0.0, 0.0, 0.0],
            [r, r, 0.0, 0.0],
            [0.95, 0.0, 0.0, math.sqrt(1 - 0.95**2)],
            [0.1, math.sqrt(0.99), 0.0, 0.0],
            [-r, -r, 0.0, 0.0],
        ]
    )
    codes = torch.zeros(100, 3)
    codes[:80, 0] = 1  # the parent alone on tokens 0..39, with its child on 40..79
    codes[40:80, 1] = 1
    acts = torch.zeros(100, 5)
    acts[4:40, 0] = 1  # the parent's latent misses 4 of 40 lone tokens ...
    acts[:2, 2] = 1  # ... on 2 of them the split latent carries the parent: absorbed alone 0.05
    acts[70:80, 0] = 1  # it misses 30 of 40 tokens with the child: on 20 a latent carries the parent
    acts[40:50, 1] = 1
    acts[50:60, 4] = -1  # (a negative code on a negated row carries it too)
    acts[60:70, 3] = 1  # and on 10 the parent is just crowded out: absorbed with child 0.5
    latent, sim = torch.tensor([0, 3, -1]), torch.tensor([0.95, 0.99, 0.0], dtype=torch.float64)
    got = absorption(acts, codes, parent, latent, sim, W_dec, directions, min_count=10)
    assert got["absorption"] == pytest.approx(0.5 - 0.05)  # the old count of silences: 0.75 - 0.1
    assert got["parents_matched"] == 1.0
    crowded = acts.clone()
    crowded[:, [1, 4]] = 0  # the same silences, no carrier: no absorption
    assert absorption(crowded, codes, parent, latent, sim, W_dec, directions, min_count=10)["absorption"] == 0.0
    unmatched = absorption(
        acts, codes, parent, latent, torch.tensor([0.3, 0.9, 0.0], dtype=torch.float64), W_dec, directions, min_count=10
    )
    assert unmatched == {"absorption": None, "parents_matched": 0.0}
    assert absorption(acts, codes, torch.tensor([-1, -1, -1]), latent, sim, W_dec, directions) == {
        "absorption": None,
        "parents_matched": None,
    }


def test_every_bench_table_ends_with_the_random_floor():
    data = SyntheticConfig(d=16, n_true=48, true_l0=3, children=2, seed=0)
    rows = list(iter_synthetic_bench(("topk",), data, n_tokens=2048, batch_size=1024, held_out_tokens=2048))
    assert [r["activation"] for r in rows] == ["topk", "random"]
    planted = PlantedFeatures(data)
    held_out, codes = planted.sample(2048, torch.Generator().manual_seed(99))
    floor = random_row(planted, 48, 3, held_out, codes)
    assert floor == rows[-1]
    random_dec = SAE(SAEConfig(d_in=16, n_latents=48, k=3), seed=12345).W_dec.detach()  # random_baseline's seed
    assert floor["mcc"] == pytest.approx(recovery_metrics(random_dec, planted.directions)["mcc"])
    assert 0 < floor["l0"] <= 3  # TopK codes of random directions: at most k


@pytest.mark.parametrize("seed", [0, 1])
def test_a_freshly_initialised_sae_does_not_already_hold_the_planted_directions(seed):
    # the planted directions once came from manual_seed(seed), the trainer's own init stream
    from saebench.sae import SAE, SAEConfig

    planted = PlantedFeatures(SyntheticConfig(d=64, n_true=256, seed=seed))
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=64, n_latents=256))
    torch.manual_seed(seed)
    assert recovery_metrics(sae.W_dec.detach(), planted.directions)["mcc"] < 0.6
    assert recovery_metrics(torch.randn(256, 64), planted.directions)["mcc"] < 0.6


def test_rank_puts_the_directions_in_a_random_subspace_and_keeps_the_other_draws():
    full = PlantedFeatures(SyntheticConfig(d=32, n_true=96, seed=2))
    low = PlantedFeatures(SyntheticConfig(d=32, n_true=96, rank=5, seed=2))
    _, s, vt = torch.linalg.svd(low.directions.double())
    assert s[4] > 0.5 and s[5] < 1e-5  # rank 5 exactly
    P = vt[:5].T @ vt[:5]  # the subspace's projector
    projected = full.directions.double() @ P
    assert torch.allclose(low.directions.double(), projected / projected.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.equal(low.probs, full.probs) and torch.equal(low.group, full.group)
    x, _ = low.sample(2000, torch.Generator().manual_seed(0))
    assert torch.linalg.matrix_rank(x.double(), atol=1e-3) == 5  # no noise: the data lies in it too
    with pytest.raises(ValueError, match="rank must be in"):
        SyntheticConfig(d=32, rank=33)


def test_score_sae_counts_dead_and_dense_latents_by_hand():
    planted = PlantedFeatures(SyntheticConfig(d=8, n_true=16, true_l0=2))
    held_out, codes = planted.sample(20, torch.Generator().manual_seed(0))
    acts = torch.zeros(20, 4)
    acts[:, 0] = 1.0  # every token
    acts[:1, 1] = 2.0  # 1 of 20: 5%, not dense
    acts[:3, 2] = 0.5  # 3 of 20: 15%, dense; latent 3 never fires
    row = score_sae(lambda x: acts[: len(x)], torch.randn(4, 8), planted, held_out, codes, block=20)
    assert (row["dead_fraction"], row["dense_fraction"], row["l0"]) == (0.25, 0.5, 1.2)
