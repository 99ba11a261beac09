"""Sparse decode and sparse encoder backward, touching only the active (token, latent) pairs.

Two layouts:
  fixed  : values, indices [batch k]                  (topk, abstopk)
  ragged : values, indices [nnz] + offsets [batch+1]  (CSR; batchtopk, mutual and feature choice)
On CUDA with the kernels of saebench/csrc/ built (saebench.kernels), both go through them; elsewhere
the torch path runs: `F.embedding_bag` (mode="sum", per_sample_weights), whose backward gives
dW_dec and dvalues, and for the encoder the dense pre-activations' own backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saebench import kernels


def decode_fixed(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """values, indices: [batch k]; W_dec: [n d] -> [batch d]."""
    if kernels.active_for(W_dec):
        batch, k = indices.shape
        offsets = kernels.fixed_offsets(batch, k, W_dec.device)
        return kernels.SparseDecode.apply(values.reshape(-1), indices.reshape(-1), offsets, W_dec, b_dec)
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


def decode_ragged(
    values: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
) -> torch.Tensor:
    """values, indices: [nnz]; offsets: [batch+1] (CSR row starts, last = nnz) -> [batch d]."""
    if kernels.active_for(W_dec):
        return kernels.SparseDecode.apply(values, indices, offsets, W_dec, b_dec)
    out = F.embedding_bag(
        indices, W_dec, offsets[:-1], per_sample_weights=values.to(W_dec.dtype), mode="sum", include_last_offset=False
    )
    return out if b_dec is None else out + b_dec


def sparse_encoder_backward(W_enc: torch.Tensor) -> bool:
    """Whether training should compute pre-activations without autograd and re-attach only the active ones."""
    return kernels.active_for(W_enc) and torch.is_grad_enabled()


def pre_acts_at(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor | None,
    pre: torch.Tensor,
) -> torch.Tensor:
    """pre-activations at the given entries, with a backward that touches only those entries.

    x: [batch d]; W_enc: [d n]; pre: [batch n] (detached); indices: [batch k] (offsets None) or
    [nnz] with offsets [batch+1]. -> same shape as indices.
    """
    fixed = offsets is None
    flat = indices.reshape(-1)
    if fixed:
        offsets = kernels.fixed_offsets(indices.shape[0], indices.shape[1], indices.device)
    rows = kernels.csr_rows(offsets, flat.numel())
    at = pre.detach()[rows, flat]
    if kernels.active_for(W_enc):
        out = kernels.SparsePreActs.apply(x, b_dec, W_enc, b_enc, flat, offsets, at)
    else:  # torch path: the same values, gathered with autograd
        out = ((x - b_dec)[rows] * W_enc.t()[flat]).sum(-1) + b_enc[flat]
    return out.reshape(indices.shape)
