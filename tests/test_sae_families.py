"""Every sparsifier against a dense PyTorch reference written independently (sort + mask)."""

from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

import saebench as sb
from saebench.sae import sparsify
from saebench.sae.losses import normalised_mse, random_prefixes, sae_loss

B, D, N, K = 24, 16, 64, 4


def dense_reference(pre: torch.Tensor, activation: str, k: int, freq: torch.Tensor | None = None) -> torch.Tensor:
    b, n = pre.shape
    z = torch.zeros_like(pre)
    if activation == "topk":
        order = pre.argsort(dim=-1, descending=True)[:, :k]
        z.scatter_(1, order, pre.gather(1, order).clamp(min=0))
    elif activation == "abstopk":
        order = pre.abs().argsort(dim=-1, descending=True)[:, :k]
        z.scatter_(1, order, pre.gather(1, order))
    elif activation in ("batchtopk", "mutual_choice"):
        flat = pre.clamp(min=0).flatten()
        keep = flat.argsort(descending=True)[: k * b]
        z = torch.zeros_like(flat).index_put((keep,), flat[keep]).view(b, n)
    elif activation == "feature_choice":
        caps = sparsify.zipf_capacities(n, b, k, 1.0)
        acts = pre.clamp(min=0)
        for j in range(n):
            # j's place when features are ranked by firing rate, ties by index (by index alone without rates)
            rank = j if freq is None else int((freq > freq[j]).sum() + (freq[:j] == freq[j]).sum())
            rows = acts[:, j].argsort(descending=True)[: caps[rank]]
            z[rows, j] = acts[rows, j]
    return z


