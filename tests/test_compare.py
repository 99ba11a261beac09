"""Comparing SAEs: the compare table, Pareto fronts, feature matching and splitting trees, against brute force."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_analysis import HOOK, make_run

import saebench as sb
from saebench.evals.prefixes import PrefixSAE
from saebench.pipeline import eval_from_config
from saebench.synthetic import PlantedFeatures, SyntheticConfig
from saebench.train import TrainConfig, train_sae


def random_sae(n, d=16, k=3, seed=0, hook="h"):
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=n, k=k, hook=hook, model="m"), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return sae.eval()


def brute_force(sae_a, sae_b, acts):
    """Every (latent of A, latent of B) decoder cosine and code correlation, in float64 numpy."""
    a = sae_a.W_dec.detach().double().numpy()
    b = sae_b.W_dec.detach().double().numpy()
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    with torch.no_grad():
        za, zb = sae_a.encode(acts).double().numpy(), sae_b.encode(acts).double().numpy()
    corr = np.zeros((za.shape[1], zb.shape[1]))
    for i in range(za.shape[1]):
        for j in range(zb.shape[1]):
            if za[:, i].std() > 0 and zb[:, j].std() > 0:
                corr[i, j] = np.corrcoef(za[:, i], zb[:, j])[0, 1]
    return cos, corr


def test_match_features_equals_brute_force():
    sae_a, sae_b = random_sae(24, seed=0), random_sae(40, seed=5)
    acts = torch.randn(700, 16, generator=torch.Generator().manual_seed(3)) * 2
    cos, corr = brute_force(sae_a, sae_b, acts)
    m = sb.match_features(sae_a, sae_b, acts, top=3, batch_size=256)
    assert m.activation is not None and m.activation_corr is not None
    for i in range(24):
        for rank in range(3):
            assert m.decoder_cos[i, rank] == pytest.approx(np.sort(cos[i])[::-1][rank], abs=1e-5)
            assert cos[i, m.decoder[i, rank]] == pytest.approx(float(m.decoder_cos[i, rank]), abs=1e-5)
            assert m.activation_corr[i, rank] == pytest.approx(np.sort(corr[i])[::-1][rank], abs=1e-5)
            assert corr[i, m.activation[i, rank]] == pytest.approx(float(m.activation_corr[i, rank]), abs=1e-5)
    assert (corr != 0).sum() > 100  # the sample exercises the correlations
    some = sb.match_features(sae_a, sae_b, acts, top=3, latents=[5, 2])
    assert torch.equal(some.latents, torch.tensor([5, 2])) and torch.equal(some.decoder, m.decoder[[5, 2]])
    assert some.activation is not None and torch.equal(some.activation, m.activation[[5, 2]])
    itself = sb.match_features(sae_a, sae_a, acts).best("activation")
    assert torch.equal(itself[0][itself[1] > 0], torch.arange(24)[itself[1] > 0])
    with pytest.raises(sb.DataError, match="needs a token sample"):
        sb.match_features(sae_a, sae_b).best("activation")
    with pytest.raises(sb.DataError, match="one SAE is on hook h and the other on other: compare SAEs of one"):
        sb.match_features(sae_a, random_sae(8, hook="other"))


@pytest.mark.slow
def test_two_seeds_matches_recover_the_shared_planted_features():
    planted = PlantedFeatures(SyntheticConfig(d=16, n_true=48, true_l0=3, seed=0))
    x, _ = planted.sample(60_000, torch.Generator().manual_seed(0))
    held_out, _ = planted.sample(8_000, torch.Generator().manual_seed(9))
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, dead_tokens=20_000)
    tcfg = TrainConfig(n_tokens=400_000, batch_size=512, lr=4e-3, warmup_steps=20)
    a, _ = train_sae(cfg, x, tcfg, show_progress=False)
    b, _ = train_sae(cfg, x, TrainConfig(**{**tcfg.__dict__, "seed": 1}), show_progress=False)
    assert not torch.allclose(a.W_dec, b.W_dec)

    def true_feature(sae):  # each latent's nearest planted direction and its |cos|
        cos = (torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1) @ planted.directions.T).abs()
        return cos.max(-1)

    (sim_a, f_a), (_, f_b) = true_feature(a), true_feature(b)
    recovered = (sim_a > 0.9).nonzero().flatten()
    assert len(recovered) >= 20
    m = sb.match_features(a, b, held_out)
    for by in ("decoder", "activation"):
        best, score = m.best(by)
        same = (f_b[best[recovered]] == f_a[recovered]).float().mean()
        assert same >= 0.9 and score[recovered].median() > 0.8, (by, float(same))


def test_pareto_front_by_hand():
    table = pd.DataFrame({"l0": [8, 16, 16, 32, 64, 8, float("nan")], "fvu": [0.5, 0.3, 0.4, 0.3, 0.1, 0.6, 0.0]})
    assert sb.pareto_front(table, "l0", "fvu") == [0, 1, 4]
    table["ce"] = 1 - table.fvu
    assert sb.pareto_front(table, "l0", "ce") == [0, 1, 4]  # higher is better for CE-loss recovered
    assert sb.pareto_front(table, "l0", "fvu", lower_y=False) == [5]  # (8, 0.6): sparsest and highest


def test_splitting_tree_nodes_are_match_features_best_matches():
    saes = [random_sae(n, seed=n) for n in (6, 12, 24, 48)]
    tree = sb.splitting_tree(saes, root=2, min_score=0.2, max_children=3)
    assert tree.iloc[0].tolist() == [0, 2, -1, 1.0]
    for level in range(1, 4):
        best, score = sb.match_features(saes[level], saes[level - 1]).best()
        for row, node in tree[tree.level == level - 1].iterrows():
            kids = tree[tree.parent == row]
            want = [j for j in range(saes[level].cfg.n_latents) if best[j] == node.latent and score[j] >= 0.2]
            want = sorted(want, key=lambda j: -float(score[j]))[:3]
            assert kids.latent.tolist() == want
            assert kids.score.tolist() == pytest.approx([float(score[j]) for j in want])
    assert len(tree) > 4 and set(tree.level) == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory):
    run, _ = make_run(tmp_path_factory.mktemp("compare"), name="m")
    cfg = sb.SAEConfig(d_in=192, n_latents=128, k=6, matryoshka=[32, 128], hook=HOOK, model="tiny")
    sb.SAE(cfg, seed=3).save(run / "sae")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"].update(n_tokens=1500, n_contexts=2)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    eval_from_config(run, ["core", "prefixes"], show_progress=False)
    return run


def test_a_prefix_reconstructs_from_the_full_codes_cut_at_its_size():
    sae = random_sae(40, k=6, seed=2)
    x = torch.randn(300, 16)
    with torch.no_grad():
        z = sae.encode(x)
        cut = z.clone()
        cut[:, 10:] = 0
        assert torch.equal(PrefixSAE(sae, 10).encode(x), cut)
        assert torch.allclose(PrefixSAE(sae, 10)(x), cut @ sae.W_dec + sae.b_dec)
        rss = ((x - (cut @ sae.W_dec + sae.b_dec)) ** 2).sum()
    figures = sb.evaluate_sae(PrefixSAE(sae, 10), x)
    assert figures["fvu"] == pytest.approx(float(rss / ((x - x.mean(0)) ** 2).sum()), rel=1e-5)
    assert figures["l0"] == pytest.approx(float((cut != 0).sum(-1).float().mean()))


def test_compare_reads_eval_json_and_its_curves(matryoshka_run, tmp_path):
    run = matryoshka_run
    result = json.loads((run / "eval.json").read_text())
    whole, small = result["prefixes"]["128"], result["prefixes"]["32"]
    assert whole["sae"]["fvu"] == pytest.approx(result["sae"]["fvu"], rel=1e-6)
    assert whole["random_baseline"]["l0"] == pytest.approx(result["random_baseline"]["l0"])
    assert small["sae"]["l0"] < whole["sae"]["l0"]
    bare, _ = make_run(tmp_path, name="bare")
    table = sb.compare([run, bare])
    assert table.sae.tolist() == [HOOK, HOOK] and table.run.tolist() == [str(run), str(bare)]
    assert table.loc[0, "sae.fvu"] == result["sae"]["fvu"] and math.isnan(table.loc[1, "sae.fvu"])
    assert table.loc[0, "matryoshka"] == "32,128" and table.loc[0, "expansion"] == 128 / 192
    assert table.loc[0, "random_baseline.ce_recovered"] == result["random_baseline"]["ce_recovered"]
    assert not any(c.startswith("prefixes") for c in table.columns)
    curves = sb.compare_curves([run, bare])
    assert curves.point.tolist() == [32, 128] and set(curves.curve) == {"prefixes"}
    assert curves.set_index("point").loc[32, "sae.fvu"] == small["sae"]["fvu"]
