import math

import pytest
import torch

import saebench as sb
from saebench.evaluate import evaluate_sae, random_baseline, spliced_losses


def identity_sae() -> sb.SAE:
    sae = sb.SAE(sb.SAEConfig(d_in=2, n_latents=3, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -5.0], [0.0, 1.0, -5.0]]))
    return sae


def test_core_metrics_by_hand():
    x = torch.tensor([[1.0, 0.5], [0.0, 2.0]])
    m = evaluate_sae(identity_sae(), x)
    # x_hat = [[1, 0], [0, 2]]: squared error 0.25; mean (0.5, 1.25): total variance 2 * (0.25 + 0.5625)
    assert m["fvu"] == pytest.approx(0.25 / 1.625)
    assert m["explained_variance"] == pytest.approx(1 - 0.25 / 1.625)
    assert m["l0"] == 1.0
    assert m["shrinkage"] == pytest.approx((1 / math.sqrt(1.25) + 1) / 2)
    assert m["dead_fraction"] == pytest.approx(1 / 3) and m["dense_fraction"] == pytest.approx(2 / 3)
    assert m["density_histogram"]["never"] == 1 and sum(m["density_histogram"]["counts"]) == 2
    # per token: rss (0.25, 0), tss about the batch mean (0.8125, 0.8125)
    assert m["fvu_batched"] == pytest.approx(0.25 / 1.625) and m["fvu_per_token"] == pytest.approx(
        (0.25 / 0.8125 + 0) / 2
    )
    assert m["cossim"] == pytest.approx((1 / math.sqrt(1.25) + 1) / 2)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)  # E||x_hat||^2 = E[x_hat.x] = 2.5
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.mul_(2)
    assert evaluate_sae(sae, x)["relative_reconstruction_bias"] == pytest.approx(2.0)  # x_hat = 2 x_hat: 10 / 5


def test_fvu_conventions_differ_by_their_batches_by_hand():
    # two batches of three tokens: batch means differ from the pooled mean, so the three FVUs differ
    x = torch.tensor([[1.0, 0.5], [0.0, 2.0], [3.0, 0.0], [0.0, 4.0], [2.0, 1.0], [1.0, 1.5]])
    sae = identity_sae()
    x_hat = sae.decode(sae.encode(x)).detach()
    rss = (x - x_hat).pow(2).sum(-1)  # 0.25, 0, 0, 0, 1, 1
    pooled = float(rss.sum() / (x - x.mean(0)).pow(2).sum())
    tss = [(b - b.mean(0)).pow(2).sum(-1) for b in (x[:3], x[3:])]
    batched = (float(rss[:3].sum() / tss[0].sum()) + float(rss[3:].sum() / tss[1].sum())) / 2
    per_token = float((rss / torch.cat(tss)).mean())
    m = evaluate_sae(sae, x, batch_size=3)
    assert (m["fvu"], m["fvu_batched"], m["fvu_per_token"]) == pytest.approx((pooled, batched, per_token))
    assert len({round(v, 6) for v in (pooled, batched, per_token)}) == 3


def test_batches_give_the_same_answer():
    torch.manual_seed(0)
    sae = sb.SAE(sb.SAEConfig(d_in=8, n_latents=32, k=3))
    x = torch.randn(1000, 8) + 3
    whole = evaluate_sae(sae, x, batch_size=1000)
    parts = evaluate_sae(sae, [x[:300], x[300:]])
    for key in ("fvu", "l0", "dead_fraction", "shrinkage"):
        assert whole[key] == pytest.approx(parts[key], rel=1e-9)


def test_random_baseline_at_matched_scale_is_the_least_squares_floor():
    torch.manual_seed(0)
    sae = sb.SAE(sb.SAEConfig(d_in=64, n_latents=1024, k=32))  # k random directions' projections overshoot ||x||
    x = torch.randn(2000, 64) * torch.linspace(0.2, 3, 64) + 1.5
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    base = random_baseline(sae, x)

    def fvu(s):
        return evaluate_sae(s, x)["fvu"]

    assert fvu(base) < 1.0 < fvu(random_baseline(sae))  # unscaled unit codes overshoot; matched scale beats the mean
    for factor in (0.9, 1.1):  # the fitted scale is the best one
        other = random_baseline(sae, x)
        with torch.no_grad():
            other.W_enc.mul_(factor)
        assert fvu(other) > fvu(base)
    part = (base.decode(base.encode(x)) - base.b_dec).detach().double()  # least squares: the normal equation holds
    assert float((part * part).sum()) == pytest.approx(
        float((part * (x - base.b_dec).detach().double()).sum()), rel=1e-4
    )


