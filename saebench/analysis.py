"""The analysis pass: one stream of held-out tokens -> per-feature statistics and examples.

    contexts -> model (stopped at the last hook) -> each SAE's sparse selection
             -> FeatureAccumulator.update (batched scatter / sort-merge; no loop over features)
             -> finish(): quantiles, interval examples, logit lens, neighbours -> FeatureResults

Memory is bounded by features x (examples + samples) x context, never by the token count.
A fire is a (token, feature) pair with a non-zero code. For abstopk, whose codes are signed,
every statistic ranks |z| and the sign is kept beside it.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saebench.atomic import atomic_save_file
from saebench.errors import ConfigError, DataError
from saebench.readers import read_safetensors, read_safetensors_metadata
from saebench.sae import SAE

# Fixed log-spaced histogram of |z|: bin 0 = [0, 1e-4), bins 1..180 = 20 per decade up to 1e5,
# bin 181 = [1e5, inf). Fixed edges make histograms mergeable and streaming exact.
HIST_DECADES = (-4, 5)
BINS_PER_DECADE = 20
HIST_INNER = torch.logspace(
    HIST_DECADES[0], HIST_DECADES[1], (HIST_DECADES[1] - HIST_DECADES[0]) * BINS_PER_DECADE + 1, dtype=torch.float64
)
N_BINS = len(HIST_INNER) + 1
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
_M32 = 0xFFFFFFFF


@dataclass
class AnalysisConfig:
    """What one analysis pass collects."""

    n_tokens: int | None = None  # None: min(2M, what the split holds)
    split: str = "test"
    n_examples: int = 20  # top-activating examples per feature
    n_intervals: int = 10  # activation-quantile intervals for stratified examples
    per_interval: int = 5
    n_samples: int = 100  # uniform sample of each feature's fires that the intervals draw from
    coact_tokens: int = 65_536  # first analysed tokens whose firings give co-activation neighbours
    n_neighbours: int = 10
    n_logit: int = 10
    batch_size: int = 64  # contexts per model forward
    checkpoint_tokens: int = 500_000
    seed: int = 0
    k: int | None = None  # k' latents per token (per-token families, SAE.check_k); None: each SAE's own rule

    def __post_init__(self) -> None:
        for name in ("n_examples", "n_intervals", "per_interval", "n_samples", "batch_size", "n_neighbours", "n_logit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"analysis {name} must be at least 1, got {getattr(self, name)}")
        if self.n_tokens is not None and self.n_tokens < 1:
            raise ConfigError(f"--tokens must be positive, got {self.n_tokens}")


def histogram_edges() -> list[float]:
    """The N_BINS + 1 boundaries of the |z| histogram (first 0, last inf)."""
    return [0.0, *HIST_INNER.tolist(), math.inf]


def histogram_bin(values: torch.Tensor) -> torch.Tensor:
    """|z| values -> bin index in [0, N_BINS)."""
    return torch.bucketize(values.double(), HIST_INNER.to(values.device), right=True)


def quantiles_from_histogram(
    hist: torch.Tensor, vmin: torch.Tensor, vmax: torch.Tensor, qs: tuple[float, ...] = QUANTILES
) -> torch.Tensor:
    """hist: [n bins] counts; vmin, vmax: [n] -> [n q] quantile estimates.

    The q-quantile lies in the first bin whose cumulative count reaches q * count; inside it the
    value is interpolated geometrically (linearly in bin 0), clamped to the feature's [min, max].
    NaN where a feature never fired.
    """
    hist = hist.double()
    cum = hist.cumsum(-1)
    total = cum[:, -1:]
    target = torch.tensor(qs, dtype=torch.float64, device=hist.device)[None] * total
    b = torch.searchsorted(cum, target).clamp_max(hist.shape[1] - 1)
    below = cum.gather(1, b) - hist.gather(1, b)
    frac = ((target - below) / hist.gather(1, b).clamp_min(1)).clamp(0, 1)
    edges = torch.tensor(histogram_edges(), dtype=torch.float64, device=hist.device)
    lo, hi = edges[b], edges[b + 1]
    hi = torch.minimum(hi, vmax.double()[:, None].expand_as(hi))
    lo = torch.minimum(lo, hi)
    geometric = lo * (hi / lo.clamp_min(1e-300)) ** frac
    value = torch.where(lo > 0, geometric, lo + (hi - lo) * frac)
    value = torch.maximum(torch.minimum(value, vmax.double()[:, None]), vmin.double()[:, None])
    return torch.where(total > 0, value, torch.full_like(value, math.nan)).float()


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (multipliers below 2^31, so int64 never overflows)."""
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