@pytest.mark.parametrize("activation", ["topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice"])
@pytest.mark.parametrize("matryoshka, reduce", [(None, "sum"), ([8, 32, N], "sum"), ([8, 32, N], "mean")])
@pytest.mark.parametrize("rates", [False, True])  # the trainer's firing rates (feature choice's capacities follow them)
def test_forward_and_gradients_match_dense_reference(activation, matryoshka, reduce, rates):
    freq = torch.randint(0, 6, (N,), generator=torch.Generator().manual_seed(2)) / 10 if rates else None  # with ties
    torch.manual_seed(0)
    cfg = sb.SAEConfig(
        d_in=D, n_latents=N, activation=activation, k=K, matryoshka=matryoshka, matryoshka_reduce=reduce, aux_coef=0.0
    )
    sae = sb.SAE(cfg, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(B, D)
    out = sae_loss(sae.train(), x, freq=freq)
    out.loss.backward()
    got = {n: cast(torch.Tensor, p.grad).clone() for n, p in sae.named_parameters()}

    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    z = dense_reference(pre, activation, K, freq)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    loss = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    for m in (matryoshka or [])[:-1]:
        loss = loss + ((x - z[:, :m] @ params["W_dec"][:m] - params["b_dec"]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    if reduce == "mean":
        loss = loss / len(matryoshka)
    loss.backward()

    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert torch.allclose(out.selection.dense(N), z, atol=1e-6)
    assert torch.allclose(out.loss, loss, rtol=1e-5)
    for name, p in params.items():
        assert p.grad is not None
        assert torch.allclose(got[name], p.grad, atol=1e-5, rtol=1e-4), name


def test_matryoshka_means_by_hand():
    """prefix_mean: the mean of the prefixes' errors (the full SAE's included); bussmann_mean: Bussmann et al.'s
    code (bartbussmann/matryoshka_sae, GlobalBatchTopKMatryoshkaSAE.get_loss_dict), whose mean also counts the
    b_dec-only reconstruction: n + 1 terms. The old name "mean" reads as prefix_mean, with a warning."""
    torch.manual_seed(0)
    x = torch.randn(B, D)
    losses = {}
    for reduce in ("sum", "prefix_mean", "bussmann_mean"):
        sae = sb.SAE(
            sb.SAEConfig(d_in=D, n_latents=N, k=K, matryoshka=[8, 32, N], matryoshka_reduce=reduce, aux_coef=0.0),
            seed=1,
        )
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
        losses[reduce] = sae_loss(sae.train(), x).loss.detach()
    var = ((x - x.mean(0)) ** 2).sum()
    b_dec_only = float(((x - sae.b_dec.detach()) ** 2).sum() / var)
    assert float(losses["prefix_mean"]) == pytest.approx(float(losses["sum"]) / 3, rel=1e-6)
    assert float(losses["bussmann_mean"]) == pytest.approx((float(losses["sum"]) + b_dec_only) / 4, rel=1e-6)
    with pytest.warns(UserWarning, match="'mean' is now called 'prefix_mean'"):
        old = sb.SAEConfig(d_in=D, n_latents=N, k=K, matryoshka=[8, N], matryoshka_reduce=cast(Any, "mean"))
    assert old.matryoshka_reduce == "prefix_mean"


def test_random_prefixes_are_log_uniform_nested_and_end_at_n():
    cfg = sb.SAEConfig(d_in=D, n_latents=4096, k=K, matryoshka=[16, 4096], matryoshka_random=3)
    gen = torch.Generator().manual_seed(0)
    draws = [random_prefixes(cfg, gen) for _ in range(2000)]
    assert all(d == sorted(set(d)) and d[-1] == 4096 and 16 <= d[0] and len(d) <= 4 and d[-2] < 4096 for d in draws)
    sizes = torch.tensor([s for d in draws for s in d[:-1]], dtype=torch.float64)
    # log-uniform on [16, 4096): log2 uniform on [4, 12), so median 2^8 and a quarter below 2^6
    assert abs(float(sizes.log2().median()) - 8) < 0.15
    assert abs(float((sizes < 64).double().mean()) - 0.25) < 0.03
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert random_prefixes(cfg, gen_a) == random_prefixes(cfg, gen_b)
    with pytest.raises(sb.ConfigError, match="matryoshka_random needs"):
        sb.SAEConfig(d_in=D, n_latents=64, k=K, matryoshka_random=2)
    with pytest.raises(sb.ConfigError, match="sum or mean"):
        sb.SAEConfig(d_in=D, n_latents=64, k=K, matryoshka=[8, 64], matryoshka_reduce=cast(Any, "max"))


def test_l0_per_family():
    torch.manual_seed(0)
    pre = torch.randn(B, N)
    assert (sparsify.topk(pre, K).l0() <= K).all()
    assert (sparsify.abstopk(pre, K).l0() == K).all()
    assert sparsify.batchtopk(pre, K).l0().sum() == K * B
    assert sparsify.feature_choice(pre, K).l0().sum() <= K * B


def test_zipf_capacities_by_hand():
    # n=4, batch=10, k=2 -> 20 slots shaped like 1, 1/2, 1/3, 1/4 (sum 25/12): 9.6, 4.8, 3.2, 2.4;
    # floors 9, 4, 3, 2 = 18; the two largest remainders (.8 for j=1, .6 for j=0) get one more each.
    assert sparsify.zipf_capacities(4, 10, 2, 1.0) == (10, 5, 3, 2)
    # no feature may take more than the batch: 1 -> capped at 4, the rest is shared by the others
    caps = sparsify.zipf_capacities(4, 4, 3, 1.0)
    assert sum(caps) == 12 and max(caps) == 4 and caps == tuple(sorted(caps, reverse=True))
    assert sparsify.zipf_capacities(5, 8, 2, 0.0) == (4, 3, 3, 3, 3)


def test_inference_threshold_is_per_token():
    cfg = sb.SAEConfig(d_in=D, n_latents=N, activation="batchtopk", k=K)
    sae = sb.SAE(cfg).eval()
    sae.threshold.fill_(0.2)
    x = torch.randn(B, D)
    pre = sae.pre_acts(x)
    expected = torch.where(pre > 0.2, pre, torch.zeros_like(pre))
    assert torch.allclose(sae.encode(x), expected)
    assert torch.allclose(sae.encode(x[:3]), sae.encode(x)[:3])


def test_encode_decode_shapes_and_width_check():
    sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, k=K))
    x = torch.randn(2, 5, D)
    z = sae.encode(x)
    assert z.shape == (2, 5, N) and (z != 0).sum(-1).max() <= K
    assert sae(x).shape == x.shape
    with pytest.raises(sb.DataError, match="width 7 but the SAE expects d_in=16"):
        sae.encode(torch.randn(3, 7))


def test_normalised_mse_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    # error 1, variance about the mean (2, 0): 1 + 1 = 2
    assert normalised_mse(x, x_hat).item() == pytest.approx(0.5)


def test_decoder_parallel_grad_removed_and_renormalised():
    sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, k=K))
    sae.W_dec.grad = torch.randn(N, D)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(N), atol=1e-6)


