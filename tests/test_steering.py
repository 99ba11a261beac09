import pytest
import torch

import saebench as sb
from saebench.steering import (
    compare_steering,
    generate,
    input_score,
    lens_mass_gain,
    logit_lens_tokens,
    output_score,
    rank_by_output_score,
    rank_prob_score,
    steer,
    steering_sweep,
)

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def sae(tiny):
    """A small SAE trained in the test on tiny's layer-0 residual stream."""
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=300, context_size=64), tiny.tokenizer, show_progress=False
    )
    h = sb.Harvester(tiny, [HOOK])
    acts = torch.cat([b[HOOK] for b in sb.stream_activations(h, ctx, batch_tokens=1024, buffer_tokens=4096, epochs=1)])
    cfg = sb.SAEConfig(d_in=tiny.cfg.d_model, n_latents=512, k=16, hook=HOOK, model="tiny")
    trained, _ = sb.train_sae(
        cfg, acts, sb.TrainConfig(n_tokens=150_000, batch_size=1024, lr=3e-3), show_progress=False
    )
    return trained


@pytest.fixture(scope="module")
def tokens(tiny):
    return torch.tensor(
        [
            [tiny.tokenizer.bos_token_id]
            + tiny.tokenizer("And God said, Let there be light", add_special_tokens=False)["input_ids"]
        ]
    )


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
    assert s.last_latents is not None
    assert (s.last_latents[..., dead_here] == 4.5).all()
    assert not torch.allclose(steered, clean, atol=1e-3)


def test_conditional_and_ablate(tiny, sae, tokens):
    _, cache = tiny.run_with_cache(tokens)
    z = sae.encode(cache[HOOK])
    live = int(z[0].ne(0).sum(0).argmax())
    with steer(tiny, sae, {live: 9.0}, mode="conditional") as s:
        tiny(tokens)
    expected = torch.where(z[..., live] != 0, torch.full_like(z[..., live], 9.0), z[..., live])
    assert s.last_latents is not None
    assert torch.equal(s.last_latents[..., live], expected)
    with steer(tiny, sae, {live: 123.0}, mode="ablate") as s:
        tiny(tokens)
    assert s.last_latents is not None
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
        assert s.prompt_len is not None
        mask = s.position_mask(s.prompt_len + 3, "cpu")
    assert mask.tolist() == [False] * s.prompt_len + [True] * 3
    assert steered != plain
    with steer(tiny, sae, {0: 40.0}, positions="prompt") as s:
        seen = []
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.append(a.shape[1]))]):
            generate(tiny, prompt, max_new_tokens=3, steering=s)
    assert s.prompt_len is not None
    assert seen == [s.prompt_len, s.prompt_len + 1, s.prompt_len + 2]  # no KV cache: every position every step


def test_sweep_and_scores(tiny, sae):
    rows = steering_sweep(tiny, sae, feature=4, scales=[0.0, 20.0], prompt="The", max_new_tokens=8)
    assert [r["scale"] for r in rows] == [0.0, 20.0]
    assert rows[1]["concept"] > rows[0]["concept"]
    assert all(r["fluency_ppl"] > 1 for r in rows)
    assert lens_mass_gain(tiny, sae, 4, 0.0, prompt="The") == pytest.approx(0.0, abs=1e-6)
    assert lens_mass_gain(tiny, sae, 4, 20.0, prompt="The") > 0


def test_compare_steering_scores_each_token_under_both_models(tiny, sae):
    prompt, feats = "And God said", {4: 20.0, 9: -5.0}
    r = compare_steering(
        tiny, sae, feats, prompt, mode="add", positions="all", max_new_tokens=6, temperature=0.8, seed=3
    )
    assert r.default.text == generate(tiny, prompt, 6, 0.8, seed=3)
    with steer(tiny, sae, feats) as s:
        assert r.steered.text == generate(tiny, prompt, 6, 0.8, seed=3, steering=s)
    assert "".join(r.prompt_pieces[1:]) == prompt
    # brute force: re-run each prefix and read the next token's log-prob
    for gen, steered in ((r.default, False), (r.steered, True)):
        ids = tiny.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prefix = [tiny.tokenizer.bos_token_id] + ids
        for t, own, clean in zip(gen.token_ids, gen.logprobs, gen.clean_logprobs, strict=True):
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
    assert r.default.perplexity == pytest.approx(
        float(torch.tensor(r.default.clean_logprobs).mean().neg().exp()), rel=1e-5
    )


