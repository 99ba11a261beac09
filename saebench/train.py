"""The SAE training loop: Adam, warmup/decay, grad clip, dead-latent tracking, checkpoints, resume.

    sae, report = sb.train_sae(sb.SAEConfig(d_in=192, n_latents=3072, k=32), acts, sb.TrainConfig(n_tokens=2_000_000))

`acts` is a tensor [N d_in] (shuffled each epoch by the seed) or a callable returning a fresh
iterator of [batch d_in] batches (a harvester stream or an ActivationStore); see `BatchSource`.
A family that ranks by the model's loss gradient (gradient_topk) also needs `grads` [N d_in], or
batches that carry them under `grad_key(hook)` (harvest.gradients). A transcoder (SAEConfig.kind) also
needs its output: `targets` [N d_out], or batches that carry its output hook's rows.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from saebench import distributed as dist
from saebench.atomic import atomic_save_file, atomic_write_text, clean_partial
from saebench.distributed import LOCAL, Reducer
from saebench.errors import ConfigError, DataError
from saebench.sae import SAE, Family, SAEConfig
from saebench.sae.losses import random_prefixes, sae_loss
from saebench.sae.sparsify import min_kept


@dataclass
class TrainConfig:
    """How to train (a run config's `train:` section; there its seed and device are the run's)."""

    n_tokens: int = 2_000_000
    batch_size: int = 4096  # tokens per step
    # None = 8e-4 / sqrt(n_latents / 2^14): the n-scaling of Gao et al. (2024), at 4x their constant,
    # chosen on the defaults suite (docs/benchmarks.md, "Choosing the defaults")
    lr: float | None = None
    warmup_steps: int | None = None  # default min(100, 5% of the steps)
    decay_fraction: float = 0.2  # lr falls linearly to 0 over this last share of steps
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    normalize_activations: bool = True  # scale inputs to mean norm sqrt(d_in); folded into the weights at save
    b_dec_init: Literal["geometric_median", "mean", "zero"] = "geometric_median"
    # W_enc = enc_init_scale * W_dec^T, for inputs of norm sqrt(d_in). None = the family's (Family.enc_init_scale:
    # 0.3 for topk / abstopk, 0.1 for the batch sparsifiers); unit scale trains far slower at the default lr
    enc_init_scale: float | None = None
    init_tokens: int = 16_384  # sample for b_dec and the scale
    log_every: int = 50
    checkpoint_every: int = 500  # steps; 0 = only at the end
    seed: int = 0
    device: str = "cpu"
    autocast_bf16: bool = True  # on CUDA only
    # fused Adam with clipping folded into its grad_scale and a non-finite step skipped on the device
    # (no host sync); None = on CUDA. The unfused path is the reference and CPU's default.
    fused_step: bool | None = None
    # under torchrun: "data" = every rank holds every SAE and trains on its share of each global
    # batch (gradients and batch statistics all-reduced); "hooks" = the SAEs are dealt out to ranks,
    # each rank runs the model on its share and sends each hook's rows to the SAE's owner
    distribute: Literal["data", "hooks"] = "data"
    # `saebench train`: batches streamed from the model through a shuffling buffer, or read from the
    # on-disk cache that `saebench harvest` writes (harvested first when missing)
    source: Literal["stream", "cache"] = "stream"
    wandb_project: str | None = None

    def resolved_lr(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 8e-4 / math.sqrt(n_latents / 2**14)

    def resolved_enc_init_scale(self, family: Family) -> float:
        return self.enc_init_scale if self.enc_init_scale is not None else family.enc_init_scale

    def resolved_warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, math.ceil(0.05 * total_steps))


Batch = dict[str, torch.Tensor]  # hook -> [batch d] (+ grad_key(hook) -> its loss gradient); a tensor is {"": tensor}
TARGET = ":target"  # the key of a transcoder's outputs given as a tensor (train_sae's targets)


def grad_key(hook: str) -> str:
    """The batch key of the model's loss gradient at `hook`'s activations."""
    return f"{hook}:grad"


def local_batch_size(batch_size: int) -> int:
    """Each rank's share of a global batch; ConfigError when it does not split over the ranks."""
    world = dist.world()
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size {batch_size} does not split over {world} ranks: make it a multiple of {world}"
        )
    return batch_size // world


STEP_COPIES = 3  # [batch n_latents] tensors alive in one step: pre-activations, their gradient, AuxK's masked copy


def memory_needed(sae_cfgs: Iterable[SAEConfig], batch_size: int) -> tuple[int, int]:
    """Bytes that training these SAEs together holds: (every SAE's state at once: weights, gradients, Adam's
    two moments and the latent statistics, 16 bytes per parameter and per latent; one step's activations,
    the largest SAE's, as the SAEs step one after another: STEP_COPIES x [batch n_latents] floats)."""
    cfgs = list(sae_cfgs)
    state = sum(16 * (2 * c.n_latents * c.d_in + c.n_latents + c.d_in) + 16 * c.n_latents for c in cfgs)
    return state, max((4 * STEP_COPIES * batch_size * c.n_latents for c in cfgs), default=0)


