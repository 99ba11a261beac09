import pytest
import torch

import saebench as sb
from saebench.steering import compare_steering, generate, input_score, output_score, rank_by_output_score, steer, steering_sweep

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def sae(tiny):
    """A small SAE trained in the test on tiny's layer-0 residual stream."""
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=300, context_size=64), tiny.tokenizer, show_progress=False)
    h = sb.Harvester(tiny, [HOOK])
    acts = torch.cat([b[HOOK] for b in sb.stream_activations(h, ctx, batch_tokens=1024, buffer_tokens=4096, epochs=1)])
    cfg = sb.SAEConfig(d_in=tiny.cfg.d_model, n_latents=512, k=16, hook=HOOK, model="tiny")
    trained, _ = sb.train_sae(cfg, acts, sb.TrainConfig(n_tokens=150_000, batch_size=1024, lr=3e-3), show_progress=False)
    return trained


@pytest.fixture(scope="module")
def tokens(tiny):
    return torch.tensor([[tiny.tokenizer.bos_token_id] + tiny.tokenizer("And God said, Let there be light", add_special_tokens=False)["input_ids"]])


def hooks_attached(model):
    unique = {id(p): p for p in model.hook_dict.values()}  # aliases name the same hook point twice
    return sum(len(p._forward_hooks) for p in unique.values())


def test_scale_zero_is_a_no_op(tiny, sae, tokens):
    clean = tiny(tokens)
    with steer(tiny, sae, {3: 0.0, 7: 0.0}):
        assert torch.equal(tiny(tokens), clean)


def test_add_moves_the_residual_by_the_decoder_row(tiny, sae, tokens):
    _, cache = tiny.run_with_cache(tokens)
    seen = {}
    with steer(tiny, sae, {5: 3.0}):
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.setdefault("x", a.clone()))]):
            tiny(tokens)
    assert torch.allclose(seen["x"], cache[HOOK] + 3.0 * sae.W_dec[5], atol=1e-5)


def test_clamp_keeps_error_term(tiny, sae, tokens):
    clean = tiny(tokens)
    _, cache = tiny.run_with_cache(tokens)
    z = sae.encode(cache[HOOK])
    dead_here = int((z[0] == 0).all(0).nonzero()[0])  # a latent inactive everywhere: clamping it to 0 changes nothing
    with steer(tiny, sae, {dead_here: 0.0}, mode="clamp") as s:
        out = tiny(tokens)
    assert torch.allclose(out, clean, atol=1e-4)
    with steer(tiny, sae, {dead_here: 4.5}, mode="clamp") as s:
        steered = tiny(tokens)
    assert (s.last_latents[..., dead_here] == 4.5).all()
    assert not torch.allclose(steered, clean, atol=1e-3)


def test_conditional_and_ablate(tiny, sae, tokens):
    _, cache = tiny.run_with_cache(tokens)
    z = sae.encode(cache[HOOK])
    live = int(z[0].ne(0).sum(0).argmax())
    with steer(tiny, sae, {live: 9.0}, mode="conditional") as s:
        tiny(tokens)
    expected = torch.where(z[..., live] != 0, torch.full_like(z[..., live], 9.0), z[..., live])
    assert torch.equal(s.last_latents[..., live], expected)
    with steer(tiny, sae, {live: 123.0}, mode="ablate") as s:
        tiny(tokens)
    assert (s.last_latents[..., live] == 0).all()


def test_orthogonal_sets_the_component(tiny, sae, tokens):
    seen = {}
    with steer(tiny, sae, {2: 1.5}, mode="orthogonal"):
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.setdefault("x", a.clone()))]):
            tiny(tokens)
    u = sae.W_dec[2] / sae.W_dec[2].norm()
    assert torch.allclose(seen["x"] @ u, torch.full(seen["x"].shape[:-1], 1.5), atol=1e-4)


def test_hooks_removed_after_exit_and_error(tiny, sae, tokens):
    before = hooks_attached(tiny)
    clean = tiny(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny, sae, {1: 50.0}):
            assert hooks_attached(tiny) == before + 1
            raise RuntimeError("boom")
    assert hooks_attached(tiny) == before
    assert torch.equal(tiny(tokens), clean)


