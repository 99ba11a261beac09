"""The app's pages under streamlit's AppTest: what they show is what the library computes."""

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from streamlit.testing.v1 import AppTest
from test_analysis import HOOK, make_run

import saebench as sb
from saebench.analysis import AnalysisConfig
from saebench.app_launcher import RUNS_ENV
from saebench.evaluate import EVAL_METRICS
from saebench.pipeline import eval_from_config

APP = Path(__file__).resolve().parents[1] / "saebench" / "app"


@pytest.fixture(scope="module")
def app_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    run, rc = make_run(root, name="analysed")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"].update(n_tokens=2000, n_contexts=4)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "fvu": 1 / (s + 1), "l0": 6.0}) + "\n" for s in range(5))
    )
    eval_from_config(run)
    sb.analyze(
        run,
        AnalysisConfig(n_tokens=1500, n_examples=5, n_samples=12, n_intervals=4, per_interval=2),
        show_progress=False,
    )
    bare, _ = make_run(root, name="bare")  # trained, never analysed
    return run, bare


def page(name, runs, monkeypatch, **params):
    monkeypatch.setenv(RUNS_ENV, ":".join(str(r) for r in runs))
    at = AppTest.from_file(str(APP / name), default_timeout=120)
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def markdown_text(at):
    return "\n".join(m.value for m in at.markdown)


def test_home_shows_eval_and_the_feature_table(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("Home.py", [run], monkeypatch)
    result = json.loads((run / "eval.json").read_text())
    table: Any = at.dataframe[0].value
    assert table.set_index("metric")["sae"]["fvu"] == pytest.approx(result["sae"]["fvu"])
    assert table.set_index("metric")["random SAE"]["ce_recovered"] == pytest.approx(
        result["random_baseline"]["ce_recovered"]
    )
    features = at.dataframe[1].value
    want = sb.FeatureStore(run).table()
    assert features["feature"].tolist() == want["feature"].tolist()
    assert features["n_fires"].tolist() == want["n_fires"].tolist()
    assert features["open"].iloc[3].endswith("feature=3")


def test_home_shows_each_suite_next_to_the_random_baseline(tmp_path, monkeypatch):
    run, rc = make_run(tmp_path, name="suites")
    sections = {
        "probing": {"source": {"dense": 0.97, "sae": {"1": 0.61, "5": 0.88}, "random": {"1": 0.31, "5": 0.42}}},
        "consistency": {
            "against": "runs/b",
            "sae": {"mcc": 0.7},
            "random": {"mcc": 0.2},
            "settings": {"against": None},
        },
    }
    core = {"sae": {"fvu": 0.1, "l0": 6.0}, "random_baseline": {"fvu": 0.9, "l0": 6.0}, "ce_convention": "sae_bench"}
    core["seconds"] = {"core": 12.5, "probing": 30.0, "consistency": 4.0}  # a caption, not a table
    sb.Run(run).write_eval(rc.harvest.hooks[0], {**core, **sections})
    at = page("Home.py", [run], monkeypatch)
    tables: list[Any] = [d.value for d in at.dataframe]
    core_table, probing, consistency = tables
    assert core_table.set_index("metric")["random SAE"]["fvu"] == 0.9
    assert core_table.set_index("metric")["what it is"]["fvu"] == EVAL_METRICS["fvu"]
    probing = probing.set_index("metric")
    assert probing.loc["source · 5", "sae"] == 0.88 and probing.loc["source · 5", "random SAE"] == 0.42
    assert probing.loc["source · dense", "value"] == 0.97
    assert consistency.set_index("metric").loc["mcc"].tolist() == [0.7, 0.2]
    assert "**probing**" in markdown_text(at) and "**consistency**" in markdown_text(at)
    assert any("`sae_bench` convention" in c.value for c in at.caption)
    assert any(c.value == "seconds per suite: core 12.5, probing 30.0, consistency 4.0" for c in at.caption)


def test_home_filters_the_table(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("Home.py", [run], monkeypatch)
    token = sb.FeatureStore(run).table().top_token.iloc[0]
    at.text_input(key="filter").input(token).run()
    shown = at.dataframe[1].value
    assert len(shown) >= 1 and all(token.lower() in t.lower() for t in shown.top_token)


def test_feature_page_shows_the_stored_card(app_runs, monkeypatch):
    run, _ = app_runs
    card = sb.FeatureStore(run).feature(4)
    at = page("pages/1_Feature.py", [run], monkeypatch, feature=4)
    assert at.title[0].value.startswith("Feature 4")
    text = markdown_text(at)
    assert f"**{card.top_examples[0].value:.3f}** · context {card.top_examples[0].context}" in text
    assert text.index(f"**{card.top_examples[0].value:.3f}**") < text.index(f"**{card.top_examples[-1].value:.3f}**")
    assert f'feature={card.decoder_neighbours[0][0]}" target="_self"' in text  # neighbours link to their pages
    assert at.metric[1].value == f"{card.n_fires:,}"
    logit = at.dataframe[0].value
    assert card.logit_lens is not None
    assert logit["promoted"].tolist() == [p for p, _ in card.logit_lens[0]]


def test_feature_page_saves_a_label_to_the_store(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/1_Feature.py", [run], monkeypatch, feature=2)
    at.text_input[1].input("dialogue quotes")
    at.form_submit_button[0].click().run()
    assert not at.exception and at.success[0].value == "saved"
    with sqlite3.connect(run / "features.sqlite") as con:
        assert con.execute("SELECT label FROM labels WHERE feature = 2").fetchone() == ("dialogue quotes",)


def test_feature_page_search_and_navigation(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/1_Feature.py", [run], monkeypatch, feature=5)
    at.button[1].click().run()  # next
    assert at.title[0].value.startswith("Feature 6")
    at.text_input(key="search").input("17").run()
    assert at.title[0].value.startswith("Feature 17")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"feature": 999}, "feature 999 is out of range: this SAE has 128 features (0-127)"),
        ({"feature": "abc"}, "is not a number"),
        ({"run": 7}, "There is no run 7"),
    ],
)
def test_feature_page_bad_input_is_a_message(app_runs, monkeypatch, params, message):
    run, _ = app_runs
    at = page("pages/1_Feature.py", [run], monkeypatch, **params)
    shown = [e.value for e in at.error] + [w.value for w in at.warning]
    assert any(message in s for s in shown), shown


