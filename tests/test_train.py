import dataclasses
import json
from typing import Any, cast

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saebench as sb
from saebench.sae import ACTIVATIONS
from saebench.synthetic import PlantedFeatures, SyntheticConfig, recovery_metrics
from saebench.train import SAETrainer, TrainConfig, geometric_median, train_sae


def planted(n=60_000, seed=0):
    p = PlantedFeatures(SyntheticConfig(d=16, n_true=48, true_l0=3, seed=seed))
    x, _ = p.sample(n, torch.Generator().manual_seed(seed))
    return p, x


def test_geometric_median_by_hand():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts)
    assert gm.norm() < 1.0  # the mean (25.25, 25.25) is dragged away by the outlier; the median is not
    assert torch.allclose(geometric_median(torch.tensor([[1.0, 2.0]] * 3)), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "activation", ["topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice", "jumprelu", "hierarchical_topk"]
)
def test_every_family_learns_planted_features(activation):
    p, x = planted()
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, activation=activation, dead_tokens=20_000)
    sae, report = train_sae(
        cfg, x, TrainConfig(n_tokens=400_000, batch_size=512, lr=4e-3, warmup_steps=20), show_progress=False
    )
    metrics = sb.evaluate_sae(sae, x[:10_000])
    assert metrics["fvu"] < 0.35, metrics
    assert recovery_metrics(sae.W_dec.detach(), p.directions)["mcc"] > 0.8
    assert abs(metrics["l0"] - 3) < 1.5


@pytest.mark.slow
def test_a_hierarchical_sae_truncates_better_than_topk():
    """The point of the prefix loss: cut to its first k' < k latents, a hierarchical SAE reconstructs better
    than a TopK SAE trained on the same stream at the same k and cut the same way."""
    p, x = planted()
    fvu = {}
    for activation in ("topk", "hierarchical_topk"):
        cfg = sb.SAEConfig(d_in=16, n_latents=48, k=6, activation=activation, dead_tokens=20_000)
        tcfg = TrainConfig(n_tokens=100_000, batch_size=512, lr=4e-3, warmup_steps=20)
        sae, _ = train_sae(cfg, x, tcfg, show_progress=False)
        fvu[activation] = [sb.evaluate_sae(sae, x[:10_000], k=k)["fvu"] for k in (1, 2, 3, 6)]
    assert all(h < t - 0.03 for h, t in zip(fvu["hierarchical_topk"][:3], fvu["topk"][:3], strict=True)), fvu
    assert fvu["hierarchical_topk"][-1] < 0.2, fvu  # and it still reconstructs at its k


@pytest.mark.parametrize(
    "activation,scale",
    [("topk", 0.3), ("abstopk", 0.3), ("batchtopk", 0.1), ("mutual_choice", 0.1), ("feature_choice", 0.1)],
)
def test_encoder_starts_tied_at_the_family_default_scale(activation, scale, tmp_path):
    _, x = planted(4096)
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, activation=activation)
    for explicit in (None, 0.7):
        sae = SAETrainer(cfg, TrainConfig(enc_init_scale=explicit), x).sae
        assert torch.allclose(sae.W_enc, (explicit or scale) * sae.W_dec.T)
    (tmp_path / "run.yaml").write_text("name: r\nmodel: tiny\n")
    assert sb.load_config(tmp_path / "run.yaml").train.enc_init_scale is None  # a run config leaves it to the family
    assert sb.load_config(tmp_path / "run.yaml", ["train.enc_init_scale=0.5"]).train.enc_init_scale == 0.5


