"""The Compare page and the Feature page's matches and splitting tree under AppTest: what they draw is what
sb.compare, sb.compare_curves, sb.match_features and sb.splitting_tree compute."""

import base64
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from test_analysis import HOOK, make_run
from test_app import page
from test_app_browser import browser, free_port, open_page, serve_app  # noqa: F401 (browser: a fixture)

import saebench as sb
from saebench.analysis import AnalysisConfig
from saebench.pipeline import eval_from_config

CELLS = {  # name -> (n_latents, activation, matryoshka)
    "n64_topk": (64, "topk", None),
    "n128_topk": (128, "topk", None),
    "n256_topk": (256, "topk", None),
    "n128_batchtopk": (128, "batchtopk", None),
    "n128_matryoshka": (128, "topk", [32, 128]),
}


def split(narrow: sb.SAE, sae: sb.SAE, seed: int) -> None:
    """Give `sae` (twice as wide) two noisy copies of each of narrow's decoder rows, as features that split."""
    noise = torch.randn(sae.W_dec.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        rows = torch.nn.functional.normalize(narrow.W_dec.repeat(2, 1) + 0.4 * noise / 192**0.5, dim=-1)
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep of five SAEs on one hook (evaluated with the prefixes suite, analysed), a run on another hook,
    and a run on the same hook that was never evaluated."""
    root = tmp_path_factory.mktemp("compare")
    sweep, _ = make_run(root, name="sweep")
    shutil.rmtree(sweep / "sae")
    config = yaml.safe_load((sweep / "config.yaml").read_text())
    config["eval"].update(n_tokens=1500, n_contexts=2)
    (sweep / "config.yaml").write_text(yaml.safe_dump(config))
    saes = {}
    for i, (name, (n, activation, matryoshka)) in enumerate(CELLS.items()):
        cfg = sb.SAEConfig(d_in=192, n_latents=n, activation=activation, k=6, matryoshka=matryoshka, hook=HOOK)
        saes[name] = sae = sb.SAE(sb.SAEConfig(**{**cfg.__dict__, "model": "tiny"}), seed=i)
        if activation == "batchtopk":
            with torch.no_grad():
                sae.threshold.fill_(1.5)
    split(saes["n64_topk"], saes["n128_topk"], 1)
    split(saes["n128_topk"], saes["n256_topk"], 2)
    for name, sae in saes.items():
        sae.save(sweep / name / "sae")
    sb.Run(sweep).write_sweep({"grid": [], "zip": [], "cells": {name: {} for name in CELLS}})
    eval_from_config(sweep, ["core", "prefixes"], show_progress=False)
    sb.analyze(sweep, AnalysisConfig(n_tokens=1500, n_examples=5, n_samples=12, n_intervals=4, per_interval=2))
    other, _ = make_run(root, name="other", hooks=("blocks.1.hook_resid_post",))
    bare, _ = make_run(root, name="bare")
    return sweep, other, bare


def figure(at, i=0) -> dict:
    """The plotly figure of the page's i-th chart, its typed arrays ({"dtype", "bdata"}) decoded to lists."""

    def plain(v):
        if isinstance(v, dict) and "bdata" in v:
            return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list) else v

    out = plain(json.loads(at.get("plotly_chart")[i].proto.spec))
    assert isinstance(out, dict)
    return out


def test_compare_page_draws_what_compare_computes(runs, monkeypatch):
    sweep, other, bare = runs
    at = page("pages/5_Compare.py", [sweep, other, bare], monkeypatch)
    table = sb.compare([sweep]).set_index("sae")
    traces = {t["name"]: t for t in figure(at)["data"]}
    for activation in ("topk", "batchtopk"):
        cells = [c for c in CELLS if CELLS[c][1] == activation]
        trace = traces[activation]
        points = {n: (x, y) for n, x, y in zip(trace["customdata"], trace["x"], trace["y"], strict=True)}
        assert set(points) == {f"sweep · {c}" for c in cells}
        for c in cells:
            assert points[f"sweep · {c}"] == pytest.approx((table.loc[c, "sae.l0"], table.loc[c, "sae.fvu"]))
        assert all(
            f'href="./?run=0&amp;hook={c}" target="_self"' in " ".join(traces[activation]["text"]) for c in cells
        )
    base = traces["random baseline"]
    for name, x, y in zip(base["customdata"], base["x"], base["y"], strict=True):
        cell = name.split(" · ")[1]
        assert (x, y) == pytest.approx((table.loc[cell, "random_baseline.l0"], table.loc[cell, "random_baseline.fvu"]))
    curve = traces["sweep · n128_matryoshka by prefix"]
    points = sb.compare_curves([sweep]).sort_values("point")
    assert curve["x"] == pytest.approx(points["sae.l0"].tolist()) and curve["customdata"] == [32, 128]
    front = sb.pareto_front(table, "sae.l0", "sae.fvu")
    assert traces["Pareto front"]["y"] == pytest.approx(table.loc[front, "sae.fvu"].tolist())
    shown = at.dataframe[0].value.set_index("label")
    assert shown.loc["sweep · n256_topk", "home"] == "./?run=0&hook=n256_topk"
    assert shown.loc["sweep · n256_topk", "sae.fvu"] == table.loc["n256_topk", "sae.fvu"]
    assert any("bare" in w.value and "saebench eval" in w.value for w in at.warning)
    assert at.selectbox[0].options == ["tiny · blocks.0.hook_resid_post", "tiny · blocks.1.hook_resid_post"]
    at = page("pages/5_Compare.py", [sweep, other], monkeypatch, y="sae.ce_recovered", x="nonsense")
    assert figure(at)["layout"]["yaxis"]["title"]["text"] == "sae.ce_recovered"
    assert any("`x=nonsense` in the URL is no figure" in w.value for w in at.warning)