def test_a_run_without_analysis_says_what_to_run(app_runs, monkeypatch):
    _, bare = app_runs
    for name in ("Home.py", "pages/1_Feature.py"):
        at = page(name, [bare], monkeypatch)
        assert any(f"saebench analyze {bare}" in i.value for i in at.info), [i.value for i in at.info]


def test_an_older_store_is_a_message_not_a_traceback(app_runs, monkeypatch, tmp_path):
    run, _ = app_runs
    old, _ = make_run(tmp_path, name="old")
    (old / "features.sqlite").write_bytes((run / "features.sqlite").read_bytes())
    with sqlite3.connect(old / "features.sqlite") as con:
        con.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    at = page("pages/1_Feature.py", [old], monkeypatch)
    assert any("rerun `saebench analyze`" in e.value for e in at.error)


def test_app_command_refuses_a_path_that_is_no_run(tmp_path):
    from test_cli import one_error_line, run_cli

    line = one_error_line(run_cli("app", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert "is not a run directory" in line and "saebench train" in line


def test_prompt_page_lists_the_features_the_store_computes(app_runs, monkeypatch, tiny):
    run, _ = app_runs
    prompt = "And God said, Let there be light"
    store = sb.FeatureStore(run)
    want = sb.features_firing_on(tiny, sb.SAE.load(run / "sae"), store.meta["hook"], prompt, top=64, vocab=store.vocab)
    at = page("pages/2_Prompt.py", [run], monkeypatch, prompt=prompt)
    table = at.dataframe[0].value
    assert table["token"].tolist() == [t.piece for t in want.tokens]
    first = want.tokens[1].features[:5]
    assert table["features"].iloc[1] == ", ".join(f"{f} ({v:.2f})" for f, v in first)
    at.selectbox(key="token").select(3).run()
    listed = markdown_text(at)
    assert all(f'feature={f}"' in listed for f, _ in want.tokens[3].features)


def test_prompt_page_empty_and_too_long_prompts(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/2_Prompt.py", [run], monkeypatch)
    assert any("Type some text" in i.value for i in at.info)
    at = page("pages/2_Prompt.py", [run], monkeypatch, prompt="word " * 400)
    assert any("longer than the model's context" in w.value for w in at.warning)


@pytest.fixture(scope="module")
def hierarchical_run(tmp_path_factory):
    run, _ = make_run(tmp_path_factory.mktemp("hierarchical"), activation="hierarchical_topk", k=6, name="hier")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"].update(n_tokens=2000, n_contexts=4)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    eval_from_config(run, ks=[2, 6])
    sb.analyze(run, AnalysisConfig(n_tokens=1500, n_examples=5, n_samples=12, k=2), show_progress=False)
    return run


@pytest.mark.slow
def test_a_hierarchical_sae_gets_a_k_prime_selector_and_its_eval_at_each_k(
    hierarchical_run, app_runs, monkeypatch, tiny
):
    run, prompt = hierarchical_run, "And God said, Let there be light"
    result = json.loads((run / "eval.json").read_text())
    at = page("Home.py", [run], monkeypatch)
    by_k: Any = at.dataframe[1].value.set_index("metric")
    assert by_k["sae k′=2"]["fvu"] == pytest.approx(result["by_k"]["2"]["sae"]["fvu"])
    assert by_k["random k′=6"]["ce_recovered"] == pytest.approx(result["by_k"]["6"]["random_baseline"]["ce_recovered"])
    assert any("analysed at k′=2" in c.value for c in at.caption)

    sae, store = sb.SAE.load(run / "sae"), sb.FeatureStore(run)
    at = page("pages/2_Prompt.py", [run], monkeypatch, prompt=prompt, k=2)
    assert at.select_slider(key="k").value == 2 and at.query_params["k"] == "2"

    def shown_features(at):
        return [row for row in at.dataframe[0].value["features"]]

    for k in (2, 5):
        want = sb.features_firing_on(tiny, sae, HOOK, prompt, top=64, vocab=store.vocab, k=k)
        assert shown_features(at) == [
            "" if t.special else ", ".join(f"{f} ({v:.2f})" for f, v in t.features[:5]) for t in want.tokens
        ]
        assert max(len(t.features) for t in want.tokens) == k
        at.select_slider(key="k").set_value(5).run()
    assert at.query_params["k"] == "5"
    at = page("pages/2_Prompt.py", [run], monkeypatch, prompt=prompt, k=99)
    assert any("outside 1..6" in w.value for w in at.warning) and at.select_slider(key="k").value == 6

    plain, _ = app_runs  # a topk SAE: no selector, and an eval without --k has no by_k
    assert not page("pages/2_Prompt.py", [plain], monkeypatch, prompt=prompt).select_slider
    assert "by_k" not in json.loads((plain / "eval.json").read_text())


@pytest.fixture(scope="module")
def upstream_run(tmp_path_factory):
    run, _ = make_run(
        tmp_path_factory.mktemp("upstream"), hooks=("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"), name="upstream"
    )
    return run


def test_steer_page_shows_what_compare_steering_computes(app_runs, monkeypatch, tiny):
    run, _ = app_runs
    prompt, feats = "And God said", {3: 5.0, 7: -2.0}
    at = page(
        "pages/3_Steer.py",
        [run],
        monkeypatch,
        prompt=prompt,
        features="3:5,7:-2",
        mult=2,
        mode="add",
        positions="generated",
        temp=0.7,
        seed=4,
        tokens=6,
    )
    sae = sb.SAE.load(run / "sae")
    want = sb.compare_steering(
        tiny,
        sae,
        {f: 2 * v for f, v in feats.items()},
        prompt,
        mode="add",
        positions="generated",
        max_new_tokens=6,
        temperature=0.7,
        seed=4,
    )
    table = at.dataframe[0].value
    assert table["steered"].tolist() == want.steered.pieces and table["default"].tolist() == want.default.pieces
    assert table["steered_logprob"].tolist() == pytest.approx(want.steered.logprobs, abs=1e-5)
    assert [m.value for m in at.metric] == [f"{want.default.perplexity:.2f}", f"{want.steered.perplexity:.2f}"]
    assert at.query_params["features"] == ["3:5,7:-2"] or at.query_params["features"] == "3:5,7:-2"
    assert 'feature=3"' in markdown_text(at)  # each steered feature links to its page


def test_steer_page_sweep_and_ranking_come_from_the_library(app_runs, monkeypatch, tiny):
    run, _ = app_runs
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="The", features="4:3", tokens=4, sweep="0,2", rank="")
    sae, store = sb.SAE.load(run / "sae"), sb.FeatureStore(run)
    rows = sb.steering_sweep(tiny, sae, {4: 3.0}, [0.0, 2.0], "The", max_new_tokens=4)
    sweep = at.dataframe[1].value
    assert sweep["text"].tolist() == [r["text"] for r in rows]
    assert sweep["concept"].tolist() == pytest.approx([r["concept"] for r in rows], abs=1e-5)
    densest = store.table().nlargest(20, "density").feature.tolist()
    ranked = at.dataframe[2].value
    want = sb.rank_by_output_score(tiny, sae, densest)
    assert ranked["feature"].tolist() == want["feature"].tolist()
    assert ranked["output_score"].tolist() == pytest.approx(want["output_score"].tolist(), abs=1e-6)


def test_steer_page_adds_features_and_reports_errors(app_runs, monkeypatch):
    run, bare = app_runs
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="The", tokens=4)
    assert any("Add features" in i.value for i in at.info)
    at.text_input(key="add").input("9").run()
    next(b for b in at.button if b.label.startswith("add 9")).click().run()
    assert not at.exception
    assert "9:" in str(at.query_params["features"])
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="word " * 120, features="9:1", tokens=32)
    assert any("exceeds the model's context" in e.value for e in at.error)
    at = page(
        "pages/3_Steer.py", [bare], monkeypatch, prompt="The", features="2:4", tokens=3
    )  # steering needs no analysis
    assert any(f"saebench analyze {bare}" in i.value for i in at.info) and len(at.dataframe) == 1