def test_default_lr_rule_by_hand():
    _, x = planted(4096)
    assert TrainConfig().resolved_lr(2**14) == pytest.approx(8e-4)
    assert TrainConfig().resolved_lr(4 * 2**14) == pytest.approx(4e-4)
    assert TrainConfig().resolved_lr(768) == pytest.approx(8e-4 * (2**14 / 768) ** 0.5)  # 3.70e-3
    assert TrainConfig(lr=1e-3).resolved_lr(768) == 1e-3
    trainer = SAETrainer(sb.SAEConfig(d_in=16, n_latents=1024, k=3), TrainConfig(warmup_steps=0), x)
    assert trainer.lr == pytest.approx(3.2e-3) and trainer.lr_at(0) == pytest.approx(3.2e-3)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"matryoshka": [6, 48], "matryoshka_random": 2},  # the prefix draws resume too
        {"activation": "feature_choice"},  # and the firing rates its capacities follow
        {"activation": "jumprelu"},  # and JumpReLU's L0 controller
    ],
)
def test_resume_is_bit_identical(tmp_path, extra):
    _, x = planted(20_000)
    cfg = sb.SAEConfig(
        **{"d_in": 16, "n_latents": 48, "k": 3, "activation": "batchtopk", "dead_tokens": 5_000, **extra}
    )
    tcfg = TrainConfig(n_tokens=60 * 256, batch_size=256, lr=3e-3, warmup_steps=5, checkpoint_every=7, log_every=5)
    whole, _ = train_sae(cfg, x, tcfg, run_dir=tmp_path / "whole", show_progress=False)
    train_sae(cfg, x, tcfg, run_dir=tmp_path / "part", stop_after_steps=23, show_progress=False)
    assert not (tmp_path / "part/sae").exists()
    resumed, _ = train_sae(cfg, x, tcfg, run_dir=tmp_path / "part", resume=True, show_progress=False)
    a = load_file(str(tmp_path / "whole/sae/sae.safetensors"))
    b = load_file(str(tmp_path / "part/sae/sae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    whole_log = (tmp_path / "whole/metrics.jsonl").read_text().splitlines()
    part_log = (tmp_path / "part/metrics.jsonl").read_text().splitlines()

    def strip(lines):
        return [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in lines]

    assert strip(whole_log) == strip(part_log)


@pytest.mark.slow
@pytest.mark.parametrize("k", [3, 6])
def test_jumprelu_adapts_its_l0_coefficient_to_reach_k(tmp_path, k):
    _, x = planted()
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=k, activation="jumprelu", dead_tokens=20_000)
    tcfg = TrainConfig(n_tokens=400_000, batch_size=512, lr=4e-3, warmup_steps=20)
    sae, _ = train_sae(cfg, x, tcfg, run_dir=tmp_path / "adaptive", show_progress=False)
    assert abs(sb.evaluate_sae(sae, x[:10_000])["l0"] - k) < 0.1 * k
    coefs = [json.loads(line)["l0_coef"] for line in (tmp_path / "adaptive/metrics.jsonl").read_text().splitlines()]
    assert len(set(coefs)) == len(coefs)  # adapted at every logged step
    tcfg.n_tokens = 30 * 512
    final_l0 = {}
    for scale in (0.0, 10.0):  # an explicit coefficient stays as given, and it is the one the loss uses
        fixed = sb.SAEConfig(**{**cfg.__dict__, "l0_coef": scale * coefs[-1]})
        train_sae(fixed, x, tcfg, run_dir=tmp_path / f"fixed{scale}", show_progress=False)
        rows = [json.loads(line) for line in (tmp_path / f"fixed{scale}/metrics.jsonl").read_text().splitlines()]
        assert all(r["l0_coef"] == pytest.approx(scale * coefs[-1]) for r in rows)
        final_l0[scale] = rows[-1]["l0"]
    assert final_l0[0.0] > 1.5 * final_l0[10.0]


def test_resume_after_a_crash_between_checkpoints(tmp_path):
    """Killed mid-interval (and, for one SAE, mid-checkpoint): resume from the newest step both SAEs hold."""
    _, x = planted(20_000)
    cfgs = {w: sb.SAEConfig(d_in=16, n_latents=w, k=3, activation="topk", dead_tokens=5_000) for w in (32, 48)}
    cfgs = {f"w{w}": c for w, c in cfgs.items()}
    tcfg = TrainConfig(
        n_tokens=60 * 256, batch_size=256, lr=3e-3, warmup_steps=5, checkpoint_every=7, log_every=5, init_tokens=512
    )
    crash_at: list[int | None] = [None]

    def source(epoch):
        for i in range(0, len(x) - 255, 256):
            if crash_at[0] is not None and epoch * 78 + i // 256 == crash_at[0]:
                raise KeyboardInterrupt
            yield x[i : i + 256]

    whole, _ = sb.train_saes(cfgs, source, tcfg, run_dir=tmp_path / "whole", show_progress=False)
    crash_at[0] = 26  # batch 26 feeds step 27: steps 1-26 ran, 25 was logged, 21 was the last checkpoint
    with pytest.raises(KeyboardInterrupt):
        sb.train_saes(cfgs, source, tcfg, run_dir=tmp_path / "part", show_progress=False)
    ckpt = tmp_path / "part/w32/checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["state-00000021.safetensors"]
    (ckpt / "state-00000028.safetensors").write_bytes(b"")  # as if killed before w48 wrote step 28
    (ckpt / ".partial").mkdir()
    (ckpt / ".partial/state-00000035.safetensors.x").write_bytes(b"half")
    crash_at[0] = None
    sb.train_saes(cfgs, source, tcfg, run_dir=tmp_path / "part", resume=True, show_progress=False)
    for name in cfgs:
        a = load_file(str(tmp_path / f"whole/{name}/sae/sae.safetensors"))
        b = load_file(str(tmp_path / f"part/{name}/sae/sae.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

        def strip(p):
            return [
                {k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in p.read_text().splitlines()
            ]

        assert strip(tmp_path / f"whole/{name}/metrics.jsonl") == strip(tmp_path / f"part/{name}/metrics.jsonl")
    assert sorted(p.name for p in ckpt.iterdir()) == ["state-00000060.safetensors"]


def test_refuses_to_overwrite_a_run(tmp_path):
    _, x = planted(5_000)
    cfg = sb.SAEConfig(d_in=16, n_latents=32, k=3)
    tcfg = TrainConfig(n_tokens=2048, batch_size=256)
    train_sae(cfg, x, tcfg, run_dir=tmp_path, show_progress=False)
    before = (tmp_path / "sae/sae.safetensors").read_bytes()
    with pytest.raises(sb.DataError, match="already holds a training run"):
        train_sae(cfg, x, tcfg, run_dir=tmp_path, show_progress=False)
    assert (tmp_path / "sae/sae.safetensors").read_bytes() == before


def test_bad_inputs_fail_clearly():
    x = torch.randn(4096, 16)
    with pytest.raises(sb.DataError, match="width 16 but sae.d_in is 12"):
        train_sae(
            sb.SAEConfig(d_in=12, n_latents=32, k=3), x, TrainConfig(n_tokens=1024, batch_size=256), show_progress=False
        )

    def stream(epoch):
        for i in range(0, 4096, 256):
            batch = x[i : i + 256].clone()
            if i == 1024:
                batch[5, 2] = float("nan")
            yield batch

    with pytest.raises(sb.DataError, match="NaN or inf in the batch of step 4"):
        train_sae(
            sb.SAEConfig(d_in=16, n_latents=32, k=3),
            stream,
            TrainConfig(n_tokens=40_000, batch_size=256, init_tokens=256),
            show_progress=False,
        )


def test_saved_sae_round_trips_and_works_on_raw_inputs(tmp_path):
    _, x = planted(20_000)
    x = x * 40  # far from sqrt(d) norm: the input scale must be folded in at save
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, activation="batchtopk")
    sae, report = train_sae(
        cfg, x, TrainConfig(n_tokens=100_000, batch_size=512, lr=4e-3), run_dir=tmp_path, show_progress=False
    )
    assert report["input_scale"] != pytest.approx(1.0)
    loaded = sb.SAE.load(tmp_path / "sae")
    assert torch.equal(loaded.encode(x[:100]), sae.encode(x[:100]))
    assert sb.evaluate_sae(loaded, x[:5000])["fvu"] < 0.5


def test_several_saes_from_one_pass_equal_separate_runs(tmp_path):
    _, x = planted(8_000, seed=1)
    y = x.flip(-1) * 2

    def stream(epoch):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 1000):
            yield {"h0": x[perm[i : i + 1000]], "h1": y[perm[i : i + 1000]]}

    cfgs = {
        "narrow": sb.SAEConfig(d_in=16, n_latents=32, k=3, hook="h0"),
        "wide": sb.SAEConfig(d_in=16, n_latents=64, k=3, hook="h0", activation="batchtopk"),
        "other_hook": sb.SAEConfig(d_in=16, n_latents=32, k=3, hook="h1"),
    }
    tcfg = TrainConfig(n_tokens=30 * 256, batch_size=256, lr=3e-3, warmup_steps=5, init_tokens=1000)
    together, reports = sb.train_saes(cfgs, stream, tcfg, run_dir=tmp_path, show_progress=False)
    assert set(reports) == set(cfgs) and all(r["steps"] == 30 for r in reports.values())
    for name, cfg in cfgs.items():
        assert cfg.hook is not None
        alone, _ = train_sae(cfg, lambda e, h=cfg.hook: (b[h] for b in stream(e)), tcfg, show_progress=False)
        assert torch.equal(alone.W_dec, together[name].W_dec), name
        assert (tmp_path / name / "sae" / "sae.safetensors").exists()


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "feature_choice", "jumprelu"])
def test_fused_step_matches_the_reference_step(activation):
    """The fused path (fused Adam, clipping as its grad_scale, no host sync) trains the same SAE as the
    unfused reference, with clipping engaged (grad_clip 0.05) and thresholds tracked on the device."""
    _, x = planted(8192)
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, activation=activation)
    saes = []
    for fused in (False, True):
        tcfg = TrainConfig(
            n_tokens=30 * 512, batch_size=512, lr=3e-3, warmup_steps=3, grad_clip=0.05, fused_step=fused, log_every=7
        )
        trainer = SAETrainer(cfg, tcfg, x[:4096])
        assert trainer.fused is fused
        norms = [trainer.step(x[i * 512 : (i + 1) * 512])["grad_norm"] for i in range(12)]
        assert min(norms) > 0.05  # the clip was active on every step
        saes.append(trainer)
    ref, fused = saes
    for (name, a), b in zip(ref.sae.state_dict().items(), fused.sae.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-5, msg=name)
    assert bool(fused.threshold_set) == bool(ref.threshold_set)


