"""The evaluation suites through `eval_from_config`: the consistency suite against hand-built decoders and
brute force, finding the second seed, and the eval.json sections they write."""

import itertools
import json

import pytest
import torch
import yaml
from test_analysis import make_run

import saebench as sb
from saebench.evals.consistency import SECOND_RANDOM_SEED, decoder_consistency
from saebench.evals.suites import section_rows
from saebench.pipeline import eval_from_config
from saebench.synthetic import recovery_metrics

SMALL = ["eval.n_tokens=1000", "eval.n_contexts=2"]


def sae_of(W_dec: torch.Tensor) -> sb.SAE:
    sae = sb.SAE(sb.SAEConfig(d_in=W_dec.shape[1], n_latents=W_dec.shape[0], k=1))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    return sae


def test_a_permuted_sign_flipped_decoder_is_perfectly_consistent():
    a = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    perm, signs = torch.tensor([3, 0, 5, 1, 4, 2]), torch.tensor([1.0, -1, 1, -1, -1, 1])
    got = decoder_consistency(sae_of(a), sae_of(a[perm] * signs[:, None]))  # b's latent j is a's perm[j]
    where = perm.argsort()  # a's latent i is b's where[i]
    assert got.mcc == pytest.approx(1.0) and got.mean_best_cos == pytest.approx(1.0)
    assert got.match.tolist() == where.tolist() and got.best.tolist() == where.tolist()
    assert got.best_cos.tolist() == pytest.approx(signs[where].tolist())


def test_consistency_is_the_best_one_to_one_matching_by_brute_force():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen)  # unnormalised: cosines all the same
    cos = (torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T).abs()
    best = max(sum(float(cos[i, j]) for j, i in enumerate(rows)) for rows in itertools.permutations(range(5), 4))
    got = decoder_consistency(sae_of(a), sae_of(b))
    assert got.mcc == pytest.approx(best / 4)
    assert got.mean_best_cos == pytest.approx(float(cos.max(1).values.mean()))
    assert (got.match >= 0).sum() == 4 and got.match_cos.sum() == pytest.approx(best, rel=1e-5)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Run a (seed 0), its second seed b (seed 1: a's decoder permuted and sign-flipped), and c (another k)."""
    root = tmp_path_factory.mktemp("seeds")
    run_a, _ = make_run(root, name="a")
    sae_a = sb.SAE.load(run_a / "sae")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    for name, seed, k in (("b", 1, 32), ("c", 2, 31)):
        run, _ = make_run(root, name=name)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["seed"] = cfg["train"]["seed"] = seed
        cfg["sae"]["k"] = k  # c: another config
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        sae = sb.SAE.load(run / "sae")
        with torch.no_grad():
            sae.W_dec.copy_(sae_a.W_dec[perm] * -1)
        sae.save(run / "sae")
    return run_a, root / "runs" / "b", perm


@pytest.mark.slow
def test_the_consistency_suite_finds_the_second_seed_and_writes_its_matches(seeds):
    run_a, run_b, perm = seeds
    result = eval_from_config(run_a, ["core"], show_progress=False, overrides=SMALL)
    result = eval_from_config(run_a, ["consistency"], show_progress=False, overrides=SMALL)
    section = next(iter(result.values()))["consistency"]
    assert section["against"] == str(run_b.resolve()) and section["seeds"] == [0, 1]
    assert section["sae"]["mcc"] == pytest.approx(1.0)
    first, second = (sb.SAE(sb.SAEConfig(d_in=192, n_latents=128, k=6), seed=s).W_dec.detach() for s in (12345, 54321))
    assert SECOND_RANDOM_SEED == 54321  # the first is random_baseline's seed
    random_mcc = recovery_metrics(second, first)["mcc"]
    assert section["random"]["mcc"] == pytest.approx(random_mcc) and section["random"]["mcc"] < 0.5
    matches = sb.Run(run_a).eval_tensors("consistency")
    assert matches is not None and matches["match"].tolist() == perm.argsort().tolist()
    assert matches["best_cos"].tolist() == pytest.approx([-1.0] * 128)
    saved = json.loads((run_a / "eval.json").read_text())
    assert saved["consistency"] == section and "fvu" in saved["sae"]  # the core figures are kept
    assert set(saved["seconds"]) == {"core", "consistency"}
    rows = {r["metric"]: r for r in section_rows(section)}
    assert rows["mcc"]["sae"] == section["sae"]["mcc"] and rows["mcc"]["random SAE"] == section["random"]["mcc"]


@pytest.mark.slow
def test_the_second_seed_is_named_or_refused_with_the_fix(seeds, tmp_path):
    run_a, run_b, _ = seeds
    named = eval_from_config(
        run_a,
        ["consistency"],
        show_progress=False,
        overrides=[*SMALL, f"eval.consistency.against={run_b.parent / 'c'}"],
    )
    assert next(iter(named.values()))["consistency"]["seeds"] == [0, 2]  # named: another config is allowed
    with pytest.raises(sb.ConfigError, match="names this run itself"):
        eval_from_config(run_a, ["consistency"], overrides=[*SMALL, f"eval.consistency.against={run_a}"])
    alone, _ = make_run(tmp_path, name="alone")
    with pytest.raises(sb.ConfigError, match="--set seed=1 --set name=alone-seed1"):
        eval_from_config(alone, ["consistency"], show_progress=False, overrides=SMALL)


@pytest.mark.slow
def test_the_ce_convention_is_set_per_evaluation_and_recorded(seeds):
    run_a, _, _ = seeds
    theirs = next(iter(eval_from_config(run_a, ["core"], False, [*SMALL, "eval.ce_convention=sae_bench"]).values()))
    ours = next(iter(eval_from_config(run_a, ["core"], False, SMALL).values()))
    assert (theirs["ce_convention"], ours["ce_convention"]) == ("sae_bench", "non_special")
    assert theirs["sae"]["ce_sae"] != ours["sae"]["ce_sae"] and theirs["sae"]["fvu"] == ours["sae"]["fvu"]
    with pytest.raises(sb.ConfigError, match="eval.ce_convention: unknown 'saebench'"):
        eval_from_config(run_a, ["core"], False, [*SMALL, "eval.ce_convention=saebench"])
