"""The interp suite: the offline explainer and its scores against hand-built windows, the chat client against
a local OpenAI-compatible server, and the suite end to end on a small analysed run over tiny."""

import json
import random
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from test_analysis import make_run

import saebench as sb
from saebench import cli
from saebench.analysis import AnalysisConfig
from saebench.errors import DataError
from saebench.evals.explainers import ChatExplainer, OfflineExplainer, quoted_terms, term_ends
from saebench.evals.interp import FeatureExamples, Window, background, balanced_accuracy, feature_examples, score
from saebench.pipeline import eval_from_config

WORDS = [" the", " Lord", " my", " light", " and", " day", " said", " God", ",", "."]
SMALL = ["eval.interp.n_features=12", "eval.interp.random_contexts=32"]


def window(rng: random.Random, with_x: bool, x: str = " Lord", length: int = 21) -> Window:
    """Random words without x, or with x at one to three places; the feature fires exactly on x."""
    pieces = [rng.choice([w for w in WORDS if w != x]) for _ in range(length)]
    if with_x:
        for i in rng.sample(range(length), rng.randint(1, 3)):
            pieces[i] = x
    return Window(pieces, [2.0 if p == x else 0.0 for p in pieces])


def fires_on_lord(seed: int = 0) -> FeatureExamples:
    rng = random.Random(seed)
    return FeatureExamples(
        7, 0.02, [window(rng, True) for _ in range(10)], [window(rng, True) for _ in range(10)],
        [window(rng, False) for _ in range(10)],
    )  # fmt: skip


def test_detection_and_fuzzing_are_one_for_the_exact_token_and_chance_for_a_random_one():
    fx, offline = fires_on_lord(), OfflineExplainer()
    assert score(fx, '" Lord"', offline) == {"detection": 1.0, "fuzzing": 1.0}
    assert score(fx, "the word Lord, unquoted", offline) == {"detection": 0.5, "fuzzing": 0.5}  # matches nothing
    rng = random.Random(1)
    got = [score(fires_on_lord(s), json.dumps(rng.choice(WORDS[2:])), offline) for s in range(200)]
    assert sum(g["detection"] for g in got) / len(got) == pytest.approx(0.5, abs=0.03)
    # a random word is never the active token, but sometimes one of the wrongly marked: at most chance
    assert sum(g["fuzzing"] for g in got) / len(got) < 0.5


def test_balanced_accuracy_by_hand():
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == pytest.approx((1 + 2 / 3) / 2)
    assert balanced_accuracy([True, True], [True, True]) == 1.0 and balanced_accuracy([False] * 3, [True] * 3) == 0.0


def test_offline_explainer_names_the_token_or_the_bigram_that_picks_it_out():
    fx = fires_on_lord()
    excerpts = [(w.pieces, w.active(0.02)) for w in fx.explain]
    assert OfflineExplainer().explain(excerpts) == '" Lord"'
    # " Lord" fires only after " the": the bigram is exact where the token alone is not
    pieces = [" my", " Lord", " the", " Lord", " and", " my", " Lord", " the", " Lord"]
    marked = [False, False, False, True, False, False, False, False, True]
    assert OfflineExplainer().explain([(pieces, marked)]) == '" the Lord"'
    assert term_ends(pieces, quoted_terms('" the Lord"')) == marked
    assert quoted_terms('"a\\nb", "\\"q\\"", ""') == {"a\nb", '"q"'}