SAMPLE_BITS = 40
TOP_BITS = 32


def feature_mix(features: torch.Tensor, seed: int) -> torch.Tensor:
    return _mix32((features.long() ^ (seed * 0x9E3779B & _M32)) & _M32)


def fire_hash(
    token_ids: torch.Tensor, features: torch.Tensor, seed: int, mix_table: torch.Tensor | None = None
) -> torch.Tensor:
    """A deterministic pseudo-random key in [0, 2^40) per (token, feature): a feature's sample is
    its fires with the smallest keys, the same whatever order or batching the tokens come in.
    mix_table: feature_mix(arange(n), seed), to skip recomputing it per fire."""
    f = mix_table[features] if mix_table is not None else feature_mix(features, seed)
    a = _mix32((token_ids & _M32) ^ f)
    b = _mix32(((token_ids >> 32) & _M32) ^ _mix32(a ^ 0x5BD1E995))
    return ((a << 8) ^ b) & ((1 << SAMPLE_BITS) - 1)


def magnitude_rank(mag: torch.Tensor) -> torch.Tensor:
    """|z| (float32, >= 0) -> int64 rank in [0, 2^31), smaller for larger |z| (IEEE order of bits)."""
    return 0x7FFFFFFF - mag.float().view(torch.int32).long()