def test_auxk_reconstructs_error_from_dead_latents():
    torch.manual_seed(0)
    cfg = sb.SAEConfig(d_in=D, n_latents=N, k=K, k_aux=3)
    sae = sb.SAE(cfg)
    x = torch.randn(B, D)
    dead = torch.zeros(N, dtype=torch.bool)
    assert sae_loss(sae, x, dead=dead).aux == 0
    dead[:10] = True
    out = sae_loss(sae, x, dead=dead)
    pre = sae.pre_acts(x)
    e = x - out.x_hat
    v, i = pre[:, :10].topk(3, dim=-1)
    e_hat = torch.zeros(B, N).scatter(1, i, v.clamp(min=0)) @ sae.W_dec
    assert torch.allclose(out.aux, normalised_mse(e, e_hat), rtol=1e-5)


def test_fold_input_scale_keeps_reconstruction():
    torch.manual_seed(0)
    for activation in ("topk", "batchtopk", "jumprelu"):
        sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, k=K, activation=activation)).eval()
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
            sae.b_dec.normal_()
            sae.set_threshold(torch.full((N,), 0.1))
        x = torch.randn(B, D)
        scale = 2.5
        ref = sae(x * scale) / scale
        sae.fold_input_scale(scale)
        assert torch.allclose(sae(x), ref, atol=1e-5)


def test_aux_zipf_expected_shares_are_capped_at_one_fire_per_token():
    from saebench.sae.losses import underused

    # n=4, k=3: raw shares 3 * (1, 1/2, 1/3, 1/4) / (25/12) = 1.44, .72, .48, .36. The first passes one
    # fire per token, so it is capped at 1 and the other 2 are re-shared by 1/2 : 1/3 : 1/4 (sum 13/12):
    # 12/13, 8/13, 6/13.
    shares = sparsify.zipf_shares(4, 3, 1.0, 1.0)
    assert shares.tolist() == pytest.approx([1.0, 12 / 13, 8 / 13, 6 / 13])
    # flagged below half of those: .9 >= .5, .5 >= 6/13, .3 < 4/13, .2 < 3/13
    freq = torch.tensor([0.3, 0.9, 0.2, 0.5])
    assert underused(freq, 3, 1.0).tolist() == [True, False, True, False]
    # the review's case: n = 3072, k = 32 used to expect 3.72 fires per token of the densest latent,
    # so a latent firing on every token was flagged as under-used
    freq = torch.full((3072,), 31 / 3071)
    freq[0] = 1.0
    assert not underused(freq, 32, 1.0)[0]
    assert sparsify.zipf_shares(3072, 32, 1.0, 1.0).sum().item() == pytest.approx(32)


def test_fire_rate_starts_from_the_first_batch():
    from saebench.train import SAETrainer

    torch.manual_seed(0)
    cfg = sb.SAEConfig(d_in=D, n_latents=N, activation="mutual_choice", k=K)
    x = torch.randn(64, D)
    trainer = SAETrainer(cfg, sb.TrainConfig(n_tokens=640, batch_size=64), sample=x)
    assert trainer.fire_rate() is None  # no estimate yet: no latent is called under-used at step 0
    with torch.no_grad():
        sel = trainer.sae.select(trainer.sae.pre_acts(x * trainer.scale), train=True)
    fired = torch.zeros(N).index_add_(0, sel.indices.reshape(-1), (sel.values != 0).reshape(-1).float()) / 64
    trainer.step(x)
    assert torch.allclose(cast(torch.Tensor, trainer.fire_rate()), fired, atol=1e-6)  # not 1% of it, as the raw EMA


