import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import saebench as sb
from saebench.interop import SAELENS_VERSION, load_saelens, save_saelens

CACHE = Path(__file__).resolve().parent.parent / ".cache"
# SAELens 6.54.12: benchmarks/peers.py's venv, else benchmarks/analyze_peer.py's (SAEDashboard pins the same SAELens)
PEER_PYTHON = next(
    (p for p in (CACHE / v / "bin" / "python" for v in ("peers-venv", "dashboard-venv")) if p.exists()),
    CACHE / "peers-venv" / "bin" / "python",
)


def trained_like(activation, matryoshka=None):
    torch.manual_seed(0)
    sae = sb.SAE(
        sb.SAEConfig(
            d_in=12,
            n_latents=40,
            k=5,
            activation=activation,
            matryoshka=matryoshka,
            hook="blocks.0.hook_resid_post",
            model="tiny",
        )
    )
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.0, 0.5)
    return sae.eval()


@pytest.mark.parametrize(
    "activation, matryoshka",
    [
        ("topk", None),
        ("batchtopk", None),
        ("feature_choice", None),
        ("batchtopk", [10, 20, 40]),
        ("jumprelu", None),
        ("hierarchical_topk", None),
    ],
)
def test_round_trip_through_saelens_format(tmp_path, activation, matryoshka):
    sae = trained_like(activation, matryoshka)
    save_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    # a hierarchical SAE at its k is a plain TopK SAE for SAELens; saebench reads it back as hierarchical
    assert meta["architecture"] == ("jumprelu" if sae.cfg.family.threshold else "topk") and meta["d_sae"] == 40
    back = sb.load_sae(tmp_path)
    x = torch.randn(30, 12) * 2
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))
    assert back.cfg.matryoshka == matryoshka and back.cfg.hook == "blocks.0.hook_resid_post"
    assert (back.cfg.activation, back.cfg.k) == (activation, 5)


@pytest.mark.parametrize(
    "metadata, family",
    [
        ({}, "jumprelu"),
        ({"training_architecture": "batchtopk"}, "batchtopk"),
        ({"saebench_activation": "mutual_choice"}, "mutual_choice"),
    ],
)
def test_saelens_jumprelu_folders_load_as_jumprelu(tmp_path, metadata, family):
    """A SAELens JumpReLU is a JumpReLU here, unless SAELens saved a BatchTopK for inference or saebench saved
    another family. Any threshold encodes as SAELens' ReLU(pre) * (pre > threshold), negative ones included."""
    torch.manual_seed(3)
    thr = torch.rand(9)
    thr[:2] = torch.tensor([-0.5, 0.0])
    tensors = {"W_enc": torch.randn(6, 9), "b_enc": torch.randn(9), "W_dec": torch.randn(9, 6), "b_dec": torch.randn(6)}
    write_saelens(
        tmp_path, {**tensors, "threshold": thr}, architecture="jumprelu", metadata={"hook_name": "h", **metadata}
    )
    sae = load_saelens(tmp_path)
    assert sae.cfg.activation == family and torch.isfinite(sae.state_dict()["threshold"]).all()
    x = torch.randn(50, 6)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.allclose(sae.encode(x), pre.relu() * (pre > thr), atol=1e-5)


def test_a_hierarchical_sae_round_trips_in_saebench_format_at_every_k(tmp_path):
    sae = trained_like("hierarchical_topk")
    sae.save(tmp_path)
    back = sb.SAE.load(tmp_path)
    x = torch.randn(30, 12) * 2
    assert back.cfg == sae.cfg and back.cfg.family.hierarchical
    assert all(torch.equal(back.encode(x, k=k), sae.encode(x, k=k)) for k in range(1, 6))


def test_reads_a_saelens_jumprelu_without_b_dec_on_input(tmp_path):
    torch.manual_seed(1)
    W_enc, b_enc, W_dec, b_dec, thr = (
        torch.randn(6, 9),
        torch.randn(9),
        torch.randn(9, 6),
        torch.randn(6),
        torch.rand(9),
    )
    save_file(
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr},
        str(tmp_path / "sae_weights.safetensors"),
    )
    (tmp_path / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "jumprelu",
                "d_in": 6,
                "d_sae": 9,
                "apply_b_dec_to_input": False,
                "normalize_activations": "none",
                "metadata": {"hook_name": "h"},
            }
        )
    )
    sae = load_saelens(tmp_path)
    assert sae.cfg.activation == "jumprelu"
    x = torch.randn(7, 6)
    pre = x @ W_enc + b_enc  # SAELens' JumpReLU by hand
    z = pre.relu() * (pre > thr)
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae.decode(z), z @ W_dec + b_dec, atol=1e-5)


