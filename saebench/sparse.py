"""Sparse decode: x_hat = sum_i v_i * W_dec[idx_i] (+ b_dec) touching only active rows.

Two layouts:
  fixed  : values, indices [batch k]                  (topk, abstopk)
  ragged : values, indices [nnz] + offsets [batch+1]  (CSR; batchtopk, mutual and feature choice)
The torch path is `F.embedding_bag` (mode="sum", per_sample_weights), whose backward gives dW_dec
and dvalues. The CUDA kernels of kernels/ plug in here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_fixed(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """values, indices: [batch k]; W_dec: [n d] -> [batch d]."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


def decode_ragged(values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """values, indices: [nnz]; offsets: [batch+1] (CSR row starts, last = nnz) -> [batch d]."""
    out = F.embedding_bag(indices, W_dec, offsets[:-1], per_sample_weights=values.to(W_dec.dtype), mode="sum", include_last_offset=False)
    return out if b_dec is None else out + b_dec


def dense_to_ragged(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: [batch n] with zeros -> (values [nnz], indices [nnz], offsets [batch+1]); keeps z's autograd."""
    rows, cols = z.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=z.shape[0])
    offsets = torch.zeros(z.shape[0] + 1, dtype=torch.long, device=z.device)
    offsets[1:] = counts.cumsum(0)
    return z[rows, cols], cols, offsets
