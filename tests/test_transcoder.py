"""Transcoders and skip transcoders: config, the SAE's output side, losses, training, save/load/resume, eval and a
run of them, each against a reference built apart from the code under test (the MLP's own weights, dense autograd,
a hand-spliced forward, numbers by hand)."""

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from streamlit.testing.v1 import AppTest

import saebench as sb
from saebench.app_launcher import RUNS_ENV
from saebench.circuits import residual_components, trace_attention
from saebench.config import RunConfig, from_dict, load_config
from saebench.errors import ConfigError
from saebench.models import TINY_DIR
from saebench.sae.losses import sae_loss
from saebench.steering import logit_lens_tokens, output_score, rank_prob_score
from saebench.train import TrainConfig, train_sae

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "saebench" / "app"
LN2, MLP_OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"
Kind = Literal["transcoder", "skip_transcoder"]


def toy_mlp(n: int = 30_000, d: int = 16, h: int = 8, seed: int = 0):
    """x [n d] Gaussian and y = relu(x W_in + b_in) W_out + b_out, with the weights."""
    g = torch.Generator().manual_seed(seed)
    W_in, b_in = torch.randn(d, h, generator=g), 0.5 * torch.randn(h, generator=g)
    W_out, b_out = torch.randn(h, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ W_in + b_in).relu() @ W_out + b_out, (W_in, b_in, W_out, b_out)


def mlp_transcoder(W_in, b_in, W_out, b_out, kind: Kind = "transcoder") -> sb.SAE:
    """relu(x W_in + b_in) W_out + b_out as a transcoder: a latent per hidden unit, all kept (TopK at k = n); each
    unit's output row is normalised and its norm moved into the encoder (ReLU is positively homogeneous)."""
    n = W_in.shape[1]
    sae = sb.SAE(sb.SAEConfig(d_in=W_in.shape[0], d_out=W_out.shape[1], n_latents=n, k=n, kind=kind))
    norm = W_out.norm(dim=-1)
    with torch.no_grad():
        sae.W_enc.copy_(W_in * norm)
        sae.b_enc.copy_(b_in * norm)
        sae.W_dec.copy_(W_out / norm[:, None])
        sae.b_dec.copy_(b_out)
    return sae.eval()


def random_transcoder(d_in=16, d_out=12, n=40, k=5, kind: Kind = "skip_transcoder", seed=1, **extra) -> sb.SAE:
    sae = sb.SAE(sb.SAEConfig(d_in=d_in, d_out=d_out, n_latents=n, k=k, kind=kind, **extra), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.b_enc, sae.b_dec, *([sae.W_skip] if sae.W_skip is not None else [])):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum())


def test_the_config_names_each_layers_output_and_refuses_what_only_a_transcoder_has():
    spec = sb.SAEConfig(kind="transcoder")
    assert spec.output_hook_for(LN2.format(3)) == MLP_OUT.format(3)
    cfg = spec.resolve(192, LN2.format(1), "tiny", d_out=96)
    assert (cfg.output_hook, cfg.d_in, cfg.d_out, cfg.n_latents, cfg.aux_k) == (MLP_OUT.format(1), 192, 96, 3072, 48)
    fixed = sb.SAEConfig(kind="skip_transcoder", output_hook="ln_final.hook_normalized")
    assert fixed.output_hook_for("hook_embed") == "ln_final.hook_normalized" and fixed.skip
    with pytest.raises(ConfigError, match="give the output hook in full"):
        spec.output_hook_for("hook_embed")
    with pytest.raises(ConfigError, match="set sae.kind: transcoder"):
        sb.SAEConfig(output_hook=MLP_OUT.format(0))
    with pytest.raises(ConfigError, match="set sae.d_out=96"):
        sb.SAEConfig(kind="transcoder", d_in=192).resolve(192, LN2.format(0), "tiny", d_out=96)
    with pytest.raises(ConfigError, match="did you mean 'transcoder'"):
        from_dict(RunConfig, {"sae": {"kind": "transcodr"}})
    assert sb.SAEConfig(d_in=8).d_out == 8 and not sb.SAEConfig(d_in=8).transcoder


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_a_transcoder_with_the_mlps_weights_is_the_mlp(kind: Kind):
    x, y, weights = toy_mlp(4096)
    sae = mlp_transcoder(*weights, kind=kind)
    assert (sae.W_skip is None) == (kind == "transcoder")  # a skip transcoder's W_skip starts at zero
    assert torch.allclose(sae(x), y, atol=1e-5)
    W_in, b_in, W_out, _ = weights
    assert torch.allclose(sae.encode(x), (x @ W_in + b_in).relu() * W_out.norm(dim=-1), atol=1e-5)
    # the interface the attribution graph reads: pre_acts is affine, pre = x W_enc + pre_acts(0)
    assert torch.allclose(sae.pre_acts(x), x @ sae.W_enc + sae.pre_acts(torch.zeros(16)), atol=1e-5)
    m = sb.evaluate_sae(sae, x, targets=y)
    assert m["fvu"] < 1e-10 and m["cossim"] == pytest.approx(1, abs=1e-6)
    assert m["l0"] == pytest.approx(float((x @ W_in + b_in > 0).sum(-1).double().mean()))