def test_unsupported_cases_fail_clearly(tmp_path):
    with pytest.raises(sb.DataError, match="does not export AbsTopK"):
        save_saelens(trained_like("abstopk"), tmp_path)
    save_file({"W_enc": torch.zeros(2, 3)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 2, "d_sae": 3}))
    with pytest.raises(sb.DataError, match="'gated' is not supported"):
        sb.load_sae(tmp_path)
    with pytest.raises(sb.DataError, match="no SAE at"):
        sb.load_sae(tmp_path / "empty")


def write_saelens(folder: Path, tensors: dict[str, torch.Tensor], **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    d_sae, d_in = tensors["W_dec"].shape
    (folder / "cfg.json").write_text(
        json.dumps({"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": True, "normalize_activations": "none", **cfg})
    )
    return folder


def test_rescale_acts_by_decoder_norm_is_folded_exactly(tmp_path):
    torch.manual_seed(2)
    n = torch.empty(9).uniform_(0.2, 3.0)
    W_enc, b_enc, W_dec, b_dec = (
        torch.randn(6, 9),
        torch.randn(9) * 0.3,
        torch.nn.functional.normalize(torch.randn(9, 6), dim=-1) * n[:, None],
        torch.randn(6),
    )
    write_saelens(
        tmp_path,
        {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec},
        architecture="topk",
        k=2,
        rescale_acts_by_decoder_norm=True,
        metadata={"sae_lens_version": "6.54.12", "hook_name": "h"},
    )
    sae = load_saelens(tmp_path)
    x = torch.randn(20, 6)
    pre = (x - b_dec) @ W_enc + b_enc

    def topk(p: torch.Tensor) -> torch.Tensor:  # SAELens' TopK by hand
        v, i = p.topk(2, dim=-1)
        return torch.zeros_like(p).scatter(-1, i, v.relu())

    z = topk(pre * n)
    assert not torch.equal(z != 0, topk(pre) != 0)  # the flag changes which latents fire here
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae.decode(z), (z / n) @ W_dec + b_dec, atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(9), atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        {"metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.attn.hook_z", "hook_head_index": 2}},
        {"hook_point": "blocks.0.attn.hook_z", "hook_point_head_index": 0},
    ],
)  # pre-6.0 names
def test_per_head_saes_are_refused(tmp_path, cfg):
    write_saelens(
        tmp_path,
        {k: torch.zeros(s) for k, s in [("W_enc", (4, 5)), ("b_enc", (5,)), ("W_dec", (5, 4)), ("b_dec", (4,))]},
        architecture="topk",
        k=2,
        **cfg,
    )
    with pytest.raises(sb.DataError, match=r"hook_head_index=[02] \(an SAE on one attention head\)"):
        load_saelens(tmp_path)


@pytest.mark.parametrize(
    "kwargs, note",
    [
        (
            {"fold_ln": True, "center_writing_weights": True, "dtype": "float32"},
            "fold_ln=True, center_writing_weights=True",
        ),
        ({"center_writing_weights": False}, None),
        ({}, None),
    ],
)
def test_processed_model_kwargs_are_reported(tmp_path, capsys, kwargs, note):
    write_saelens(
        tmp_path,
        {
            "W_enc": torch.randn(4, 5),
            "b_enc": torch.zeros(5),
            "W_dec": torch.randn(5, 4),
            "b_dec": torch.zeros(4),
            "threshold": torch.zeros(5),
        },
        architecture="jumprelu",
        metadata={
            "sae_lens_version": "6.54.12",
            "hook_name": "blocks.1.hook_resid_post",
            "model_from_pretrained_kwargs": kwargs,
        },
    )
    sae = load_saelens(tmp_path)
    err = capsys.readouterr().err
    if note is None:
        assert "note" not in sae.meta and err == ""
    else:
        assert note in sae.meta["note"] and "blocks.1.hook_resid_post" in sae.meta["note"]
        assert err.count("\n") == 1 and note in err