class Canned(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint: explains as "the token Lord"; detects the excerpts holding "Lord";
    in fuzzing, picks the excerpts whose every mark is on Lord. Modes: slow, babble, foreign."""

    mode = "ok"
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, body))
        system, user = (m["content"] for m in body["messages"])
        if self.mode == "slow":
            time.sleep(3)
        if "strongest first" in system:
            text = "This feature fires on the token Lord."
        else:
            lines = user.split("The excerpts:\n\n")[1].splitlines()
            picks = []
            for line in lines:
                number, _, text = line.partition(". ")
                marks = [m.split(">>")[0] for m in text.split("<<")[1:]]
                if ("<<" not in text and " Lord" in text) or (marks and all(m == " Lord" for m in marks)):
                    picks.append(number)
            text = ", ".join(picks) or "None"
        if self.mode == "babble":
            text = "I would say\nthe second one, probably"
        reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
        data = b"<html>not json</html>" if self.mode == "foreign" else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Canned.mode, Canned.seen = "ok", []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_chat_explainer_asks_the_endpoint_and_parses_its_answers(server):
    chat, fx = ChatExplainer(server, "canned"), fires_on_lord()
    explanation = chat.explain([(w.pieces, w.active(0.02)) for w in fx.explain])
    assert explanation == "the token Lord"
    assert score(fx, explanation, chat) == {"detection": 1.0, "fuzzing": 1.0}
    path, body = Canned.seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "canned" and body["temperature"] == 0
    assert "<< Lord>>" in body["messages"][1]["content"]  # the explainer sees the active tokens marked


def test_chat_explainer_failures_are_one_clear_line(server):
    fx = fires_on_lord()
    Canned.mode = "babble"
    with pytest.raises(DataError, match=r"answered 'I would say the second one, probably', not excerpt numbers"):
        score(fx, "x", ChatExplainer(server, "canned"))
    Canned.mode = "slow"
    with pytest.raises(DataError, match=r"no answer within 0.5 s; check the server or raise eval.interp.timeout"):
        ChatExplainer(server, "canned", timeout=0.5).explain([])
    Canned.mode = "foreign"
    with pytest.raises(DataError, match="not an OpenAI chat completion; give --explainer the server's /v1 base URL"):
        ChatExplainer(server, "canned").explain([])
    with pytest.raises(DataError, match="cannot connect .*; start the server or fix --explainer"):
        ChatExplainer("http://127.0.0.1:9/v1", "canned", timeout=5).explain([])


@pytest.fixture(scope="module")
def analysed_run(tmp_path_factory):
    run, _ = make_run(tmp_path_factory.mktemp("interp"), name="interp")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"].update(n_tokens=2000, n_contexts=4)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    analysis = AnalysisConfig(n_tokens=3000, n_examples=20, n_samples=40, n_intervals=10, per_interval=4)
    sb.analyze(run, analysis, show_progress=False)
    return run


@pytest.mark.slow
def test_suite_writes_its_section_and_the_stores_explanations(analysed_run, tiny):
    (result,) = eval_from_config(analysed_run, ["interp"], show_progress=False, overrides=SMALL).values()
    section = result["interp"]
    assert section["explainer"] == "offline" and section["settings"]["n_features"] == 12
    for who in ("sae", "random"):
        part = section[who]
        assert part["n_features"] == 12 and part["n_errors"] == 0
        assert 0 <= part["detection"] <= 1 and 0 <= part["fuzzing"] <= 1
    store = sb.FeatureStore(analysed_run)
    scored = {f: e for f in range(store.n_features) for e in store.explanations(f)}
    assert len(scored) == 12
    assert sum(e.detection or 0 for e in scored.values()) / 12 == pytest.approx(section["sae"]["detection"])
    # the notebook calls read the same examples and windows as the suite
    f, e = max(scored.items(), key=lambda kv: kv[1].detection or 0)
    assert sb.explain_features(store, [f]) == {f: e.text}
    contexts = sb.load_contexts(sb.Run(analysed_run).config.data, tiny.tokenizer, show_progress=False)
    sae, hook, settings = (
        sb.SAE.load(analysed_run / "sae"),
        "blocks.0.hook_resid_post",
        sb.InterpSettings(random_contexts=32),
    )
    got = sb.score_explanations(tiny, sae, hook, store, contexts, {f: e.text}, settings=settings)
    assert got == {f: {"detection": e.detection, "fuzzing": e.fuzzing}}
    # an explanation that matches nothing predicts "no" everywhere: balanced accuracy 0.5 when both classes show
    (bg,) = background(tiny, [sae], hook, contexts, settings)
    fx = feature_examples(store, f, settings, bg)
    classes = frozenset(any(w.active(fx.threshold)) for w in fx.held_out + fx.random)
    nothing = sb.score_explanations(tiny, sae, hook, store, contexts, {f: "nothing quoted"}, settings=settings)[f]
    assert nothing["detection"] == {frozenset({True, False}): 0.5, frozenset({True}): 0.0}[classes]
    assert nothing["fuzzing"] == 0.5
    small = sb.InterpSettings(n_features=12, random_contexts=32)
    alone = sb.interpretability(tiny, sae, hook, sb.FeatureStore(analysed_run), contexts, small, show_progress=False)
    assert alone["sae"] == section["sae"] and "random" not in alone  # the notebook call, without a baseline
    again = eval_from_config(analysed_run, ["interp"], show_progress=False, overrides=SMALL)
    assert next(iter(again.values()))["interp"] == section  # seeded: the same figures


def test_explanations_table_is_added_to_an_older_store_and_dropped_by_reanalysis(analysed_run, tmp_path):
    copy = tmp_path / "old.sqlite"
    copy.write_bytes((analysed_run / "features.sqlite").read_bytes())
    with sqlite3.connect(copy) as con:
        con.execute("DROP TABLE explanations")
    store = sb.FeatureStore(copy, writable=True)
    assert store.explanations(3) == []
    store.set_explanations("offline", {3: {"explanation": '" x"', "detection": 0.75, "fuzzing": None}})
    assert store.explanations(3) == [sb.Explanation("offline", '" x"', 0.75, None)]
    with pytest.raises(DataError, match="read-only"):
        sb.FeatureStore(copy).set_explanations("offline", {})


@pytest.mark.slow
def test_missing_store_and_the_cli_flags(tmp_path, server, capsys):
    bare, _ = make_run(tmp_path, name="bare")
    assert cli.main(["eval", str(bare), "--suite", "interp", "--set", "eval.n_tokens=1000"]) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("saebench: error:")]
    assert f"run `saebench analyze {bare}` first" in line
    sb.analyze(bare, AnalysisConfig(n_tokens=1500, n_examples=10, n_samples=20), show_progress=False)
    argv = ["eval", str(bare), "--suite", "interp", "--explainer", server, "--explainer-model", "canned"]
    small = ["eval.n_tokens=1000", "eval.interp.n_features=3", "eval.interp.random_contexts=8"]
    assert cli.main(argv + [a for kv in small for a in ("--set", kv)]) == 0
    section = json.loads((bare / "eval.json").read_text())["interp"]
    assert section["explainer"] == f"canned at {server}" and section["sae"]["n_features"] == 3
    asked = [b["messages"][0]["content"] for _, b in Canned.seen]
    assert {b["model"] for _, b in Canned.seen} == {"canned"} and sum("strongest first" in a for a in asked) == 2 * 3
    store = sb.FeatureStore(bare)
    assert sum(len(store.explanations(f)) for f in range(store.n_features)) == 3
    sb.analyze(bare, AnalysisConfig(n_tokens=1500, n_examples=10, n_samples=20), show_progress=False)
    store = sb.FeatureStore(bare)  # a re-analysis drops them: their examples changed
    assert sum(len(store.explanations(f)) for f in range(store.n_features)) == 0


def test_feature_page_shows_the_explanations_and_scores(analysed_run, monkeypatch):
    from test_app import page

    record = {"explanation": '" Lord", " the Lord"', "detection": 0.75, "fuzzing": 0.5}
    sb.FeatureStore(analysed_run, writable=True).set_explanations("by-hand", {5: record})
    at = page("pages/1_Feature.py", [analysed_run], monkeypatch, feature=5)
    assert any("by-hand · detection 0.75, fuzzing 0.50" in m.value for m in at.markdown)
    assert '" Lord", " the Lord"' in [t.value for t in at.text]
