"""The planted-feature generator against closed forms, and the recovery metrics against hand-built cases."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from scipy.stats import multivariate_normal, norm

from saebench.synthetic import (
    PlantedFeatures,
    SyntheticConfig,
    absorption,
    match_latents,
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
    hierarchical, batch = list(rows)
    assert list(hierarchical["by_k"]) == ["1", "4"] and "by_k" not in batch  # a batch family has no k'
    assert hierarchical["by_k"]["1"]["l0"] <= 1 < hierarchical["by_k"]["4"]["l0"] <= 4
    assert hierarchical["by_k"]["4"] == {k: hierarchical[k] for k in hierarchical["by_k"]["4"]}


def test_absorption_by_hand():
    # features: 0 = parent, 1 = its child, 2 = a lone feature; latents: 0 <-> parent, 1 <-> child
    parent = torch.tensor([-1, 0, -1])
    codes = torch.zeros(100, 3)
    codes[:40, 0] = 1  # parent alone on tokens 0..39
    codes[40:80, 0] = 1  # parent with child on 40..79
    codes[40:80, 1] = 1
    acts = torch.zeros(100, 2)
    acts[:40, 0] = 1
    acts[:36, 0][:4] = 0  # the parent's latent misses 4 of 40 lone tokens (0.1)
    acts[40:80, 0] = 1
    acts[40:70, 0] = 0  # ... and 30 of 40 tokens with the child (0.75)
    latent, sim = torch.tensor([0, 1, -1]), torch.tensor([0.95, 0.9, 0.0], dtype=torch.float64)
    got = absorption(acts, codes, parent, latent, sim, min_count=10)
    assert got["absorption"] == pytest.approx(0.75 - 0.1)
    assert got["parents_matched"] == 1.0
    unmatched = absorption(
        acts, codes, parent, latent, torch.tensor([0.3, 0.9, 0.0], dtype=torch.float64), min_count=10
    )
    assert unmatched == {"absorption": None, "parents_matched": 0.0}
    assert absorption(acts, codes, torch.tensor([-1, -1, -1]), latent, sim) == {
        "absorption": None,
        "parents_matched": None,
    }


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