def test_saved_config_is_a_saelens_6_config(tmp_path):
    sae = trained_like("topk")
    sae.cfg.hook = "blocks.0.attn.hook_z"
    save_saelens(sae, tmp_path / "z")
    save_saelens(trained_like("batchtopk"), tmp_path / "resid")
    z, resid = (json.loads((tmp_path / f / "cfg.json").read_text()) for f in ("z", "resid"))
    assert z["metadata"]["sae_lens_version"] == resid["metadata"]["sae_lens_version"] == SAELENS_VERSION
    assert (z["metadata"]["hook_name"], z["metadata"]["model_name"]) == ("blocks.0.attn.hook_z", "tiny")
    assert (z["reshape_activations"], resid["reshape_activations"]) == ("hook_z", "none")
    back = load_saelens(
        tmp_path / "z"
    )  # reshape_activations hook_z is accepted; saebench's hook_z activations are flat
    x = torch.randn(8, 12)
    assert (
        back.cfg.hook == "blocks.0.attn.hook_z"
        and "note" not in back.meta
        and torch.equal(back.encode(x), sae.encode(x))
    )


# -- against SAELens itself, in its own venv ----------------------------------------------------------
PEER_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sae_lens import (
    SAE, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

root, heads = Path(sys.argv[1]), int(sys.argv[2])
x = load_file(str(root / "x.safetensors"))["x"]
d_in, d_sae = x.shape[-1], 40


@torch.no_grad()
def run(sae, folder):
    xin = x.reshape(len(x), heads, -1) if sae.cfg.reshape_activations == "hook_z" else x
    z = sae.encode(xin)
    save_file(
        {"z": z.contiguous(), "x_hat": sae.decode(z).reshape(len(x), -1).contiguous()}, str(folder / "out.safetensors")
    )


report = {}
for folder in sorted((root / "to").iterdir()):  # saebench -> SAELens
    sae = SAE.load_from_disk(folder)
    md = sae.cfg.metadata
    report[folder.name] = {"class": type(sae).__name__, "hook_name": md.hook_name, "model_name": md.model_name,
                           "hook_z": sae.hook_z_reshaping_mode, "version": md.sae_lens_version}
    run(sae, folder)


@torch.no_grad()
def randomize(sae, seed):
    g = torch.Generator().manual_seed(seed)
    sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
    sae.W_dec.copy_(
        torch.randn(d_sae, d_in, generator=g) * torch.empty(d_sae, 1).uniform_(0.2, 3.0, generator=g) / d_in**0.5
    )
    sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.2)
    sae.b_dec.copy_(torch.randn(d_in, generator=g))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(torch.empty(d_sae).uniform_(0.0, 0.5, generator=g))
    return sae


def meta(hook="blocks.0.hook_resid_post", **kw):
    return SAEMetadata(hook_name=hook, model_name="gpt2", **kw)


made = {  # SAELens -> saebench
    "topk": TopKSAE(TopKSAEConfig(
        d_in=d_in, d_sae=d_sae, k=5, metadata=meta(model_from_pretrained_kwargs={"center_writing_weights": False})
    )),
    "topk_rescale": TopKSAE(TopKSAEConfig(
        d_in=d_in, d_sae=d_sae, k=5, rescale_acts_by_decoder_norm=True, metadata=meta()
    )),
    "topk_rescale_hook_z": TopKSAE(TopKSAEConfig(
        d_in=d_in, d_sae=d_sae, k=5, rescale_acts_by_decoder_norm=True, reshape_activations="hook_z",
        metadata=meta("blocks.0.attn.hook_z"),
    )),
    "jumprelu_no_b_dec_in": JumpReLUSAE(JumpReLUSAEConfig(
        d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False, metadata=meta()
    )),
}
for i, (name, sae) in enumerate(made.items()):
    randomize(sae, i).save_model(root / "from" / name)
    run(sae, root / "from" / name)
