"""Whole SAE training steps (encoder, selection, decoder, losses, Adam) with activations already on the device.

    python benchmarks/train_step.py \
                        # GPU: n 65536, d 2304, k 32, B 8192, bf16 autocast; fresh, Zipf, dead
    python benchmarks/train_step.py --device cpu --n 4096 --d 256 --batch 1024 --steps 5 --cases fresh
    python benchmarks/train_step.py --device cpu --n 3072 --d 192 --k 64 --batch 4096 --steps 5 --cases fresh \
        --activation topk hierarchical_topk        # several families side by side; --naive-prefix-errors: see below

One JSON line per (case, family, path) (CUDA kernels on, torch path): the median step (CUDA events) of
SAETrainer.step as the training loop calls it (no host sync between log steps), tokens/s, and the
share of a step spent in each part (timed separately with device syncs, so the shares are approximate).
Cases: fresh (a new SAE); zipf (encoder biases that make a few latents fire on 10-50% of tokens,
as in trained SAEs; the measured share is reported); dead (half the latents dead, so AuxK runs
with k_aux = d/2 entries per token).
Memory: saved_mb, what autograd keeps from the forward for the backward (parameters and the batch left
out), and on CUDA peak_mb, the step's peak allocation above what was allocated before it; max_rss_mb is the
process's peak resident memory so far (run one --activation per process to read it per family). On a CPU,
cpu_ms is the process's CPU time per step (all threads), steadier than the wall clock on a shared machine.
--naive-prefix-errors: hierarchical_topk with the reference's materialised cumsum (autograd keeps
[batch k d]) instead of losses.PrefixErrors, to see what the recurrence saves.
Goal (issue 12): >= 1M tokens/s fresh on an H100 with the kernels.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from timing import timed_ms

from saebench import kernels
from saebench.sae import ACTIVATIONS, SAEConfig, losses
from saebench.sae.families import Activation
from saebench.sae.losses import reconstruction_loss, variance_sum
from saebench.train import SAETrainer, TrainConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parts_ms(trainer: SAETrainer, x: torch.Tensor, device: torch.device) -> dict:
    """One step taken apart: encoder, selection, decoder+loss forward, backward, optimizer."""
    sae, marks = trainer.sae, [("start", time.perf_counter())]

    def mark(name):
        sync(device)
        marks.append((name, time.perf_counter()))

    use_bf16 = trainer.cfg.autocast_bf16 and device.type == "cuda"
    sparse_bwd = kernels.active_for(sae.W_enc)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        with torch.set_grad_enabled(not sparse_bwd):
            pre = sae.pre_acts(x)
        mark("encoder")
        sel = sae.select(pre, train=True)
        if sparse_bwd:
            sel = sae.reattach(sel, sae.pre_at(sel, x, pre))
        mark("selection")
        loss = reconstruction_loss(sae, x, sel, variance_sum(x), sae.cfg.matryoshka)[0]
        mark("decoder_and_loss")
    trainer.opt.zero_grad(set_to_none=True)
    loss.backward()
    mark("backward")
    sae.remove_parallel_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), trainer.cfg.grad_clip)  # (the fused step folds this into Adam)
    trainer.opt.grad_scale = trainer.opt.found_inf = None  # pyright: ignore[reportAttributeAccessIssue]
    trainer.opt.step()
    sae.normalize_decoder()
    mark("optimizer")
    total = marks[-1][1] - marks[0][1]
    return {name: round((t - marks[i][1]) / total, 3) for i, (name, t) in enumerate(marks[1:])}


def prepare(trainer: SAETrainer, case: str) -> None:
    """Shape the SAE for a case before timing (see the module docstring)."""
    n = trainer.sae_cfg.n_latents
    if case == "zipf":
        ranks = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(trainer.device) + 1
        with torch.no_grad():  # pre-activations have std ~0.1 at init: rank 1 gets +0.35, rank ~25 nothing
            trainer.sae.b_enc += 0.1 * (3.5 - 1.1 * ranks.float().log()).clamp_min(0)


def mark_dead(trainer: SAETrainer, case: str) -> None:
    if case == "dead":
        n = trainer.sae_cfg.n_latents
        trainer.tokens_since_fired[: n // 2] = trainer.sae_cfg.dead_tokens


class NaivePrefixErrors:
    """The reference's hierarchical loss: every prefix sum materialised ([batch k d]), autograd through it."""

    @staticmethod
    def apply(r0, values, indices, W_dec):
        residual = r0[:, None] - (values[..., None].to(W_dec.dtype) * W_dec[indices]).cumsum(1)
        return residual.pow(2).sum((0, 2)), residual[:, -1].detach()


