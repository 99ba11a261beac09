"""The sparse-decoder CUDA kernels of saebench/csrc/: build, load, and autograd Functions around them.

Built on first use with torch.utils.cpp_extension into ~/.cache/saebench/kernels/<hash> (or
ahead with `saebench kernels build`). Where CUDA or a compiler is missing, or the build fails,
`extension()` returns None, one line on stderr says why, and saebench.sparse uses its torch path.
Set SAEBENCH_KERNELS=0 to force the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

KERNEL_DIR = Path(__file__).resolve().parent / "csrc"  # package data: the CUDA and C++ sources
SOURCES = ("binding.cpp", "sparse_decoder.cu")
_state: dict = {}


def build_dir() -> Path:
    digest = hashlib.sha256(b"".join((KERNEL_DIR / f).read_bytes() for f in (*SOURCES, "sparse_decoder.cuh")))
    digest.update(torch.__version__.encode())
    root = Path(os.environ.get("SAEBENCH_CACHE", Path.home() / ".cache" / "saebench"))
    return root / "kernels" / digest.hexdigest()[:16]


def unavailable_reason() -> str | None:
    if os.environ.get("SAEBENCH_KERNELS", "1") == "0":
        return "SAEBENCH_KERNELS=0"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (KERNEL_DIR / SOURCES[1]).exists():
        return "kernel sources not found"
    return None


def extension(verbose: bool = False) -> Any:
    """The compiled extension module, or None (after saying why once)."""
    if "ext" in _state:
        return _state["ext"]
    reason = unavailable_reason()
    ext = None
    if reason is None:
        try:
            from torch.utils.cpp_extension import load

            out = build_dir()
            out.mkdir(parents=True, exist_ok=True)
            ext = load(
                name="saebench_sparse_kernels",
                sources=[str(KERNEL_DIR / f) for f in SOURCES],
                build_directory=str(out),
                extra_cuda_cflags=["-O3", "--use_fast_math"],
                extra_cflags=["-O3"],
                verbose=verbose,
            )
        except Exception as e:  # a failed build must not stop training: the torch path is exact
            reason = f"build failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
    if ext is None and reason != "no CUDA device":
        print(f"saebench: sparse kernels off, using the torch path: {reason}", file=sys.stderr)
    _state["ext"], _state["reason"] = ext, reason
    return ext


def active_for(t: torch.Tensor) -> bool:
    return t.is_cuda and extension() is not None


@functools.lru_cache(maxsize=8)
def fixed_offsets(batch: int, k: int, device) -> torch.Tensor:
    """CSR offsets [batch+1] of a fixed-k batch; one tensor per shape, so bucket() can recognise it."""
    return torch.arange(0, (batch + 1) * k, k, device=device, dtype=torch.long)


def csr_rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """The token of every CSR entry: offsets [batch+1] -> [nnz] (output_size given: no host sync)."""
    batch = offsets.numel() - 1
    return torch.repeat_interleave(torch.arange(batch, device=offsets.device), offsets.diff(), output_size=nnz)


@dataclass(frozen=True)
class Buckets:
    """Entries grouped by latent: perm [nnz] (entry ids, latent-major, token order within a latent),
    lat_offsets [n+1] (latent j owns perm[lat_offsets[j]:lat_offsets[j+1]]), row_of [nnz] (entry -> token)."""

    perm: torch.Tensor
    lat_offsets: torch.Tensor
    row_of: torch.Tensor


_last_buckets: list = []  # [(indices, offsets, key, Buckets)]: the decoder's and the encoder's backward share one sort


def bucket(indices: torch.Tensor, offsets: torch.Tensor, n: int) -> Buckets:
    """Bucket CSR entries (indices [nnz] in [0, n), offsets [batch+1]) by latent, with no host sync.

    A stable sort gives each latent a contiguous run in token order; `searchsorted` on the sorted
    keys gives the run starts (bincount would sync twice on CUDA). The last result is reused for the
    same data: the cache holds its tensors, so an equal address and version mean the same values.
    """
    key = (
        indices.data_ptr(),
        indices._version,
        indices.shape,
        indices.stride(),
        indices.device,
        offsets.data_ptr(),
        offsets._version,
        offsets.numel(),
        n,
    )
    if _last_buckets and _last_buckets[0][2] == key:
        return _last_buckets[0][3]
    held = (indices, offsets)
    indices, offsets = indices.contiguous(), offsets.contiguous()
    sorted_idx, perm = torch.sort(indices, stable=True)
    lat_offsets = torch.searchsorted(sorted_idx, torch.arange(n + 1, device=indices.device, dtype=indices.dtype))
    out = Buckets(perm, lat_offsets, csr_rows(offsets, indices.numel()))
    _last_buckets[:] = [(*held, key, out)]
    return out


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a kernel runs in: autocast's (bf16/fp16) inside a CUDA autocast region, else t's."""
    if t.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return t.dtype