@dataclass
class Slots:
    """The best `m` entries per feature: the smallest `rank` (an int64 below 2^bits); on equal
    rank the earlier token wins.

    Each feature has 2m slots. A candidate that beats the feature's threshold (its m-th best at
    the last compaction) is appended; a feature whose slots are full is compacted to its best m
    (a row sort), so each accepted entry costs O(1) amortised and nothing else moves.
    rank: [n 2m] (2^bits where empty); token: [n 2m] global token id (context * ctx + position),
    -1 if empty; value: [n 2m] the signed code; acts: [n 2m ctx] the feature's codes over that
    token's context; fill: [n] slots in use; threshold: [n] rank to beat.
    """

    rank: torch.Tensor
    token: torch.Tensor
    value: torch.Tensor
    acts: torch.Tensor
    fill: torch.Tensor
    threshold: torch.Tensor
    m: int
    bits: int

    TENSORS = ("rank", "token", "value", "acts", "fill", "threshold")
    PER_SLOT = ("rank", "token", "value", "acts")

    @classmethod
    def empty(cls, n: int, m: int, ctx: int, bits: int, device, acts_dtype=torch.float16) -> Slots:
        def full(shape, v, dtype=torch.long):
            return torch.full(shape, v, dtype=dtype, device=device)

        return cls(
            full((n, 2 * m), 1 << bits),
            full((n, 2 * m), -1),
            full((n, 2 * m), 0.0, torch.float32),
            full((n, 2 * m, ctx), 0.0, acts_dtype),
            full((n,), 0),
            full((n,), 1 << bits),
            m,
            bits,
        )

    def blank(self, name: str) -> float:
        """What an empty slot holds in tensor `name`."""
        return {"rank": 1 << self.bits, "token": -1}.get(name, 0)

    def offer(
        self, feat: torch.Tensor, rank: torch.Tensor, token: torch.Tensor, value: torch.Tensor, context_acts
    ) -> None:
        """Candidates (feat, rank, token, value: [c]; tokens ascending and later than every kept
        one). context_acts(accepted candidate indices [a]) -> [a ctx] runs for the accepted only."""
        m = self.m
        live = (rank < self.threshold[feat]).nonzero().squeeze(-1)
        if not len(live):
            return
        c_feat = feat[live]
        order = ((c_feat << self.bits + 1) | rank[live]).sort(stable=True).indices  # by feature, best first
        live, c_feat = live[order], c_feat[order]
        within = torch.arange(len(live), device=live.device) - torch.searchsorted(c_feat, c_feat)
        live, c_feat, within = (
            live[within < m],
            c_feat[within < m],
            within[within < m],
        )  # only a batch's best m can stay
        count = torch.bincount(c_feat, minlength=len(self.fill))
        full = (self.fill + count > 2 * m).nonzero().squeeze(-1)
        if len(full):
            self._compact(full)
        slot = self.fill[c_feat] + within
        self.rank[c_feat, slot] = rank[live]
        self.token[c_feat, slot] = token[live]
        self.value[c_feat, slot] = value[live]
        self.acts[c_feat, slot] = context_acts(live).to(self.acts.dtype)
        self.fill += count

    def _compact(self, rows: torch.Tensor) -> None:
        """Keep the best m of each of these features, best first, and raise their thresholds."""
        m = self.m
        order = self.token[rows].sort(dim=1, stable=True).indices
        order = order.gather(1, self.rank[rows].gather(1, order).sort(dim=1, stable=True).indices)
        for name in self.PER_SLOT:
            t = getattr(self, name)
            kept = t[rows].gather(1, order if t.dim() == 2 else order[..., None].expand(-1, -1, t.shape[2]))
            kept[:, m:] = self.blank(name)
            t[rows] = kept
        fill = (self.token[rows, :m] >= 0).sum(1)
        self.fill[rows] = fill
        self.threshold[rows] = torch.where(fill == m, self.rank[rows, m - 1], torch.full_like(fill, self.blank("rank")))

    def sorted(self) -> Slots:
        """The best m per feature, best first, on the CPU."""
        out = Slots(**{k: getattr(self, k).clone() for k in self.TENSORS}, m=self.m, bits=self.bits)
        out._compact(torch.arange(len(out.fill), device=out.fill.device))
        best = {k: getattr(out, k)[:, : self.m] if k in self.PER_SLOT else getattr(out, k) for k in self.TENSORS}
        return Slots(**{k: best[k].cpu() for k in self.TENSORS}, m=self.m, bits=self.bits)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in self.TENSORS}

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for k in self.TENSORS:
            getattr(self, k).copy_(tensors[f"{prefix}.{k}"])


