"""Sparse decode and sparse encoder backward against dense PyTorch references.

The `cpu` cases run saebench.sparse's torch path (what CI exercises); the `cuda` cases
(marked gpu) run the CUDA kernels of kernels/ through the same entry points.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from saebench import kernels, sparse

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: elementwise (rtol 1e-5). bf16/fp16: relative error of the whole tensor under 1e-2
    (an element that sums cancelling terms has no meaningful elementwise relative error)."""
    got = got.double().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    assert got.shape == want.shape
    err = float((got - want).detach().norm() / want.norm().clamp_min(1e-12))
    assert err < 1e-2, f"relative error {err:.2e}"


def _device(name: str) -> str:
    if name == "cuda" and (not torch.cuda.is_available() or kernels.extension() is None):
        pytest.skip(f"CUDA kernels unavailable: {kernels.unavailable_reason() or kernels._state.get('reason')}")
    return name


def _ragged_case(batch: int, n: int, d: int, gen: torch.Generator):
    """CSR entries with empty rows, repeated latents, a repeated (row, latent) pair and zero values."""
    counts = torch.randint(0, 9, (batch,), generator=gen)
    counts[0] = 0
    counts[-1] = 12
    offsets = torch.zeros(batch + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    nnz = int(offsets[-1])
    indices = torch.randint(0, max(2, n // 8), (nnz,), generator=gen)  # few latents -> many repeats
    indices[-2:] = indices[-1]
    values = torch.randn(nnz, generator=gen)
    values[::5] = 0.0
    return values, indices, offsets


def _dense_reference(values, indices, offsets, batch, n):
    rows = torch.repeat_interleave(torch.arange(batch), offsets.diff())
    return torch.zeros(batch, n, dtype=values.dtype).index_put((rows, indices), values, accumulate=True)


def _check_decode(dev, dtype, values, indices, offsets, W, b, layout):
    batch, n = offsets.numel() - 1, W.shape[0]
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(batch, W.shape[1], generator=gen).to(dtype).float()
    values, W, b = (t.to(dtype).float() for t in (values, W, b))  # the reference sees the same rounded inputs
    v_ref, W_ref, b_ref = (t.clone().double().requires_grad_() for t in (values, W, b))
    z = _dense_reference(v_ref, indices, offsets, batch, n)
    out_ref = z @ W_ref + b_ref
    (out_ref * g.double()).sum().backward()

    v, Wd, bd = (t.to(dev, dtype).requires_grad_() for t in (values, W, b))
    if layout == "fixed":
        k = int(offsets[1] - offsets[0])
        out = sparse.decode_fixed(v.reshape(batch, k), indices.to(dev).reshape(batch, k), Wd, bd)
    else:
        out = sparse.decode_ragged(v, indices.to(dev), offsets.to(dev), Wd, bd)
    (out.float() * g.to(dev)).sum().backward()
    _close(out, out_ref.detach(), dtype)
    _close(v.grad, v_ref.grad, dtype)
    _close(Wd.grad, W_ref.grad, dtype)
    _close(bd.grad, b_ref.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(17, 300, 64, 5), (8, 1000, 72, 32), (3, 50, 13, 4)])
def test_decode_fixed_matches_dense(device, dtype, shape):
    dev = _device(device)
    if dev == "cpu" and dtype == torch.float16:
        pytest.skip("embedding_bag has no fp16 CPU kernel; the CPU path trains in fp32/bf16")
    batch, n, d, k = shape
    gen = torch.Generator().manual_seed(0)
    indices = torch.randint(0, n, (batch, k), generator=gen)
    indices[0, :2] = indices[0, 2]  # repeated latent within a token
    values = torch.randn(batch, k, generator=gen)
    values[1] = 0.0
    offsets = torch.arange(0, (batch + 1) * k, k)
    W, b = torch.randn(n, d, generator=gen) / d**0.5, torch.randn(d, generator=gen)
    _check_decode(dev, dtype, values.reshape(-1), indices.reshape(-1), offsets, W, b, "fixed")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 256, 64), (9, 4096, 2304), (5, 40, 7)])