# a trained BatchTopK is saved for inference as a JumpReLU (decoder norms folded, threshold = topk_threshold)
btk = randomize(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=5.0, metadata=meta())), 9)
btk.topk_threshold = torch.tensor(0.3, dtype=torch.double)
btk.save_inference_model(root / "from" / "batchtopk")
inference = SAE.load_from_disk(root / "from" / "batchtopk")
report["batchtopk_inference_class"] = type(inference).__name__
run(inference, root / "from" / "batchtopk")
# a trained JumpReLU, saved for inference by SAELens' own code (decoder norms folded into the threshold)
jr = randomize(JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta())), 10)
jr.save_inference_model(root / "from" / "jumprelu_trained")
inference = SAE.load_from_disk(root / "from" / "jumprelu_trained")
report["jumprelu_inference_class"] = type(inference).__name__
run(inference, root / "from" / "jumprelu_trained")
print(json.dumps(report))
"""

TO_SAELENS = {
    "topk": ("topk", "blocks.0.hook_resid_post", "TopKSAE"),
    "batchtopk": ("batchtopk", "blocks.0.hook_resid_post", "JumpReLUSAE"),
    "hook_z": ("topk", "blocks.0.attn.hook_z", "TopKSAE"),
    "jumprelu": ("jumprelu", "blocks.0.hook_resid_post", "JumpReLUSAE"),
    "hierarchical": ("hierarchical_topk", "blocks.0.hook_resid_post", "TopKSAE"),  # SAELens' TopK at its k
}
FROM_SAELENS = ["topk", "topk_rescale", "topk_rescale_hook_z", "jumprelu_no_b_dec_in", "batchtopk", "jumprelu_trained"]
HEADS = 3  # d_in 12 = 3 heads x 4


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> SimpleNamespace:
    """Runs SAELens once on saebench-saved SAEs (root/to) and on SAEs it builds and saves (root/from)."""
    if not PEER_PYTHON.exists():
        pytest.skip(f"no peer venv at {PEER_PYTHON} (made by benchmarks/analyze_peer.py)")
    root = tmp_path_factory.mktemp("saelens")
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(3)) * 2
    save_file({"x": x}, str(root / "x.safetensors"))
    saes = {}
    for name, (activation, hook) in ((n, v[:2]) for n, v in TO_SAELENS.items()):
        sae = trained_like(activation)
        sae.cfg.hook = hook
        with torch.no_grad():
            sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.3)  # untie from W_dec
        save_saelens(sae, root / "to" / name)
        saes[name] = sae
    run = subprocess.run(
        [str(PEER_PYTHON), "-W", "ignore", "-c", PEER_SCRIPT, str(root), str(HEADS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return SimpleNamespace(root=root, x=x, saes=saes, report=json.loads(run.stdout.strip().splitlines()[-1]))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.peers
@pytest.mark.parametrize("name", list(TO_SAELENS))
def test_saelens_loads_saebench_saes(peer, name):
    _, hook, cls = TO_SAELENS[name]
    assert peer.report[name] == {
        "class": cls,
        "hook_name": hook,
        "model_name": "tiny",
        "hook_z": name == "hook_z",
        "version": SAELENS_VERSION,
    }
    out, sae = load_file(str(peer.root / "to" / name / "out.safetensors")), peer.saes[name]
    z = sae.encode(peer.x)
    assert (z != 0).any()
    close(out["z"], z)
    close(out["x_hat"], sae.decode(z))


@pytest.mark.peers
@pytest.mark.parametrize("name", FROM_SAELENS)
def test_saebench_loads_saelens_saes(peer, name):
    sae = load_saelens(peer.root / "from" / name)
    out = load_file(str(peer.root / "from" / name / "out.safetensors"))
    assert (sae.cfg.hook, sae.cfg.model) == (
        "blocks.0.attn.hook_z" if "hook_z" in name else "blocks.0.hook_resid_post",
        "gpt2",
    )
    assert "note" not in sae.meta  # {"center_writing_weights": False} is SAELens' own default: an unprocessed model
    assert (out["z"] != 0).any()
    close(sae.encode(peer.x), out["z"])
    close(sae.decode(out["z"]), out["x_hat"])
    if name == "batchtopk":
        assert peer.report["batchtopk_inference_class"] == "JumpReLUSAE" and (sae.cfg.activation, sae.cfg.k) == (
            "batchtopk",
            5,
        )
    if name.startswith("jumprelu"):
        assert sae.cfg.activation == "jumprelu" and peer.report.get("jumprelu_inference_class", "JumpReLUSAE") == (
            "JumpReLUSAE"
        )
