"""The analysis pass and the feature store against brute force on a small SAE over tiny."""

import dataclasses
import math
import sqlite3
from typing import Any

import pytest
import torch
import yaml

import saebench as sb
from saebench.analysis import (
    N_BINS,
    AnalysisConfig,
    coactivation_neighbours,
    fire_hash,
    histogram_bin,
    quantiles_from_histogram,
)
from saebench.circuits import _ln
from saebench.config import RunConfig, to_dict
from saebench.errors import DataError
from saebench.harvest import Harvester
from saebench.sae.families import Activation

HOOK = "blocks.0.hook_resid_post"
CFG = AnalysisConfig(
    n_examples=5, n_samples=12, n_intervals=4, per_interval=2, coact_tokens=3000, batch_size=8, n_neighbours=6
)


def make_run(
    root, activation: Activation = "topk", n_latents=128, k=6, hooks=(HOOK,), name="t", model="tiny", d_in=192
):
    rc = RunConfig(name=name, model=model, runs_dir=str(root / "runs"))
    rc.data = dataclasses.replace(rc.data, split="test", context_size=32, max_documents=40)
    rc.harvest.hooks = list(hooks)
    run = rc.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(rc)))
    for n, hook in enumerate(hooks):
        sae = sb.SAE(
            sb.SAEConfig(d_in=d_in, n_latents=n_latents, activation=activation, k=k, hook=hook, model=model), seed=n
        )
        if activation in ("batchtopk", "feature_choice", "jumprelu"):
            sae.set_threshold(torch.full((n_latents,), 1.5))
        sae.save(run / "sae" if len(hooks) == 1 else run / hook / "sae")
    return run, rc


def brute_force(model, rc, sae, k=None):
    """Dense codes (at k', given k) of every analysed token: z [rows n], token ids [rows], contexts [n_ctx ctx]."""
    contexts = sb.load_contexts(rc.data, model.tokenizer, show_progress=False)
    acts, keep = Harvester(model, [sae.cfg.hook]).activations(contexts.tokens, contexts.special_mask)
    b, pos = keep.nonzero(as_tuple=True)
    with torch.no_grad():
        z = sae.encode(acts[sae.cfg.hook], k=k)
    return z, b * contexts.tokens.shape[1] + pos, contexts.tokens


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny):
    run, rc = make_run(tmp_path_factory.mktemp("analysis"))
    summary = sb.analyze(run, CFG, show_progress=False)
    sae = sb.SAE.load(run / "sae")
    z, token, contexts = brute_force(tiny, rc, sae)
    return run, summary, sae, z, token, contexts


def top_by_brute_force(z, token, f, k):
    mag = z[:, f].abs()
    rows = mag.nonzero().squeeze(-1)
    order = sorted(rows.tolist(), key=lambda r: (-float(mag[r]), int(token[r])))
    return [(int(token[r]), float(z[r, f])) for r in order[:k]]


def test_statistics_equal_brute_force(analysed):
    run, summary, sae, z, token, _ = analysed
    store = sb.FeatureStore(run)
    assert summary["n_tokens"] == len(z) == store.meta["n_tokens"]
    fires = (z != 0).sum(0)
    table = store.table()
    assert table["n_fires"].tolist() == fires.tolist()
    for f in range(0, sae.cfg.n_latents, 7):
        card = store.feature(f)
        values = z[:, f][z[:, f] != 0].abs()
        assert card.n_fires == len(values) and card.density == pytest.approx(len(values) / len(z))
        if not len(values):
            continue
        assert card.max_activation == pytest.approx(float(values.max()), rel=1e-6)
        assert card.min_activation == pytest.approx(float(values.min()), rel=1e-6)
        assert card.mean_activation == pytest.approx(float(values.double().mean()), rel=1e-5)
        assert card.std_activation == pytest.approx(float(values.double().std(unbiased=False)), rel=1e-3, abs=1e-5)
        counts = torch.bincount(histogram_bin(values), minlength=N_BINS)
        lo, hi = int(counts.nonzero().min()), int(counts.nonzero().max())
        assert card.histogram == (store.edges[lo : hi + 2], counts[lo : hi + 1].tolist())
        want = quantiles_from_histogram(counts[None], values.min()[None], values.max()[None])[0]
        assert list(card.quantiles.values()) == pytest.approx(want.tolist(), rel=1e-5)
        exact = torch.quantile(values.double(), torch.tensor(list(card.quantiles), dtype=torch.float64))
        # read from 20-per-decade bins, each quantile lies within two bins of the exact one
        assert (torch.tensor(list(card.quantiles.values())).double().log10() - exact.log10()).abs().max() <= 2 / 20


