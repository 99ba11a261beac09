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


def test_batches_give_the_same_answer():
    torch.manual_seed(0)
    sae = sb.SAE(sb.SAEConfig(d_in=8, n_latents=32, k=3))
    x = torch.randn(1000, 8) + 3
    whole = evaluate_sae(sae, x, batch_size=1000)
    parts = evaluate_sae(sae, [x[:300], x[300:]])
    for key in ("fvu", "l0", "dead_fraction", "shrinkage"):
        assert whole[key] == pytest.approx(parts[key], rel=1e-9)


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
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=40, context_size=32), tiny.tokenizer, show_progress=False)
    ctx = sb.TokenContexts(ctx.tokens[:8], ctx.special_mask[:8])
    out = spliced_losses(tiny, sae, "blocks.0.hook_resid_post", ctx)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-4)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-3) and out["kl_sae"] < 1e-6
    assert out["ce_zero"] > out["ce_clean"] + 0.5 and out["kl_zero"] > 0.1
