"""The absorption suite against planted first-letter data whose absorption is known by construction,
SAEBench 0.6.0's own functions (peers) and autograd."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import saebench as sb
from saebench.evals.absorption import (
    LETTERS,
    LetterData,
    absorption_rates,
    f1_scores,
    first_letter_data,
    fit_logistic,
    letter_words,
    main_latents,
    train_probe,
    word_absorption,
)
from saebench.harvest import Harvester
from saebench.interop import save_saelens
from saebench.models import token_pieces

SAEBENCH_PYTHON = Path(__file__).resolve().parent.parent / ".cache" / "saebench-venv" / "bin" / "python"
D, PER_LETTER = 64, 40


def planted(seed: int = 0):
    """x = 3 e_letter + 2 u_word (u unit, orthogonal to the letters) for 40 words per letter; 80/20 split."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(26).repeat_interleave(PER_LETTER)
    u = F.normalize(torch.randn(len(y), D - 26, generator=g), dim=-1)
    x = torch.cat([3 * F.one_hot(y, 26).float(), 2 * u], 1)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[: int(0.8 * len(y))], perm[int(0.8 * len(y)) :]
    return LetterData(x[tr], y[tr], x[te], y[te], [f"w{i}" for i in te.tolist()]), x, tr, te


def dictionary_sae(x: torch.Tensor, children: list[int]) -> sb.SAE:
    """TopK (k = 1) with a latent per letter (the truth) and, for each word in `children`, a child latent along
    e_letter + u_word: on that word it beats the letter's latent, which then stays silent (absorption)."""
    rows = [F.one_hot(torch.tensor(c), D).float() for c in range(26)]
    rows += [F.normalize(torch.cat([x[w, :26] / 3, x[w, 26:] / 2]), dim=0) for w in children]
    W = torch.stack(rows)
    sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=len(W), activation="topk", k=1, hook="h", model="m"))
    with torch.no_grad():
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
    return sae.eval()


def test_letter_words_are_saebench_alpha_tokens():
    ids, words = letter_words(["the", " The", "  the", " ", "", "a1", "é", " é", "x", "<0x41>", " Zoo"])
    assert words == ["the", " The", "x", " Zoo"] and ids == [0, 1, 8, 10]


def test_logistic_fit_is_the_optimum_autograd_finds():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 200, 4, generator=g), torch.rand(3, 200, generator=g) < 0.2
    probe = fit_logistic(x, y)
    theta = torch.cat([probe.W, probe.b[:, None]], 1).double().requires_grad_()
    xb = torch.cat([x.double(), torch.ones(3, 200, 1, dtype=torch.float64)], -1)
    n_pos = y.sum(1, keepdim=True).double()
    w = torch.where(y, 200 / (2 * n_pos), 200 / (2 * (200 - n_pos)))
    z = torch.einsum("pnk,pk->pn", xb, theta)
    loss = (w * F.binary_cross_entropy_with_logits(z, y.double(), reduction="none")).sum() + 0.5 * theta[:, :4].pow(
        2
    ).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.abs().max() < 1e-4  # float32 rounding of the returned weights; float64 inside


@pytest.fixture(scope="module")
def planted_probe():
    data, *_ = planted()
    return train_probe(data.x_train, data.y_train, batch_size=64, weight_decay=1e-4)


@pytest.mark.slow
def test_probe_separates_planted_letters_and_not_shuffled_ones(planted_probe):
    data, *_ = planted()
    assert f1_scores(planted_probe(data.x_test), data.y_test).min() == 1.0
    shuffled = data.y_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))]
    probe = train_probe(data.x_train, shuffled, batch_size=64, weight_decay=1e-4)
    assert f1_scores(probe(data.x_test), data.y_test).mean() < 0.15  # chance: about 1/26 precision