def test_random_baseline_keeps_shape_and_b_dec():
    sae = sb.SAE(sb.SAEConfig(d_in=8, n_latents=32, k=3, activation="batchtopk"))
    with torch.no_grad():
        sae.b_dec.fill_(2.0)
    base = random_baseline(sae)
    assert base.cfg.n_latents == 32 and base.cfg.k == 3 and torch.equal(base.b_dec, sae.b_dec)
    assert not torch.equal(base.W_dec, sae.W_dec)


def test_spliced_losses_perfect_sae_recovers_everything(tiny):
    """An SAE that reconstructs exactly gives CE recovered 1 and KL 0; zero-ablation is worse."""
    d = tiny.cfg.d_model
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=2 * d, k=d, activation="abstopk"))
    with torch.no_grad():  # latents 0..d-1 = +e_i, d..2d-1 = -e_i: abstopk with k=d reproduces x exactly
        eye = torch.eye(d)
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(torch.cat([eye, -eye]).T * torch.tensor([1.0] * d + [0.0] * d))
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=40, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx = sb.TokenContexts(ctx.tokens[:8], ctx.special_mask[:8])
    out = spliced_losses(tiny, sae, "blocks.0.hook_resid_post", ctx)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-3) and out["kl_sae"] < 1e-6
    assert out["ce_zero"] > out["ce_clean"] + 0.5 and out["kl_zero"] > 0.1


def test_spliced_losses_average_only_predictions_between_non_special_tokens(tiny):
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=40, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx = sb.TokenContexts(ctx.tokens[:4].clone(), ctx.special_mask[:4].clone())
    ctx.special_mask[1, 10] = True  # as if a pad / EOS sat there: predictions into and out of it do not count
    assert ctx.special_mask[:, 0].all()  # BOS
    sae = sb.SAE(sb.SAEConfig(d_in=tiny.cfg.d_model, n_latents=64, k=4))
    out = spliced_losses(tiny, sae, "blocks.0.hook_resid_post", ctx)
    with torch.no_grad():
        logits = tiny(ctx.tokens).float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ctx.tokens[:, 1:], reduction="none")
    keep = ~ctx.special_mask
    counted = keep[:, :-1] & keep[:, 1:]
    assert int(counted.sum()) == 4 * 31 - 4 - 2  # BOS -> first token in each row, and row 1's 9 -> 10 and 10 -> 11
    assert out["ce_clean"] == pytest.approx(float(ce[counted].mean()), rel=1e-5)


def test_sae_bench_explained_variance_by_hand():
    """SAEBench 0.6.0's explained_variance: 1 - E rss / (E||x||^2 - (E||x||^2 / d)^2), not the pooled EV."""
    m = evaluate_sae(identity_sae(), torch.tensor([[1.0, 0.5], [0.0, 2.0]]))
    mean_sq = (1.25 + 4.0) / 2  # E||x||^2; mean rss 0.125
    assert m["explained_variance_sae_bench"] == pytest.approx(1 - 0.125 / (mean_sq - (mean_sq / 2) ** 2))
    # the mean predictor: pooled EV 0, SAEBench's far above it (variance about zero, not the mean)
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0)) + 1.0
    sae = sb.SAE(sb.SAEConfig(d_in=64, n_latents=128, k=4))
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # nothing fires: x_hat = b_dec
        sae.b_dec.copy_(x.mean(0))
    m = evaluate_sae(sae, x)
    assert m["l0"] == 0 and m["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    x64 = x.double()
    s = float(x64.pow(2).sum(-1).mean())
    want = 1 - float((x64 - x64.mean(0)).pow(2).sum(-1).mean()) / (s - (s / 64) ** 2)
    assert m["explained_variance_sae_bench"] == pytest.approx(want, rel=1e-6) and want > 0.4


def test_core_extras_by_hand():
    """SAEBench core's extras: densities over 1% / 10% (counts and shares of all firings), mean max cosines."""
    r = math.sqrt(0.5)
    sae = sb.SAE(sb.SAEConfig(d_in=4, n_latents=4, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [r, r, 0, 0]]))
        sae.W_enc.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, r], [0, 0, 0, r]]))  # columns
    eye = torch.eye(4)
    x = torch.cat([eye[[0]].repeat(180, 1), eye[[1]].repeat(15, 1), eye[[2]], torch.zeros(4, 4)])
    m = evaluate_sae(sae, x)  # densities 0.9, 0.075, 0.005, 0 (latent 3 loses to latent 2 on e2)
    assert m["freq_over_1_percent"] == 0.5 and m["dense_fraction"] == 0.25 and m["dead_fraction"] == 0.25
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.975 / 0.98)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.9 / 0.98)
    # decoder rows: 0 and 1 meet row 3 at cos r, row 2 meets none; encoder columns 2 and 3 meet at cos r
    assert m["average_max_decoder_cosine_sim"] == pytest.approx(3 * r / 4)
    assert m["average_max_encoder_cosine_sim"] == pytest.approx(2 * r / 4)


