"""saebench.induction: the induction trace's decomposition, its sums by group, and feature profiles,
against brute force."""

from pathlib import Path

import pytest
import torch

import saebench as sb
from saebench.induction import (
    InductionTrace,
    hook_activations,
    repeated_prompt,
    share_by_group,
    summarize_induction,
    token_profile,
    trace_induction,
)

HOOKS = ("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out")


@pytest.fixture(scope="module")
def random_saes():
    torch.manual_seed(0)
    return {h: sb.SAE(sb.SAEConfig(d_in=192, n_latents=128, k=8, hook=h, model="tiny")) for h in HOOKS}


@pytest.fixture(scope="module")
def text(tiny):
    return sb.load_contexts(sb.DataConfig(split="test", max_documents=60), tiny.tokenizer, show_progress=False).tokens


def test_each_trace_splits_the_models_own_score_advantage(tiny, random_saes, text):
    prompt = repeated_prompt(text[0, 1:13], tiny.tokenizer.bos_token_id)
    assert prompt.shape == (1, 25) and torch.equal(prompt[0, 1:13], prompt[0, 13:])
    traces = trace_induction(tiny, prompt, 1, 2, random_saes)
    assert [t.query_pos for t in traces] == list(range(15, 25))  # from key 4, control 1 (the first after BOS)
    _, cache = tiny.run_with_cache(prompt)
    scores = cache["blocks.1.attn.hook_attn_scores"][0, 2]
    for t in traces:
        assert (t.key_pos, t.control_pos) == (t.query_pos - 11, t.query_pos - 14)
        assert t.advantage == pytest.approx(
            float(scores[t.query_pos, t.key_pos] - scores[t.query_pos, t.control_pos]), abs=1e-4
        )
        assert sum(t.key_side.values()) == pytest.approx(1.0, abs=1e-3) and sum(t.query_side.values()) == pytest.approx(
            1.0, abs=1e-3
        )
        assert any(name.startswith("blocks.0.attn.hook_z:f") for name in t.key_side)


def test_share_by_group_weights_each_trace_by_its_advantage():
    a = InductionTrace(5, 2, 1, "x", 2.0, 0.5, {"h:f1": 0.75, "h:f2": 0.5, "tok_embed": -0.25}, {"tok_embed": 1.0})
    b = InductionTrace(6, 3, 2, "y", 1.0, 0.5, {"h:f1": 1.0, "h:error": 0.0}, {"tok_embed": 0.5, "h:f3": 0.5})
    # summed advantage 3: key side h = (2 * 1.25 + 1 * 1) / 3, tok_embed = -0.5 / 3
    assert share_by_group([a, b], "key_side") == pytest.approx({"h": 3.5 / 3, "tok_embed": -0.5 / 3, "h:error": 0.0})
    assert share_by_group([a, b], "query_side") == pytest.approx({"tok_embed": 2.5 / 3, "h": 0.5 / 3})
    per_feature = share_by_group([a, b], "key_side", group=lambda name: name)
    assert per_feature["h:f1"] == pytest.approx(2.5 / 3) and list(per_feature)[0] == "h:f1"


@torch.no_grad()
def test_token_profile_reads_the_strongest_examples(tiny, random_saes, text):
    tokens = text[:6, :40]
    hook = "blocks.0.attn.hook_z"
    sae = random_saes[hook]
    _, cache = tiny.run_with_cache(tokens)
    acts = cache[hook].flatten(-2)
    assert torch.allclose(hook_activations(tiny, tokens, [hook])[hook], acts, atol=1e-5)
    feature = int(sae.encode(acts.reshape(-1, 192)).gt(0).sum(0).argmax())  # the one firing most often
    rows = [(float(sae.encode(acts[b, p][None])[0, feature]), b, p) for b in range(6) for p in range(2, 40)]
    top = [r for r in sorted(rows, reverse=True)[:10] if r[0] > 0]
    previous = [int(tokens[b, p - 1]) for _, b, p in top]
    most = max(previous.count(t) for t in previous)
    token, how_often = token_profile(tiny, sae, acts, tokens, feature, offset=-1, top=10)
    assert token in {tiny.tokenizer.decode([t]) for t in previous if previous.count(t) == most}
    assert how_often == pytest.approx(most / len(top))


# The committed tiny and the SAEs of configs/tiny-attn.yaml trained on it (tests/data/tiny-attn, made by
# `saebench train configs/tiny-attn.yaml` and copied without activations): the issue-11 circuit.
TINY_ATTN = Path(__file__).parent / "data" / "tiny-attn"


def test_tiny_has_an_induction_head_downstream_of_a_previous_token_head(tiny):
    report = sb.induction_report(tiny)
    layer, head = divmod(int(report["induction"].argmax()), tiny.cfg.n_heads)
    assert layer >= 1 and float(report["induction"][layer, head]) >= 0.4
    assert report["loss_first_copy"] - report["loss_second_copy"] >= 2.0
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=300), tiny.tokenizer, show_progress=False)
    prev = sb.head_scores(tiny, ctx)["prev_token"]
    assert float(prev[:layer].max()) >= 0.8  # a previous-token head upstream


@pytest.fixture(scope="module")
def circuit(tiny):
    saes = sb.Run(TINY_ATTN).load_saes(device="cpu")
    assert set(saes) == set(HOOKS)
    layer, head = divmod(int(sb.induction_report(tiny)["induction"].argmax()), tiny.cfg.n_heads)
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=300), tiny.tokenizer, show_progress=False)
    return summarize_induction(tiny, saes, layer, head, ctx.tokens, span=32, n_prompts=8)


def test_induction_keys_are_built_from_previous_token_features_of_the_attention_sae(circuit):
    """Kissane et al. 2024: the induction head's key side is carried by the previous-token head's
    hook_z features, whose strongest examples' previous token is the query token they serve."""
    assert circuit.n_traces == 8 * 30 and circuit.mean_attention > 0.1
    assert circuit.key_groups["blocks.0.attn.hook_z"] >= 0.5, circuit.key_groups
    assert len(circuit.key_features) == 5 and all(
        row[0].startswith("blocks.0.attn.hook_z:f") for row in circuit.key_features[:3]
    )
    matches = [row for row in circuit.key_features if row[3] == row[2] and row[4] >= 0.5]
    assert len(matches) >= 3, circuit.key_features


def test_induction_queries_come_from_features_of_the_current_token(circuit):
    """The query side is carried by SAE features (here the layer-0 attention output's, not the
    embedding's or the MLP's: docs/benchmarks.md) whose top examples' current token is the query token."""
    from_features = sum(v for g, v in circuit.query_groups.items() if g in HOOKS)
    assert from_features + circuit.query_groups.get("tok_embed", 0.0) >= 0.5, circuit.query_groups
    matches = [row for row in circuit.query_features if row[3] == row[2] and row[4] >= 0.5]
    assert len(matches) >= 3, circuit.query_features
