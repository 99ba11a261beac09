"""Trainer and SAE options on tiny's activations: held-out FVU per (family, options), in one run.

    python benchmarks/tiny_options.py --families topk topk:enc_init_scale=0.3 topk:decay_fraction=0 batchtopk

The tiny half of the defaults suite (the other half: benchmarks/synthetic.py). Harvests tiny's
blocks.1.hook_resid_post once (train split to train, held-out split to score, as
benchmarks/peers.py does), then trains one SAE per family spec at n_latents = expansion x d,
k 32, each from the trainer's defaults with the spec's options changed. A spec is
activation[+matryoshka][:key=value,...]; keys of SAEConfig go to the SAE, the rest to TrainConfig.
One JSON line per spec: FVU, L0, dead and dense shares on the held-out tokens, training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

from peers import HOOK, harvest
from synthetic import parse_spec

import saebench as sb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["topk"])
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--test-tokens", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    acts = harvest(args.tokens, args.test_tokens)
    d = acts["train"].shape[1]
    n = args.expansion * d
    for spec in args.families:
        activation, matryoshka, sae_keys, train_keys = parse_spec(spec)
        prefixes = [n // 8, n // 4, n // 2, n] if matryoshka else None
        cfg = sb.SAEConfig(
            **{"d_in": d, "n_latents": n, "k": args.k, "activation": activation, "matryoshka": prefixes, **sae_keys}
        )
        train = sb.TrainConfig(**{"n_tokens": args.tokens, "batch_size": args.batch, "seed": 0, **train_keys})
        start = time.perf_counter()
        sae, _ = sb.train_sae(cfg, acts["train"], train, show_progress=False)
        seconds = time.perf_counter() - start
        sae.eval()
        m = sb.evaluate_sae(sae, acts["test"])
        print(
            json.dumps(
                {
                    "family": spec,
                    "hook": HOOK,
                    "n_latents": n,
                    "k": args.k,
                    "tokens": args.tokens,
                    "lr": train.resolved_lr(n),
                    "fvu": round(m["fvu"], 4),
                    "l0": round(m["l0"], 2),
                    "dead_fraction": round(m["dead_fraction"], 4),
                    "dense_fraction": round(m["dense_fraction"], 4),
                    "tokens_per_s": round(args.tokens // args.batch * args.batch / seconds),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
