"""The sparse-decoder CUDA kernels of kernels/: build, load, and autograd Functions around them.

Built on first use with torch.utils.cpp_extension into ~/.cache/saebench/kernels/<hash> (or
ahead with `saebench kernels build`). Where CUDA or a compiler is missing, or the build fails,
`extension()` returns None, one line on stderr says why, and saebench.sparse uses its torch path.
Set SAEBENCH_KERNELS=0 to force the torch path.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"  # the source checkout (installed editable)
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


def extension(verbose: bool = False):
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
            ext = load(name="saebench_sparse_kernels", sources=[str(KERNEL_DIR / f) for f in SOURCES], build_directory=str(out),
                       extra_cuda_cflags=["-O3", "--use_fast_math"], extra_cflags=["-O3"], verbose=verbose)
        except Exception as e:  # a failed build must not stop training: the torch path is exact
            reason = f"build failed ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
    if ext is None and reason != "no CUDA device":
        print(f"saebench: sparse kernels off, using the torch path: {reason}", file=sys.stderr)
    _state["ext"], _state["reason"] = ext, reason
    return ext


def active_for(t: torch.Tensor) -> bool:
    return t.is_cuda and extension() is not None


def fixed_offsets(batch: int, k: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * k, k, device=device, dtype=torch.long)


class SparseDecode(torch.autograd.Function):
    """x_hat [batch d] = sum_p values[p] W_dec[indices[p]] + b_dec, CSR (values, indices [nnz]; offsets [batch+1])."""

    @staticmethod
    def forward(ctx, values, indices, offsets, W_dec, b_dec):
        ext = extension()
        values = values.to(W_dec.dtype)
        out = ext.gather_rows(values, indices, offsets, W_dec, None if b_dec is None else b_dec.to(W_dec.dtype))
        ctx.save_for_backward(values, indices, offsets, W_dec)
        ctx.has_bias = b_dec is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, offsets, W_dec = ctx.saved_tensors
        dW, dvalues, _ = extension().bucketed_grad(grad_out.to(W_dec.dtype).contiguous(), values, indices, offsets,
                                                   W_dec.shape[0], W_dec if ctx.needs_input_grad[0] else None, False)
        dvalues = dvalues.to(values.dtype) if ctx.needs_input_grad[0] else None
        db = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return dvalues, None, None, dW if ctx.needs_input_grad[3] else None, db


class SparsePreActs(torch.autograd.Function):
    """pre[p] = (x[row p] - b_dec) . W_enc[:, indices[p]] + b_enc[indices[p]] at the active entries only.

    x: [batch d]; W_enc: [d n]; indices: [nnz]; offsets: [batch+1]. The backward touches only the
    active (token, latent) pairs: dW_enc[:, j] = sum_p dpre[p] (x - b_dec)[row p], db_enc = bincount,
    dx[b] = sum_p dpre[p] W_enc[:, idx p], db_dec = -W_enc db_enc.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, indices, offsets, pre_at_entries):
        xc = (x - b_dec).to(W_enc.dtype).contiguous()
        ctx.save_for_backward(xc, W_enc, indices, offsets)
        ctx.x_dtype = x.dtype
        return pre_at_entries.clone()

    @staticmethod
    def backward(ctx, dpre):
        xc, W_enc, indices, offsets = ctx.saved_tensors
        dpre = dpre.to(W_enc.dtype).contiguous()
        dW_t, _, db_enc = extension().bucketed_grad(xc, dpre, indices, offsets, W_enc.shape[1], None, True)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = extension().gather_rows(dpre, indices, offsets, W_enc.t().contiguous(), None).to(ctx.x_dtype)
        db_dec = -(W_enc.float() @ db_enc).to(W_enc.dtype) if ctx.needs_input_grad[1] else None
        return dx, db_dec, dW_t.t() if ctx.needs_input_grad[2] else None, db_enc.to(W_enc.dtype) if ctx.needs_input_grad[3] else None, None, None, None