def test_sweep_of_several_features_scales_their_strengths(tiny, sae):
    done = []
    rows = steering_sweep(
        tiny, sae, {4: 2.0, 9: 1.0}, [0.0, 5.0], "The", max_new_tokens=4, progress=lambda i, n: done.append((i, n))
    )
    assert done == [(1, 2), (2, 2)]
    with steer(tiny, sae, {4: 10.0, 9: 5.0}) as s:
        assert rows[1]["text"] == generate(tiny, "The", 4, steering=s)
    assert rows[0]["text"] == generate(tiny, "The", 4)


def test_rank_by_output_score_orders_candidates(tiny, sae):
    table = rank_by_output_score(tiny, sae, [4, 9, 11])
    assert sorted(table.feature) == [4, 9, 11]
    assert table.output_score.is_monotonic_decreasing
    for f, v in zip(table.feature, table.output_score, strict=True):
        assert v == pytest.approx(output_score(tiny, sae, f))


def test_rank_prob_score_by_hand():
    # ranks by probability: token 1 (.5) is 0, token 2 (.3) is 1, tokens 0 and 3 (.1) are 2
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert rank_prob_score(probs, torch.tensor([2, 3])) == pytest.approx((1 - 1 / 4) * 0.3)
    assert rank_prob_score(probs, torch.tensor([1])) == pytest.approx(0.5)
    assert rank_prob_score(probs, torch.tensor([0, 3])) == pytest.approx((1 - 2 / 4) * 0.1)


def test_logit_lens_is_the_final_norm_then_the_unembedding(tiny, sae):
    with torch.no_grad():
        logits = tiny.ln_final(sae.W_dec[7][None])[0] @ tiny.W_U
    assert logit_lens_tokens(tiny, sae, 7, 20).tolist() == logits.topk(20).indices.tolist()


def test_output_score_as_the_paper_computes_it(tiny, sae):
    """The reference re-does the paper's AmlifySAEHook by hand: encode the hook's activation, raise the
    feature at the last token by 10 x that token's largest code, decode, add the SAE error back;
    then rank the logit-lens tokens by argsort of the next-token probabilities."""
    f = 4
    tokens = torch.tensor(
        [[tiny.tokenizer.bos_token_id] + tiny.tokenizer(sb.NEUTRAL_PROMPT, add_special_tokens=False)["input_ids"]]
    )

    def amplify(act, hook):
        z = sae.encode(act)
        error = act - sae.decode(z)
        z2 = z.clone()
        z2[:, -1, f] += 10 * z[:, -1].max()
        return sae.decode(z2) + error

    with torch.no_grad(), tiny.hooks(fwd_hooks=[(HOOK, amplify)]):
        probs = tiny(tokens)[0, -1].softmax(-1)
        lens = (tiny.ln_final(sae.W_dec[f][None])[0] @ tiny.W_U).softmax(-1).topk(20).indices
    order = probs.argsort(descending=True)
    min_rank = min(int((order == t).nonzero()) for t in lens)
    want = (1 - min_rank / probs.numel()) * float(probs[lens].max())
    assert output_score(tiny, sae, f) == pytest.approx(want, rel=1e-4)


def test_input_score_as_the_paper_computes_it(tiny, sae):
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=80, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx = sb.TokenContexts(ctx.tokens[:150], ctx.special_mask[:150])
    h = sb.Harvester(tiny, [HOOK], exclude_special=False)
    with torch.no_grad():
        z = sae.encode(h.forward(ctx.tokens)[HOOK])
    lens = set((tiny.ln_final(sae.W_dec.detach())[:, None] @ tiny.W_U).squeeze(1).topk(20).indices.tolist()[5])
    examples = []  # (max code, token at the max) of each context where feature 5 fires
    for c in range(len(ctx.tokens)):
        codes = [float(z[c, p, 5]) if not ctx.special_mask[c, p] else 0.0 for p in range(ctx.tokens.shape[1])]
        if max(codes) > 0:
            examples.append((max(codes), int(ctx.tokens[c, codes.index(max(codes))])))
    top = sorted(examples, key=lambda e: -e[0])[:100]
    assert len(top) >= 10
    want = sum(t in lens for _, t in top) / len(top)
    assert input_score(tiny, sae, 5, ctx) == pytest.approx(want)
    assert input_score(tiny, sae, 5, sb.TokenContexts(ctx.tokens[:2], ctx.special_mask[:2]), min_examples=10) is None