def test_jumprelu_pseudo_gradients_by_hand():
    # eps 0.5: the kernel K((pre - t) / eps) / eps is 2 where |pre - t| < 0.25, else 0
    pre = torch.tensor([0.9, 1.1, 1.3, 0.7, 2.0], requires_grad=True)
    t = torch.tensor(1.0, requires_grad=True).expand(5)
    z = sparsify.jump(pre, t, 0.5)
    assert z.tolist() == pytest.approx([0.0, 1.1, 1.3, 0.0, 2.0])
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    dpre, dt = torch.autograd.grad(z, (pre, t), g)
    assert dpre.tolist() == [0.0, 2.0, 3.0, 0.0, 5.0]  # H(pre - t) g
    assert dt.tolist() == pytest.approx([-2.0, -4.0, 0.0, 0.0, 0.0])  # -(t / eps) K g: 0.9 and 1.1 in the window
    h = sparsify.step(pre, t, 0.5)
    assert h.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    dpre, dt = torch.autograd.grad(h, (pre, t), g, allow_unused=True)
    assert dpre is None or not dpre.any()
    assert dt.tolist() == pytest.approx([-2.0, -4.0, 0.0, 0.0, 0.0])  # -(1 / eps) K g


def test_jumprelu_straight_through_to_the_input_by_hand():
    """ste_to_input: the same values and threshold gradients, and pre gets minus the threshold's kernel term."""
    pre = torch.tensor([0.9, 1.1, 1.3, 0.7, 2.0], requires_grad=True)
    t = torch.tensor(1.0, requires_grad=True).expand(5)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    z = sparsify.jump(pre, t, 0.5, to_input=True)
    assert z.tolist() == pytest.approx([0.0, 1.1, 1.3, 0.0, 2.0])
    dpre, dt = torch.autograd.grad(z, (pre, t), g)
    assert dpre.tolist() == pytest.approx([2.0, 6.0, 3.0, 0.0, 5.0])  # H g + (t / eps) K g
    assert dt.tolist() == pytest.approx([-2.0, -4.0, 0.0, 0.0, 0.0])
    h = sparsify.step(pre, t, 0.5, to_input=True)
    assert h.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    dpre, dt = torch.autograd.grad(h, (pre, t), g)
    assert dpre.tolist() == pytest.approx([2.0, 4.0, 0.0, 0.0, 0.0])  # (1 / eps) K g
    assert dt.tolist() == pytest.approx([-2.0, -4.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_loss_and_gradients_match_dense_reference(ste_to_input):
    """The training selection (active entries plus the kernel's lower half-window at value 0) against a dense
    JumpReLU: autograd for the weights, eq. 11-12 of Rajamanoharan et al. for the threshold; with ste_to_input,
    pre also gets the kernel terms with the opposite sign (the jump and the step depend on pre - theta alone)."""
    torch.manual_seed(0)
    cfg = sb.SAEConfig(
        d_in=D, n_latents=N, activation="jumprelu", k=K, aux_coef=0.0, bandwidth=0.1, ste_to_input=ste_to_input
    )
    eps, lam = cfg.epsilon, 0.7
    sae = sb.SAE(cfg, seed=1).train()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.set_threshold(torch.rand(N) * 0.8 + 0.2)
    x = torch.randn(B, D)
    out = sae_loss(sae, x, l0_coef=lam)
    out.loss.backward()
    got = {n: cast(torch.Tensor, p.grad).clone() for n, p in sae.named_parameters()}

    p = {n: v.detach().clone().requires_grad_(True) for n, v in sae.named_parameters()}
    theta = p["log_threshold"].detach().exp()
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    z = torch.where(pre > theta, pre, torch.zeros_like(pre))
    z_leaf = z.detach().requires_grad_(True)
    var = ((x - x.mean(0)) ** 2).sum()
    fvu = ((x - z_leaf @ p["W_dec"] - p["b_dec"]) ** 2).sum() / var
    l0 = (pre > theta).float().sum(-1).mean()
    loss = fvu + lam * l0 / K
    fvu.backward()
    window = ((pre.detach() - theta).abs() < eps / 2).float() / eps
    assert window.sum() > 0 and (z != 0).sum() > 0
    kernel_terms = window * (theta * cast(torch.Tensor, z_leaf.grad) + lam / (K * B))
    d_theta = -kernel_terms.sum(0)
    # the weights' gradients: through the active entries, and with ste_to_input straight to pre as well
    torch.autograd.backward([z, pre], [cast(torch.Tensor, z_leaf.grad), kernel_terms * ste_to_input])

    assert torch.allclose(out.loss, loss, rtol=1e-5)
    assert torch.allclose(out.selection.dense(N), z, atol=1e-6)
    assert torch.allclose(out.selection.l0().mean(), l0)
    assert torch.allclose(got["log_threshold"], d_theta * theta, atol=1e-5)  # d/dlog(theta) = theta d/dtheta
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(got[name], cast(torch.Tensor, p[name].grad), atol=1e-5, rtol=1e-4), name
    sae.eval()
    assert torch.allclose(sae.encode(x), z, atol=1e-6)  # inference: the same rule


def test_jumprelu_saves_its_threshold_and_loads_it_back(tmp_path):
    sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, activation="jumprelu", k=K)).eval()
    sae.set_threshold(torch.rand(N))
    sae.save(tmp_path)
    assert set(load_file(str(tmp_path / "sae.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    back = sb.SAE.load(tmp_path)
    x = torch.randn(B, D) * 2
    assert torch.equal(back.threshold, sae.threshold) and torch.equal(back.encode(x), sae.encode(x))
    assert torch.allclose(back.log_threshold.exp(), sae.threshold)


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_reattached_selection_gives_the_same_gradients(monkeypatch, ste_to_input):
    """The sparse encoder backward (pre without autograd, the selection's entries recomputed) on the torch path:
    the same loss and gradients as the dense backward, the threshold's pseudo-gradient included."""
    from saebench.sae import losses

    cfg = sb.SAEConfig(
        d_in=D, n_latents=N, activation="jumprelu", k=K, bandwidth=0.1, k_aux=3, ste_to_input=ste_to_input
    )
    x, dead = torch.randn(B, D), torch.arange(N) % 5 == 0
    grads = []
    for reattach in (False, True):
        monkeypatch.setattr(losses.sparse, "sparse_encoder_backward", lambda W, r=reattach: r)
        sae = sb.SAE(cfg, seed=2).train()
        sae.set_threshold(torch.linspace(0.1, 0.9, N))
        out = sae_loss(sae, x, dead=dead, l0_coef=0.3)
        out.loss.backward()
        grads.append({"loss": out.loss.detach(), **{n: cast(torch.Tensor, p.grad) for n, p in sae.named_parameters()}})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


# -- HierarchicalTopK (Balagansky et al. 2025) ----------------------------------------------------
def naive_prefix_errors(r0, values, indices, W_dec):
    """The reference's way: every prefix sum materialised, [batch k d], and autograd through it."""
    prefix = (values[..., None] * W_dec[indices]).cumsum(1)
    return (r0[:, None] - prefix).pow(2).sum((0, 2))


def test_prefix_errors_and_gradients_match_the_naive_cumsum():
    from saebench.sae.losses import PrefixErrors

    torch.manual_seed(0)
    r0 = torch.randn(B, D, requires_grad=True)
    values = torch.randn(B, K + 3, requires_grad=True)  # any values: zeros and negatives too
    with torch.no_grad():
        values[:3, -2:] = 0
    indices = torch.randint(0, N, (B, K + 3))  # repeats within a token too
    W_dec = (torch.randn(N, D) * 1.7).requires_grad_()  # rows not unit-norm: the recurrence must not assume it
    weights = torch.rand(K + 3)  # a general upstream gradient, not only the mean
    errs, residual = PrefixErrors.apply(r0, values, indices, W_dec)
    (errs * weights).sum().backward()
    got = [cast(torch.Tensor, t.grad).clone() for t in (r0, values, W_dec)]
    for t in (r0, values, W_dec):
        t.grad = None
    want = naive_prefix_errors(r0, values, indices, W_dec)
    (want * weights).sum().backward()
    assert torch.allclose(errs, want, rtol=1e-5)
    assert torch.allclose(residual, r0 - (values[..., None] * W_dec[indices]).sum(1), atol=1e-5)
    for g, t in zip(got, (r0, values, W_dec), strict=True):
        assert torch.allclose(g, cast(torch.Tensor, t.grad), atol=1e-4, rtol=1e-4)


def test_hierarchical_loss_and_gradients_match_a_dense_reference():
    torch.manual_seed(0)
    k = 6
    sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, activation="hierarchical_topk", k=k, k_aux=5), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
    x = torch.randn(B, D)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = sae_loss(sae.train(), x, dead=dead)
    out.loss.backward()
    got = {n: cast(torch.Tensor, p.grad).clone() for n, p in sae.named_parameters()}

    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    order = pre.argsort(dim=-1, descending=True)[:, :k]  # sorted by value, descending
    values = pre.gather(1, order).clamp(min=0)
    var = ((x - x.mean(0)) ** 2).sum()
    prefix = (values[..., None] * params["W_dec"][order]).cumsum(1) + params["b_dec"]  # [B k D]
    recon = ((x[:, None] - prefix) ** 2).sum((0, 2)).mean() / var
    x_hat = prefix[:, -1]
    # AuxK on the full top-k's error, as for topk
    cand = torch.where(dead, pre, torch.full_like(pre, -torch.inf)).topk(5, dim=-1)
    e_hat = torch.zeros(B, N).scatter(1, cand.indices, cand.values.clamp(min=0)) @ params["W_dec"]
    error = (x - x_hat).detach()
    aux = ((error - e_hat) ** 2).sum() / ((error - error.mean(0)) ** 2).sum()
    loss = recon + sae.cfg.aux_coef * aux
    loss.backward()

    assert torch.equal(out.selection.indices, order) and torch.allclose(out.selection.values, values, atol=1e-6)
    assert torch.allclose(out.x_hat, x_hat, atol=1e-5)
    assert torch.allclose(out.mse, ((x - x_hat) ** 2).sum() / var, rtol=1e-5)
    assert torch.allclose(out.aux, aux, rtol=1e-5) and out.aux > 0
    assert torch.allclose(out.loss, loss, rtol=1e-5)
    for name, p in params.items():
        assert torch.allclose(got[name], cast(torch.Tensor, p.grad), atol=1e-5, rtol=1e-4), name


def largest_saved_for_backward(fn) -> int:
    """The most elements of any one tensor that autograd keeps for the backward of fn()."""
    saved = [0]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fn()
    return max(saved)


def test_hierarchical_loss_keeps_no_batch_k_d_tensor_for_the_backward():
    torch.manual_seed(0)
    b, d, n, k = 64, 32, 48, 16  # batch * k * d is 8x larger than anything the step needs: pre is [b n]
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=n, activation="hierarchical_topk", k=k, aux_coef=0.0)).train()
    x = torch.randn(b, d)
    assert largest_saved_for_backward(lambda: sae_loss(sae, x)) < b * k * d
    values, indices = torch.rand(b, k, requires_grad=True), torch.randint(0, n, (b, k))
    assert largest_saved_for_backward(lambda: naive_prefix_errors(x, values, indices, sae.W_dec)) == b * k * d