def test_feature_page_shows_each_other_saes_best_match(runs, monkeypatch, tiny):
    sweep, other, _ = runs
    at = page("pages/1_Feature.py", [sweep, other], monkeypatch, hook="n64_topk", feature=5)
    run = sb.Run(sweep)
    me = run.load_sae("n64_topk")
    sample = sb.token_sample(tiny, run.config, HOOK, 4096)
    shown = next(d.value for d in at.dataframe if "decoder match" in d.value).set_index("sae")
    assert set(shown.index) == {f"sweep · {c}" for c in CELLS if c != "n64_topk"}
    for cell in CELLS:
        if cell == "n64_topk":
            continue
        m = sb.match_features(me, run.load_sae(cell), sample, latents=[5])
        (dec, cos), (act, corr) = m.best("decoder"), m.best("activation")
        row = shown.loc[f"sweep · {cell}"]
        assert row["decoder match"] == f"./Feature?run=0&hook={cell}&feature={int(dec[0])}"
        assert row["activation match"] == f"./Feature?run=0&hook={cell}&feature={int(act[0])}"
        assert (row.cosine, row.correlation) == pytest.approx((float(cos[0]), float(corr[0])), abs=1e-6)
    assert any("Not compared" in c.value and "other · blocks.1.hook_resid_post" in c.value for c in at.caption)


def test_splitting_tree_nodes_are_splitting_tree(runs, monkeypatch):
    sweep, _, _ = runs
    at = page(
        "pages/1_Feature.py", [sweep], monkeypatch, hook="n64_topk", feature=7, wider="0:n128_topk,0:n256_topk", min=0.5
    )
    run = sb.Run(sweep)
    want = sb.splitting_tree([run.load_sae(c) for c in ("n64_topk", "n128_topk", "n256_topk")], 7, min_score=0.5)
    shown = next(d.value for d in at.dataframe if "top tokens" in d.value)
    assert shown[["level", "latent", "parent"]].values.tolist() == want[["level", "latent", "parent"]].values.tolist()
    assert shown.score.tolist() == pytest.approx(want.score.tolist())
    assert len(want) >= 5 and set(want.level) == {0, 1, 2}  # 7 splits into 7 and 71, each of them in two
    store = sb.FeatureStore(sweep / "n128_topk")
    node = shown[shown.level == 1].iloc[0]
    assert node["top tokens"] == " ".join(repr(t) for t, _ in store.feature(int(node.latent)).top_tokens[:3])
    assert node.open == f"./Feature?run=0&hook=n128_topk&feature={int(node.latent)}"
    tree_plot = figure(at, 1)["data"][-1]
    assert tree_plot["x"] == shown.level.tolist()


@pytest.mark.browser
@pytest.mark.slow
def test_a_points_link_opens_its_sae_on_home_in_chromium(runs, browser):  # noqa: F811
    """`saebench app SWEEP OTHER` in headless Chromium: a point's name on the Compare page opens that SAE's Home."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sweep, other, _ = runs
    proc, url = serve_app([sweep, other], free_port())
    try:
        open_page(browser, f"{url}/Compare", "Compare SAEs", "compare")
        link = browser.find_element(By.XPATH, "//*[local-name()='a'][contains(@*[local-name()='href'], 'n256_topk')]")
        link.click()
        WebDriverWait(browser, 60).until(lambda d: "SAE on n256_topk" in d.find_element(By.TAG_NAME, "body").text)
        assert "hook=n256_topk" in browser.current_url and "run=0" in browser.current_url
        WebDriverWait(browser, 60).until(lambda d: "256 of 256 features" in d.find_element(By.TAG_NAME, "body").text)
        open_page(
            browser, f"{url}/Feature?run=0&hook=n64_topk&feature=7&wider=0:n128_topk,0:n256_topk", "Feature 7", "split"
        )
        assert "Splitting across widths" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
