import json

import pytest
import torch
from safetensors.torch import save_file

import saebench as sb
from saebench.interop import load_saelens, save_saelens


def trained_like(activation, matryoshka=None):
    torch.manual_seed(0)
    sae = sb.SAE(sb.SAEConfig(d_in=12, n_latents=40, k=5, activation=activation, matryoshka=matryoshka, hook="blocks.0.hook_resid_post", model="tiny"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.0, 0.5)
    return sae.eval()


@pytest.mark.parametrize("activation, matryoshka", [("topk", None), ("batchtopk", None), ("feature_choice", None), ("batchtopk", [10, 20, 40])])
def test_round_trip_through_saelens_format(tmp_path, activation, matryoshka):
    sae = trained_like(activation, matryoshka)
    save_saelens(sae, tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    assert meta["architecture"] == ("topk" if activation == "topk" else "jumprelu") and meta["d_sae"] == 40
    back = sb.SAE.load(tmp_path)
    x = torch.randn(30, 12) * 2
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))
    assert back.cfg.matryoshka == matryoshka and back.cfg.hook == "blocks.0.hook_resid_post"


def test_reads_a_saelens_jumprelu_without_b_dec_on_input(tmp_path):
    torch.manual_seed(1)
    W_enc, b_enc, W_dec, b_dec, thr = torch.randn(6, 9), torch.randn(9), torch.randn(9, 6), torch.randn(6), torch.rand(9)
    save_file({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "threshold": thr}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 6, "d_sae": 9, "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": {"hook_name": "h"}}))
    sae = load_saelens(tmp_path)
    x = torch.randn(7, 6)
    pre = x @ W_enc + b_enc  # SAELens' JumpReLU by hand
    z = pre.relu() * (pre > thr)
    assert torch.allclose(sae.encode(x), z, atol=1e-5)
    assert torch.allclose(sae.decode(z), z @ W_dec + b_dec, atol=1e-5)


def test_unsupported_cases_fail_clearly(tmp_path):
    with pytest.raises(sb.DataError, match="no AbsTopK"):
        save_saelens(trained_like("abstopk"), tmp_path)
    save_file({"W_enc": torch.zeros(2, 3)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 2, "d_sae": 3}))
    with pytest.raises(sb.DataError, match="'gated' is not supported"):
        sb.SAE.load(tmp_path)
    with pytest.raises(sb.DataError, match="no SAE at"):
        sb.SAE.load(tmp_path / "empty")