class FeatureAccumulator:
    """Streaming per-feature statistics of one SAE over a token stream."""

    STATS = ("n_fires", "n_positive", "sum", "sum_signed", "sum_sq", "max", "min", "hist")

    def __init__(self, n_latents: int, ctx: int, cfg: AnalysisConfig, signed: bool, device="cpu"):
        self.n, self.ctx, self.cfg, self.signed = n_latents, ctx, cfg, signed
        n = n_latents
        self.n_fires = torch.zeros(n, dtype=torch.long, device=device)
        self.n_positive = torch.zeros(n, dtype=torch.long, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)  # of |z|
        self.sum_signed = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.max = torch.zeros(n, device=device)  # of |z|
        self.min = torch.full((n,), math.inf, device=device)
        self.hist = torch.zeros(n, N_BINS, dtype=torch.long, device=device)
        self.top = Slots.empty(n, cfg.n_examples, ctx, TOP_BITS, device)
        self.sample = Slots.empty(n, cfg.n_samples, ctx, SAMPLE_BITS, device)
        self.mix_table = feature_mix(torch.arange(n, device=device), cfg.seed)
        self.coact_tokens: list[torch.Tensor] = []  # [nnz] token row index in the co-activation sample
        self.coact_feats: list[torch.Tensor] = []
        self.coact_seen = 0

    @torch.no_grad()
    def update(self, row: torch.Tensor, feat: torch.Tensor, value: torch.Tensor, row_token: torch.Tensor) -> None:
        """One batch of fires. row, feat, value: [e] (row ascending); row_token: [rows] global token ids
        (context * ctx + position, ascending); every row is one analysed token."""
        if len(row_token) == 0:
            return
        nz = value != 0
        row, feat, value = row[nz], feat[nz].long(), value[nz].float()
        mag = value.abs()
        self.n_fires += torch.bincount(feat, minlength=self.n)
        self.n_positive += torch.bincount(feat[value > 0], minlength=self.n)
        self.sum.index_add_(0, feat, mag.double())
        self.sum_signed.index_add_(0, feat, value.double())
        self.sum_sq.index_add_(0, feat, mag.double() ** 2)
        self.max.scatter_reduce_(0, feat, mag, reduce="amax")
        self.min.scatter_reduce_(0, feat, mag, reduce="amin")
        self.hist.view(-1).index_add_(0, feat * N_BINS + histogram_bin(mag), torch.ones_like(feat))

        token = row_token[row]
        ctx_of_row, pos_of_row = row_token // self.ctx, row_token % self.ctx
        first = ctx_of_row[0]
        row_at = torch.full((int(ctx_of_row[-1] - first) + 1, self.ctx), -1, dtype=torch.long, device=value.device)
        row_at[ctx_of_row - first, pos_of_row] = torch.arange(len(row_token), device=value.device)
        codes = torch.zeros(len(row_token) + 1, self.n, device=value.device)  # last row: zeros, for row_at = -1
        codes[row, feat] = value

        def context_acts(accepted: torch.Tensor) -> torch.Tensor:
            """Codes of feature feat[a] over the whole context of token[a]: [a ctx]."""
            return codes[row_at[ctx_of_row[row[accepted]] - first], feat[accepted, None]]

        self.top.offer(feat, magnitude_rank(mag), token, value, context_acts)
        self.sample.offer(feat, fire_hash(token, feat, self.cfg.seed, self.mix_table), token, value, context_acts)

        room = self.cfg.coact_tokens - self.coact_seen
        if room > 0:
            take = row < room
            self.coact_tokens.append((row[take] + self.coact_seen).int())
            self.coact_feats.append(feat[take].int())
            self.coact_seen += min(room, len(row_token))

    def _coact_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, feature) of every fire in the co-activation sample: [nnz], [nnz]."""
        if not self.coact_tokens:
            return torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
        return torch.cat(self.coact_tokens), torch.cat(self.coact_feats)

    # -- checkpoint state --------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{k}": getattr(self, k) for k in self.STATS}
        out.update(self.top.state(f"{prefix}.top"))
        out.update(self.sample.state(f"{prefix}.sample"))
        out[f"{prefix}.coact_tokens"], out[f"{prefix}.coact_feats"] = self._coact_sample()
        out[f"{prefix}.coact_seen"] = torch.tensor([self.coact_seen])
        return {k: v.contiguous().cpu() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor], prefix: str) -> None:
        for k in self.STATS:
            getattr(self, k).copy_(tensors[f"{prefix}.{k}"])
        self.top.load(tensors, f"{prefix}.top")
        self.sample.load(tensors, f"{prefix}.sample")
        device = self.n_fires.device
        self.coact_tokens = [tensors[f"{prefix}.coact_tokens"].to(device)]
        self.coact_feats = [tensors[f"{prefix}.coact_feats"].to(device)]
        self.coact_seen = int(tensors[f"{prefix}.coact_seen"][0])

    # -- the end of the pass -----------------------------------------------------------------
    @torch.no_grad()
    def finish(self, n_tokens: int) -> FeatureResults:
        cfg = self.cfg
        fired = self.n_fires.clamp_min(1).double()
        vmin = torch.where(self.n_fires > 0, self.min, torch.zeros_like(self.min))
        quantiles = quantiles_from_histogram(self.hist, vmin, self.max)
        interval_edges = quantiles_from_histogram(
            self.hist, vmin, self.max, tuple(i / cfg.n_intervals for i in range(1, cfg.n_intervals))
        )
        top, sample = self.top.sorted(), self.sample.sorted()
        interval, interval_rank = self._interval_examples(sample, interval_edges.cpu())
        return FeatureResults(
            n_tokens=n_tokens,
            n_fires=self.n_fires.cpu(),
            n_positive=self.n_positive.cpu(),
            mean=(self.sum / fired).float().cpu(),
            mean_signed=(self.sum_signed / fired).float().cpu(),
            std=((self.sum_sq / fired - (self.sum / fired) ** 2).clamp_min(0).sqrt()).float().cpu(),
            max=self.max.cpu(),
            min=vmin.cpu(),
            hist=self.hist.cpu(),
            quantiles=quantiles.cpu(),
            interval_edges=torch.cat([vmin[:, None], interval_edges, self.max[:, None]], 1).cpu(),
            top=top,
            sample=sample,
            sample_interval=interval.cpu(),
            sample_interval_rank=interval_rank.cpu(),
            coact=coactivation_neighbours(*self._coact_sample(), self.n, cfg.n_neighbours),
            coact_tokens=self.coact_seen,
        )

    def _interval_examples(self, s: Slots, inner_edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval of every sampled fire ([n s] in sorted sample order, -1 if empty), and its rank
        within its interval (smallest key first): the first `per_interval` of each are shown."""
        mag = s.value.abs()
        interval = torch.searchsorted(inner_edges.contiguous(), mag.contiguous(), right=True)
        interval = torch.where(s.token >= 0, interval, torch.full_like(interval, -1))
        n, m = interval.shape
        group = torch.arange(n, device=interval.device)[:, None] * (self.cfg.n_intervals + 1) + interval + 1
        flat = group.reshape(-1)
        order = flat.sort(stable=True).indices  # slots are already in sample order within a feature
        g_sorted = flat[order]
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(len(flat), device=flat.device) - torch.searchsorted(g_sorted, g_sorted)
        return interval, rank.reshape(n, m)