def test_orthogonal_sets_several_components_jointly(tiny, sae, tokens):
    feats = {2: 1.5, 3: -0.5, 8: 2.0}
    W = sae.W_dec.detach()
    U = W[list(feats)] / W[list(feats)].norm(dim=-1, keepdim=True)
    assert (U @ U.T - torch.eye(3)).abs().max() > 0.01  # not orthogonal: sequential projections would miss
    seen = {}
    _, cache = tiny.run_with_cache(tokens)
    with steer(tiny, sae, feats, mode="orthogonal"):
        with tiny.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: seen.setdefault("x", a.clone()))]):
            tiny(tokens)
    got = seen["x"][0] @ U.T
    assert torch.allclose(got, torch.tensor(list(feats.values())).expand_as(got), atol=1e-4)
    change = seen["x"][0] - cache[HOOK][0]
    in_span = change @ torch.linalg.pinv(U) @ U
    assert torch.allclose(change, in_span, atol=1e-4)  # the edit moves x only within the features' span


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


@pytest.fixture(scope="module")
def signed_sae(sae):
    """An AbsTopK SAE made from the trained one with every weight negated: its strong codes are negative."""
    cfg = sb.SAEConfig(d_in=sae.cfg.d_in, n_latents=sae.cfg.n_latents, k=sae.cfg.k, activation="abstopk", hook=HOOK)
    signed = sb.SAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(signed, name).copy_(-getattr(sae, name))
        signed.b_dec.copy_(sae.b_dec)
    return signed.eval()


def test_output_score_of_a_signed_family_amplifies_by_the_largest_magnitude(tiny, signed_sae):
    f = 4
    tokens = torch.tensor(
        [[tiny.tokenizer.bos_token_id] + tiny.tokenizer(sb.NEUTRAL_PROMPT, add_special_tokens=False)["input_ids"]]
    )
    with torch.no_grad():
        last = signed_sae.encode(sb.Harvester(tiny, [HOOK], exclude_special=False).forward(tokens)[HOOK])[0, -1]
    assert last.abs().max() > last.max() + 1  # a signed max would amplify by far less

    def amplify(act, hook):
        act = act.clone()
        act[:, -1] += 10 * last.abs().max() * signed_sae.W_dec[f]
        return act

    with torch.no_grad(), tiny.hooks(fwd_hooks=[(HOOK, amplify)]):
        probs = tiny(tokens)[0, -1].softmax(-1)
    lens = logit_lens_tokens(tiny, signed_sae, f, 20)
    assert output_score(tiny, signed_sae, f) == pytest.approx(rank_prob_score(probs, lens), rel=1e-4)


def test_input_score_of_a_signed_family_ranks_by_magnitude(tiny, signed_sae):
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=80, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx = sb.TokenContexts(ctx.tokens[:150], ctx.special_mask[:150])
    with torch.no_grad():
        z = signed_sae.encode(sb.Harvester(tiny, [HOOK], exclude_special=False).forward(ctx.tokens)[HOOK])

    def score(f, magnitude):
        lens = set(logit_lens_tokens(tiny, signed_sae, f, 20).tolist())
        codes = z[..., f].masked_fill(ctx.special_mask, 0)
        codes = codes.abs() if magnitude else codes
        val, pos = codes.max(-1)
        top = sorted((-float(v), int(ctx.tokens[c, pos[c]])) for c, v in enumerate(val) if v > 0)[:100]
        return sum(t in lens for _, t in top) / len(top) if len(top) >= 10 else None

    f = next(f for f in range(64) if score(f, True) is not None and score(f, True) != score(f, False))
    assert input_score(tiny, signed_sae, f, ctx) == pytest.approx(score(f, True))