def test_hierarchical_with_matryoshka_is_refused():
    with pytest.raises(sb.ConfigError, match="does not combine with hierarchical_topk"):
        sb.SAEConfig(d_in=D, n_latents=N, activation="hierarchical_topk", k=K, matryoshka=[8, N])


def test_encode_at_k_prime_truncates_the_per_token_selection():
    torch.manual_seed(0)
    x = torch.randn(B, D)
    for activation in ("hierarchical_topk", "topk", "abstopk"):
        sae = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, activation=activation, k=8)).eval()
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
        pre = sae.pre_acts(x)
        for k in (1, 3, 8, 20):
            z = sae.encode(x, k=k)
            assert torch.equal(z, dense_reference(pre, "abstopk" if activation == "abstopk" else "topk", k))
            assert torch.equal(sae(x, k=k), sae.decode(z))
        assert torch.equal(sae.encode(x, k=8), sae.encode(x))
    sel = sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, activation="hierarchical_topk", k=8)).select(pre, train=False)
    assert (sel.values[:, :-1] >= sel.values[:, 1:]).all()  # sorted: its first k' are the top k'
    for bad in (0, N + 1):
        with pytest.raises(sb.ConfigError, match=f"k'={bad} must lie in"):
            sae.encode(x, k=bad)
    for activation in ("batchtopk", "mutual_choice", "feature_choice"):
        with pytest.raises(sb.ConfigError, match="learned threshold"):
            sb.SAE(sb.SAEConfig(d_in=D, n_latents=N, activation=activation, k=K)).encode(x, k=2)