def test_steering_reaches_generated_tokens(tiny, sae):
    prompt = "And God said"
    plain = generate(tiny, prompt, max_new_tokens=12)
    with steer(tiny, sae, {0: 40.0, 1: 40.0}, positions="generated") as s:
        steered = generate(tiny, prompt, max_new_tokens=12, steering=s)
        assert s.prompt_len == len(tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1
        mask = s.position_mask(s.prompt_len + 3, "cpu")
    assert mask.tolist() == [False] * s.prompt_len + [True] * 3
    assert steered != plain
    with steer(tiny, sae, {0: 40.0}, positions="prompt") as s:
        seen = []
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.append(a.shape[1]))]):
            generate(tiny, prompt, max_new_tokens=3, steering=s)
    assert seen == [s.prompt_len, s.prompt_len + 1, s.prompt_len + 2]  # no KV cache: every position every step


def test_sweep_and_scores(tiny, sae):
    rows = steering_sweep(tiny, sae, feature=4, scales=[0.0, 20.0], prompt="The", max_new_tokens=8)
    assert [r["scale"] for r in rows] == [0.0, 20.0]
    assert rows[1]["concept"] > rows[0]["concept"]
    assert all(r["fluency_ppl"] > 1 for r in rows)
    assert output_score(tiny, sae, 4, 0.0, prompt="The") == pytest.approx(0.0, abs=1e-6)
    assert output_score(tiny, sae, 4, 20.0, prompt="The") > 0
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=50, context_size=32), tiny.tokenizer, show_progress=False)
    assert 0.0 <= input_score(tiny, sae, 4, sb.TokenContexts(ctx.tokens[:64], ctx.special_mask[:64])) <= 1.0


def test_compare_steering_scores_each_token_under_both_models(tiny, sae):
    prompt, feats = "And God said", {4: 20.0, 9: -5.0}
    r = compare_steering(tiny, sae, feats, prompt, mode="add", positions="all", max_new_tokens=6, temperature=0.8, seed=3)
    assert r.default.text == generate(tiny, prompt, 6, 0.8, seed=3)
    with steer(tiny, sae, feats) as s:
        assert r.steered.text == generate(tiny, prompt, 6, 0.8, seed=3, steering=s)
    assert "".join(r.prompt_pieces[1:]) == prompt
    # brute force: re-run each prefix and read the next token's log-prob
    for gen, steered in ((r.default, False), (r.steered, True)):
        ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prefix = [tiny.tokenizer.bos_token_id] + ids
        for t, own, clean in zip(gen.token_ids, gen.logprobs, gen.clean_logprobs):
            x = torch.tensor([prefix])
            with torch.no_grad():
                want_clean = float(tiny(x)[0, -1].log_softmax(-1)[t])
                if steered:
                    with steer(tiny, sae, feats):
                        want_own = float(tiny(x)[0, -1].log_softmax(-1)[t])
                else:
                    want_own = want_clean
            assert own == pytest.approx(want_own, abs=1e-4) and clean == pytest.approx(want_clean, abs=1e-4)
            prefix.append(t)
    assert r.default.logprobs == pytest.approx(r.default.clean_logprobs)
    table = r.table()
    assert table.steered.tolist() == r.steered.pieces and len(table) == 6
    assert r.default.perplexity == pytest.approx(float(torch.tensor(r.default.clean_logprobs).mean().neg().exp()), rel=1e-5)


def test_sweep_of_several_features_scales_their_strengths(tiny, sae):
    done = []
    rows = steering_sweep(tiny, sae, {4: 2.0, 9: 1.0}, [0.0, 5.0], "The", max_new_tokens=4, progress=lambda i, n: done.append((i, n)))
    assert done == [(1, 2), (2, 2)]
    with steer(tiny, sae, {4: 10.0, 9: 5.0}) as s:
        assert rows[1]["text"] == generate(tiny, "The", 4, steering=s)
    assert rows[0]["text"] == generate(tiny, "The", 4)


def test_rank_by_output_score_orders_candidates(tiny, sae):
    scales = {4: 20.0, 9: 20.0, 11: 0.0}
    table = rank_by_output_score(tiny, sae, scales, prompt="The")
    assert sorted(table.feature) == [4, 9, 11]
    assert table.output_score.is_monotonic_decreasing
    for f, v in zip(table.feature, table.output_score):
        assert v == pytest.approx(output_score(tiny, sae, f, scales[f], prompt="The"))


def test_errors(tiny, sae):
    with pytest.raises(sb.ConfigError, match="feature index 9999 is out of range: the SAE has 512 latents"):
        with steer(tiny, sae, {9999: 1.0}):
            pass
    with pytest.raises(sb.HookError, match="trained on blocks.0.hook_resid_post, not blocks.1.hook_resid_post"):
        with steer(tiny, sae, {1: 1.0}, hook="blocks.1.hook_resid_post"):
            pass
    with pytest.raises(sb.ConfigError, match="unknown steering mode"):
        with steer(tiny, sae, {1: 1.0}, mode="push"):
            pass
