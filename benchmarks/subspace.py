"""Subspace init (Wang et al. 2025, arXiv 2508.16929) on tiny's attention outputs.

    python benchmarks/subspace.py --tokens 0                   # only how low-rank the attention outputs are
    python benchmarks/subspace.py --tokens 1500000             # + wide SAEs with and without subspace init

First, per hook, the rank r of the PCA (about the mean, over --test-tokens held-out tokens) that holds 90 / 99 /
99.9% of the variance, and the same for W_O's energy (squared singular values), as shares of d_model. Then one
model pass over the train split feeds one TopK SAE per (hook, expansion, init in {random, subspace}), all at the
trainer's defaults but for `init`; each is scored on the held-out tokens: FVU, L0, dead share (never fires on
them), dense share (fires on > 10%), and the trainer's own dead share at the end (no fire in --dead-tokens,
whose AuxK revives them).
One JSON line per hook, then per SAE.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import saebench as sb
from saebench.train import principal_subspace

HOOKS = ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]
SHARES = (0.9, 0.99, 0.999)


def rank_holding(energy: torch.Tensor, share: float) -> int:
    """Fewest of the (descending) energies holding `share` of their sum."""
    held = energy.double().cumsum(0) / energy.double().sum()
    return min(int((held < share).sum()) + 1, len(energy))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", default=HOOKS)
    p.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per SAE; 0: only the ranks")
    p.add_argument("--test-tokens", type=int, default=200_000)
    p.add_argument("--expansions", type=int, nargs="+", default=[16, 64])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument(
        "--dead-tokens", type=int, default=None, help="default tokens / 20, configs/tiny.yaml's ratio (1M of 20M)"
    )
    args = p.parse_args()
    model = sb.load_model("tiny")
    harvester = sb.Harvester(model, args.hooks)
    held_out_contexts = sb.load_contexts(sb.DataConfig(split="test"), model.tokenizer, show_progress=False)
    batches = list(sb.stream_activations(harvester, held_out_contexts, 8192, n_tokens=args.test_tokens, seed=0))
    test = {h: torch.cat([b[h] for b in batches])[: args.test_tokens].float() for h in args.hooks}
    for hook, x in test.items():
        layer = int(hook.split(".")[1])
        W_O = model.blocks[layer].attn.W_O.detach().reshape(-1, x.shape[1])  # [heads*d_head d_model]
        w_energy = torch.linalg.svdvals(W_O.double()).pow(2)
        d = x.shape[1]
        row = {"hook": hook, "tokens": len(x), "d_model": d}
        for share in SHARES:
            r = principal_subspace(x, x.mean(0), share).shape[1]
            row |= {f"rank_{share:g}": r, f"share_{share:g}": round(r / d, 3)}
            row[f"W_O_rank_{share:g}"] = rank_holding(w_energy, share)
        print(json.dumps(row), flush=True)
    if not args.tokens:
        return
    contexts = sb.load_contexts(sb.DataConfig(split="train"), model.tokenizer, show_progress=False)
    cfgs = {
        f"{hook}/x{e}/{init}": sb.SAEConfig(
            d_in=harvester.widths[hook],
            n_latents=e * harvester.widths[hook],
            k=args.k,
            dead_tokens=args.dead_tokens or max(1, args.tokens // 20),
            init=init,
            hook=hook,
        )
        for hook in args.hooks
        for e in args.expansions
        for init in ("random", "subspace")
    }

    def source(epoch: int):
        return sb.stream_activations(harvester, contexts, batch_tokens=args.batch, seed=epoch, epochs=1)

    start = time.perf_counter()
    saes, reports = sb.train_saes(cfgs, source, sb.TrainConfig(n_tokens=args.tokens, batch_size=args.batch, seed=0))
    seconds = time.perf_counter() - start
    for name, sae in saes.items():
        cfg, report = cfgs[name], reports[name]
        m = sb.evaluate_sae(sae, test[str(cfg.hook)])
        row = {
            "hook": cfg.hook,
            "n_latents": cfg.n_latents,
            "expansion": cfg.n_latents // cfg.d_in,
            "k": cfg.k,
            "init": cfg.init,
            "init_rank": report.get("init_rank"),
            "tokens": report["steps"] * args.batch,
            "fvu": round(m["fvu"], 4),
            "l0": round(m["l0"], 2),
            "dead_fraction": round(m["dead_fraction"], 4),
            "dense_fraction": round(m["dense_fraction"], 4),
            "train_dead_fraction": round(report["dead_fraction"], 4),
            "all_saes_seconds": round(seconds),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