def test_fused_step_skips_a_bad_batch_and_raises_at_the_next_sync():
    _, x = planted(4096)
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3)
    trainer = SAETrainer(cfg, TrainConfig(n_tokens=10**6, batch_size=256, fused_step=True), x[:2048])
    trainer.step(x[:256], sync=False)
    before = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
    bad = x[256:512].clone()
    bad[3, 1] = float("inf")
    assert trainer.step(bad, sync=False) == {}  # no host sync, no error yet
    for name, value in trainer.sae.state_dict().items():
        if name != "W_dec":  # normalize_decoder still runs (idempotent on unit rows)
            assert torch.equal(value, before[name]), name
    with pytest.raises(sb.DataError, match="NaN or inf in the batch of step 1"):
        trainer.step(x[512:768], sync=True)


def test_min_kept_by_hand():
    from saebench.sae.sparsify import Selection, min_kept

    sel = Selection(torch.tensor([[0.5, 0.0], [2.0, 0.25]]), torch.tensor([[3, 1], [3, 0]]), None, 2)
    assert float(min_kept(sel, 4, per_feature=False)) == 0.25
    assert min_kept(sel, 4, per_feature=True).tolist() == [0.25, float("inf"), float("inf"), 0.5]
    none = Selection(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), None, 2)
    assert float(min_kept(none, 4, per_feature=False)) == float("inf")