class SparseDecode(torch.autograd.Function):
    """x_hat [batch d] = sum_p values[p] W_dec[indices[p]] + b_dec, CSR (values, indices [nnz]; offsets [batch+1]).

    Under CUDA autocast it runs in autocast's dtype (W_dec cast once, saved for the backward);
    gradients come back in each input's own dtype.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, values, indices, offsets, W_dec, b_dec):
        dtype = compute_dtype(W_dec)
        W = W_dec.to(dtype)
        v = values.to(dtype)
        out = extension().gather_rows(v, indices, offsets, W, None if b_dec is None else b_dec.to(dtype))
        ctx.save_for_backward(v, indices, offsets, W)
        ctx.has_bias, ctx.n = b_dec is not None, W_dec.shape[0]
        ctx.dtypes = (values.dtype, W_dec.dtype, None if b_dec is None else b_dec.dtype)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        v, indices, offsets, W = ctx.saved_tensors
        b = bucket(indices, offsets, ctx.n)
        want_dv = ctx.needs_input_grad[0]
        dW, dvalues, _ = extension().bucketed_grad(
            grad_out.to(W.dtype).contiguous(), v, b.perm, b.lat_offsets, b.row_of, W if want_dv else None, False
        )
        dvalues = dvalues.to(ctx.dtypes[0]) if want_dv else None
        db = (
            grad_out.sum(0, dtype=torch.float32).to(ctx.dtypes[2]) if ctx.has_bias and ctx.needs_input_grad[4] else None
        )
        return dvalues, None, None, dW.to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None, db


class SparsePreActs(torch.autograd.Function):
    """pre[p] = (x[row p] - b_dec) . W_enc[:, indices[p]] + b_enc[indices[p]] at the active entries only.

    x: [batch d]; W_enc: [d n]; indices: [nnz]; offsets: [batch+1]. The backward touches only the
    active (token, latent) pairs: dW_enc[:, j] = sum_p dpre[p] (x - b_dec)[row p], db_enc = sum of
    dpre per latent, dx[b] = sum_p dpre[p] W_enc[:, idx p], db_dec = -W_enc db_enc.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, b_dec, W_enc, b_enc, indices, offsets, pre_at_entries):
        dtype = compute_dtype(W_enc)
        xc = (x - b_dec).to(dtype).contiguous()
        ctx.save_for_backward(xc, W_enc, indices, offsets)
        ctx.dtypes = (x.dtype, b_dec.dtype, W_enc.dtype, b_enc.dtype)
        return pre_at_entries.clone()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dpre):
        xc, W_enc, indices, offsets = ctx.saved_tensors
        x_dtype, b_dec_dtype, W_dtype, b_enc_dtype = ctx.dtypes
        n = W_enc.shape[1]
        b = bucket(indices, offsets, n)
        dpre = dpre.to(xc.dtype).contiguous()
        dW_t, _, db_enc = extension().bucketed_grad(xc, dpre, b.perm, b.lat_offsets, b.row_of, None, True)
        need = ctx.needs_input_grad
        dx = (
            extension().gather_rows(dpre, indices, offsets, W_enc.to(xc.dtype).t().contiguous(), None).to(x_dtype)
            if need[0]
            else None
        )
        db_dec = -(W_enc.float() @ db_enc).to(b_dec_dtype) if need[1] else None
        # dW_t is latent-major [n d]; W_enc's layout is [d n], so autograd copies it once into W_enc.grad
        dW = dW_t.to(W_dtype).t() if need[2] else None
        return dx, db_dec, dW, db_enc.to(b_enc_dtype) if need[3] else None, None, None, None