def test_trace_page_shows_what_trace_attention_computes(app_runs, upstream_run, monkeypatch, tiny):
    run, _ = app_runs
    prompt = "The cat sat on the mat. The cat sat on the mat."
    at = page("pages/4_Trace.py", [upstream_run, run], monkeypatch, prompt=prompt, layer=1, head=2, q=9)
    saes = {
        h: sb.SAE.load(p)
        for h, p in (
            ("blocks.0.attn.hook_z", upstream_run / "blocks.0.attn.hook_z" / "sae"),
            ("blocks.0.hook_mlp_out", upstream_run / "blocks.0.hook_mlp_out" / "sae"),
            ("blocks.0.hook_resid_post", run / "sae"),
        )
    }
    r = sb.trace_attention(tiny, prompt, 1, 2, 9, saes=saes, logit_tokens="top")
    assert at.metric[0].value == f"9 → {r.key_pos}" and at.metric[2].value == f"{r.score:.3f}"
    pairs = at.dataframe[0].value
    want = r.top_pairs(20)
    assert pairs["query_component"].tolist() == want["query_component"].tolist()
    assert pairs["score"].tolist() == pytest.approx(want["score"].tolist(), abs=1e-5)
    feature_rows = pairs[pairs.query_component.str.contains(":f")]
    assert len(feature_rows) and all(
        f"run=1&hook=blocks.0.hook_resid_post&feature={c.rsplit(':f', 1)[1]}" in u
        for c, u in zip(feature_rows.query_component, feature_rows["query page"], strict=True)
    )
    logit = at.dataframe[3].value
    assert logit["component"].tolist() == r.logit_table(20)["component"].tolist()
    z_rows = logit[logit.component.str.startswith("blocks.0.attn.hook_z:f")]
    assert len(z_rows) and all(u.startswith("./Feature?run=0&hook=blocks.0.attn.hook_z&feature=") for u in z_rows.page)
    assert at.query_params["layer"] in ("1", ["1"]) and at.query_params["q"] in ("9", ["9"])