@dataclass
class FeatureResults:
    """Everything the store holds for one SAE, as tensors over features ([n ...])."""

    n_tokens: int
    n_fires: torch.Tensor
    n_positive: torch.Tensor
    mean: torch.Tensor
    mean_signed: torch.Tensor
    std: torch.Tensor
    max: torch.Tensor
    min: torch.Tensor
    hist: torch.Tensor  # [n N_BINS]
    quantiles: torch.Tensor  # [n len(QUANTILES)]
    interval_edges: torch.Tensor  # [n n_intervals+1]
    top: Slots
    sample: Slots
    sample_interval: torch.Tensor  # [n n_samples]
    sample_interval_rank: torch.Tensor
    coact: tuple[torch.Tensor, torch.Tensor]  # ([n k] neighbour ids, -1 if none; [n k] Jaccard)
    coact_tokens: int
    decoder: tuple[torch.Tensor, torch.Tensor] | None = None  # ([n k] ids, [n k] cosine)
    logit_lens: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = (
        None  # top ids, values, bottom ids, values
    )
    notes: dict = field(default_factory=dict)


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, k: int = 10, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k cosine neighbours of each decoder row (self excluded). W_dec: [n d] -> ([n k], [n k])."""
    w = W_dec.float()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = w.shape[0]
    k = min(k, n - 1)
    ids, vals = [], []
    for start in range(0, n, block):
        sim = w[start : start + block] @ w.T
        rows = torch.arange(start, min(start + block, n), device=w.device)
        sim[rows - start, rows] = -math.inf
        v, i = sim.topk(k, dim=-1)
        ids.append(i.cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)


PAIR_COUNT_MAX_LATENTS = 8192  # up to here co-fire counts are a dense [n n] pair histogram


@torch.no_grad()
def coactivation_neighbours(
    tokens: torch.Tensor, feats: torch.Tensor, n: int, k: int = 10, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k neighbours of each feature by the Jaccard index of their firing sets over a token
    sample: |i and j| / |i or j|. tokens, feats: [nnz] (one entry per fire, tokens ascending)
    -> ([n k] ids, -1 where fewer than k features ever co-fire; [n k] Jaccard).

    method: "pairs" counts co-firing pairs into a dense [n n] histogram (n <= 8192), "sparse"
    multiplies the sparse firing matrix by blocks of itself (any n); default by n."""
    k = min(k, n - 1)
    if len(tokens) == 0:
        return torch.full((n, k), -1, dtype=torch.long), torch.zeros(n, k)
    t, f = tokens.long(), feats.long()
    counts = torch.bincount(f, minlength=n).float()
    method = method or ("pairs" if n <= PAIR_COUNT_MAX_LATENTS else "sparse")
    co_blocks = _co_counts_pairs(t, f, n) if method == "pairs" else _co_counts_sparse(t, f, n)
    ids, vals = [], []
    for start, co in co_blocks:  # co: [b n] co-fire counts of features start..start+b
        stop = start + co.shape[0]
        union = counts[start:stop, None] + counts[None] - co
        jac = torch.where(co > 0, co / union.clamp_min(1), torch.zeros_like(co))
        jac[torch.arange(stop - start, device=jac.device), torch.arange(start, stop, device=jac.device)] = 0
        v, i = jac.topk(k, dim=-1)
        ids.append(torch.where(v > 0, i, torch.full_like(i, -1)).cpu())
        vals.append(v.cpu())
    return torch.cat(ids), torch.cat(vals)


