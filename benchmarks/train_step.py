"""Whole SAE training steps (encoder, selection, decoder, losses, Adam) with activations already on the device.

    python benchmarks/train_step.py \
                        # GPU: n 65536, d 2304, k 32, B 8192, bf16 autocast; fresh, Zipf, dead
    python benchmarks/train_step.py --device cpu --n 4096 --d 256 --batch 1024 --steps 5 --cases fresh

One JSON line per (case, path) (CUDA kernels on, torch path): the median step (CUDA events) of
SAETrainer.step as the training loop calls it (no host sync between log steps), tokens/s, and the
share of a step spent in each part (timed separately with device syncs, so the shares are approximate).
Cases: fresh (a new SAE); zipf (encoder biases that make a few latents fire on 10-50% of tokens,
as in trained SAEs; the measured share is reported); dead (half the latents dead, so AuxK runs
with k_aux = d/2 entries per token).
Goal (issue 12): >= 1M tokens/s fresh on an H100 with the kernels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timing import timed_ms

from saebench import kernels
from saebench.sae import SAEConfig
from saebench.sae.losses import normalised_mse
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
            sel = sae.reattach(sel, x, pre)
        mark("selection")
        loss = normalised_mse(x, sae.decode_selection(sel))
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


def run(path: str, case: str, args, x: torch.Tensor, device: torch.device) -> dict:
    kernels._state.clear()
    if path == "torch":
        kernels._state.update(ext=None, reason="benchmark: torch path")
    cfg = SAEConfig(d_in=args.d, n_latents=args.n, k=args.k, activation=args.activation)
    trainer = SAETrainer(
        cfg, TrainConfig(n_tokens=10**12, batch_size=args.batch, device=str(device)), x[: min(len(x), 4096)]
    )
    prepare(trainer, case)

    def step():
        mark_dead(trainer, case)
        trainer.step(x, sync=False)

    ms = timed_ms(step, device, repeats=args.steps)
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
        "activation": args.activation,
        "dead_latents": n_dead,
        "aux_k": min(cfg.aux_k, n_dead),
        "densest_latent_fires_on": round(top_share, 3),
        "step_ms": round(ms, 2),
        "tokens_per_s": round(args.batch / ms * 1e3),
    }
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
    p.add_argument("--activation", default="topk")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cases", nargs="+", default=["fresh", "zipf", "dead"], choices=["fresh", "zipf", "dead"])
    args = p.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d, device=device)
    paths = ("kernels", "torch") if device.type == "cuda" else ("torch",)
    for case in args.cases:
        rows = [run(path, case, args, x, device) for path in paths]
        for row in rows:
            print(json.dumps(row), flush=True)
        if len(rows) == 2:
            print(
                json.dumps(
                    {
                        "case": case,
                        "kernels_vs_torch_tokens_per_s": round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 2),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