def test_a_child_latent_replacing_the_parent_is_full_absorption():
    data, x, tr, te = planted()
    a_test = [int(i) for i in te if i < PER_LETTER]  # the held-out words of letter a
    absorbed, truth = dictionary_sae(x, a_test), dictionary_sae(x, [])
    for sae, rate in ((absorbed, 1.0), (truth, 0.0)):
        z = sae.encode(x[a_test])
        r = word_absorption(x[a_test], z, sae.W_dec.detach(), F.one_hot(torch.tensor(0), D).float(), [0])
        assert r.full.float().mean() == rate and r.fraction.mean() == rate
    assert (r.absorber == -1).all()  # the truth: nothing else carries the letter
    z = absorbed.encode(x[a_test])
    r = word_absorption(x[a_test], z, absorbed.W_dec.detach(), F.one_hot(torch.tensor(0), D).float(), [0])
    assert sorted(r.absorber.tolist()) == list(range(26, 26 + len(a_test)))


@pytest.mark.slow
def test_rates_end_to_end_equal_the_planted_share(planted_probe):
    """Letter a's held-out words 0 and 1 and two training words get children: the k-sparse probes keep the
    parent alone (the children add too little F1), so a's rate is 2 / its held-out words; the truth gives 0."""
    data, x, tr, te = planted()
    a_test = [int(i) for i in te if i < PER_LETTER]
    a_train = [int(i) for i in tr if i < PER_LETTER]
    probe, s, letters = planted_probe, sb.AbsorptionSettings(), list(range(26))
    got = absorption_rates(dictionary_sae(x, a_test[:2] + a_train[:2]), data, probe, letters, s)
    a = got["letters"]["a"]
    assert a["main_latents"] == [0] and a["n_probe_true_positives"] == len(a_test)
    assert (
        a["full_absorption_rate"] == pytest.approx(2 / len(a_test))
        and a["absorption_fraction"] == a["full_absorption_rate"]
    )
    assert [(d["latent"], d["words"]) for d in a["absorbing_latents"]] == [(26, 1), (27, 1)]
    assert all(v["full_absorption_rate"] == 0 for k, v in got["letters"].items() if k != "a")
    assert got["mean_full_absorption_rate"] == pytest.approx(2 / len(a_test) / 26)
    truth = absorption_rates(dictionary_sae(x, []), data, probe, letters, s)
    assert truth["mean_full_absorption_rate"] == 0.0 and truth["mean_absorption_fraction"] == 0.0
    assert truth["mean_num_split_features"] == 1.0
    assert absorption_rates(dictionary_sae(x, []), data, probe, letters[:3], s)["mean_absorption_fraction"] is None


def test_prompts_on_tiny_read_the_word(tiny):
    """Without in-context lines each prompt is BOS, newline, the word, " has the first letter:"; the row read is
    the word's activation, and labels and words stay aligned through the split."""
    hook, s = "blocks.0.hook_resid_post", sb.AbsorptionSettings(n_icl=0, test_fraction=0.5, batch_size=1024)
    data = first_letter_data(tiny, hook, s, show_progress=False)
    ids, words = letter_words(token_pieces(tiny))
    assert len(data.y_train) + len(data.y_test) == len(ids) == 3534
    for i in (0, 17, len(data.words_test) - 1):
        word = data.words_test[i]
        assert data.y_test[i] == LETTERS.index(word.strip()[0].lower())
        tokens = tiny.tokenizer("\n" + word + " has the first letter:", add_special_tokens=False)["input_ids"]
        acts = Harvester(tiny, [hook], exclude_special=False).forward(torch.tensor([[0, *tokens]]))[hook]
        assert tokens[1] == ids[words.index(word)]  # the text tokenizes to the same ids here
        torch.testing.assert_close(data.x_test[i], acts[0, 2])