def test_output_fvu_and_the_skip_term_by_hand():
    x, y, _ = toy_mlp(3000, d=16)
    y = y[:, :12]
    sae = random_transcoder()
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.W_skip)
    W_enc, b_enc, W_dec, b_dec, W_skip = (t.detach().double() for t in params if t is not None)
    pre = x.double() @ W_enc + b_enc  # a transcoder does not centre its input
    kth = pre.sort(-1, descending=True).values[:, 4:5]
    z = torch.where(pre >= kth, pre.clamp_min(0), 0.0)
    y_hat = z @ W_dec + b_dec + x.double() @ W_skip
    assert torch.allclose(sae(x).double(), y_hat, atol=1e-5)
    assert torch.allclose(sae.decode(sae.encode(x), x).double(), y_hat, atol=1e-5)
    with pytest.raises(ValueError, match="pass x"):
        sae.decode(sae.encode(x))
    m = sb.evaluate_sae(sae, x, batch_size=1000, targets=y)
    assert m["fvu"] == pytest.approx(fvu(y, y_hat), rel=1e-5)
    assert m["cossim"] == pytest.approx(float(F.cosine_similarity(y.double(), y_hat).mean()), rel=1e-5)
    assert m["shrinkage"] == pytest.approx(float((y_hat.norm(dim=-1) / y.double().norm(dim=-1)).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((z > 0).sum(-1).double().mean()))
    with pytest.raises(sb.DataError, match="targets"):
        sb.evaluate_sae(sae, x)


@pytest.mark.parametrize(
    "extra", [{}, {"matryoshka": [10, 40]}, {"activation": "hierarchical_topk"}, {"activation": "batchtopk"}]
)
def test_the_loss_and_its_gradients_match_a_dense_reference(extra):
    """sae_loss of a skip transcoder (output error, AuxK on the output's residual) against the same loss written
    densely, and every parameter's gradient against autograd through it."""
    x, y, _ = toy_mlp(256)
    y = y[:, :12]
    sae = random_transcoder(k=4, **extra).train()
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    out = sae_loss(sae, x, dead=dead, target=y)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()

    pre = x @ sae.W_enc + sae.b_enc
    assert sae.W_skip is not None
    base = sae.b_dec + x @ sae.W_skip
    var = (y - y.mean(0)).pow(2).sum()
    if extra.get("activation") == "batchtopk":  # the batch keeps its 4 * 256 largest ReLU(pre)
        cut = pre.relu().flatten().topk(4 * len(x)).values[-1]
        z = torch.where((pre >= cut) & (pre > 0), pre, 0.0)
    else:
        _, idx = pre.topk(4, dim=-1, sorted=True)
        vals = pre.gather(-1, idx).relu()
        z = torch.zeros_like(pre).scatter(-1, idx, vals)
    y_hat = z @ sae.W_dec + base
    if extra.get("activation") == "hierarchical_topk":  # mean over the k prefixes of the sorted selection
        cum = (vals[..., None] * sae.W_dec[idx]).cumsum(1)  # [batch k d]
        recon = (y[:, None] - base[:, None] - cum).pow(2).sum((0, 2)).mean() / var
    elif "matryoshka" in extra:
        prefix = torch.arange(40) < 10
        recon = ((y - (z * prefix) @ sae.W_dec - base).pow(2).sum() + (y - y_hat).pow(2).sum()) / var
    else:
        recon = (y - y_hat).pow(2).sum() / var
    err = (y - y_hat).detach()
    cand, cidx = torch.where(dead, pre, -torch.inf).topk(min(sae.cfg.aux_k, int(dead.sum())), dim=-1)
    err_hat = torch.zeros_like(pre).scatter(-1, cidx, cand.relu()) @ sae.W_dec
    aux = (err - err_hat).pow(2).sum() / (err - err.mean(0)).pow(2).sum()
    loss = recon + sae.cfg.aux_coef * aux
    assert float(out.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(out.mse.detach()) == pytest.approx(fvu(y, y_hat.detach()), rel=1e-5)
    assert sae.cfg.aux_k == 6  # d_out // 2
    loss.backward()
    for name, grad in got.items():
        want = sae.get_parameter(name).grad
        assert want is not None and torch.allclose(grad, want, atol=1e-5, rtol=1e-4), name


def best_linear_fvu(x, y) -> float:
    design = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    coef = torch.linalg.lstsq(design, y.double()).solution
    return fvu(y, design @ coef)


@pytest.mark.parametrize(
    "kind, activation",
    [("transcoder", "topk"), ("skip_transcoder", "topk"), ("skip_transcoder", "jumprelu"), ("transcoder", "batchtopk")],
)
def test_training_learns_a_relu_mlp_far_beyond_the_best_linear_map(kind: Kind, activation):
    x, y, _ = toy_mlp(24_576)
    held_x, held_y = x[-4096:], y[-4096:]
    cfg = sb.SAEConfig(d_in=16, d_out=16, n_latents=32, k=8, kind=kind, activation=activation, dead_tokens=20_000)
    sae, report = train_sae(
        cfg, x[:-4096], TrainConfig(n_tokens=100_000, batch_size=1024), show_progress=False, targets=y[:-4096]
    )
    got = sb.evaluate_sae(sae, held_x, targets=held_y)["fvu"]  # the folded SAE on raw inputs and outputs
    linear = best_linear_fvu(held_x, held_y)
    assert got < 0.03 and got < linear / 5, (got, linear)
    assert report["fvu"] == pytest.approx(got, abs=0.02)


def test_save_load_and_resume_a_skip_transcoder(tmp_path):
    x, y, _ = toy_mlp(12_000)
    cfg = sb.SAEConfig(d_in=16, d_out=16, n_latents=32, k=4, kind="skip_transcoder", dead_tokens=3000)
    tcfg = TrainConfig(n_tokens=40 * 256, batch_size=256, warmup_steps=5, checkpoint_every=7, log_every=5)
    whole, _ = train_sae(cfg, x, tcfg, run_dir=tmp_path / "whole", show_progress=False, targets=y)
    train_sae(cfg, x, tcfg, run_dir=tmp_path / "part", stop_after_steps=17, show_progress=False, targets=y)
    train_sae(cfg, x, tcfg, run_dir=tmp_path / "part", resume=True, show_progress=False, targets=y)
    a, b = (load_file(str(tmp_path / f"{r}/sae/sae.safetensors")) for r in ("whole", "part"))
    assert set(a) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"} and all(torch.equal(a[k], b[k]) for k in a)
    loaded = sb.load_sae(tmp_path / "part/sae")
    assert (loaded.cfg.kind, loaded.cfg.d_out) == ("skip_transcoder", 16)
    assert torch.equal(loaded(x[:100]), whole(x[:100]))
    meta = json.loads((tmp_path / "whole/sae/cfg.json").read_text())
    assert meta["output_scale_folded"] > 0 and meta["kind"] == "skip_transcoder"
    with pytest.raises(sb.DataError, match="does not export skip_transcoders"):  # SAELens would centre the input
        sb.save_saelens(loaded, tmp_path / "saelens")
    plain = sb.SAE(sb.SAEConfig(d_in=16, n_latents=32, k=4))
    plain.save(tmp_path / "plain")
    assert "W_skip" not in load_file(str(tmp_path / "plain/sae.safetensors"))
    assert sb.SAE.load(tmp_path / "plain").W_skip is None


def hand_spliced_ce(model, tc, layer, tokens, keep) -> tuple[float, float, float]:
    """Mean CE over predictions between non-special tokens: clean, with the MLP's output at non-special positions
    replaced by the transcoder's prediction from the clean run's cached MLP input, and zero-ablated."""
    _, cache = model.run_with_cache(tokens)
    new = tc(cache[LN2.format(layer)])
    out = []
    for replace in (None, new, torch.zeros_like(new)):

        def splice(act, hook, replace=replace):
            return act if replace is None else torch.where(keep[..., None], replace, act)

        logits = model.run_with_hooks(tokens, fwd_hooks=[(MLP_OUT.format(layer), splice)])
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        mask = (keep[:, :-1] & keep[:, 1:]).float()
        out.append(float((ce * mask).sum() / mask.sum()))
    return out[0], out[1], out[2]


@pytest.fixture(scope="module")
def contexts(tiny):
    data = sb.DataConfig(split="test", max_documents=40, context_size=32)
    ctx = sb.load_contexts(data, tiny.tokenizer, show_progress=False)
    return sb.TokenContexts(ctx.tokens[:6], ctx.special_mask[:6])


@torch.no_grad()
def test_ce_with_the_mlp_replaced_matches_a_hand_spliced_forward(tiny, contexts):
    tc = random_transcoder(192, 192, 256, 16, seed=3, output_hook=MLP_OUT.format(1), hook=LN2.format(1))
    _, cache = tiny.run_with_cache(contexts.tokens[:2])  # near the MLP output's own scale
    tc.b_dec.copy_(cache[MLP_OUT.format(1)].mean((0, 1)))
    tc.W_dec.mul_(0.3)
    assert tc.W_skip is not None
    tc.W_skip.mul_(0.05)
    got = sb.spliced_losses(tiny, tc, LN2.format(1), contexts, batch_size=4)
    clean, spliced, zero = hand_spliced_ce(tiny, tc, 1, contexts.tokens, ~contexts.special_mask)
    assert got["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert got["ce_sae"] == pytest.approx(spliced, abs=1e-5) and abs(spliced - clean) > 1e-2
    assert got["ce_zero"] == pytest.approx(zero, abs=1e-5)
    assert got["ce_recovered"] == pytest.approx((zero - spliced) / (zero - clean), abs=1e-4)
    backwards = dataclasses.replace(tc.cfg, output_hook=MLP_OUT.format(0))  # writes before it reads
    with pytest.raises(ConfigError, match="must come after its input hook"):
        sb.spliced_losses(tiny, sb.SAE(backwards), LN2.format(1), contexts, batch_size=4)
    with (
        pytest.raises(ConfigError, match="must come after its input hook"),
        sb.steer(tiny, sb.SAE(backwards), {0: 1.0}, mode="clamp"),
    ):
        tiny(contexts.tokens[:1])


@pytest.fixture(scope="module")
def relu_tiny(tmp_path_factory):
    """tiny with ReLU in place of GELU in its MLPs: a model whose MLPs a transcoder can be exactly."""
    folder = tmp_path_factory.mktemp("relu-tiny")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_DIR / name, folder / name)
    config = json.loads((TINY_DIR / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    return sb.load_model(str(folder)), load_file(str(folder / "model.safetensors"))


def exact_mlp_transcoder(weights: dict, layer: int) -> sb.SAE:
    """The MLP of `layer` read from its normalised input (before ln2's weight and bias, as the bridge's hook is)."""
    w = {k.split(f"h.{layer}.")[1]: v for k, v in weights.items() if f".h.{layer}." in k}
    W_in = w["ln_2.weight"][:, None] * w["mlp.c_fc.weight"]
    b_in = w["ln_2.bias"] @ w["mlp.c_fc.weight"] + w["mlp.c_fc.bias"]
    tc = mlp_transcoder(W_in, b_in, w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
    tc.cfg = dataclasses.replace(tc.cfg, hook=LN2.format(layer), output_hook=MLP_OUT.format(layer))
    return tc


@torch.no_grad()
def test_a_transcoder_that_is_the_mlp_recovers_all_the_loss(relu_tiny, contexts):
    model, weights = relu_tiny
    harvester = sb.Harvester(model, [LN2.format(1), MLP_OUT.format(1)])
    acts, _ = harvester.activations(contexts.tokens, contexts.special_mask)
    for layer in (0, 1):
        tc = exact_mlp_transcoder(weights, layer)
        if layer == 1:
            assert sb.evaluate_sae(tc, acts[LN2.format(1)], targets=acts[MLP_OUT.format(1)])["fvu"] < 1e-9
        got = sb.spliced_losses(model, tc, LN2.format(layer), contexts, batch_size=3)
        assert got["ce_sae"] == pytest.approx(got["ce_clean"], abs=1e-5) and got["kl_sae"] < 1e-8
        assert got["ce_recovered"] == pytest.approx(1, abs=1e-4) and got["ce_zero"] > got["ce_clean"] + 0.1


SMALL = [
    "data.split=test",
    "data.max_documents=100",
    "data.context_size=32",
    "harvest.batch_size=16",
    "harvest.buffer_tokens=2048",
    "sae.expansion=2",
    "sae.k=8",
    "train.n_tokens=4096",
    "train.batch_size=512",
    "eval.n_tokens=2000",
    "eval.n_contexts=4",
]


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory):
    """A small run of configs/tiny-transcoders.yaml, trained, evaluated and analysed; and the hooks of each forward
    pass of its training."""
    cfg = load_config(ROOT / "configs/tiny-transcoders.yaml", [f"runs_dir={tmp_path_factory.mktemp('runs')}", *SMALL])
    reads = []
    forward = sb.Harvester.forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sb.Harvester, "forward", lambda self, *a: reads.append(tuple(self.hooks)) or forward(self, *a))
        sb.train_from_config(cfg)
    results = sb.eval_from_config(cfg.run_dir, show_progress=False)
    sb.analyze(cfg.run_dir, sb.AnalysisConfig(n_tokens=300, split="test"), show_progress=False)
    return sb.Run(cfg.run_dir), reads, results


@pytest.mark.slow
def test_a_run_of_transcoders_trains_from_one_model_pass_then_evaluates_and_analyses(tc_run):
    run, reads, results = tc_run
    both = {LN2.format(0), LN2.format(1), MLP_OUT.format(0), MLP_OUT.format(1)}
    assert reads and all(set(hooks) == both for hooks in reads)  # every forward pass reads inputs and outputs
    assert {h: (home.path.name, home.output_hook) for h, home in run.saes.items()} == {
        LN2.format(layer): (LN2.format(layer), MLP_OUT.format(layer)) for layer in (0, 1)
    }
    tc = run.load_sae(LN2.format(1))
    assert (tc.cfg.kind, tc.cfg.output_hook, tc.cfg.d_out, tc.cfg.n_latents) == (
        "skip_transcoder",
        MLP_OUT.format(1),
        192,
        384,
    )
    with pytest.raises(ConfigError, match="--suite tpp reads decoder rows"):
        sb.eval_from_config(run.path, suites=["core", "tpp"], show_progress=False)
    for hook, result in results.items():
        assert run.eval(hook) == result
        assert result["sae"]["fvu"] < result["random_baseline"]["fvu"] < 1.5
        assert result["sae"]["ce_clean"] < result["sae"]["ce_sae"] < result["sae"]["ce_zero"]

    store = sb.FeatureStore(run.home(LN2.format(1)).store_path)
    assert (store.meta["kind"], store.meta["output_hook"]) == ("skip_transcoder", MLP_OUT.format(1))
    model = run.load_model()
    with torch.no_grad():  # the output logit lens: the decoder row through ln_final and the unembedding
        top = int((model.ln_final(tc.W_dec[5]) @ model.W_U).argmax())
    lens = store.feature(5).logit_lens
    assert lens is not None and lens[0][0][0] == model.tokenizer.decode([top])


@pytest.mark.slow
def test_the_app_traces_and_shows_transcoder_features(tc_run, monkeypatch, tiny):
    run, _, _ = tc_run
    monkeypatch.setenv(RUNS_ENV, str(run.path))
    prompt = "The cat sat on the mat. The cat sat on the mat."
    at = AppTest.from_file(str(APP / "pages/4_Trace.py"), default_timeout=120)
    for key, value in {"prompt": prompt, "layer": 1, "head": 2, "q": 9}.items():
        at.query_params[key] = str(value)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    r = sb.trace_attention(tiny, prompt, 1, 2, 9, saes={h: run.load_sae(h) for h in run.saes}, logit_tokens="top")
    assert any(name.startswith(LN2.format(0) + ":f") for name in r.q_names)  # layer 0's MLP through its features
    pairs = at.dataframe[0].value
    assert pairs["query_component"].tolist() == r.top_pairs(20)["query_component"].tolist()

    at = AppTest.from_file(str(APP / "pages/1_Feature.py"), default_timeout=120)
    at.query_params["hook"], at.query_params["feature"] = LN2.format(1), "5"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("skip_transcoder feature" in c.value for c in at.caption)
    assert any(h.value == f"Output logit lens ({MLP_OUT.format(1)})" for h in at.subheader)


def test_a_transcoder_run_refuses_the_activation_cache(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-transcoders.yaml", [f"runs_dir={tmp_path}", "train.source=cache"])
    with pytest.raises(ConfigError, match="train.source: stream"):
        sb.train_from_config(cfg)


@torch.no_grad()
def test_the_trace_splits_an_mlp_into_its_transcoders_features(relu_tiny):
    """Through the transcoder that is layer 0's MLP, the MLP's output splits into its hidden units' outputs (the
    features), b_out and a zero error; through a skip transcoder, into features, b_dec, x W_skip and the error.
    Either way the residual stream and the L1 heads' QK scores are the sums of the parts."""
    model, weights = relu_tiny
    tokens = sb.prompt_tokens(model, "The cat sat on the mat. The cat sat on the mat.")
    _, cache = model.run_with_cache(tokens)
    x, mlp_out = cache[LN2.format(0)][0], cache[MLP_OUT.format(0)][0]
    w = {k.split("h.0.")[1]: v for k, v in weights.items() if ".h.0." in k}
    hidden = (model.blocks[0].ln2(cache["blocks.0.hook_resid_mid"]) @ w["mlp.c_fc.weight"] + w["mlp.c_fc.bias"]).relu()
    skip = random_transcoder(192, 192, 64, 6, seed=2, hook=LN2.format(0), output_hook=MLP_OUT.format(0))
    for tc in (exact_mlp_transcoder(weights, 0), skip):
        p = 5
        comps = residual_components(model, cache, 1, p, {LN2.format(0): tc})
        mine = {
            n.split(":")[1]: v for n, v in zip(comps.names, comps.vectors, strict=True) if n.startswith(LN2.format(0))
        }
        assert torch.allclose(torch.stack(list(mine.values())).sum(0), mlp_out[p], atol=1e-4)
        assert torch.allclose(comps.vectors.sum(0), cache["blocks.1.hook_resid_pre"][0, p], atol=1e-4)
        if tc is skip:
            assert torch.allclose(mine["skip"], x[p] @ skip.W_skip, atol=1e-5)
            assert mine["error"].norm() > 0.1
        else:
            units = hidden[0, p].nonzero().squeeze(-1)
            assert set(mine) == {f"f{int(u)}" for u in units} | {"bias", "error"}
            for u in units.tolist():
                assert torch.allclose(mine[f"f{u}"], hidden[0, p, u] * w["mlp.c_proj.weight"][u], atol=1e-4)
            assert mine["error"].abs().max() < 1e-4
        for head in (0, model.cfg.n_heads - 1):
            r = trace_attention(model, tokens, layer=1, head=head, query_pos=-1, saes={LN2.format(0): tc}, check=False)
            assert float(r.pair_scores.sum()) == pytest.approx(r.score, abs=1e-3)


@torch.no_grad()
def test_steering_a_transcoder_edits_what_it_writes(relu_tiny):
    """Ablating the features of the transcoder that is layer 0's MLP removes those hidden units' outputs from the
    MLP's output; adding a feature adds its decoder row there; output_score boosts it there by its codes of the
    MLP's input: each against a hand-written hook on blocks.0.hook_mlp_out."""
    model, weights = relu_tiny
    tc = exact_mlp_transcoder(weights, 0)
    tokens = sb.prompt_tokens(model, "The cat sat on the mat. The cat sat on the mat.")
    _, cache = model.run_with_cache(tokens)
    w = {k.split("h.0.")[1]: v for k, v in weights.items() if ".h.0." in k}
    hidden = (model.blocks[0].ln2(cache["blocks.0.hook_resid_mid"]) @ w["mlp.c_fc.weight"] + w["mlp.c_fc.bias"]).relu()
    units = hidden[0].mean(0).topk(2).indices.tolist()

    def hand(edit):
        return model.run_with_hooks(tokens, fwd_hooks=[(MLP_OUT.format(0), lambda act, hook: act + edit)])

    for mode, features, edit in (
        ("ablate", {u: 0.0 for u in units}, -hidden[..., units] @ w["mlp.c_proj.weight"][units]),
        ("add", {units[0]: 3.0}, 3.0 * tc.W_dec[units[0]]),
        ("clamp", {units[1]: 2.0}, (2.0 - tc.encode(cache[LN2.format(0)])[..., units[1:]]) * tc.W_dec[units[1]]),
    ):
        with sb.steer(model, tc, features, mode=mode):
            got = model(tokens)
        assert torch.allclose(got, hand(edit), atol=1e-4), mode
    f = units[0]
    code = tc.encode(cache[LN2.format(0)][:, -1])
    boost = torch.zeros_like(cache[MLP_OUT.format(0)])
    boost[:, -1] = 10.0 * code.max() * tc.W_dec[f]
    probs = hand(boost)[0, -1].softmax(-1)
    want = rank_prob_score(probs, logit_lens_tokens(model, tc, f, 20))
    assert output_score(model, tc, f, "The cat sat on the mat. The cat sat on the mat.") == pytest.approx(
        want, rel=1e-4
    )
