"""Sparse decode and sparse encoder backward against dense PyTorch references.

The `cpu` cases run saebench.sparse's torch path (what CI exercises); the `cuda` cases
(marked gpu) run the CUDA kernels of kernels/ through the same entry points.
"""

import shutil
import subprocess
from pathlib import Path
from typing import cast

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
    for got, want in zip(ts, ref, strict=True):
        assert got.grad is not None and want.grad is not None
        _close(got.grad, want.grad, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["topk", "abstopk", "batchtopk", "feature_choice", "jumprelu"])
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
        grads.append({k: cast(torch.Tensor, p.grad).clone() for k, p in sae.named_parameters()})
    monkeypatch.delitem(kernels._state, "ext")
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def _zipf_indices(nnz: int, n: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    """Latent ids with Zipf frequencies (rank r drawn with p ~ r^-s): a few latents own most entries."""
    p = torch.arange(1, n + 1, dtype=torch.float64) ** -s
    return torch.multinomial(p / p.sum(), nnz, replacement=True, generator=gen)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, at an address 1 element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


EDGE_CASES = {
    # name: (batch, n, d, entries per row or None for ragged Zipf rows)
    "latent_and_row_over_128_entries": (300, 64, 96, None),
    "d_over_one_block_vectorised": (16, 256, 4104, 8),  # fp32: 4096 columns per block -> 2 column chunks
    "d_over_one_block_scalar": (16, 256, 4099, 8),  # odd d: the 1-element path, 5 column chunks
    "zipf_skewed": (512, 4096, 128, 32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("misaligned", [False, True])
def test_decode_edge_cases_match_dense(device, case, misaligned):
    dev = _device(device)
    batch, n, d, k = EDGE_CASES[case]
    gen = torch.Generator().manual_seed(5)
    if k is None:  # every token fires latent 0 (a 300-entry bucket); row 7 has 200 entries
        counts = torch.full((batch,), 3)
        counts[7] = 200
        offsets = torch.zeros(batch + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        indices = torch.randint(1, n, (int(offsets[-1]),), generator=gen)
        indices[offsets[:-1]] = 0
    else:
        offsets = torch.arange(0, (batch + 1) * k, k)
        indices = _zipf_indices(batch * k, n, gen)
    values = torch.randn(indices.numel(), generator=gen).abs()
    W, b = torch.randn(n, d, generator=gen) / d**0.5, torch.randn(d, generator=gen)
    if misaligned and dev == "cpu":
        pytest.skip("alignment only selects a CUDA code path")
    v_ref, W_ref, b_ref = (t.clone().double().requires_grad_() for t in (values, W, b))
    out_ref = _dense_reference(v_ref, indices, offsets, batch, n) @ W_ref + b_ref
    g = torch.randn(batch, d, generator=gen)
    (out_ref * g.double()).sum().backward()
    v, Wd, bd = (t.to(dev).requires_grad_() for t in (values, W, b))
    W_in = _misaligned(Wd) if misaligned else Wd
    out = sparse.decode_ragged(v, indices.to(dev), offsets.to(dev), W_in, bd)
    (out * g.to(dev)).sum().backward()
    for got, want in ((out, out_ref), (v.grad, v_ref.grad), (Wd.grad, W_ref.grad), (bd.grad, b_ref.grad)):
        assert got is not None and want is not None
        torch.testing.assert_close(got.detach().double().cpu(), want.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_kernel_backward_is_bitwise_deterministic():
    """Skewed latents, d over one block (several column chunks), non-contiguous indices: two backward
    passes through the kernels give identical bits (no float atomics). (The CPU torch path is not
    bitwise deterministic at this size: its index_add runs on several threads.)"""
    dev = _device("cuda")
    gen = torch.Generator().manual_seed(6)
    batch, n, d, k = 512, 2048, 4104, 32
    wide = _zipf_indices(batch * 2 * k, n, gen).view(batch, 2 * k)
    indices = wide[:, ::2].to(dev)  # non-contiguous [batch k]
    values = torch.randn(batch, k, generator=gen).abs().to(dev)
    W = (torch.randn(n, d, generator=gen) / d**0.5).to(dev)
    x = torch.randn(batch, d, generator=gen).to(dev)
    W_enc, b_enc, b_dec = W.t().contiguous(), torch.zeros(n, device=dev), torch.zeros(d, device=dev)
    grads = []
    for _ in range(2):
        kernels._last_buckets.clear()
        leaves = [t.clone().requires_grad_() for t in (values, W, x, W_enc)]
        with torch.no_grad():
            pre = leaves[2] @ leaves[3]
        at = sparse.pre_acts_at(leaves[2], b_dec, leaves[3], b_enc, indices, None, pre)
        out = sparse.decode_fixed(leaves[0] * at, indices, leaves[1])
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_decode_over_two_to_the_31_elements():
    """n * d > 2^31 (4.8 GB of bf16): offsets into W must be 64-bit."""
    dev = _device("cuda")
    n, d, batch, k = (1 << 20) + 7, 2304, 4, 8
    W = torch.zeros(n, d, device=dev, dtype=torch.bfloat16)
    indices = torch.tensor([[n - 1, n - 2, 5, (1 << 20) - 1] * 2] * batch, device=dev)
    W[indices.unique()] = torch.randn(len(indices.unique()), d, device=dev, dtype=torch.bfloat16)
    values = torch.rand(batch, k, device=dev, dtype=torch.bfloat16)
    W.requires_grad_()
    out = sparse.decode_fixed(values, indices, W)
    want = (values.float()[..., None] * W.detach()[indices].float()).sum(1)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert W.grad is not None
    touched = W.grad[indices.unique()].float()
    assert touched.abs().sum() > 0 and W.grad[n // 2].abs().sum() == 0
    torch.testing.assert_close(
        W.grad[n - 1].float(),
        (values.float()[:, 0] + values.float()[:, 4]).sum() * torch.ones(d, device=dev),
        rtol=2e-2,
        atol=2e-2,
    )


@pytest.mark.gpu
def test_autocast_runs_kernels_in_bf16_and_returns_fp32_grads():
    dev = _device("cuda")
    gen = torch.Generator().manual_seed(7)
    batch, n, d, k = 64, 1024, 256, 16
    indices = torch.randint(0, n, (batch, k), generator=gen).to(dev)
    values = torch.rand(batch, k, generator=gen).to(dev).requires_grad_()
    W = (torch.randn(n, d, generator=gen) / d**0.5).to(dev).requires_grad_()
    b = torch.zeros(d, device=dev, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sparse.decode_fixed(values, indices, W, b)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert W.grad is not None and values.grad is not None and b.grad is not None
    assert W.grad.dtype == values.grad.dtype == b.grad.dtype == torch.float32
    ref = [t.detach().clone().requires_grad_() for t in (values, W, b)]
    F = torch.nn.functional
    F.embedding_bag(indices, ref[1], per_sample_weights=ref[0], mode="sum").add(ref[2]).square().sum().backward()
    for got, want in zip((values.grad, W.grad, b.grad), ref, strict=True):
        assert want.grad is not None
        assert float((got - want.grad).norm() / want.grad.norm()) < 2e-2


@pytest.mark.gpu
def test_out_of_range_latent_fails_a_device_assert(tmp_path):
    """A bad index stops the kernel (a device assert, as torch's own indexing kernels do); run in a
    child process, since a device assert ends the process's CUDA context."""
    _device("cuda")
    import sys

    code = (
        "import torch; from saebench import sparse\n"
        "W = torch.randn(10, 64, device='cuda'); i = torch.tensor([[3, 12]], device='cuda')\n"
        "sparse.decode_fixed(torch.ones(1, 2, device='cuda'), i, W); torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "assert" in result.stderr.lower(), result.stderr[-2000:]


def test_bucket_groups_entries_by_latent_in_token_order():
    """kernels.bucket (the sort the backward kernels read) against a brute-force grouping."""
    gen = torch.Generator().manual_seed(4)
    _, indices, offsets = _ragged_case(40, 64, 8, gen)
    n = 70  # latents 64..69 and most of 8..63 never fire: empty buckets
    b = kernels.bucket(indices, offsets, n)
    rows = torch.repeat_interleave(torch.arange(40), offsets.diff())
    assert torch.equal(b.row_of, rows)
    assert b.lat_offsets.shape == (n + 1,) and int(b.lat_offsets[-1]) == indices.numel()
    for j in range(n):
        entries = b.perm[b.lat_offsets[j] : b.lat_offsets[j + 1]].tolist()
        assert entries == (indices == j).nonzero().squeeze(1).tolist()  # all of latent j's entries, in token order
    assert kernels.bucket(indices, offsets, n) is b  # the decoder's and encoder's backward share one sort
    indices[0] = (indices[0] + 1) % n  # an in-place change bumps the version: bucketed afresh
    assert kernels.bucket(indices, offsets, n) is not b
    strided = torch.arange(12).reshape(3, 4)[:, ::2].reshape(-1)  # a non-contiguous index tensor
    assert kernels.bucket(strided, torch.tensor([0, 2, 4, 6]), 12).perm.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None or not Path("/usr/local/cuda/include/cuda_runtime.h").exists(),
    reason="needs g++ and the CUDA headers",
)
def test_torch_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp against the installed torch's headers (syntax and overloads, no GPU): what
    torch.utils.cpp_extension would compile on a CUDA machine. The CPU wheel leaves out one
    generated CUDA config header; an equivalent one-line stand-in is written for it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    src = Path(kernels.KERNEL_DIR) / "binding.cpp"
    flags = [
        f"-I{p}" for p in (str(tmp_path), *include_paths(), "/usr/local/cuda/include", sysconfig.get_paths()["include"])
    ]
    result = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=saebench_check", *flags, str(src)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_core_compiles_with_nvcc_alone(tmp_path):
    src = Path(kernels.KERNEL_DIR) / "sparse_decoder.cu"
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-arch=sm_90", "-c", str(src), "-o", str(tmp_path / "core.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "core.o").stat().st_size > 0