PEER_SCRIPT = r"""
import json, sys
import numpy as np, torch
from safetensors.torch import load_file
from sae_lens import SAE
from sklearn.linear_model import LogisticRegression
from sae_bench.evals.absorption.feature_absorption import (
    FULL_ABSORPTION_PROBE_COS_THRESHOLD, ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
    ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD, ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS,
    StatsAndLikelyFalseNegativeResults, calculate_projection_and_cos_sims)
from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator
from sae_bench.evals.absorption.k_sparse_probing import add_feature_splits_to_metrics_df
from sae_bench.evals.absorption.main import _aggregate_results_df
from sae_bench.evals.absorption.probing import LinearProbe
from sae_bench.evals.absorption.prompting import first_letter_formatter
import pandas as pd

root = sys.argv[1]
t = load_file(f"{root}/arrays.safetensors")
meta = json.load(open(f"{root}/meta.json"))
SUFFIX = " has the first letter:"
by_word = dict(zip(meta["words"], t["x_test"]))

class Model:  # hands SAEBench's calculator the activations at the word of each prompt it builds
    tokenizer = "given"
    def to_tokens(self, text):
        return torch.zeros(1, 6)
    def run_with_cache(self, prompts, names_filter):
        x = torch.stack([by_word[p.split("\n")[-1][: -len(SUFFIX)]] for p in prompts])
        acts = torch.zeros(len(prompts), 6, x.shape[1])
        acts[:, 0] = x
        return None, {names_filter[0]: acts}

probe = LinearProbe(t["probe_W"].shape[1], 26)
with torch.no_grad():
    probe.fc.weight.copy_(t["probe_W"]); probe.fc.bias.copy_(t["probe_b"])
out = {}
for name, case in meta["saes"].items():
    sae = SAE.load_from_disk(f"{root}/{name}")
    calc = FeatureAbsorptionCalculator(
        model=Model(), icl_word_list=meta["words"], max_icl_examples=10, base_template="{word}" + SUFFIX,
        answer_formatter=first_letter_formatter(), word_token_pos=-6,
        full_absorption_probe_cos_sim_threshold=FULL_ABSORPTION_PROBE_COS_THRESHOLD,
        absorption_fraction_probe_cos_sim_threshold=ABSORPTION_FRACTION_PROBE_COS_THRESHOLD,
        probe_projection_proportion_threshold=ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD,
        absorption_fraction_max_absorbing_latents=ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS)
    negs = {l: StatsAndLikelyFalseNegativeResults(len(v["words"]), 0, v["main"], v["words"])
            for l, v in case["letters"].items()}
    df = calculate_projection_and_cos_sims(calc, sae, probe, layer=0, likely_negs=negs)
    agg = _aggregate_results_df(df).set_index("letter")
    rows = []
    for l, v in case["splits"].items():
        row = {"letter": l}
        for k, (f1, feats) in enumerate(zip(v["f1"], v["ranked"]), 1):
            row[f"f1_sparse_sae_{k}"] = f1
            row[f"sparse_sae_k_{k}_feats"] = np.array(feats)
        rows.append(row)
    metrics = pd.DataFrame(rows)
    add_feature_splits_to_metrics_df(metrics, max_k_value=len(rows[0]) // 2, f1_jump_threshold=0.03)
    z_train, z_test, y_train = t[f"{name}.z_train"], t[f"{name}.z_test"], t["y_train"]
    sk, exact = {}, {}
    for l, v in case["splits"].items():
        feats, label = v["ranked"][-1], (y_train == "abcdefghijklmnopqrstuvwxyz".index(l)).numpy().astype(np.int64)
        fit = LogisticRegression(max_iter=500, class_weight="balanced").fit(z_train[:, feats].numpy(), label)
        sk[l] = fit.decision_function(z_test[:, feats].numpy()).tolist()
        fit = LogisticRegression(max_iter=10_000, tol=1e-12, class_weight="balanced").fit(
            z_train[:, feats].double().numpy(), label)
        exact[l] = fit.decision_function(z_test[:, feats].double().numpy()).tolist()
    out[name] = {
        "fraction": agg["mean_absorption_fraction"].to_dict(), "full": agg["full_absorption_rate"].to_dict(),
        "split_feats": {r.letter: list(map(int, r.split_feats)) for r in metrics.itertuples()},
        "sklearn_scores": sk, "sklearn_exact": exact,
    }
print(json.dumps(out))
"""