def test_trace_page_head_finder_picks_the_best_induction_head(app_runs, monkeypatch, tiny):
    run, _ = app_runs
    at = page("pages/4_Trace.py", [run], monkeypatch)
    rc = sb.load_config(run / "config.yaml")
    import dataclasses

    contexts = sb.load_contexts(
        dataclasses.replace(rc.data, split="test", max_documents=200), tiny.tokenizer, show_progress=False
    )
    best = divmod(int(sb.head_scores(tiny, contexts)["induction"].argmax()), tiny.cfg.n_heads)
    assert (at.selectbox(key="layer").value, at.selectbox(key="head").value) == best
    at.selectbox(key="layer").select(0).run()
    at.selectbox(key="k").select(1).run()
    assert not at.exception and at.metric[0].value.endswith("→ 1")
    at = page("pages/4_Trace.py", [run], monkeypatch, prompt="word " * 400)
    assert any("Shorten it" in e.value for e in at.error)


def test_feature_page_opens_steer_and_trace(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/1_Feature.py", [run], monkeypatch, feature=4)
    urls = [b.proto.url for b in at.get("link_button")]
    assert any(u.startswith("./Steer?run=0&hook=blocks.0.hook_resid_post&features=4:") for u in urls)
    assert any(u.startswith("./Trace?run=0&prompt=") for u in urls)


def test_steer_page_strength_zero_is_the_default_and_fifty_is_not(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="And God said", features="4:0", tokens=8)
    table = at.dataframe[0].value
    assert table["steered"].tolist() == table["default"].tolist()
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="And God said", features="4:50", tokens=8)
    table = at.dataframe[0].value
    assert table["steered"].tolist() != table["default"].tolist()


