"""Harvest throughput against a plain forward pass of the same model and batch, in one run.

    python benchmarks/harvest.py [--model tiny] [--tokens 500000] [--memory-tokens 5000000]

Prints one JSON line per case. `ratio_to_forward` = harvest tokens/s / plain-forward tokens/s
(goal >= 0.8); the harvester stops the pass at the last hook, so `ratio_to_forward_to_hook`
also compares with a bare forward pass stopped at the same hook (the collection overhead alone).
The memory case harvests --memory-tokens to a disk cache in a child process and reports its
peak resident memory (goal < 2 GB for 5M tokens of tiny).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

import saebench as sb
from saebench.config import HarvestConfig


def plain_forward(model, contexts, batch_size: int) -> float:
    """Positions per second of model(tokens), logits included."""
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(contexts), batch_size):
            model(contexts.tokens[i : i + batch_size])
            n += contexts.tokens[i : i + batch_size].numel()
    return n / (time.perf_counter() - start)


def forward_to_hook(model, contexts, batch_size: int, hook: str) -> float:
    """Positions per second of the bare forward pass up to `hook` (the same early stop as the
    harvester, nothing collected): what harvesting cannot avoid paying."""

    class Stop(Exception):
        pass

    def stop(act, hook):
        raise Stop

    n = 0
    start = time.perf_counter()
    with torch.no_grad(), model.hooks(fwd_hooks=[(hook, stop)]):
        for i in range(0, len(contexts), batch_size):
            try:
                model(contexts.tokens[i : i + batch_size])
            except Stop:
                pass
            n += contexts.tokens[i : i + batch_size].numel()
    return n / (time.perf_counter() - start)


def harvest_stream(harvester, contexts, batch_size: int) -> float:
    n = 0
    start = time.perf_counter()
    for batch in sb.stream_activations(
        harvester, contexts, batch_tokens=4096, buffer_tokens=65536, batch_size=batch_size, epochs=1
    ):
        n += len(next(iter(batch.values())))
    return n / (time.perf_counter() - start)


def harvest_cache(harvester, contexts, batch_size: int, data_cfg) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig(hooks=harvester.hooks, n_tokens=10**12, batch_size=batch_size, shard_contexts=512)
        start = time.perf_counter()
        manifest = sb.harvest_to_disk(harvester, contexts, tmp, cfg, data_cfg, "bench")
        return manifest["n_tokens"] / (time.perf_counter() - start)


def memory_child(model: str, n_tokens: int, out: str) -> None:
    cfg = sb.RunConfig(model=model, runs_dir=out, name="mem")
    cfg.harvest = HarvestConfig(
        hooks=["blocks.1.hook_resid_post"], n_tokens=n_tokens, batch_size=64, shard_contexts=512
    )
    manifest = sb.harvest_from_config(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "case": "memory",
                "model": model,
                "tokens": manifest["n_tokens"],
                "peak_rss_mb": round(peak_mb, 1),
                "goal_mb": 2048,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=500_000, help="positions per throughput case")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--memory-tokens", type=int, default=0, help="also run the memory case with this many tokens")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.model, args.memory_tokens, args.out)
    model = sb.load_model(args.model)
    data_cfg = sb.DataConfig(split="train", context_size=128)
    contexts = sb.load_contexts(data_cfg, model.tokenizer, show_progress=False)
    n_ctx = min(len(contexts), args.tokens // contexts.tokens.shape[1])
    contexts = sb.TokenContexts(contexts.tokens[:n_ctx], contexts.special_mask[:n_ctx])
    harvester = sb.Harvester(model, [args.hook])
    plain_forward(
        model, sb.TokenContexts(contexts.tokens[:128], contexts.special_mask[:128]), args.batch_size
    )  # warm-up
    base = plain_forward(model, contexts, args.batch_size)
    common = {
        "model": args.model,
        "hook": args.hook,
        "batch_size": args.batch_size,
        "positions": contexts.n_tokens,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"case": "plain_forward", **common, "tokens_per_s": round(base)}), flush=True)
    to_hook = forward_to_hook(model, contexts, args.batch_size, args.hook)
    print(json.dumps({"case": "forward_to_hook", **common, "tokens_per_s": round(to_hook)}), flush=True)
    for name, fn in (
        ("stream", lambda: harvest_stream(harvester, contexts, args.batch_size)),
        ("cache", lambda: harvest_cache(harvester, contexts, args.batch_size, data_cfg)),
    ):
        rate = fn()
        # harvest counts kept (non-special) tokens; the forward pass counts every position
        print(
            json.dumps(
                {
                    "case": f"harvest_{name}",
                    **common,
                    "tokens_per_s": round(rate),
                    "ratio_to_forward": round(rate / base, 3),
                    "ratio_to_forward_to_hook": round(rate / to_hook, 3),
                }
            ),
            flush=True,
        )
    if args.memory_tokens:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    "--model",
                    args.model,
                    "--memory-tokens",
                    str(args.memory_tokens),
                    "--out",
                    tmp,
                ],
                check=True,
            )


if __name__ == "__main__":
    main()
