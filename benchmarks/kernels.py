"""Sparse decoder forward+backward: dense decoder vs the torch sparse path vs the CUDA kernels, in one run.

    python benchmarks/kernels.py                # GPU grid: B 8192, d {768, 2304}, n {16384, 65536, 262144}, k {32, 128}, bf16
    python benchmarks/kernels.py --device cpu --batch 1024 --d 768 --n 16384 --k 32   # CPU smoke run (no kernels)

One JSON line per case: median ms of forward+backward for each path, ratios to dense and to
the torch path, and the kernels' forward time and achieved GB/s against the card's bandwidth.
Goals (issue 4): kernels >= 5x dense at n 65536, d 2304, k 32; >= 1.3x the torch path; forward >= 50% of bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from saebench import kernels

BANDWIDTH_GBS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100": 2039}


def card_bandwidth_gbs(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    name = props.name
    return next((v for k, v in BANDWIDTH_GBS.items() if all(part in name for part in k.split())), None)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def case(batch: int, d: int, n: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    W = (torch.randn(n, d, device=device, generator=gen, dtype=torch.float32) / d**0.5).to(dtype).requires_grad_()
    b = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, n, (batch, k), device=device, generator=gen)
    values = torch.rand(batch, k, device=device, generator=gen, dtype=torch.float32).to(dtype).requires_grad_()
    grad = torch.randn(batch, d, device=device, generator=gen, dtype=torch.float32).to(dtype)

    def dense():
        z = torch.zeros(batch, n, device=device, dtype=dtype).scatter(1, indices, values)
        x_hat = z @ W + b
        torch.autograd.backward(x_hat, grad)

    def torch_sparse():
        x_hat = F.embedding_bag(indices, W, per_sample_weights=values, mode="sum") + b
        torch.autograd.backward(x_hat, grad)

    row = {"batch": batch, "d": d, "n": n, "k": k, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    row["dense_ms"] = round(timed(dense, device, repeats), 3)
    row["torch_sparse_ms"] = round(timed(torch_sparse, device, repeats), 3)
    row["torch_sparse_vs_dense"] = round(row["dense_ms"] / row["torch_sparse_ms"], 2)
    if kernels.active_for(W):
        offsets = kernels.fixed_offsets(batch, k, device)

        def kernel():
            x_hat = kernels.SparseDecode.apply(values.reshape(-1), indices.reshape(-1), offsets, W, b)
            torch.autograd.backward(x_hat, grad)

        ext = kernels.extension()
        forward_ms = timed(lambda: ext.gather_rows(values.detach().reshape(-1), indices.reshape(-1), offsets, W.detach(), b.detach()), device, repeats)
        row["kernel_ms"] = round(timed(kernel, device, repeats), 3)
        row["kernel_vs_dense"] = round(row["dense_ms"] / row["kernel_ms"], 2)
        row["kernel_vs_torch_sparse"] = round(row["torch_sparse_ms"] / row["kernel_ms"], 2)
        moved = batch * k * (d * W.element_size() + 8 + values.element_size()) + batch * d * W.element_size()
        row["kernel_forward_ms"] = round(forward_ms, 4)
        row["kernel_forward_GBps"] = round(moved / forward_ms / 1e6, 1)
        peak = card_bandwidth_gbs(device)
        row["kernel_forward_bandwidth_fraction"] = round(row["kernel_forward_GBps"] / peak, 3) if peak else None
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
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        print(json.dumps({"device": torch.cuda.get_device_name(device), "bandwidth_GBps": card_bandwidth_gbs(device), "torch": torch.__version__}))
    for d in args.d:
        for n in args.n:
            for k in args.k:
                print(json.dumps(case(args.batch, d, n, k, dtype, device, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