def test_steer_page_unknown_feature_is_a_message(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="The", features="99999:3", tokens=4)
    assert any("feature 99999 is out of range: this SAE has 128 features" in e.value for e in at.error), [
        e.value for e in at.error
    ]
    at = page("pages/3_Steer.py", [run], monkeypatch, prompt="The", features="x:y", tokens=4)
    assert any("is not FEATURE:STRENGTH" in w.value for w in at.warning)


def test_trace_page_pairs_sum_to_the_score_and_bad_input_is_a_message(app_runs, monkeypatch):
    run, _ = app_runs
    at = page("pages/4_Trace.py", [run], monkeypatch, prompt="And God said, Let there be light", layer=1, head=1)
    score, pair_sum = at.metric[2].value, at.metric[3].value
    assert score == pair_sum
    at = page("pages/4_Trace.py", [run], monkeypatch, prompt="And God said", layer=1, head=99)
    assert any("There is no head 99 (they run 0..5)" in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.metric  # and the page still traces the default head
    at = page("pages/4_Trace.py", [run], monkeypatch, prompt="And God said", layer=7, q=50)
    warned = " ".join(w.value for w in at.warning)
    assert "There is no layer 7" in warned and "There is no query position 50" in warned
    at = page("pages/4_Trace.py", [run], monkeypatch, prompt=" ")
    assert any("Type a prompt" in i.value for i in at.info)


def test_trace_page_summarizes_the_induction_circuit_as_the_library_does(app_runs, monkeypatch, tiny):
    from saebench.induction import summarize_induction

    run, _ = app_runs
    at = page("pages/4_Trace.py", [run], monkeypatch, layer=1, head=2)
    assert "second-copy tokens traced" not in [m.label for m in at.metric]  # nothing summarized before the button
    at.button(key="induction").click().run()
    assert not at.exception, [e.value for e in at.exception]
    rc = sb.load_config(run / "config.yaml")
    contexts = sb.load_contexts(
        dataclasses.replace(rc.data, split="test", max_documents=300), tiny.tokenizer, show_progress=False
    )
    saes = sb.Run(run).load_saes()
    want = summarize_induction(tiny, saes, 1, 2, contexts.tokens, span=32, n_prompts=8)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["second-copy tokens traced"] == str(want.n_traces)
    assert metrics["attention on the induction key"] == f"{want.mean_attention:.3f}"
    key_groups = at.dataframe[-4].value
    assert key_groups["component group"].tolist() == list(want.key_groups)
    assert key_groups["key-side share"].tolist() == pytest.approx(list(want.key_groups.values()), abs=1e-6)
    key_features = at.dataframe[-2].value
    assert key_features["component"].tolist() == [row[0] for row in want.key_features]
    assert key_features["top examples' previous token"].tolist() == [row[3] for row in want.key_features]
