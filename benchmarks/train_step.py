"""Whole SAE training steps (encoder, selection, decoder, losses, Adam) with activations already on the device.

    python benchmarks/train_step.py                         # GPU: n 65536, d 2304, k 32, B 8192, bf16 autocast
    python benchmarks/train_step.py --device cpu --n 4096 --d 256 --batch 1024 --steps 5

One JSON line per path (CUDA kernels on, torch path): tokens/s of SAETrainer.step, and the share
of a step spent in each part (timed separately with device syncs, so the shares are approximate).
Goal (issue 4): >= 1M tokens/s on an H100 with the kernels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

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
    torch.nn.utils.clip_grad_norm_(sae.parameters(), trainer.cfg.grad_clip)
    trainer.opt.step()
    sae.normalize_decoder()
    mark("optimizer")
    total = marks[-1][1] - marks[0][1]
    return {name: round((t - marks[i][1]) / total, 3) for i, (name, t) in enumerate(marks[1:])}


def run(path: str, args, x: torch.Tensor, device: torch.device) -> dict:
    kernels._state.clear()
    if path == "torch":
        kernels._state.update(ext=None, reason="benchmark: torch path")
    cfg = SAEConfig(d_in=args.d, n_latents=args.n, k=args.k, activation=args.activation)
    trainer = SAETrainer(cfg, TrainConfig(n_tokens=10**12, batch_size=args.batch, device=str(device)), x[: min(len(x), 4096)])
    for _ in range(2):
        trainer.step(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(x)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    row = {"path": path, "kernels": kernels.active_for(trainer.sae.W_dec), "device": str(device), "n": args.n, "d": args.d, "k": args.k,
           "batch": args.batch, "activation": args.activation, "step_ms": round(seconds * 1e3, 2), "tokens_per_s": round(args.batch / seconds)}
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
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.d, device=device)
    rows = [run(path, args, x, device) for path in (("kernels", "torch") if device.type == "cuda" else ("torch",))]
    for row in rows:
        print(json.dumps(row))
    if len(rows) == 2:
        print(json.dumps({"kernels_vs_torch_tokens_per_s": round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
