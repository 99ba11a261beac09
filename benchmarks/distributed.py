"""Data-parallel SAE training steps under torchrun: tokens/s for 1, 2, ... processes and the all-reduce's share.

    python benchmarks/distributed.py --device cpu --latents 4096 --d 256 --batch 2048 --procs 1 2     # CPU (gloo)
    python benchmarks/distributed.py --device cuda --procs 1 2 4 8 \
                             # GPUs (NCCL): n 65536, d 2304

Launches itself under `torchrun --standalone --nproc_per_node P` for each P and prints one JSON line
per P: the global batch stays fixed (each rank trains on batch / P rows), so ideal scaling is
tokens/s x P. allreduce_ms is the gradient all-reduce alone (timed on the same tensors as the
step's), allreduce_share its share of the step, grad_mb the bytes all-reduced per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from timing import timed_ms

from saebench import distributed as dist
from saebench.sae import SAEConfig
from saebench.train import SAETrainer, TrainConfig


def worker(args: argparse.Namespace) -> None:
    device = torch.device(dist.init(args.device))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world()))
    gen = torch.Generator().manual_seed(0)
    local = args.batch // dist.world()
    data = torch.randn(args.batch * 4, args.d, generator=gen)
    cfg = TrainConfig(n_tokens=10**12, batch_size=args.batch, lr=1e-4, device=str(device), init_tokens=args.batch)
    sae_cfg = SAEConfig(d_in=args.d, n_latents=args.latents, activation=args.activation, k=args.k)
    trainer = SAETrainer(sae_cfg, cfg, data[: args.batch], dist.Reducer(dist.world() > 1))
    batches = [
        data[i * args.batch + dist.rank() * local : i * args.batch + (dist.rank() + 1) * local].to(device)
        for i in range(4)
    ]
    count = iter(range(10**9))
    step_ms = timed_ms(lambda: trainer.step(batches[next(count) % 4], sync=False), device, repeats=args.steps)
    params = list(trainer.sae.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    reduce_ms = (
        timed_ms(lambda: trainer.reduce.sum_grads_(params), device, repeats=args.steps) if dist.world() > 1 else 0.0
    )
    if dist.is_main():
        grad_mb = sum(p.numel() * p.element_size() for p in params) / 2**20
        print(
            json.dumps(
                {
                    "procs": dist.world(),
                    "device": str(device),
                    "n": args.latents,
                    "d": args.d,
                    "k": args.k,
                    "batch": args.batch,
                    "activation": args.activation,
                    "step_ms": round(step_ms, 3),
                    "tokens_per_s": round(args.batch / step_ms * 1e3),
                    "allreduce_ms": round(reduce_ms, 3),
                    "allreduce_share": round(reduce_ms / step_ms, 3),
                    "grad_mb": round(grad_mb, 1),
                }
            ),
            flush=True,
        )
    dist.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latents", type=int, default=65536)
    p.add_argument("--d", type=int, default=2304)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8192, help="global tokens per step")
    p.add_argument("--activation", default="topk")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(argparse.Namespace(**json.loads(os.environ["SAEBENCH_BENCH_ARGS"])))
    base = None
    for procs in args.procs:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            __file__,
            "--worker",
        ]
        # the worker's settings travel in the environment: torchrun reads options after the script as its own prefixes
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]),
            "SAEBENCH_BENCH_ARGS": json.dumps(vars(args)),
        }
        started = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"torchrun with {procs} processes failed:\n{out.stderr[-3000:]}")
        row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
        base = row["tokens_per_s"] if procs == 1 else base
        row["speedup_vs_1"] = round(row["tokens_per_s"] / base, 3) if base else None
        row["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