def test_decode_ragged_matches_dense(device, dtype, shape):
    dev = _device(device)
    if dev == "cpu" and dtype == torch.float16:
        pytest.skip("embedding_bag has no fp16 CPU kernel; the CPU path trains in fp32/bf16")
    batch, n, d = shape
    gen = torch.Generator().manual_seed(2)
    values, indices, offsets = _ragged_case(batch, n, d, gen)
    W, b = torch.randn(n, d, generator=gen) / d**0.5, torch.randn(d, generator=gen)
    _check_decode(dev, dtype, values, indices, offsets, W, b, "ragged")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["fixed", "ragged"])
def test_sparse_encoder_backward_matches_dense(device, dtype, layout):
    dev = _device(device)
    batch, n, d, k = 12, 512, 96, 6
    gen = torch.Generator().manual_seed(3)
    x, b_dec = torch.randn(batch, d, generator=gen), torch.randn(d, generator=gen) * 0.1
    W_enc, b_enc = torch.randn(d, n, generator=gen) / d**0.5, torch.randn(n, generator=gen) * 0.1
    if layout == "fixed":
        indices, offsets = torch.randint(0, n, (batch, k), generator=gen), None
        flat_idx, flat_off = indices.reshape(-1), torch.arange(0, (batch + 1) * k, k)
    else:
        _, flat_idx, flat_off = _ragged_case(batch, n, d, gen)
        indices, offsets = flat_idx, flat_off
    weights = torch.randn(flat_idx.numel(), generator=gen)
    x, b_dec, W_enc, b_enc = (t.to(dtype).float() for t in (x, b_dec, W_enc, b_enc))

    ref = [t.clone().double().requires_grad_() for t in (x, b_dec, W_enc, b_enc)]
    pre_ref = (ref[0] - ref[1]) @ ref[2] + ref[3]
    rows = torch.repeat_interleave(torch.arange(batch), flat_off.diff())
    (pre_ref[rows, flat_idx] * weights.double()).sum().backward()

    ts = [t.to(dev, dtype).requires_grad_() for t in (x, b_dec, W_enc, b_enc)]
    with torch.no_grad():
        pre = (ts[0] - ts[1]) @ ts[2] + ts[3]
    idx_dev = indices.to(dev)
    out = sparse.pre_acts_at(ts[0], ts[1], ts[2], ts[3], idx_dev, None if offsets is None else offsets.to(dev), pre)
    assert out.shape == indices.shape
    (out.reshape(-1).float() * weights.to(dev)).sum().backward()
    _close(out.reshape(-1), pre_ref[rows, flat_idx].detach(), dtype)
    for got, want in zip(ts, ref):
        _close(got.grad, want.grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["topk", "abstopk", "batchtopk", "feature_choice"])
def test_training_step_with_kernels_equals_torch_path(activation, monkeypatch):
    """A whole SAE loss (selection, AuxK, Matryoshka) gives the same gradients with and without kernels."""
    _device("cuda")
    from saebench.sae import SAE, SAEConfig
    from saebench.sae.losses import sae_loss

    cfg = SAEConfig(d_in=64, n_latents=1024, activation=activation, k=8, matryoshka=[128, 1024])
    x = torch.randn(256, 64, device="cuda")
    dead = torch.zeros(1024, dtype=torch.bool, device="cuda")
    dead[::3] = True
    grads = []
    for use_kernels in (True, False):
        monkeypatch.setitem(kernels._state, "ext", kernels.extension() if use_kernels else None)
        sae = SAE(cfg, device="cuda", seed=0)
        out = sae_loss(sae, x, dead=dead, freq=torch.rand(1024, device="cuda") * 0.01)
        out.loss.backward()
        grads.append({k: p.grad.clone() for k, p in sae.named_parameters()})
    monkeypatch.delitem(kernels._state, "ext")
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_core_compiles_with_nvcc_alone(tmp_path):
    src = Path(__file__).resolve().parent.parent / "kernels" / "sparse_decoder.cu"
    result = subprocess.run(["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "core.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "core.o").stat().st_size > 0
