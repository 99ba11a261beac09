"""Gradient TopK (Olmo et al. 2025) end to end: the harvested loss gradients against a direct autograd
computation, the ranking against a dense reference on tiny's gradients, the cache (round trip and
kill/resume), training, the input-scale fold, save/load, SAELens export and the spliced evaluation."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import saebench as sb
from saebench.cli import main
from saebench.config import HarvestConfig
from saebench.data import DataConfig
from saebench.errors import ConfigError
from saebench.evaluate import spliced_losses
from saebench.harvest import harvest_to_disk
from saebench.interop import load_saelens, save_saelens
from saebench.sae.losses import sae_loss
from saebench.train import grad_key

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
RESID = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def contexts(tiny):
    ctx = sb.load_contexts(
        DataConfig(split="test", max_documents=200, context_size=32), tiny.tokenizer, show_progress=False
    )
    ctx.special_mask[2, 12] = True  # as if an EOS sat there: predictions into and out of it are not counted
    return ctx


def direct_grad(model, tokens: torch.Tensor, special: torch.Tensor, hook: str) -> torch.Tensor:
    """d(sum of the counted next-token NLLs)/d(activation at hook), the activation made a leaf: [b pos d]."""
    leaf = {}

    def swap(act, hook):
        leaf["x"] = act.detach().requires_grad_()
        return leaf["x"]

    with model.hooks(fwd_hooks=[(hook, swap)]):
        logp = model(tokens).double().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    counted = ~special[:, :-1] & ~special[:, 1:]
    (grad,) = torch.autograd.grad(nll[counted].sum(), leaf["x"])
    return grad.flatten(2) if grad.dim() == 4 else grad


def test_harvested_gradients_equal_direct_autograd(tiny, contexts):
    tokens, special = contexts.tokens[:4], contexts.special_mask[:4]
    rows, _ = sb.Harvester(tiny, HOOKS, exclude_special=False, gradients=True).activations(tokens, special)
    plain, _ = sb.Harvester(tiny, HOOKS, exclude_special=False).activations(tokens, special)
    kept, _ = sb.Harvester(tiny, HOOKS, gradients=True).activations(tokens, special)
    for hook in HOOKS:  # one backward for every hook, upstream ones included, as each hook's own
        ref = direct_grad(tiny, tokens, special, hook).float()
        got = rows[grad_key(hook)].reshape(ref.shape)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), hook
        assert torch.equal(rows[hook], plain[hook])  # the activations are the plain forward's
        assert torch.equal(kept[grad_key(hook)], got[~special]) and torch.equal(
            kept[hook], plain[hook][~special.flatten()]
        )
        assert got[:, -1].abs().max() == 0  # the last position predicts nothing counted and nothing reads it
        uncounted = torch.stack([got[0, 0], got[2, 11], got[2, 12]]).abs().amax(-1)  # BOS, 11 -> 12, 12 -> 13
        if hook == HOOKS[0]:  # block 1 reads these positions for counted predictions
            assert uncounted.min() > 0
        else:  # block 1's outputs reach only their own position's prediction
            assert uncounted.max() == 0


def test_gradient_ranking_on_tiny_equals_a_dense_reference(tiny, contexts):
    tokens, special = contexts.tokens[:8], contexts.special_mask[:8]
    x = sb.Harvester(tiny, [RESID]).activations(tokens, special)[0][RESID]
    g = direct_grad(tiny, tokens, special, RESID)[~special].float()
    n, k, beta = 96, 6, 3.0
    sae = sb.SAE(sb.SAEConfig(d_in=x.shape[1], n_latents=n, k=k, activation="gradient_topk", gradient_beta=beta))
    with torch.no_grad():
        sae.b_enc.normal_(0, 1.0)
        sae.b_dec.copy_(x.mean(0))
    z = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach().clamp(min=0)
    score = z * (1 + beta * (g @ sae.W_dec.detach().T).abs())
    top = score.argsort(-1, descending=True)[:, :k]
    ref = torch.zeros_like(z).scatter(1, top, z.gather(1, top))
    got = sae.encode(x, grad=g)
    assert torch.allclose(got, ref, atol=1e-5)
    topk = sae.encode(x)  # without gradients: plain TopK
    assert ((got != 0) != (topk != 0)).any(dim=-1).float().mean() > 0.2  # the gradients change the choice
    plain = sb.SAE(sb.SAEConfig(d_in=x.shape[1], n_latents=n, k=k))
    plain.load_state_dict(sae.state_dict())
    assert torch.equal(topk, plain.encode(x))


def test_training_step_matches_a_dense_reference():
    torch.manual_seed(0)
    b, d, n, k, beta = 24, 16, 64, 4, 2.0
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=n, k=k, activation="gradient_topk", gradient_beta=beta, aux_coef=0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    x, g = torch.randn(b, d), torch.randn(b, d)
    out = sae_loss(sae.train(), x, grad=g)
    out.loss.backward()
    params = {name: p.detach().clone().requires_grad_(True) for name, p in sae.named_parameters()}
    z = ((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]).clamp(min=0)
    top = (z.detach() * (1 + beta * (g @ params["W_dec"].detach().T).abs())).argsort(-1, descending=True)[:, :k]
    z = torch.zeros_like(z).scatter(1, top, z.gather(1, top))
    loss = ((x - z @ params["W_dec"] - params["b_dec"]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    assert torch.allclose(out.selection.dense(n), z, atol=1e-6) and torch.allclose(out.loss, loss, rtol=1e-5)
    for (name, _), want in zip(params.items(), grads, strict=True):
        assert torch.allclose(getattr(sae, name).grad, want, atol=1e-5, rtol=1e-4), name


def test_fold_input_scale_keeps_the_gradient_ranking():
    torch.manual_seed(0)
    sae = sb.SAE(sb.SAEConfig(d_in=16, n_latents=64, k=4, activation="gradient_topk", gradient_beta=5.0)).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_()
    x, g, scale = torch.randn(32, 16), torch.randn(32, 16), 2.5
    ref = sae.encode(x * scale, g / scale) / scale  # trained on scale * x, where the gradient is g / scale
    sae.fold_input_scale(scale)
    assert sae.cfg.gradient_beta == pytest.approx(5.0 / scale)
    assert torch.allclose(sae.encode(x, g), ref, atol=1e-5)


def _cache(tmp, tiny, contexts, max_shards=None, n_tokens=500, gradients=True):
    cfg = HarvestConfig(hooks=HOOKS[:2], n_tokens=n_tokens, batch_size=5, shard_contexts=5, gradients=gradients)
    h = sb.Harvester(tiny, cfg.hooks, gradients=gradients)
    return harvest_to_disk(h, contexts, tmp, cfg, DataConfig(split="test"), "tiny", max_shards=max_shards)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_holds_gradients_beside_activations(tmp_path, tiny, contexts):
    manifest = _cache(tmp_path, tiny, contexts, n_tokens=300)
    assert manifest["gradients"] is True
    store = sb.ActivationStore(tmp_path, HOOKS[1])
    acts, grads = store.load_all(), store.load_all(key="grads")
    rows, _ = sb.Harvester(tiny, HOOKS[:2], gradients=True).activations(
        contexts.tokens[:10], contexts.special_mask[:10]
    )
    assert torch.equal(acts, rows[HOOKS[1]][:300]) and torch.equal(grads, rows[grad_key(HOOKS[1])][:300])
    batches = list(store.iter_batches(64, seed=1, gradients=True))
    got_a, got_g = (torch.cat([b[key] for b in batches]) for key in (HOOKS[1], grad_key(HOOKS[1])))
    order, ref_order = got_a[:, 0].argsort(), acts[:, 0].argsort()
    assert torch.equal(got_a[order], acts[ref_order]) and torch.equal(got_g[order], grads[ref_order])
    assert torch.equal(got_a, torch.cat(list(store.iter_batches(64, seed=1))))  # the same rows in the same order
    _cache(tmp_path / "plain", tiny, contexts, n_tokens=300, gradients=False)
    with pytest.raises(sb.DataError, match="other settings \\(gradients\\)"):  # no silent reuse without them
        _cache(tmp_path / "plain", tiny, contexts, n_tokens=300)
    with pytest.raises(sb.DataError, match="has no gradients"):
        next(sb.ActivationStore(tmp_path / "plain", HOOKS[1]).iter_batches(64, gradients=True))


def test_gradient_cache_resume_equals_uninterrupted(tmp_path, tiny, contexts):
    whole = _cache(tmp_path / "whole", tiny, contexts)
    part = _cache(tmp_path / "part", tiny, contexts, max_shards=2)
    assert not part["complete"] and len(part["shards"]) == 2
    (tmp_path / "part" / HOOKS[0] / "shard_00002.safetensors").write_bytes(b"partial")  # killed mid-shard
    assert _cache(tmp_path / "part", tiny, contexts) == whole
    assert _files(tmp_path / "part") == _files(tmp_path / "whole")


def test_stream_keeps_gradients_with_their_activations(tiny, contexts):
    h = sb.Harvester(tiny, [RESID], gradients=True)
    sub = sb.TokenContexts(contexts.tokens[:24], contexts.special_mask[:24])
    batches = list(sb.stream_activations(h, sub, batch_tokens=64, buffer_tokens=256, batch_size=8, epochs=1))
    got_a, got_g = (torch.cat([b[key] for b in batches]) for key in (RESID, grad_key(RESID)))
    ref = [h.activations(sub.tokens[i : i + 8], sub.special_mask[i : i + 8])[0] for i in range(0, 24, 8)]
    ref_a, ref_g = (torch.cat([r[key] for r in ref]) for key in (RESID, grad_key(RESID)))
    order, ref_order = got_a[:, 0].argsort(), ref_a[:, 0].argsort()
    assert not torch.equal(got_a, ref_a)  # shuffled
    assert torch.equal(got_a[order], ref_a[ref_order]) and torch.equal(got_g[order], ref_g[ref_order])


def test_train_save_load_round_trip(tmp_path, tiny, contexts):
    rows, _ = sb.Harvester(tiny, [RESID], gradients=True).activations(contexts.tokens[:48], contexts.special_mask[:48])
    x, g = rows[RESID], rows[grad_key(RESID)]
    cfg = sb.SAEConfig(d_in=x.shape[1], n_latents=256, k=8, activation="gradient_topk", gradient_beta=2.0)
    train = sb.TrainConfig(n_tokens=4096, batch_size=256, log_every=8)
    with pytest.raises(ConfigError, match="set harvest.gradients: true"):
        sb.train_sae(cfg, x, train, show_progress=False)
    sae, report = sb.train_sae(cfg, x, train, run_dir=tmp_path, show_progress=False, grads=g)
    assert sae.cfg.gradient_beta == pytest.approx(2.0 / report["input_scale"])
    loaded = sb.SAE.load(tmp_path / "sae")
    assert loaded.cfg == sae.cfg and torch.equal(loaded.encode(x, g), sae.encode(x, g))
    assert report["l0"] == 8 and sb.evaluate_sae(loaded, x, grads=g)["fvu"] < 1
    topk, _ = sb.train_sae(sb.SAEConfig(d_in=x.shape[1], n_latents=256, k=8), x, train, show_progress=False)
    assert not torch.equal(topk.W_dec, sae.W_dec)  # the gradients steered training
    save_saelens(loaded, tmp_path / "saelens")
    back = load_saelens(tmp_path / "saelens")
    assert back.cfg.activation == "gradient_topk" and back.cfg.gradient_beta == loaded.cfg.gradient_beta


def test_spliced_losses_with_the_clean_runs_gradients(tiny, contexts):
    ctx = sb.TokenContexts(contexts.tokens[:6], contexts.special_mask[:6])
    d = tiny.cfg.d_model
    sae = sb.SAE(sb.SAEConfig(d_in=d, n_latents=4 * d, k=8, activation="gradient_topk", gradient_beta=50.0))
    keep = ~ctx.special_mask
    grad = direct_grad(tiny, ctx.tokens, ctx.special_mask, RESID).float()

    def patch(act, hook):
        return torch.where(keep[..., None], sae(act, grad), act)

    with torch.no_grad(), tiny.hooks(fwd_hooks=[(RESID, patch)]):
        logits = tiny(ctx.tokens).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ctx.tokens[:, 1:], reduction="none")
    ref = float(nll[keep[:, :-1] & keep[:, 1:]].mean())
    with_grads = spliced_losses(tiny, sae, RESID, ctx, batch_size=4, gradients=True)
    assert with_grads["ce_sae"] == pytest.approx(ref, rel=1e-5)
    assert with_grads["ce_sae"] != pytest.approx(spliced_losses(tiny, sae, RESID, ctx)["ce_sae"], rel=1e-4)


def test_run_config_and_encoder_models_refuse_without_gradients(tmp_path, minilm):
    (tmp_path / "run.yaml").write_text("name: r\nmodel: tiny\nsae:\n  activation: gradient_topk\n")
    with pytest.raises(ConfigError, match="set harvest.gradients: true"):
        sb.load_config(tmp_path / "run.yaml")
    assert sb.load_config(tmp_path / "run.yaml", ["harvest.gradients=true"]).harvest.gradients
    with pytest.raises(ConfigError, match="gradient_beta must be >= 0"):
        sb.SAEConfig(activation="gradient_topk", gradient_beta=-1)
    with pytest.raises(ConfigError, match="needs a causal LM"):
        sb.Harvester(minilm, ["blocks.0.hook_resid_post"], gradients=True)


@pytest.mark.slow
def test_train_eval_analyze_and_browse_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(
        "name: g\nmodel: tiny\ndata:\n  split: test\n  max_documents: 100\n  context_size: 32\n"
        "harvest:\n  hooks: [blocks.0.hook_resid_post]\n  n_tokens: 2048\n  batch_size: 16\n  shard_contexts: 16\n"
        "  gradients: true\nsae:\n  activation: gradient_topk\n  expansion: 2\n  k: 8\n"
        "train:\n  n_tokens: 2048\n  batch_size: 512\n  source: cache\neval:\n  n_tokens: 1000\n  n_contexts: 2\n"
    )

    def cli(*args):
        assert main(list(args)) == 0
        return capsys.readouterr().out

    cli("train", "run.yaml")
    out = cli("eval", "runs/g")
    assert "sae no grad" in out
    report = json.loads((tmp_path / "runs/g/eval.json").read_text())
    assert {"sae", "sae_without_gradients", "random_baseline"} <= report.keys()
    for side in ("sae", "sae_without_gradients"):
        assert report[side]["l0"] == pytest.approx(8) and report[side]["fvu"] < report["random_baseline"]["fvu"]
    assert report["sae"]["fvu"] != report["sae_without_gradients"]["fvu"]
    cli("analyze", "runs/g", "--tokens", "500")  # the store encodes without gradients (plain TopK)
    store = sb.FeatureStore(tmp_path / "runs/g")
    assert store.meta["activation"] == "gradient_topk" and len(store.table()) == 2 * 192

    from streamlit.testing.v1 import AppTest

    from saebench.app_launcher import RUNS_ENV

    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "runs/g"))
    home = AppTest.from_file(str(Path(sb.__file__).parent / "app" / "Home.py"), default_timeout=120)
    home.run()
    table: Any = home.dataframe[0].value
    assert table.set_index("metric")["sae without gradients"]["fvu"] == pytest.approx(
        report["sae_without_gradients"]["fvu"]
    )