def memory_mb(trainer: SAETrainer, x: torch.Tensor, device: torch.device) -> tuple[float, float | None]:
    """One step's (saved_mb, peak_mb): see the module docstring."""
    keep = {p.untyped_storage().data_ptr() for p in trainer.sae.parameters()} | {x.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in keep:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step(x, sync=False)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20 if device.type == "cuda" else None
    return round(sum(saved.values()) / 2**20, 1), None if peak is None else round(peak, 1)


def run(path: str, case: str, activation: Activation, args, x: torch.Tensor, device: torch.device) -> dict:
    kernels._state.clear()
    if path == "torch":
        kernels._state.update(ext=None, reason="benchmark: torch path")
    cfg = SAEConfig(d_in=args.d, n_latents=args.n, k=args.k, activation=activation)
    trainer = SAETrainer(
        cfg, TrainConfig(n_tokens=10**12, batch_size=args.batch, device=str(device)), x[: min(len(x), 4096)]
    )
    prepare(trainer, case)

    def step():
        mark_dead(trainer, case)
        trainer.step(x, sync=False)

    cpu = time.process_time()
    ms = timed_ms(step, device, repeats=args.steps)
    cpu_ms = (time.process_time() - cpu) * 1e3 / (args.steps + 3)  # timed_ms's 3 warm-up steps included
    with torch.no_grad():
        fired = trainer.sae.select(trainer.sae.pre_acts(x * trainer.scale), train=True)
        top_share = float(torch.bincount(fired.indices.reshape(-1), minlength=args.n).max()) / args.batch
    mark_dead(trainer, case)
    n_dead = int((trainer.tokens_since_fired >= cfg.dead_tokens).sum())
    row = {
        "case": case,
        "path": path,
        "kernels": kernels.active_for(trainer.sae.W_dec),
        "device": str(device),
        "n": args.n,
        "d": args.d,
        "k": args.k,
        "batch": args.batch,
        "activation": activation,
        "prefix_errors": ("naive" if args.naive_prefix_errors else "recurrence") if cfg.family.hierarchical else None,
        "dead_latents": n_dead,
        "aux_k": min(cfg.aux_k, n_dead),
        "densest_latent_fires_on": round(top_share, 3),
        "step_ms": round(ms, 2),
        "cpu_ms": round(cpu_ms, 2) if device.type == "cpu" else None,
        "tokens_per_s": round(args.batch / ms * 1e3),
    }
    mark_dead(trainer, case)
    row["saved_mb"], row["peak_mb"] = memory_mb(trainer, x, device)
    row["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    mark_dead(trainer, case)
    row["share"] = parts_ms(trainer, x, device)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--activation", nargs="+", default=["topk"], choices=ACTIVATIONS, help="families, timed in turn")
    p.add_argument("--naive-prefix-errors", action="store_true", help="hierarchical_topk with the materialised cumsum")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cases", nargs="+", default=["fresh", "zipf", "dead"], choices=["fresh", "zipf", "dead"])
    args = p.parse_args()
    if args.naive_prefix_errors:
        losses.PrefixErrors = NaivePrefixErrors  # pyright: ignore[reportAttributeAccessIssue]
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d, device=device)
    paths = ("kernels", "torch") if device.type == "cuda" else ("torch",)
    for case in args.cases:
        for activation in args.activation:
            rows = [run(path, case, activation, args, x, device) for path in paths]
            for row in rows:
                print(json.dumps(row), flush=True)
            if len(rows) == 2:
                ratio = round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
                print(
                    json.dumps({"case": case, "activation": activation, "kernels_vs_torch_tokens_per_s": ratio}),
                    flush=True,
                )


if __name__ == "__main__":
    main()