def available_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's free memory, else the host's MemAvailable (within a cgroup's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        free = min(free, int(limit) - int(used)) if limit.isdigit() else free
    except (OSError, StopIteration, ValueError):
        pass
    return free


def check_memory(sae_cfgs: Iterable[SAEConfig], batch_size: int, device: torch.device) -> None:
    """ConfigError when training these SAEs together will not fit in `device`'s free memory (memory_needed)."""
    cfgs = list(sae_cfgs)
    state, step = memory_needed(cfgs, batch_size)
    free = available_memory(device)
    if state + step > free:
        gib = [f"{b / 2**30:.2f} GiB" for b in (state + step, state, step, free)]
        raise ConfigError(
            f"training {len(cfgs)} SAEs from one pass needs about {gib[0]} on {device} ({gib[1]} of weights, "
            f"gradients and Adam state, {gib[2]} for one step) but {gib[3]} is free: train fewer SAEs per pass "
            "(a smaller grid, or train.distribute: hooks over more ranks) or lower train.batch_size"
        )


def refuse_overwrite(dirs: Iterable[Path]) -> None:
    """DataError when a folder already holds a training run (its metrics.jsonl): nothing is overwritten."""
    for d in dirs:
        if (Path(d) / "metrics.jsonl").exists():
            raise DataError(f"{d} already holds a training run: pass --resume to continue it, or choose another name")


class BatchSource:
    """Deterministic batches from a tensor or a factory of iterators, resumable by count.

    acts: a tensor [N d] or a dict of row-aligned tensors {key: [N d]} (reshuffled each epoch by the seed),
    or a callable epoch -> iterator of [chunk d] tensors or of {key: [chunk d]} dicts (several hooks
    from one model pass, and their gradients).
    Under torchrun each rank gets batch_size / world rows per batch: its slice of each global
    batch of a tensor (every rank holds the same tensor), or its own callable's rows (each rank's
    callable yields that rank's data).
    """

    def __init__(
        self, acts: torch.Tensor | dict[str, torch.Tensor] | Callable[[int], Iterator], batch_size: int, seed: int
    ):
        self.batch_size = local_batch_size(batch_size)
        self.acts = {"": acts} if isinstance(acts, torch.Tensor) else acts
        self.global_batch, self.seed = batch_size, seed
        if isinstance(self.acts, dict):
            n = len(next(iter(self.acts.values())))
            for value in self.acts.values():
                if value.dim() != 2 or len(value) != n:
                    raise DataError(f"activations must be [n_tokens d_in], got shape {tuple(value.shape)}")
            if n < batch_size:
                raise DataError(f"only {n} activations for a batch of {batch_size}: lower train.batch_size")

    def batches(self, skip: int = 0) -> Iterator[Batch]:
        epoch, seen = 0, 0
        while True:
            if isinstance(self.acts, dict):
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                tensors = self.acts
                perm = torch.randperm(len(next(iter(tensors.values()))), generator=gen)
                n_full = len(perm) - len(perm) % self.global_batch
                mine = slice(dist.rank() * self.batch_size, (dist.rank() + 1) * self.batch_size)
                it = (
                    {k: v[perm[i : i + self.global_batch][mine]] for k, v in tensors.items()}
                    for i in range(0, n_full, self.global_batch)
                )
            else:
                it = self._rebatch(self.acts(epoch))
            got_any = False
            for batch in it:
                got_any = True
                if seen >= skip:
                    yield batch
                seen += 1
            if not got_any:
                raise DataError("the activation source yielded no batches")
            epoch += 1

    def _rebatch(self, it: Iterator) -> Iterator[Batch]:
        carry: dict[str, list[torch.Tensor]] = {}
        size = 0
        for chunk in it:
            chunk = chunk if isinstance(chunk, dict) else {"": chunk}
            for key, value in chunk.items():
                carry.setdefault(key, []).append(value)
            size += len(next(iter(chunk.values())))
            while size >= self.batch_size:
                flat = {k: torch.cat(v) for k, v in carry.items()}
                yield {k: v[: self.batch_size] for k, v in flat.items()}
                carry = {k: [v[self.batch_size :]] for k, v in flat.items()}
                size -= self.batch_size


class Picked(NamedTuple):
    x: torch.Tensor  # [batch d_in] the SAE's hook's rows
    grad: torch.Tensor | None  # [batch d_out] the loss gradient where it writes (None when the source has none)
    target: torch.Tensor | None  # [batch d_out] a transcoder's output hook's rows (None for an SAE)


def _pick(batch: Batch, sae_cfg: SAEConfig) -> Picked:
    """The SAE's rows, their loss gradient and, for a transcoder, its output's rows."""
    hooks = [key for key in batch if not key.endswith(grad_key("")) and key != TARGET]
    hook = hooks[0] if len(hooks) == 1 else sae_cfg.hook
    out = (TARGET if TARGET in batch else sae_cfg.output_hook) if sae_cfg.transcoder else hook
    if hook not in batch or out not in batch:
        missing = out if hook in batch else hook
        raise DataError(f"the activation source has no hook {missing!r} (it has {', '.join(hooks)})")
    grad = batch.get(grad_key(out))
    if grad is None and sae_cfg.family.gradients:
        raise ConfigError(
            f"sae.activation {sae_cfg.activation} ranks latents by the model's loss gradient: set harvest.gradients: "
            "true (train_sae: pass grads=)"
        )
    return Picked(batch[hook], grad, batch[out] if sae_cfg.transcoder else None)


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm. x: [n d] -> [d]."""
    median = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - median).norm(dim=-1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            return new
        median = new
    return median


@torch.no_grad()
def principal_subspace(x: torch.Tensor, centre: torch.Tensor, share: float) -> torch.Tensor:
    """The fewest principal directions of x about `centre` that hold `share` of sum ||x - centre||^2.

    x: [N d], centre: [d] -> U [d r], orthonormal columns, by decreasing variance."""
    xc = (x - centre).double()
    var, vecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    var, vecs = var.flip(0).clamp_min(0), vecs.flip(1)
    held = var.cumsum(0) / var.sum().clamp_min(1e-300)
    r = min(int((held < share).sum()) + 1, x.shape[1])
    return vecs[:, :r].float()


class SAETrainer:
    """Owns one SAE, its optimizer and statistics; `step(x)` trains on one batch [batch d_in].

    reduce: data parallelism; x is then this rank's share of the global batch, and gradients,
    selection, dead-latent statistics, thresholds and metrics follow the global batch. `sample`
    must be the same on every rank (the initialisation is then the same). A transcoder also takes
    `target_sample`, its outputs at those rows; its inputs and outputs are each scaled to mean norm
    sqrt(width)."""

    def __init__(
        self,
        sae_cfg: SAEConfig,
        cfg: TrainConfig,
        sample: torch.Tensor,
        reduce: Reducer = LOCAL,
        target_sample: torch.Tensor | None = None,
    ):
        self.cfg, self.sae_cfg, self.reduce = cfg, sae_cfg, reduce
        if (target_sample is None) == sae_cfg.transcoder:
            raise DataError(f"a transcoder (sae.kind {sae_cfg.kind}) trains on inputs and targets, an SAE on inputs")
        for what, rows, d in (("activations", sample, sae_cfg.d_in), ("targets", target_sample, sae_cfg.d_out)):
            if rows is not None and rows.shape[-1] != d:
                key = "d_in" if what == "activations" else "d_out"
                raise DataError(
                    f"{what} have width {rows.shape[-1]} but sae.{key} is {d}: set sae.{key}={rows.shape[-1]}"
                )
        _check_finite(sample, "the initialisation sample")
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        sample = sample.to(self.device, torch.float32)
        self.scale = float(math.sqrt(sae_cfg.d_in) / sample.norm(dim=-1).mean()) if cfg.normalize_activations else 1.0
        sample = sample * self.scale
        self.scale_out = self.scale  # the target's (a transcoder's output's) scale
        if target_sample is not None:
            _check_finite(target_sample, "the initialisation sample's targets")
            target_sample = target_sample.to(self.device, torch.float32)
            norm = target_sample.norm(dim=-1).mean()
            self.scale_out = float(math.sqrt(sae_cfg.d_out) / norm) if cfg.normalize_activations else 1.0
        outputs = sample if target_sample is None else target_sample * self.scale_out
        if cfg.b_dec_init == "geometric_median":
            b_dec = geometric_median(outputs)
        elif cfg.b_dec_init == "mean":
            b_dec = outputs.mean(0)
        else:
            b_dec = outputs.new_zeros(sae_cfg.d_out)
        # about b_dec: the codes reconstruct x - b_dec, so the decoder's span must hold it, offset included
        basis = principal_subspace(outputs, b_dec, sae_cfg.subspace_variance) if sae_cfg.init == "subspace" else None
        self.init_meta = {} if basis is None else {"init_rank": basis.shape[1]}  # for the report and cfg.json
        self.sae = SAE(sae_cfg, device=self.device, seed=cfg.seed, basis=basis).train()
        with torch.no_grad():
            self.sae.W_enc.mul_(cfg.resolved_enc_init_scale(sae_cfg.family))
            self.sae.b_dec.copy_(b_dec)
            if sae_cfg.family.threshold == "learned":
                # each latent fires on a share k/n of the sample at the start (mean L0 = k), where the paper's
                # threshold 0.001 starts at L0 ~ n/2 and log(threshold) needs thousands of steps to climb
                pre = self.sae.pre_acts(sample[:4096])
                rank = max(1, round(len(pre) * (1 - sae_cfg.k / sae_cfg.n_latents)))
                self.sae.set_threshold(pre.kthvalue(rank, dim=0).values.clamp_min(sae_cfg.epsilon))
        self.lr = cfg.resolved_lr(sae_cfg.n_latents)
        self.fused = cfg.fused_step if cfg.fused_step is not None else self.device.type == "cuda"
        groups = [[p for n, p in self.sae.named_parameters() if n != "log_threshold"]]
        if sae_cfg.family.threshold == "learned":
            groups.append([self.sae.log_threshold])
        self.lr_scales = (1.0, THRESHOLD_LR_SCALE)[: len(groups)]
        self.opt = torch.optim.Adam(
            [{"params": g} for g in groups], lr=self.lr, betas=cfg.adam_betas, fused=self.fused or None
        )
        self.bad_step = torch.full(
            (2,), -1, dtype=torch.long, device=self.device
        )  # first step with a bad (batch, loss)
        self.total_steps = max(1, cfg.n_tokens // cfg.batch_size)
        self.step_count = 0
        self.tokens_since_fired = torch.zeros(sae_cfg.n_latents, dtype=torch.long, device=self.device)
        self.fire_freq = torch.zeros(sae_cfg.n_latents, device=self.device)  # EMA of fires per token
        self.threshold_set = torch.zeros((), dtype=torch.bool, device=self.device)  # a threshold was ever recorded
        self.prefix_gen = torch.Generator().manual_seed(
            cfg.seed + 11
        )  # Matryoshka prefix draws, the same on every rank
        # JumpReLU's L0 controller state (I, e), see l0_coef
        self.l0_ctrl = torch.tensor([math.log(L0_COEF_INIT), 0.0], device=self.device)

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.cfg.resolved_warmup(self.total_steps)))
        decay_start = int(self.total_steps * (1 - self.cfg.decay_fraction))
        decay = (
            1.0 if step < decay_start else max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_start))
        )
        return self.lr * warm * decay

    def step(
        self, x: torch.Tensor, sync: bool = True, grad: torch.Tensor | None = None, target: torch.Tensor | None = None
    ) -> dict:
        """One optimizer step on x [batch d_in] (grad: the model's loss gradient where the SAE writes, [batch d_out];
        target: a transcoder's output [batch d_out]); the metrics dict, or {} when sync is False.

        The fused path reads nothing back to the host unless sync is True: a non-finite batch or loss
        skips the update on the device and raises at the next synced step.
        """
        if not self.fused:
            for rows in (x, target):
                if rows is not None:
                    _check_finite(rows, f"the batch of step {self.step_count}")
        x = x.to(self.device, torch.float32) * self.scale
        if target is not None:
            target = target.to(self.device, torch.float32) * self.scale_out
        if grad is not None:  # the gradient with respect to scale * x (a transcoder's: to scale_out * target)
            grad = grad.to(self.device, torch.float32) / self.scale_out
        for group, scale in zip(self.opt.param_groups, self.lr_scales, strict=True):
            group["lr"] = self.lr_at(self.step_count) * scale
        dead = self.tokens_since_fired >= self.sae_cfg.dead_tokens
        learned = self.sae_cfg.family.threshold == "learned"
        use_bf16 = self.cfg.autocast_bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            prefixes = random_prefixes(self.sae_cfg, self.prefix_gen) if self.sae_cfg.matryoshka_random else None
            l0_coef = self.l0_coef() if learned else None
            out = sae_loss(
                self.sae,
                x,
                dead=dead,
                freq=self.fire_rate(),
                reduce=self.reduce,
                prefixes=prefixes,
                l0_coef=l0_coef,
                grad=grad,
                target=target,
            )
        if not self.fused and not torch.isfinite(out.loss):
            raise DataError(
                f"loss became {float(out.loss)} at step {self.step_count}: lower train.lr or check the activations"
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.reduce.sum_grads_(
            list(self.sae.parameters())
        )  # each rank's loss is its share: the sum is the global gradient
        self.sae.remove_parallel_grad()
        params = [p for p in self.sae.parameters() if p.grad is not None]
        if self.fused:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            bad = self.reduce.max(torch.stack([~torch.isfinite(x).all(), ~torch.isfinite(out.loss)]))
            first = (self.bad_step < 0) & bad
            self.bad_step.copy_(torch.where(first, self.step_count, self.bad_step))
            # clip_grad_norm_ multiplies by min(1, clip / (norm + 1e-6)); fused Adam divides by grad_scale
            self.opt.grad_scale = (  # pyright: ignore[reportAttributeAccessIssue]
                1 / (self.cfg.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0)
            ).float()
            self.opt.found_inf = (bad.any() | ~torch.isfinite(grad_norm)).float()  # pyright: ignore[reportAttributeAccessIssue]
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.opt.step()
        self.sae.normalize_decoder()
        self._update_stats(out.selection, len(x))
        self.step_count += 1
        if not sync:
            return {}
        self.raise_if_bad()
        sums = self.reduce.sum(
            torch.stack([out.loss.detach(), out.mse.detach(), out.aux.detach(), out.selection.l0().sum()]).float()
        )
        loss, fvu, aux, l0_sum = sums.tolist()
        return {
            "step": self.step_count,
            "tokens": self.step_count * self.cfg.batch_size,
            "loss": loss,
            "fvu": fvu,
            "aux": aux,
            "l0": l0_sum / (len(x) * self.reduce.world),
            "lr": self.lr_at(self.step_count - 1),
            "dead_fraction": float(dead.float().mean()),
            "grad_norm": float(grad_norm),
            **({"l0_coef": float(self.l0_coef())} if learned else {}),
        }

    def l0_coef(self) -> torch.Tensor:
        """JumpReLU's λ for the next step: sae.l0_coef, else a PI controller on log λ that brings the mean L0 to k:
        λ = exp(I + KP e), e = clamp((L0 - k) / k, -1, 1) of the last batch, and I += KI e after each step.
        The thresholds integrate λ's error themselves (each drifts while λ is off its balance), so an
        integral-only controller would oscillate: the proportional part turns their drift round as L0 crosses k,
        the integral part removes the remaining offset. Its state is on the device (no host sync), the same on
        every rank (L0 is the global batch's) and checkpointed."""
        if self.sae_cfg.l0_coef is not None:
            return torch.tensor(self.sae_cfg.l0_coef, device=self.device)
        return (self.l0_ctrl[0] + L0_KP * self.l0_ctrl[1]).exp()

    def raise_if_bad(self) -> None:
        """Raise for the first non-finite batch or loss the fused path skipped (one host sync)."""
        batch_step, loss_step = (int(v) for v in self.bad_step.tolist())
        if batch_step >= 0:
            raise _nonfinite(f"the batch of step {batch_step}")
        if loss_step >= 0:
            raise DataError(f"loss became non-finite at step {loss_step}: lower train.lr or check the activations")

    def fire_rate(self) -> torch.Tensor | None:
        """[n] fires per token, the bias-corrected EMA of the batches so far (as Adam's moments); None before any."""
        if self.step_count == 0:
            return None
        return self.fire_freq / (1 - 0.99**self.step_count)

    @torch.no_grad()
    def _update_stats(self, sel, batch: int) -> None:
        n = self.sae_cfg.n_latents
        fired = torch.zeros(n, device=self.device).index_add_(
            0, sel.indices.reshape(-1), (sel.values != 0).reshape(-1).float()
        )
        fired, batch = self.reduce.sum(fired), batch * self.reduce.world
        self.tokens_since_fired = torch.where(
            fired > 0, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + batch
        )
        self.fire_freq.mul_(0.99).add_(fired / batch, alpha=0.01)
        family = self.sae_cfg.family
        if family.threshold == "learned":
            self.sae.threshold.copy_(self.sae.log_threshold.detach().exp())
            err = ((fired.sum() / batch - self.sae_cfg.k) / self.sae_cfg.k).clamp(-1, 1)
            self.l0_ctrl.copy_(torch.stack([self.l0_ctrl[0] + L0_KI * err, err]))
        if family.batch_selection:  # written with torch.where: no host sync
            per_feature = family.threshold == "per_feature"
            low = min_kept(sel, n, per_feature, self.reduce).float().expand(n)
            ok = torch.isfinite(low)
            d = self.sae_cfg.threshold_decay
            decay, rest = torch.where(self.threshold_set, d, 0.0), torch.where(self.threshold_set, 1 - d, 1.0)
            t = self.sae.threshold
            t.copy_(torch.where(ok, decay * t + rest * low, t))
            self.threshold_set |= ok.any()

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"sae.{k}": v.detach().clone() for k, v in self.sae.state_dict().items()}
        tensors["stats.tokens_since_fired"] = self.tokens_since_fired.clone()
        tensors["stats.fire_freq"] = self.fire_freq.clone()
        tensors["stats.prefix_rng"] = self.prefix_gen.get_state()
        tensors["stats.l0_ctrl"] = self.l0_ctrl.clone()
        opt = self.opt.state_dict()
        for pid, st in opt["state"].items():
            for key, value in st.items():
                tensors[f"opt.{pid}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
        meta = {
            "step": self.step_count,
            "scale": self.scale,
            "scale_out": self.scale_out,
            "threshold_set": bool(self.threshold_set),
            "param_groups": opt["param_groups"],
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        self.tokens_since_fired.copy_(tensors["stats.tokens_since_fired"])
        self.fire_freq.copy_(tensors["stats.fire_freq"])
        if "stats.prefix_rng" in tensors:
            self.prefix_gen.set_state(tensors["stats.prefix_rng"].clone())
        if "stats.l0_ctrl" in tensors:
            self.l0_ctrl.copy_(tensors["stats.l0_ctrl"])
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step_count, self.scale = meta["step"], meta["scale"]
        self.scale_out = meta.get("scale_out", self.scale)
        self.threshold_set.fill_(bool(meta["threshold_set"]))

    def export(self) -> SAE:
        """A copy for inference on raw activations (input scale folded in)."""
        sae = SAE(self.sae_cfg, device=self.device)
        sae.load_state_dict(self.sae.state_dict())
        sae.fold_input_scale(self.scale, self.scale_out)
        return sae.eval()


def _check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise _nonfinite(where)


def _nonfinite(where: str) -> DataError:
    return DataError(f"NaN or inf in {where}: check the model dtype and the activation source")


# JumpReLU: log(threshold) trains at THRESHOLD_LR_SCALE x the lr, the one scale of {1, 2, 5} whose mean L0 was
# within 10% of k on tiny at 1M tokens and on both planted benches with DeepMind's estimator; at 5x the early
# thresholds overshoot, at 1x they lag on the small bench. With the pseudo-gradient to the input as well (the default)
# 1x and 2x end alike on tiny at 2M tokens (docs/benchmarks.md, issue 25). The L0 controller (SAETrainer.l0_coef)
# starts at λ = L0_COEF_INIT
THRESHOLD_LR_SCALE = 2.0
L0_COEF_INIT, L0_KP, L0_KI = 0.1, 4.0, 0.01
CHECKPOINT = "state-{step:08d}.safetensors"


def save_checkpoint(
    trainer: SAETrainer,
    folder: Path,
    batches_consumed: int,
    rng_states: torch.Tensor | None = None,
    distribute: str = "data",
) -> None:
    """One file per step: tensors, with the trainer's meta in the safetensors metadata.
    rng_states: [world state], every rank's torch RNG (default: this process's)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = trainer.state()
    tensors["rng.torch"] = rng_states if rng_states is not None else torch.get_rng_state()[None]
    meta = {**meta, "batches_consumed": batches_consumed, "world": len(tensors["rng.torch"]), "distribute": distribute}
    atomic_save_file(
        tensors, folder / CHECKPOINT.format(step=trainer.step_count), metadata={"saebench_state": json.dumps(meta)}
    )


def checkpoint_steps(folder: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in folder.glob("state-*.safetensors")}


def prune_checkpoints(folder: Path, keep: int) -> None:
    clean_partial(folder)
    for step in checkpoint_steps(folder) - {keep}:
        (folder / CHECKPOINT.format(step=step)).unlink(missing_ok=True)


def load_checkpoint(trainer: SAETrainer, folder: Path, step: int) -> int:
    path = folder / CHECKPOINT.format(step=step)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["saebench_state"])
    world = meta.get("world", 1)
    if world != dist.world():
        raise DataError(
            f"{path} was written by {world} process(es) and this job has {dist.world()}: "
            f"resume with --nproc_per_node {world}"
        )
    tensors = load_file(str(path))
    rng = tensors.pop("rng.torch")
    torch.set_rng_state((rng[dist.rank()] if rng.dim() == 2 else rng).clone())
    trainer.load_state(tensors, meta)
    return meta["batches_consumed"]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint, so a resumed log has no repeats."""
    if path.exists():
        rows = [
            line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step
        ]
        atomic_write_text(path, "".join(r + "\n" for r in rows))


def train_sae(
    sae_cfg: SAEConfig,
    acts: torch.Tensor | Callable[[int], Iterator],
    cfg: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    show_progress: bool = True,
    grads: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[SAE, dict]:
    """Train one SAE. With run_dir: metrics.jsonl, checkpoints/ and sae/ are written there.

    stop_after_steps: stop early (as if killed) after this many steps, checkpointing first.
    grads: [N d_out] with a tensor `acts`, the model's loss gradient at each row (Harvester(gradients=True)), or for
    a transcoder at each row of its output. targets: [N d_out] with a tensor `acts`, a transcoder's output at each row.
    Returns the inference-ready SAE (input scale folded in) and a report of the last metrics.
    """
    source: torch.Tensor | dict[str, torch.Tensor] | Callable[[int], Iterator] = acts
    if grads is not None or targets is not None:
        written = targets if targets is not None else acts  # where the SAE writes, and the gradient is taken
        if (
            not isinstance(written, torch.Tensor)
            or not isinstance(acts, torch.Tensor)
            or len(written) != len(acts)
            or (grads is not None and grads.shape != written.shape)
        ):
            raise DataError(
                "targets [N d_out] and grads must be tensors with a row per row of acts; grads of the targets' "
                "shape (acts' for an SAE): the gradient where the SAE writes"
            )
        source = {"": acts} if targets is None else {"": acts, TARGET: targets}
        if grads is not None:
            source[grad_key("" if targets is None else TARGET)] = grads
    dirs = {"sae": Path(run_dir)} if run_dir is not None else None
    saes, reports = train_saes({"sae": sae_cfg}, source, cfg, None, resume, stop_after_steps, show_progress, dirs)
    return saes["sae"], reports["sae"]


def train_saes(
    sae_cfgs: dict[str, SAEConfig],
    acts: torch.Tensor | dict[str, torch.Tensor] | Callable[[int], Iterator],
    cfg: TrainConfig | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    show_progress: bool = True,
    dirs: dict[str, Path] | None = None,
    train_cfgs: dict[str, TrainConfig] | None = None,
) -> tuple[dict[str, SAE], dict[str, dict]]:
    """Train several SAEs on one pass over the data (e.g. widths or hooks of one model forward).

    A dict source gives each SAE the batch of its `hook` (and its gradient, grad_key(hook)). Each SAE
    gets run_dir/<name>/, or the folder `dirs` gives it (metrics.jsonl, checkpoints/, sae/).
    train_cfgs: an SAE's own TrainConfig (its optimiser and schedule: lr, warmup, ...); the batches, token
    budget, seed, logging and checkpoints are always cfg's. ConfigError when the SAEs will not fit in
    memory together (check_memory).
    Under torchrun (cfg.distribute): in "data" mode every rank returns every SAE and rank 0 writes
    the run files; in "hooks" mode SAE i is trained and written by rank i % world, which returns it.
    Resuming reads the checkpoints on every rank (a filesystem every rank sees).
    """
    if cfg is None:
        cfg = TrainConfig()
    if cfg.distribute not in dist.MODES:
        raise ConfigError(f"train.distribute must be one of {', '.join(dist.MODES)}, got {cfg.distribute!r}")
    world, rank = dist.world(), dist.rank()
    by_hook = world > 1 and cfg.distribute == "hooks"
    names = list(sae_cfgs)
    owners = {name: dist.owner(i) if by_hook else rank for i, name in enumerate(names)}
    reduce = Reducer(world > 1 and not by_hook)
    source = BatchSource(acts, cfg.batch_size, cfg.seed)
    own = [name for name in names if owners[name] == rank]
    check_memory(
        (sae_cfgs[name] for name in own), cfg.batch_size if by_hook else source.batch_size, torch.device(cfg.device)
    )
    sample = _init_sample(source, cfg)
    trainers = {}
    for name in own:
        picked = _pick(sample, sae_cfgs[name])
        trainers[name] = SAETrainer(sae_cfgs[name], (train_cfgs or {}).get(name, cfg), picked.x, reduce, picked.target)
    writes = by_hook or dist.is_main()  # this rank writes its trainers' folders
    if dirs is None:
        dirs = {name: Path(run_dir) / name for name in names} if run_dir is not None else {}
    base = Path(run_dir) if run_dir is not None else next(iter(dirs.values()), None)
    total_steps = max(1, cfg.n_tokens // cfg.batch_size)
    consumed = 0  # global batches = steps done
    restarted = (
        base is not None and dist.restarted()
    )  # torchrun's elastic restart: resume, or start over before any checkpoint
    if base and (resume or restarted):
        # the newest step that every SAE checkpointed (a kill can fall between two SAEs' writes)
        common = set.intersection(*(checkpoint_steps(d / "checkpoints") for d in dirs.values()))
        if not common and not restarted:
            raise DataError(
                f"nothing to resume in {base}: no checkpoint common to every SAE (drop --resume to start fresh)"
            )
        consumed = max(common, default=0)
        for name, trainer in trainers.items():
            if consumed:
                load_checkpoint(trainer, dirs[name] / "checkpoints", consumed)
        resume = True
    if not resume:
        refuse_overwrite(dirs.values())
    dist.barrier()  # every rank has checked and read before any rank writes
    if base and resume and writes:
        for name in trainers:
            _truncate_metrics(dirs[name] / "metrics.jsonl", consumed)
    mine = {name: dirs[name] for name in trainers} if base and writes else {}
    for d in mine.values():
        d.mkdir(parents=True, exist_ok=True)
    files = {name: (d / "metrics.jsonl").open("a") for name, d in mine.items()}
    wandb_run = _wandb(cfg, sae_cfgs) if cfg.wandb_project and dist.is_main() else None
    last: dict[str, dict] = {name: {} for name in trainers}
    started, start_step = time.perf_counter(), consumed
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train sae",
        unit="step",
        disable=not (show_progress and dist.is_main()),
    )

    def checkpoint() -> None:
        rng = dist.all_gather_cat(torch.get_rng_state()[None])  # [world state]
        for name, d in mine.items():
            save_checkpoint(trainers[name], d / "checkpoints", consumed, rng, cfg.distribute)
        dist.barrier()
        for _name, d in mine.items():  # only once every SAE holds the new step
            prune_checkpoints(d / "checkpoints", keep=consumed)

    try:
        for batch in source.batches(skip=consumed):
            if consumed >= total_steps:
                break
            step = consumed + 1
            log = step % cfg.log_every == 0 or step == total_steps
            save = bool(dirs) and bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            stop = stop_after_steps is not None and step >= stop_after_steps
            gathered: dict[tuple[str | None, str | None, int], tuple] = {}
            for name in names:
                x, grad, target = _pick(batch, sae_cfgs[name])
                if by_hook:  # the owner receives the global batch of its SAE's hook, in rank order
                    owner = owners[name]
                    key = (sae_cfgs[name].hook, sae_cfgs[name].output_hook, owner)
                    if key not in gathered:
                        gathered[key] = tuple(t if t is None else dist.gather_cat(t, owner) for t in (x, grad, target))
                    x, grad, target = gathered[key]
                if name in trainers:  # metrics (a host sync) only where they are used
                    assert x is not None
                    row = trainers[name].step(x, sync=log or save or stop, grad=grad, target=target)
                    last[name] = row or last[name]
            consumed += 1
            bar.update(1)
            if log and trainers:
                rate = round((step - start_step) * cfg.batch_size / max(1e-9, time.perf_counter() - started))
                first = next(iter(last.values()))
                bar.set_postfix(
                    fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}", dead=f"{first['dead_fraction']:.3f}"
                )
                for name, row in last.items():
                    row["tokens_per_s"] = rate
                    if name in files:
                        files[name].write(json.dumps(row) + "\n")
                        files[name].flush()
                if wandb_run:
                    wandb_run.log({f"{n}/{k}": v for n, row in last.items() for k, v in row.items()}, step=step)
            if save:
                checkpoint()
            if stop:
                if dirs:
                    checkpoint()
                break
    finally:
        bar.close()
        for f in files.values():
            f.close()
    saes, reports = {}, {}
    finished = consumed >= total_steps
    if dirs and finished:
        checkpoint()
    for name, trainer in trainers.items():
        saes[name] = trainer.export()
        if name in mine and finished:
            saes[name].save(
                mine[name] / "sae",
                extra={"input_scale_folded": trainer.scale, "train": asdict(trainer.cfg), "steps": trainer.step_count}
                | ({"output_scale_folded": trainer.scale_out} if sae_cfgs[name].transcoder else {})
                | trainer.init_meta,
            )
        reports[name] = {**last[name], "steps": trainer.step_count, "input_scale": trainer.scale} | trainer.init_meta
    dist.barrier()  # every SAE is saved before any rank returns
    return saes, reports


def _init_sample(source: BatchSource, cfg: TrainConfig) -> Batch:
    """init_tokens rows, the same on every rank: a tensor's own sample, or each rank's share of a stream gathered."""
    if isinstance(source.acts, dict):
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        idx = torch.randperm(len(next(iter(source.acts.values()))), generator=gen)[: cfg.init_tokens]
        return {k: v[idx].float() for k, v in source.acts.items()}
    want = -(-cfg.init_tokens // dist.world())
    rows: dict[str, list[torch.Tensor]] = {}
    n = 0
    for batch in source.batches():
        for key, value in batch.items():
            rows.setdefault(key, []).append(value.float())
        n += len(next(iter(batch.values())))
        if n >= want:
            break
    n = dist.all_min_int(min(n, want))
    return {k: dist.all_gather_cat(torch.cat(v)[:n]) for k, v in rows.items()}


def _wandb(cfg: TrainConfig, sae_cfgs: dict[str, SAEConfig]):
    try:
        import wandb
    except ImportError:
        raise DataError("train.wandb_project is set but wandb is not installed: pip install wandb") from None
    return wandb.init(
        project=cfg.wandb_project, config={"saes": {n: asdict(c) for n, c in sae_cfgs.items()}, "train": asdict(cfg)}
    )