@pytest.mark.peers
@pytest.mark.slow
def test_saebench_absorption_functions_agree(tmp_path, planted_probe):
    """SAEBench 0.6.0's calculator, aggregation, feature-split rule and sklearn's probe on our arrays: its
    model is an adapter that returns our activations at the word (its own model loading needs the hub)."""
    if not SAEBENCH_PYTHON.exists():
        pytest.skip(f"no SAEBench venv at {SAEBENCH_PYTHON}")
    data, x, tr, te = planted()
    a_test, a_train = [int(i) for i in te if i < PER_LETTER], [int(i) for i in tr if i < PER_LETTER]
    probe = planted_probe
    s = sb.AbsorptionSettings(max_k=4)
    noisy = sb.SAE(sb.SAEConfig(d_in=D, n_latents=96, k=6, hook="h", model="m"), seed=3).eval()
    with torch.no_grad():  # partial absorption: several latents share the letter directions
        noisy.W_enc.add_(0.5 * torch.randn(D, 96, generator=torch.Generator().manual_seed(4)))
    saes = {"planted": dictionary_sae(x, a_test[:3] + a_train[:2]), "noisy": noisy}
    arrays = {"x_test": data.x_test, "y_train": data.y_train, "probe_W": probe.W, "probe_b": probe.b}
    found = probe(data.x_test) > 0
    meta: dict = {"words": data.words_test, "saes": {}}
    ours = {}
    for name, sae in saes.items():
        save_saelens(sae, tmp_path / name)
        z_train, z_test = sae.encode(data.x_train).detach(), sae.encode(data.x_test).detach()
        arrays |= {f"{name}.z_train": z_train, f"{name}.z_test": z_test}
        main, f1 = main_latents(z_train, data.y_train, z_test, data.y_test, s)
        l1 = train_probe(z_train, data.y_train, batch_size=4096, weight_decay=1e-6, l1=0.01)
        ranked = l1.W.topk(s.max_k, dim=-1).indices
        letters = {}
        for c, letter in enumerate(LETTERS):
            rows = ((data.y_test == c) & found[:, c]).nonzero().squeeze(1).tolist()
            letters[letter] = {"words": [data.words_test[r] for r in rows], "main": main[c]}
        splits = {
            LETTERS[c]: {"f1": f1[:, c].tolist(), "ranked": [ranked[c, :k].tolist() for k in range(1, s.max_k + 1)]}
            for c in range(26)
        }
        meta["saes"][name] = {"letters": letters, "splits": splits}
        ours[name] = (absorption_rates(sae, data, probe, list(range(26)), s), main, ranked, z_train, z_test)
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(tmp_path / "arrays.safetensors"))
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    run = subprocess.run(
        [str(SAEBENCH_PYTHON), "-W", "ignore", "-c", PEER_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peer = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (got, main, ranked, z_train, z_test) in ours.items():
        theirs = peer[name]
        for letter, v in got["letters"].items():
            assert v["absorption_fraction"] == pytest.approx(theirs["fraction"][letter], abs=1e-3), (name, letter)
            assert v["full_absorption_rate"] == pytest.approx(theirs["full"][letter], abs=1e-3), (name, letter)
        assert {LETTERS[c]: m for c, m in enumerate(main)} == theirs["split_feats"]
        feats = ranked[:, : s.max_k]
        y = data.y_train[None] == torch.arange(26)[:, None]
        fit = fit_logistic(z_train[:, feats].permute(1, 0, 2), y)
        scores = torch.einsum("ncK,cK->nc", z_test[:, feats], fit.W) + fit.b
        for c, letter in enumerate(LETTERS):  # SAEBench's own call stops early (float32, gtol 1e-4): within 0.05
            torch.testing.assert_close(scores[:, c], torch.tensor(theirs["sklearn_exact"][letter]), atol=1e-3, rtol=0)
            torch.testing.assert_close(scores[:, c], torch.tensor(theirs["sklearn_scores"][letter]), atol=0.05, rtol=0)
    assert any(0 < v["absorption_fraction"] < 1 for v in ours["noisy"][0]["letters"].values())
