"""Sparsifiers: which latents of pre [batch n] fire, and with what value.

  topk           each token keeps its k largest pre, ReLU'd                    (Gao et al. 2024)
                 (hierarchical_topk: the same, sorted by value, descending; Balagansky et al. 2025)
  abstopk        each token keeps its k largest |pre|, sign kept, no ReLU     (AbsTopK 2025)
  gradient_topk  each token keeps the k largest z_i (1 + beta |d_i . grad_x L|), z = ReLU(pre), with
                 values z_i: latents that move the model's loss rank higher    (Olmo et al. 2025)
  batchtopk      the batch keeps its k*batch largest ReLU(pre)               (Bussmann et al.;
                 = mutual choice, Ayonrinde 2024)
  feature_choice feature j keeps its top m_j tokens; sum_j m_j = k*batch, m_j Zipf-shaped over the
                 features ranked by recent firing rate (by index before any)
  jumprelu       each token keeps pre where pre > threshold[j], a trained     (Rajamanoharan et al. 2024)
                 parameter; straight-through pseudo-gradients to the threshold
  threshold      inference rule of the batch sparsifiers and JumpReLU: ReLU(pre) where pre > threshold[j]

Under data parallelism (`reduce` active) the batch sparsifiers select over the global batch:
the cut-off values come from `distributed.global_kth_largest`, and each rank keeps its own entries
at or above them. Entries whose ReLU is 0 are left out (they decode to nothing), and a tie at the
cut-off keeps every tied entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from saebench.distributed import LOCAL, Reducer, global_kth_largest
from saebench.kernels import csr_rows


@dataclass
class Selection:
    """Active latents. Fixed layout: values, indices [batch k], offsets None.
    Ragged (CSR) layout: values, indices [nnz], offsets [batch+1]."""

    values: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor | None
    batch: int

    def rows(self) -> torch.Tensor:
        """Token index of every entry: [batch k] or [nnz]."""
        if self.offsets is None:
            return torch.arange(self.batch, device=self.values.device)[:, None].expand_as(self.indices)
        return csr_rows(self.offsets, self.indices.numel())

    def dense(self, n: int) -> torch.Tensor:
        """-> z [batch n] (differentiable in values)."""
        z = torch.zeros(self.batch, n, dtype=self.values.dtype, device=self.values.device)
        return z.index_put(
            (self.rows().reshape(-1), self.indices.reshape(-1)), self.values.reshape(-1), accumulate=True
        )

    def prefix(self, m: int) -> Selection:
        """Only latents < m contribute (their layout stays, other values become 0)."""
        return Selection(
            torch.where(self.indices < m, self.values, torch.zeros_like(self.values)),
            self.indices,
            self.offsets,
            self.batch,
        )

    def l0(self) -> torch.Tensor:
        """Active (non-zero) latents per token: [batch]."""
        nz = (self.values != 0).to(torch.float32)
        if self.offsets is None:
            return nz.sum(-1)
        return torch.zeros(self.batch, device=nz.device).index_add_(0, self.rows(), nz)


def topk(pre: torch.Tensor, k: int, sorted: bool = False) -> Selection:
    values, indices = pre.topk(k, dim=-1, sorted=sorted)
    return Selection(values.relu(), indices, None, pre.shape[0])


def abstopk(pre: torch.Tensor, k: int) -> Selection:
    _, indices = pre.abs().topk(k, dim=-1, sorted=False)
    return Selection(pre.gather(-1, indices), indices, None, pre.shape[0])


def gradient_topk(pre: torch.Tensor, latent_grads: torch.Tensor, k: int, beta: float) -> Selection:
    """latent_grads: [batch n], d_i . grad_x L for each decoder row d_i."""
    z = pre.relu()
    _, indices = (z.detach() * (1 + beta * latent_grads.abs())).topk(k, dim=-1, sorted=False)
    return Selection(z.gather(-1, indices), indices, None, pre.shape[0])


def _csr(flat: torch.Tensor, values_flat: torch.Tensor, batch: int, n: int) -> Selection:
    """Entries given by flat indices (row * n + col) -> CSR selection sorted by (row, col)."""
    flat, _ = flat.sort()
    rows, cols = flat // n, flat % n
    offsets = torch.zeros(batch + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
    return Selection(values_flat[flat], cols, offsets, batch)


def batchtopk(pre: torch.Tensor, k: int, reduce: Reducer = LOCAL) -> Selection:
    batch, n = pre.shape
    acts = pre.relu().reshape(-1)
    total = k * batch * reduce.world
    top, flat = acts.topk(min(total, acts.numel()), sorted=reduce.active)
    if reduce.active:
        cut = global_kth_largest(top[:, None], torch.tensor([total]), reduce).to(acts.dtype)
        flat = ((acts >= cut) & (acts > 0)).nonzero().squeeze(-1)
    return _csr(flat, acts, batch, n)


@lru_cache(maxsize=32)
def zipf_shares(n: int, total: float, cap: float, exponent: float) -> torch.Tensor:
    """[n] float64 shares summing to min(total, n * cap), none above cap, shaped like (j+1)^-exponent
    (water-filling: share by weight; a share that would pass cap is fixed at cap and the rest re-shared)."""
    total = min(float(total), n * float(cap))
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** -exponent
    out = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    remaining = total
    while remaining > 1e-9 and free.any():
        share = remaining * weights * free / (weights * free).sum()
        over = free & (out + share >= cap)
        if over.any():
            remaining -= float((cap - out[over]).sum())
            out[over] = cap
            free &= ~over
        else:
            out += share
            remaining = 0.0
    return out


@lru_cache(maxsize=32)
def zipf_capacities(n: int, batch: int, k: int, exponent: float) -> tuple[int, ...]:
    """Integer m_j summing to min(k*batch, n*batch), m_j <= batch, shaped like (j+1)^-exponent."""
    total = min(k * batch, n * batch)
    cap = zipf_shares(n, total, batch, exponent)
    m = cap.floor()
    short = int(total - m.sum())
    if short:
        frac = torch.where(m < batch, cap - m, torch.full_like(cap, -1.0))
        m[frac.sort(descending=True, stable=True).indices[:short]] += 1  # ties go to lower indices
    return tuple(int(v) for v in m)


def feature_choice(
    pre: torch.Tensor, k: int, exponent: float = 1.0, reduce: Reducer = LOCAL, freq: torch.Tensor | None = None
) -> Selection:
    """freq: [n] recent fires per token; the j-th largest capacity goes to the j-th most frequent feature
    (ties to the lower index), so capacities follow use rather than fixed indices. None: by index."""
    batch, n = pre.shape
    capacities = zipf_capacities(n, batch * reduce.world, k, exponent)
    m = torch.tensor(capacities, device=pre.device)
    if freq is not None:
        m = torch.empty_like(m).scatter_(0, freq.argsort(descending=True, stable=True), m)
    acts = pre.relu()
    kmax = min(max(capacities), batch)
    top, tok = acts.topk(kmax, dim=0, sorted=True)  # [kmax n]
    if reduce.active:
        cut = global_kth_largest(top, m, reduce).to(acts.dtype)
        keep = (top >= cut[None, :]) & (top > 0)
    else:
        keep = torch.arange(kmax, device=pre.device)[:, None] < m[None, :]
    feat = torch.arange(n, device=pre.device)[None, :].expand(kmax, n)
    flat = tok[keep] * n + feat[keep]
    return _csr(flat, acts.reshape(-1), batch, n)


def _kernel(pre: torch.Tensor, threshold: torch.Tensor, eps: float) -> torch.Tensor:
    """K((pre - threshold) / eps) / eps, K the unit rectangle; no gradient."""
    return ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps


def jump(pre: torch.Tensor, threshold: torch.Tensor, eps: float, to_input: bool = False) -> torch.Tensor:
    """pre * H(pre - threshold), elementwise, with the pseudo-gradients d/dpre = H(pre - threshold) and
    d/dthreshold = -(threshold / eps) K((pre - threshold) / eps) (Rajamanoharan et al. 2024, eq. 11).
    to_input: the jump's pseudo-gradient reaches pre as well, d/dpre = H + (threshold / eps) K (the jump depends
    on pre - threshold alone; Anthropic's setup, SAELens' jumprelu_ste_to_input)."""
    t = threshold.detach()
    kernel = t * _kernel(pre.detach(), t, eps)
    out = pre * (pre > t) - (threshold - t) * kernel
    return out + (pre - pre.detach()) * kernel if to_input else out


def step(pre: torch.Tensor, threshold: torch.Tensor, eps: float, to_input: bool = False) -> torch.Tensor:
    """H(pre - threshold) with d/dthreshold = -(1 / eps) K((pre - threshold) / eps) and none to pre (eq. 12);
    to_input: d/dpre = (1 / eps) K as well."""
    t = threshold.detach()
    kernel = _kernel(pre.detach(), t, eps)
    out = (pre > t).to(pre.dtype) - (threshold - t) * kernel
    return out + (pre - pre.detach()) * kernel if to_input else out


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, eps: float, to_input: bool = False) -> Selection:
    """JumpReLU's training selection: pre * H(pre - threshold[j]) per token (threshold [n] > 0, differentiable),
    which is ReLU(pre) * H(pre - threshold), SAELens' inference rule and `threshold`'s. Entries within eps/2 below
    the threshold are kept at value 0: their pseudo-gradient reaches the threshold (and pre, with to_input)."""
    batch, n = pre.shape
    flat = (pre.detach() > threshold.detach() - eps / 2).reshape(-1).nonzero().squeeze(-1)
    sel = _csr(flat, pre.reshape(-1), batch, n)
    return Selection(jump(sel.values, threshold[sel.indices], eps, to_input), sel.indices, sel.offsets, batch)


def threshold(pre: torch.Tensor, thresholds: torch.Tensor) -> Selection:
    acts = pre.relu()
    return _csr(
        ((acts > thresholds) & (acts > 0)).reshape(-1).nonzero().squeeze(-1),
        acts.reshape(-1),
        pre.shape[0],
        pre.shape[1],
    )


@torch.no_grad()
def min_kept(sel: Selection, n: int, per_feature: bool, reduce: Reducer = LOCAL) -> torch.Tensor:
    """Smallest positive kept value (over every rank's batch): a scalar, or per feature ([n]); +inf where none.
    No host sync."""
    values = sel.values.detach().reshape(-1)
    values = torch.where(values > 0, values, torch.full_like(values, float("inf")))
    if not per_feature:
        return reduce.min(values.min() if values.numel() else values.new_tensor(float("inf")))
    out = torch.full((n,), float("inf"), device=values.device, dtype=values.dtype)
    return reduce.min(out.scatter_reduce(0, sel.indices.reshape(-1), values, reduce="amin"))
