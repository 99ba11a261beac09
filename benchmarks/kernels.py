"""Sparse decoder forward+backward: dense decoder vs the torch sparse path vs the CUDA kernels, in one run.

    python benchmarks/kernels.py \
               # GPU grid: B 8192, d {768, 2304}, n {16384, 65536, 262144}, k {32, 128}, bf16, uniform and Zipf
    python benchmarks/kernels.py --device cpu --batch 1024 --d 768 --n 16384 --k 32 --repeats 5 \
  # CPU smoke run (no kernels)

One JSON line per case: median ms (CUDA events, 50 repeats) of forward+backward for each path, with
gradients cleared before each backward as a training step does; ratios to dense and to the torch
path; the kernels' forward time and achieved GB/s against the measured copy bandwidth.
--dist zipf draws latents with Zipf frequencies (rank r ~ r^-1.1): a few latents fire on 10-50% of
tokens, as in trained SAEs, and their backward buckets hold thousands of entries.
Goals (issue 12): kernels >= 5x dense at n 65536, d 2304, k 32; >= 1.3x the torch path; forward >= 50% of bandwidth.
"""

from __future__ import annotations

import argparse
import json
from types import ModuleType

import torch
import torch.nn.functional as F
from timing import copy_bandwidth_gbs, timed_ms

from saebench import kernels


def draw_indices(batch: int, n: int, k: int, dist: str, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[batch k] distinct latents per token: uniform, or Zipf over latent ranks (shuffled ids)."""
    weights = (
        torch.ones(n, device=device)
        if dist == "uniform"
        else torch.arange(1, n + 1, device=device, dtype=torch.float32) ** -1.1
    )
    ranks = torch.multinomial(weights.expand(batch, n), k, replacement=False, generator=gen)
    return torch.randperm(n, device=device, generator=gen)[ranks]


def case(
    batch: int,
    d: int,
    n: int,
    k: int,
    dist: str,
    dtype: torch.dtype,
    device: torch.device,
    repeats: int,
    bandwidth: float | None,
) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(n, d, device=device, generator=gen, dtype=torch.float32) / d**0.5).to(dtype).requires_grad_()
    b = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
    indices = draw_indices(batch, n, k, dist, gen, device)
    values = torch.rand(batch, k, device=device, generator=gen, dtype=torch.float32).to(dtype).requires_grad_()
    grad = torch.randn(batch, d, device=device, generator=gen, dtype=torch.float32).to(dtype)
    leaves = (W, b, values)

    def clear():
        for t in leaves:
            t.grad = None

    def dense():
        clear()
        z = torch.zeros(batch, n, device=device, dtype=dtype).scatter(1, indices, values)
        x_hat = z @ W + b
        torch.autograd.backward(x_hat, grad)

    def torch_sparse():
        clear()
        x_hat = F.embedding_bag(indices, W, per_sample_weights=values, mode="sum") + b
        torch.autograd.backward(x_hat, grad)

    top_share = float(torch.bincount(indices.reshape(-1), minlength=n).max()) / batch
    row = {
        "batch": batch,
        "d": d,
        "n": n,
        "k": k,
        "dist": dist,
        "densest_latent_fires_on": round(top_share, 3),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }
    row["dense_ms"] = round(timed_ms(dense, device, repeats), 3)
    row["torch_sparse_ms"] = round(timed_ms(torch_sparse, device, repeats), 3)
    row["torch_sparse_vs_dense"] = round(row["dense_ms"] / row["torch_sparse_ms"], 2)
    if kernels.active_for(W):
        offsets = kernels.fixed_offsets(batch, k, device)

        def kernel():
            clear()
            kernels._last_buckets.clear()  # each iteration pays for its sort, as a training step does
            x_hat = kernels.SparseDecode.apply(values.reshape(-1), indices.reshape(-1), offsets, W, b)
            torch.autograd.backward(x_hat, grad)

        ext = kernels.extension()
        assert isinstance(ext, ModuleType)
        forward_ms = timed_ms(
            lambda: ext.gather_rows(values.detach().reshape(-1), indices.reshape(-1), offsets, W.detach(), b.detach()),
            device,
            repeats,
        )
        row["kernel_ms"] = round(timed_ms(kernel, device, repeats), 3)
        row["kernel_vs_dense"] = round(row["dense_ms"] / row["kernel_ms"], 2)
        row["kernel_vs_torch_sparse"] = round(row["torch_sparse_ms"] / row["kernel_ms"], 2)
        moved = batch * k * (d * W.element_size() + 8 + values.element_size()) + batch * d * W.element_size()
        row["kernel_forward_ms"] = round(forward_ms, 4)
        row["kernel_forward_GBps"] = round(moved / forward_ms / 1e6, 1)
        row["kernel_forward_bandwidth_fraction"] = (
            round(row["kernel_forward_GBps"] / bandwidth, 3) if bandwidth else None
        )
    else:
        row["kernel"] = f"unavailable: {kernels._state.get('reason') or kernels.unavailable_reason()}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8192)
    p.add_argument("--d", type=int, nargs="+", default=[768, 2304])
    p.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 262144])
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dist", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth_gbs(device)
    if device.type == "cuda":
        print(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(device),
                    "measured_copy_GBps": bandwidth,
                    "torch": torch.__version__,
                }
            )
        )
    for d in args.d:
        for n in args.n:
            for k in args.k:
                for dist in args.dist:
                    print(
                        json.dumps(case(args.batch, d, n, k, dist, dtype, device, args.repeats, bandwidth)), flush=True
                    )


if __name__ == "__main__":
    main()