def test_spliced_losses_in_sae_bench_convention(tiny):
    """SAEBench 0.6.0's default: SAE and zero spliced at every position, BOS included; CE over predictions
    from a non-special input (whatever the target), KL over non-special positions, the last included."""
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=40, context_size=32), tiny.tokenizer, show_progress=False
    )
    tokens, special = ctx.tokens[:4].clone(), ctx.special_mask[:4].clone()
    tokens[1, 10], special[1, 10] = tiny.tokenizer.bos_token_id, True  # a document boundary mid-context
    sae = sb.SAE(sb.SAEConfig(d_in=tiny.cfg.d_model, n_latents=64, k=4))
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        clean = tiny(tokens).float()
        with tiny.hooks(fwd_hooks=[(hook, lambda act, hook: sae(act))]):
            spliced = tiny(tokens).float()
        with tiny.hooks(fwd_hooks=[(hook, lambda act, hook: torch.zeros_like(act))]):
            zero = tiny(tokens).float()
    keep = ~special
    ce_mask, kl_mask = keep[:, :-1], keep

    def ce(logits):
        per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return float(per[ce_mask].mean())

    def kl(logits):
        p = clean.log_softmax(-1)
        return float((p.exp() * (p - logits.log_softmax(-1))).sum(-1)[kl_mask].mean())

    out = spliced_losses(tiny, sae, hook, sb.TokenContexts(tokens, special), convention="sae_bench")
    want = {"ce_clean": ce(clean), "ce_sae": ce(spliced), "ce_zero": ce(zero), "kl_sae": kl(spliced)}
    assert {k: out[k] for k in want} == pytest.approx(want, rel=1e-5)
    assert out["kl_zero"] == pytest.approx(kl(zero), rel=1e-5)
    assert out["ce_recovered"] == pytest.approx(
        (want["ce_zero"] - want["ce_sae"]) / (want["ce_zero"] - want["ce_clean"])
    )
    ours = spliced_losses(tiny, sae, hook, sb.TokenContexts(tokens, special))
    assert abs(ours["ce_sae"] - out["ce_sae"]) > 1e-3  # the two conventions are different numbers
    with pytest.raises(sb.ConfigError, match="ce_convention"):
        spliced_losses(tiny, sae, hook, sb.TokenContexts(tokens, special), convention="SAEBench")


def at_k(sae: sb.SAE, k: int) -> sb.SAE:
    """The same weights in an SAE whose own k is k (the path a k' must agree with)."""
    import dataclasses

    other = sb.SAE(dataclasses.replace(sae.cfg, k=k))
    other.load_state_dict(sae.state_dict())
    return other.eval()


def test_figures_at_k_prime_are_those_of_the_sae_at_that_k(tiny):
    torch.manual_seed(0)
    d = tiny.cfg.d_model
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=4 * d, k=12, activation="hierarchical_topk")).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    x = torch.randn(500, d) * 2
    got = evaluate_sae(sae, x, k=3)
    with torch.no_grad():  # brute force: the 3 largest, ReLU'd
        top = sae.pre_acts(x).topk(3, dim=-1)
        z = torch.zeros(500, 4 * d).scatter(1, top.indices, top.values.clamp(min=0))
        rss = (x - z @ sae.W_dec - sae.b_dec).pow(2).sum()
    assert got["fvu"] == pytest.approx(float(rss / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert got["l0"] <= 3 and got == evaluate_sae(at_k(sae, 3), x)
    assert random_baseline(sae, x, k=3).cfg.k == 3 and evaluate_sae(random_baseline(sae, x, k=3), x)["l0"] <= 3
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=40, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx = sb.TokenContexts(ctx.tokens[:4], ctx.special_mask[:4])
    hook = "blocks.0.hook_resid_post"
    spliced = spliced_losses(tiny, sae, hook, ctx, k=3)
    assert spliced == spliced_losses(tiny, at_k(sae, 3), hook, ctx)
    assert spliced["ce_sae"] != spliced_losses(tiny, sae, hook, ctx)["ce_sae"]
