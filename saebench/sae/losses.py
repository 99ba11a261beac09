"""Training losses: (Matryoshka or hierarchical) normalised reconstruction error plus AuxK / aux_zipf."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saebench import sparse
from saebench.distributed import LOCAL, Reducer
from saebench.sae import sparsify
from saebench.sae.sae import SAE


@dataclass
class StepOutput:
    loss: torch.Tensor
    mse: torch.Tensor  # normalised MSE of the full reconstruction (= batch FVU; a transcoder's of its output)
    aux: torch.Tensor
    selection: sparsify.Selection
    x_hat: torch.Tensor  # [batch d_out] the reconstruction (a transcoder's predicted output)


def normalised_mse(
    x: torch.Tensor, x_hat: torch.Tensor, reduce: Reducer = LOCAL, total_var: torch.Tensor | None = None
) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch. x, x_hat: [batch d].

    With `reduce` active the denominator is the global batch's, so the ranks' values sum to the
    global batch's normalised MSE (and their gradients sum to its gradient)."""
    if total_var is None:
        total_var = variance_sum(x, reduce)
    return (x - x_hat).pow(2).sum() / total_var


@torch.no_grad()
def variance_sum(x: torch.Tensor, reduce: Reducer = LOCAL) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the (global) batch, two-pass; x: [batch d] -> scalar."""
    if not reduce.active:
        return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    total = reduce.sum(torch.cat([x.sum(0), x.new_tensor([len(x)])]))
    mean = total[:-1] / total[-1]
    return reduce.sum((x - mean).pow(2).sum()).clamp_min(1e-12)


class PrefixErrors(torch.autograd.Function):
    """The squared error of every prefix of a fixed-layout selection, in its order (Balagansky et al. 2025):

        r_j = r0 - sum_{i<=j} z_i W_dec[idx_i];  errs_j = sum over the batch of ||r_j||^2

    r0: [batch d] (x - b_dec); values, indices: [batch k]; W_dec: [n d] -> errs [k] and r_{k-1} [batch d]
    (the full selection's residual, not differentiable). One selected column at a time, forward and
    backward, so memory is O(batch d), never [batch k d]: the backward walks back from the last residual
    (r_{j-1} = r_j + z_j d_j), with S_j = sum_{l>=j} dL/dr_l giving dL/dz_j = -d_j . S_j,
    dL/dd_j = -z_j S_j and dL/dr0 = S_0. (The reference's cumsum keeps [batch k d] for its backward.)"""

    @staticmethod
    def forward(ctx, r0: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor):
        zt, r = values.to(W_dec.dtype).t().contiguous(), r0.to(W_dec.dtype, copy=True)
        d, errs = torch.empty_like(r), r.new_empty(len(zt))
        for j in range(len(zt)):  # in place: no [batch d] tensor is allocated per column
            r.addcmul_(zt[j, :, None], torch.index_select(W_dec, 0, indices[:, j], out=d), value=-1)
            errs[j] = torch.linalg.vector_norm(r).square()
        ctx.save_for_backward(r, values, indices, W_dec)
        ctx.r0_dtype = r0.dtype
        ctx.mark_non_differentiable(r)
        return errs, r

    @staticmethod
    def backward(ctx, g_errs: torch.Tensor, _):
        r, values, indices, W_dec = ctx.saved_tensors
        zt, g = values.to(W_dec.dtype).t().contiguous(), 2 * g_errs.to(W_dec.dtype)
        r, S, d, zS = r.clone(), torch.zeros_like(r), torch.empty_like(r), torch.empty_like(r)
        dot, grad_W = torch.empty_like(zt), torch.zeros_like(W_dec)
        for j in reversed(range(len(zt))):
            z = zt[j, :, None]
            torch.index_select(W_dec, 0, indices[:, j], out=d)
            S.addcmul_(r, g[j])
            torch.linalg.vecdot(d, S, out=dot[j])
            grad_W.index_add_(0, indices[:, j], torch.mul(S, z, out=zS), alpha=-1)
            r.addcmul_(z, d)
        return S.to(ctx.r0_dtype), -dot.t().to(values.dtype), None, grad_W


def auxk_loss(
    sae: SAE,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    pre: torch.Tensor,
    candidates: torch.Tensor,
    reattach: bool = False,
    reduce: Reducer = LOCAL,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct the residual error from the top-k_aux `candidates` latents (Gao et al. 2024).

    candidates: [n] bool (dead latents, or under-used ones for aux_zipf). Ranks by |pre| for a signed family.
    reattach: pre is detached (sparse encoder backward); recompute the chosen entries with autograd.
    target: [batch d_out] a transcoder's output, which x_hat predicts (default x).
    """
    n_cand = int(candidates.sum())
    if n_cand == 0:
        return x.new_zeros(())
    k_aux = min(sae.cfg.aux_k, n_cand)
    error = ((x if target is None else target) - x_hat).detach()
    if sae.cfg.family.signed:
        rank = torch.where(candidates, pre.abs(), torch.full_like(pre, -torch.inf))
        _, idx = rank.topk(k_aux, dim=-1)
        values = pre.gather(-1, idx)
    else:
        values, idx = torch.where(candidates, pre, torch.full_like(pre, -torch.inf)).topk(k_aux, dim=-1)
        values = values.relu()
    if reattach:
        sel = sparsify.Selection(values, idx, None, x.shape[0])
        values = sae.reattach(sel, sae.pre_at(sel, x, pre), jump=False).values
    error_hat = sparse.decode_fixed(values, idx, sae.W_dec)
    loss = normalised_mse(error, error_hat, reduce)
    return torch.nan_to_num(loss, nan=0.0)


def underused(freq: torch.Tensor, k: int, exponent: float) -> torch.Tensor:
    """aux_zipf's candidates: features firing below half of their expected Zipf share.

    Sort features by observed firing frequency (fires per token); the expected frequency of the
    feature at rank r is k * r^-exponent / sum_r r^-exponent, capped at one fire per token with the
    excess re-shared over lower ranks (as feature choice's capacities), so expected shares sum to
    k per token. Features below half of that, dead ones included, get the auxiliary loss.
    """
    n = freq.shape[0]
    expected_by_rank = sparsify.zipf_shares(n, k, 1.0, exponent).to(freq.device, freq.dtype)
    expected = torch.empty_like(freq)
    expected[freq.argsort(descending=True)] = expected_by_rank
    return freq < 0.5 * expected


def random_prefixes(cfg, gen: torch.Generator) -> list[int]:
    """Nabeshima's Matryoshka sampling: cfg.matryoshka_random sizes log-uniform in [matryoshka[0], n),
    ascending, plus n."""
    lo, n = cfg.matryoshka[0], cfg.n_latents
    u = torch.rand(cfg.matryoshka_random, generator=gen, dtype=torch.float64)
    sizes = (lo * (n / lo) ** u).floor().long().clamp(lo, n - 1)
    return sorted(set(sizes.tolist())) + [n]


def reconstruction_loss(
    sae: SAE,
    x: torch.Tensor,
    sel: sparsify.Selection,
    total_var: torch.Tensor,
    prefixes: list[int] | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The family's reconstruction term: the normalised error of the full selection, plus (Matryoshka) that
    of each latent prefix in `prefixes`, or (hierarchical) the mean over every prefix of the sorted selection.
    target: [batch d_out] a transcoder's output (default x), which each prefix predicts with the skip term.
    -> (term, the full selection's normalised MSE, x_hat [batch d_out])."""
    cfg = sae.cfg
    y, skip = (x if target is None else target), sae.skip(x)
    base = sae.b_dec if skip is None else sae.b_dec + skip  # the output of no feature

    def predict(n_prefix: int | None = None) -> torch.Tensor:
        out = sae.decode_selection(sel, n_prefix)
        return out if skip is None else out + skip

    if cfg.family.hierarchical:  # the last prefix is the full selection
        errs, residual = PrefixErrors.apply(y - base, sel.values, sel.indices, sae.W_dec)
        return errs.mean() / total_var, errs[-1] / total_var, y - residual
    x_hat = predict()
    recon = mse = normalised_mse(y, x_hat, total_var=total_var)
    if prefixes:
        recon = sum(normalised_mse(y, predict(m), total_var=total_var) for m in prefixes[:-1]) + mse
        if cfg.matryoshka_reduce == "prefix_mean":
            recon = recon / len(prefixes)
        elif cfg.matryoshka_reduce == "bussmann_mean":  # their code counts the b_dec-only reconstruction too
            recon = (recon + normalised_mse(y, base.expand_as(y), total_var=total_var)) / (len(prefixes) + 1)
    return recon, mse, x_hat


def sae_loss(
    sae: SAE,
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    freq: torch.Tensor | None = None,
    reduce: Reducer = LOCAL,
    prefixes: list[int] | None = None,
    grad: torch.Tensor | None = None,
    l0_coef: torch.Tensor | float | None = None,
    target: torch.Tensor | None = None,
) -> StepOutput:
    """x: [batch d_in]; target: [batch d_out] a transcoder's output, which it predicts from x (default x).
    dead: [n] bool; freq: [n] recent fires per token (aux_zipf, feature choice's capacities);
    grad: [batch d_out] the model's loss gradient at the target (for the families that rank by it).
    prefixes: Matryoshka sizes for this step (default cfg.matryoshka); their errors are summed or
    averaged (cfg.matryoshka_reduce), the full SAE's included.
    l0_coef: JumpReLU's λ (default cfg.l0_coef); the loss adds λ * mean_tokens(L0) / k, L0 = sum_j H(pre_j -
    threshold_j) with the step's pseudo-gradient to the threshold (and to pre with cfg.ste_to_input: sparsify.step).

    reduce: data parallelism; x is this rank's share of the batch, selection and normalisers are the
    global batch's, and the losses are this rank's shares (summed over ranks: the global losses)."""
    cfg = sae.cfg
    sparse_backward = sparse.sparse_encoder_backward(sae.W_enc)
    theta = sae.learned_threshold()
    at = None  # [nnz] pre at the selection's entries, with autograd, where the jump and the L0 step share it
    if sparse_backward:
        with torch.no_grad():
            pre = sae.pre_acts(x)
        sel = sae.select(pre, train=True, reduce=reduce, grad=grad, freq=freq)
        at = sae.pre_at(sel, x, pre)
        sel = sae.reattach(sel, at)
    elif theta is not None:  # one gather of pre for JumpReLU's jump and its L0 step
        pre = sae.pre_acts(x)
        sel = sae.select(pre.detach(), train=True, reduce=reduce, grad=grad, freq=freq)
        at = pre.reshape(-1).gather(0, sel.rows() * pre.shape[-1] + sel.indices)
        sel = sae.reattach(sel, at)
    else:
        pre = sae.pre_acts(x)
        sel = sae.select(pre, train=True, reduce=reduce, grad=grad, freq=freq)
    total_var = variance_sum(x if target is None else target, reduce)
    recon, mse, x_hat = reconstruction_loss(sae, x, sel, total_var, prefixes or cfg.matryoshka, target)
    aux = x.new_zeros(())
    if cfg.aux_coef > 0:
        if cfg.family.aux == "aux_zipf" and freq is not None:
            candidates = underused(freq, cfg.k, cfg.zipf_exponent)
            aux = auxk_loss(sae, x, x_hat, pre, candidates, sparse_backward, reduce, target)
        elif dead is not None:
            aux = auxk_loss(sae, x, x_hat, pre, dead, sparse_backward, reduce, target)
    loss = recon + cfg.aux_coef * aux
    l0_coef = cfg.l0_coef if l0_coef is None else l0_coef
    if (
        theta is not None and at is not None and l0_coef is not None
    ):  # the selection holds every entry the kernel reaches
        at = at if cfg.ste_to_input else at.detach()
        l0 = sparsify.step(at, theta[sel.indices], cfg.epsilon, cfg.ste_to_input).sum() / (len(x) * reduce.world)
        loss = loss + l0_coef * l0 / cfg.k
    return StepOutput(loss, mse, aux, sel, x_hat)