def _co_counts_pairs(t: torch.Tensor, f: torch.Tensor, n: int, chunk_pairs: int = 1 << 24):
    """Each token's active features, padded to [tokens L]; every ordered pair counted once."""
    n_tok = int(t.max()) + 1
    per_token = torch.bincount(t, minlength=n_tok)
    width = int(per_token.max())
    slot = torch.arange(len(t), device=t.device) - (per_token.cumsum(0) - per_token)[t]
    active = torch.full((n_tok, width), -1, dtype=torch.long, device=t.device)
    active[t, slot] = f
    co = torch.zeros(n * n, dtype=torch.long, device=t.device)
    step = max(1, chunk_pairs // (width * width))
    for a in range(0, n_tok, step):
        rows = active[a : a + step]
        i, j = rows[:, :, None].expand(-1, -1, width), rows[:, None, :].expand(-1, width, -1)
        ok = (i >= 0) & (j >= 0) & (i != j)
        co += torch.bincount(i[ok] * n + j[ok], minlength=n * n)
    yield 0, co.view(n, n).float()


def _co_counts_sparse(t: torch.Tensor, f: torch.Tensor, n: int):
    n_tok = int(t.max()) + 1
    by_feature = torch.sparse_coo_tensor(
        torch.stack([f, t]), torch.ones(len(t), device=t.device), (n, n_tok), check_invariants=True
    ).coalesce()
    block = max(1, min(n, 2**25 // n_tok, 2**25 // n))  # bounds the dense [n_tok b] and [b n] blocks
    for start in range(0, n, block):
        stop = min(start + block, n)
        cols = (f >= start) & (f < stop)
        dense = torch.zeros(n_tok, stop - start, device=t.device)
        dense[t[cols], f[cols] - start] = 1.0
        yield start, torch.sparse.mm(by_feature, dense).T


@torch.no_grad()
def logit_lens(
    model, W_dec: torch.Tensor, k: int = 10, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each decoder row through the model's final norm and the unembedding (no b_U), as in
    Arad et al. 2025: -> top ids, top logits, bottom ids, bottom logits, each [n k]."""
    W_U = model.W_U
    out = [[], [], [], []]
    for start in range(0, W_dec.shape[0], block):
        logits = model.ln_final(W_dec[start : start + block].to(W_U.device, W_U.dtype)) @ W_U
        top, bottom = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        for lst, t in zip(out, (top.indices, top.values, bottom.indices, bottom.values), strict=True):
            lst.append(t.float().cpu() if t.is_floating_point() else t.cpu())
    top_ids, top_values, bottom_ids, bottom_values = (torch.cat(o) for o in out)
    return top_ids, top_values, bottom_ids, bottom_values


def whole_contexts(contexts, n_tokens: int) -> tuple[int, int]:
    """The fewest leading contexts holding at least n_tokens non-special tokens: (contexts, their tokens)."""
    cum = (~contexts.special_mask).sum(1).cumsum(0)
    n_ctx = min(int(torch.searchsorted(cum, torch.tensor(n_tokens))) + 1, len(cum))
    return n_ctx, int(cum[n_ctx - 1])


def sparse_codes(sae: SAE, acts: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """acts: [rows d_in] -> the SAE's inference codes (at k', given k) as (row, feature, value), each [e],
    row ascending."""
    pre = sae.pre_acts(acts.to(sae.W_enc.dtype))
    sel = sae.select(pre, train=False, k=k)
    return sel.rows().reshape(-1), sel.indices.reshape(-1), sel.values.reshape(-1)


def accumulate(
    harvester,
    saes: dict[str, tuple[SAE, str]],
    contexts,
    n_ctx: int,
    n_tokens: int,
    cfg: AnalysisConfig,
    state_dir: Path,
    fingerprint: str,
    resume: bool = False,
    restart: bool = False,
    show_progress: bool = True,
) -> tuple[dict[str, FeatureAccumulator], float, int]:
    """The analysis pass: the first n_ctx contexts (n_tokens kept tokens) through the model and every SAE.

    saes: name -> (SAE, its hook). The accumulators are checkpointed to state_dir every
    cfg.checkpoint_tokens; `resume` continues an interrupted pass with the same `fingerprint` (its
    settings) and ends with the same accumulators as an uninterrupted pass. -> (name -> accumulator,
    seconds of this pass, tokens it read)."""
    device = harvester.device
    ctx = contexts.tokens.shape[1]
    accs = {
        name: FeatureAccumulator(sae.cfg.n_latents, ctx, cfg, sae.cfg.family.signed, device)
        for name, (sae, _) in saes.items()
    }
    state_path = state_dir / "state.safetensors"
    fix = f"pass --restart to start the analysis over (or delete {state_dir})"
    start_ctx = tokens_done = 0
    if state_path.exists():
        meta = read_safetensors_metadata(state_path, fix)
        if restart:
            shutil.rmtree(state_dir)
        elif not resume:
            raise DataError(
                f"an interrupted analysis ({meta.get('tokens_done', '?')} of {n_tokens} tokens) is in {state_dir}: "
                f"pass --resume to continue it or --restart to start over"
            )
        elif meta.get("fingerprint") != fingerprint:
            raise DataError(
                f"the interrupted analysis in {state_dir} used other settings: "
                "rerun with the same ones, or pass --restart"
            )
        else:
            tensors = read_safetensors(state_path, device, fix)
            for k, acc in enumerate(accs.values()):
                acc.load(tensors, f"sae{k}")
            start_ctx, tokens_done = int(meta["contexts_done"]), int(meta["tokens_done"])

    started, tokens_before = time.perf_counter(), tokens_done
    bar = tqdm(
        total=n_tokens, initial=tokens_done, desc="analyze", unit="tok", unit_scale=True, disable=not show_progress
    )
    since_checkpoint = 0
    for i in range(start_ctx, n_ctx, cfg.batch_size):
        j = min(i + cfg.batch_size, n_ctx)
        acts, keep = harvester.device_activations(contexts.tokens[i:j], contexts.special_mask[i:j])
        b, pos = keep.to(device).nonzero(as_tuple=True)
        row_token = (b + i) * ctx + pos
        for name, (sae, hook) in saes.items():
            accs[name].update(*sparse_codes(sae, acts[hook], cfg.k), row_token)
        tokens_done += len(row_token)
        since_checkpoint += len(row_token)
        bar.update(len(row_token))
        if since_checkpoint >= cfg.checkpoint_tokens and j < n_ctx:
            state_dir.mkdir(exist_ok=True)
            tensors = {k: v for n, acc in enumerate(accs.values()) for k, v in acc.state(f"sae{n}").items()}
            meta = {"fingerprint": fingerprint, "contexts_done": str(j), "tokens_done": str(tokens_done)}
            atomic_save_file(tensors, state_path, meta)
            since_checkpoint = 0
    bar.close()
    return accs, time.perf_counter() - started, tokens_done - tokens_before