@pytest.mark.slow
def test_analysis_at_k_prime_equals_brute_force(tmp_path, tiny):
    run, rc = make_run(tmp_path, activation="hierarchical_topk", k=6)
    n = sb.analyze(run, dataclasses.replace(CFG, k=2, n_tokens=2000), show_progress=False)["n_tokens"]
    z, token, _ = brute_force(tiny, rc, sb.SAE.load(run / "sae"), k=2)
    z, token = z[:n], token[:n]  # the analysed contexts: the first ones, whole
    store = sb.FeatureStore(run)
    assert (store.meta["inference_k"], store.meta["k"]) == (2, 6) and (z != 0).sum(-1).max() == 2
    assert store.table()["n_fires"].tolist() == (z != 0).sum(0).tolist()
    for f in range(0, 128, 9):
        want = top_by_brute_force(z, token, f, CFG.n_examples)
        assert [v for v in (ex.value for ex in store.feature(f).top_examples)] == pytest.approx([v for _, v in want])
    batch, _ = make_run(tmp_path, activation="batchtopk", name="batch")
    with pytest.raises(sb.ConfigError, match="learned threshold"):
        sb.analyze(batch, dataclasses.replace(CFG, k=2), show_progress=False)


def test_top_examples_are_the_exact_top_activations(analysed):
    run, _, sae, z, token, contexts = analysed
    store = sb.FeatureStore(run)
    ctx = contexts.shape[1]
    for f in range(sae.cfg.n_latents):
        card = store.feature(f)
        got = [(ex.context * ctx + ex.position, ex.value) for ex in card.top_examples]
        want = top_by_brute_force(z, token, f, CFG.n_examples)
        assert [t for t, _ in got] == [t for t, _ in want], f
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
        for ex in card.top_examples[:2]:
            assert ex.tokens == contexts[ex.context].tolist()
            rows = (token // ctx) == ex.context
            dense = torch.zeros(ctx)
            dense[token[rows] % ctx] = z[rows, f]
            assert ex.acts == pytest.approx(dense.tolist(), rel=1e-3, abs=1e-3)  # stored as float16
            assert ex.acts[ex.position] == pytest.approx(ex.value, rel=1e-3)


def test_rerunning_the_model_on_a_stored_example_reproduces_its_value(analysed, tiny):
    run, *_ = analysed
    store, sae = sb.FeatureStore(run), sb.SAE.load(run / "sae")
    for f in (0, 5, 17):
        for ex in store.feature(f).top_examples[:3] + store.feature(f).quantile_examples[0].examples[:1]:
            acts = Harvester(tiny, [HOOK], exclude_special=False).forward(torch.tensor([ex.tokens]))[HOOK][0]
            with torch.no_grad():
                assert float(sae.encode(acts)[ex.position, f]) == pytest.approx(ex.value, rel=1e-5, abs=1e-6)


def test_interval_examples_are_a_seeded_uniform_sample_inside_their_quantile_intervals(analysed):
    run, _, sae, z, token, contexts = analysed
    store = sb.FeatureStore(run)
    ctx = contexts.shape[1]
    for f in range(0, sae.cfg.n_latents, 5):
        card = store.feature(f)
        rows = (z[:, f] != 0).nonzero().squeeze(-1)
        if not len(rows):
            assert all(not iv.examples for iv in card.quantile_examples)
            continue
        keys = fire_hash(token[rows], torch.full_like(rows, f), CFG.seed)
        sample = rows[keys.argsort()[: CFG.n_samples]]  # the fires with the smallest keys, in key order
        edges = [iv.low for iv in card.quantile_examples] + [card.quantile_examples[-1].high]
        assert [iv.q_low for iv in card.quantile_examples] == [j / CFG.n_intervals for j in range(CFG.n_intervals)]
        want: dict[int, list[int]] = {}
        for r in sample.tolist():
            j = int(torch.searchsorted(torch.tensor(edges[1:-1]), torch.tensor(abs(float(z[r, f]))), right=True))
            want.setdefault(j, []).append(int(token[r]))
        for j, iv in enumerate(card.quantile_examples):
            got = [ex.context * ctx + ex.position for ex in iv.examples]
            assert got == want.get(j, [])[: CFG.per_interval]
            for ex in iv.examples:
                assert iv.low - 1e-5 <= abs(ex.value) <= iv.high + 1e-5


def test_decoder_neighbours_equal_the_dense_cosine_matrix(analysed):
    run, _, sae, *_ = analysed
    store = sb.FeatureStore(run)
    w = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    cos = (w @ w.T).fill_diagonal_(-math.inf)
    vals, ids = cos.topk(CFG.n_neighbours, dim=-1)
    for f in range(0, sae.cfg.n_latents, 3):
        got = store.feature(f).decoder_neighbours
        assert [j for j, _ in got] == ids[f].tolist()
        assert [v for _, v in got] == pytest.approx(vals[f].tolist(), abs=1e-5)


def test_coactivation_neighbours_are_the_top_jaccard_over_the_sample(analysed):
    run, _, sae, z, *_ = analysed
    store = sb.FeatureStore(run)
    fired = (z[: CFG.coact_tokens] != 0).float()
    assert store.meta["coactivation_tokens"] == CFG.coact_tokens
    co = fired.T @ fired
    jac = co / (fired.sum(0)[:, None] + fired.sum(0)[None] - co).clamp_min(1)
    jac.fill_diagonal_(0)
    for f in range(0, sae.cfg.n_latents, 3):
        got = store.feature(f).coactivation_neighbours
        want = jac[f].topk(CFG.n_neighbours).values
        want = want[want > 0]
        assert [v for _, v in got] == pytest.approx(want.tolist(), abs=1e-5)
        assert all(jac[f, j] == pytest.approx(v, abs=1e-5) for j, v in got)  # ties may order either way


@pytest.mark.parametrize("method", ["pairs", "sparse"])
def test_coactivation_by_hand(method):
    # tokens 0..3; feature 0 fires on {0,1,2}, 1 on {1,2}, 2 on {3}, 3 on {0}
    tokens = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    feats = torch.tensor([0, 3, 0, 1, 0, 1, 2])
    ids, vals = coactivation_neighbours(tokens, feats, n=4, k=2, method=method)
    assert ids[0].tolist() == [1, 3] and vals[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert ids[2].tolist() == [-1, -1]  # fires alone
    assert ids[1].tolist() == [0, -1] and vals[1].tolist() == pytest.approx([2 / 3, 0])


def test_coactivation_methods_agree_on_real_codes(analysed):
    *_, z, token, _ = analysed
    rows, feats = (z[:2000] != 0).nonzero(as_tuple=True)
    a_ids, a_vals = coactivation_neighbours(rows, feats, z.shape[1], 6, method="pairs")
    b_ids, b_vals = coactivation_neighbours(rows, feats, z.shape[1], 6, method="sparse")
    assert torch.allclose(a_vals, b_vals, atol=1e-6)


def test_logit_lens_by_hand_through_the_final_norm(analysed, tiny):
    run, _, sae, *_ = analysed
    store = sb.FeatureStore(run)
    w, b = _ln(tiny, tiny.cfg.n_layers)
    v = sae.W_dec.detach()
    centred = v - v.mean(-1, keepdim=True)
    normed = centred / (centred.pow(2).mean(-1, keepdim=True) + tiny.cfg.eps).sqrt() * w + b
    logits = normed @ tiny.W_U
    for f in (0, 9, 40):
        lens = store.feature(f).logit_lens
        assert lens is not None
        top, bottom = lens
        want_top = logits[f].topk(CFG.n_logit)
        want_bottom = logits[f].topk(CFG.n_logit, largest=False)
        assert [p for p, _ in top] == store.pieces(want_top.indices.tolist())
        assert [x for _, x in top] == pytest.approx(want_top.values.tolist(), abs=1e-3)
        assert [p for p, _ in bottom] == store.pieces(want_bottom.indices.tolist())


def test_search_finds_a_feature_by_its_top_token_and_by_its_label(analysed):
    run, *_ = analysed
    store = sb.FeatureStore(run, writable=True)
    table: Any = store.table()
    word = next(r for r in table.itertuples() if r.top_token.strip().isalpha() and len(r.top_token.strip()) > 3)
    hits = store.search(word.top_token.strip(), limit=store.n_features)
    assert word.feature in hits["feature"].tolist()
    store.set_label(7, "zebra crossings", note="from a test")
    assert store.search("zebra")["feature"].tolist() == [7]
    assert store.feature(7).label == "zebra crossings" and store.feature(7).note == "from a test"
    assert store.search('"unbalanced ( quotes').empty  # user text is quoted, never FTS syntax


def test_store_refuses_bad_input_with_clear_errors(analysed, tmp_path):
    run, *_ = analysed
    store = sb.FeatureStore(run)
    with pytest.raises(DataError, match=r"feature 128 is out of range: this SAE has 128 features \(0-127\)"):
        store.feature(128)
    with pytest.raises(DataError, match="read-only"):
        store.set_label(1, "x")
    with pytest.raises(DataError, match="run `saebench analyze"):
        sb.FeatureStore(tmp_path)
    for key, value, message in [
        ("schema_version", "0", "schema 0, this saebench reads 1"),
        ("complete", "false", "unfinished analysis"),
    ]:
        copy = tmp_path / f"{key}.sqlite"
        copy.write_bytes((run / "features.sqlite").read_bytes())
        with sqlite3.connect(copy) as con:
            con.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        with pytest.raises(DataError, match=message):
            sb.FeatureStore(copy)


def test_features_firing_on_a_prompt_equal_the_sae_encoding(analysed, tiny):
    run, _, sae, *_ = analysed
    store = sb.FeatureStore(run)
    got = sb.features_firing_on(tiny, sae, HOOK, "In the beginning God created", top=4, vocab=store.vocab)
    ids = [t.token for t in got.tokens]
    acts = Harvester(tiny, [HOOK], exclude_special=False).forward(torch.tensor([ids]))[HOOK][0]
    z = sae.encode(acts)
    assert got.tokens[0].special and got.tokens[0].features == [] and not got.truncated
    for t in got.tokens[1:]:
        want = z[t.position].abs().topk(4)
        assert [j for j, _ in t.features] == want.indices.tolist()
        assert [v for _, v in t.features] == pytest.approx(z[t.position, want.indices].tolist(), rel=1e-5)
    assert sb.features_firing_on(tiny, sae, HOOK, "word " * 400, vocab=store.vocab).truncated


def test_reanalysis_keeps_labels(tmp_path, tiny):
    run, _ = make_run(tmp_path)
    cfg = dataclasses.replace(CFG, n_tokens=600)
    sb.analyze(run, cfg, show_progress=False)
    sb.FeatureStore(run, writable=True).set_label(3, "kept")
    (run / "eval.json").write_text('{"sae": {"fvu": 0.25}}')
    sb.analyze(run, dataclasses.replace(cfg, n_tokens=900), show_progress=False)
    store = sb.FeatureStore(run)
    assert store.feature(3).label == "kept" and store.meta["n_tokens"] >= 900
    assert store.meta["eval"] == {"sae": {"fvu": 0.25}}
    assert store.search("kept")["feature"].tolist() == [3]


@pytest.mark.parametrize("activation", ["abstopk", "batchtopk", "jumprelu"])
def test_other_families_against_brute_force(tmp_path, tiny, activation):
    run, rc = make_run(tmp_path, activation=activation, n_latents=64, k=4)
    sb.analyze(run, dataclasses.replace(CFG, n_tokens=1500), show_progress=False)
    sae = sb.SAE.load(run / "sae")
    store = sb.FeatureStore(run)
    z, token, contexts = brute_force(tiny, rc, sae)
    z, token = z[: store.meta["n_tokens"]], token[: store.meta["n_tokens"]]
    negative_tops = 0
    assert store.table()["n_fires"].tolist() == (z != 0).sum(0).tolist()
    for f in range(0, 64, 4):
        card = store.feature(f)
        want = top_by_brute_force(z, token, f, CFG.n_examples)
        assert [ex.context * contexts.shape[1] + ex.position for ex in card.top_examples] == [t for t, _ in want]
        assert [ex.value for ex in card.top_examples] == pytest.approx([v for _, v in want], rel=1e-6)
        if activation == "abstopk" and card.n_fires:
            col = z[:, f][z[:, f] != 0]
            assert card.positive_fraction == pytest.approx(float((col > 0).float().mean()))
            assert card.mean_signed == pytest.approx(float(col.double().mean()), rel=1e-5, abs=1e-6)
            negative_tops += sum(ex.value < 0 for ex in card.top_examples)
    assert negative_tops > 0 if activation == "abstopk" else negative_tops == 0  # ranked by |z|, sign kept


def test_a_multi_hook_run_gets_one_store_per_sae(tmp_path):
    run, _ = make_run(tmp_path, hooks=(HOOK, "blocks.1.hook_resid_post"), n_latents=32, k=4)
    summary = sb.analyze(run, dataclasses.replace(CFG, n_tokens=500), show_progress=False)
    assert len(summary["stores"]) == 2
    with pytest.raises(DataError, match="several hooks"):
        sb.FeatureStore(run)
    store = sb.FeatureStore(run, hook="blocks.1.hook_resid_post")
    assert store.meta["hook"] == "blocks.1.hook_resid_post" and store.n_features == 32


def test_store_is_wal_and_an_encoder_model_gets_no_logit_lens(tmp_path):
    run, _ = make_run(tmp_path, model="minilm", d_in=384, n_latents=64, k=4)
    sb.analyze(run, dataclasses.replace(CFG, n_tokens=400), show_progress=False)
    with sqlite3.connect(run / "features.sqlite") as con:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store = sb.FeatureStore(run)
    assert "skipped" in store.meta["logit_lens_note"]
    assert all(store.feature(f).logit_lens is None for f in range(4))
    assert store.feature(0).decoder_neighbours  # the rest of the card is there