def low_rank(n=4096, seed=0):
    """[n 16]: 6 directions of variance 16, 9, 4, 1, 1/4, 1/16, a little noise in all 16, offset from 0."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(16, 6, generator=g)).Q
    x = (torch.randn(n, 6, generator=g) * torch.tensor([4.0, 3, 2, 1, 0.5, 0.25])) @ basis.T
    return x + 0.01 * torch.randn(n, 16, generator=g) + 2.0


@pytest.mark.parametrize("share", [0.5, 0.9, 0.99, 1.0])
def test_subspace_init_rank_matches_numpy_svd_and_rows_lie_in_its_span(share):
    x = low_rank()
    cfg = sb.SAEConfig(d_in=16, n_latents=48, k=3, init="subspace", subspace_variance=share)
    trainer = SAETrainer(cfg, TrainConfig(init_tokens=4096), x)
    sae = trainer.sae
    _, s, vt = np.linalg.svd((x * trainer.scale - sae.b_dec.detach()).double().numpy(), full_matrices=False)
    r = min(int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), share)) + 1, 16)
    assert trainer.init_meta == {"init_rank": r}
    assert r == {0.5: 1, 0.9: 3, 0.99: 5, 1.0: 16}[share]  # the planted spectrum: 16, 9, 4, 1, 1/4, ... of 30.3
    W = sae.W_dec.detach().double().numpy()
    span = vt[:r].T  # [16 r]
    assert np.abs(W - W @ span @ span.T).max() < 1e-5  # every row in the span
    assert np.linalg.matrix_rank(W, tol=1e-4) == r  # and the rows fill it
    assert np.allclose(np.linalg.norm(W, axis=1), 1, atol=1e-6)
    assert torch.allclose(sae.W_enc, 0.3 * sae.W_dec.T)  # the encoder tied at the family's scale, as today


def test_subspace_init_trains_every_family_and_logs_its_rank(tmp_path):
    x = low_rank(8192)
    tcfg = TrainConfig(n_tokens=8 * 256, batch_size=256, init_tokens=2048, log_every=4)
    plain = [a for a in ACTIVATIONS if not sb.FAMILIES[a].gradients]  # no model here, so no loss gradients
    for activation, matryoshka in [(a, None) for a in plain] + [("batchtopk", [12, 48])]:
        cfg = sb.SAEConfig(
            d_in=16, n_latents=48, k=3, activation=cast(Any, activation), matryoshka=matryoshka, init="subspace"
        )
        run = tmp_path / f"{activation}-{bool(matryoshka)}"
        sae, report = train_sae(cfg, x, tcfg, run_dir=run, show_progress=False)
        assert report["init_rank"] == 5 and json.loads((run / "sae/cfg.json").read_text())["init_rank"] == 5
        random, report = train_sae(dataclasses.replace(cfg, init="random"), x, tcfg, show_progress=False)
        assert "init_rank" not in report
        fvu = sb.evaluate_sae(sae, x[:2048])["fvu"]  # seen 0.06-0.47 after 8 steps, random init 0.20-0.44
        assert fvu < 0.6 and fvu < sb.evaluate_sae(random, x[:2048])["fvu"] + 0.06, (activation, matryoshka)
    (tmp_path / "run.yaml").write_text("name: r\nmodel: tiny\n")
    assert sb.load_config(tmp_path / "run.yaml", ["sae.init=subspace"]).sae.init == "subspace"
    with pytest.raises(sb.ConfigError, match="sae.init: unknown 'pca'; use one of random, subspace"):
        sb.load_config(tmp_path / "run.yaml", ["sae.init=pca"])
    with pytest.raises(sb.ConfigError, match="subspace_variance must lie in"):
        sb.SAEConfig(d_in=16, n_latents=48, k=3, subspace_variance=0)
