"""Gradient TopK (Olmo et al. 2025) against TopK on tiny at equal k, trained on the same tokens, in one run.

    python benchmarks/gradient_topk.py [--cache-tokens 2000000] [--tokens 6000000] [--n-latents 3072] [--k 32] \
[--betas 1] [--runs-dir runs]

Harvests tiny's blocks.1.hook_resid_post (train split) once, with the loss gradients, into one cache
(RUNS/gtopk-cache), then from it trains a TopK SAE and a gradient TopK SAE per beta through the
pipeline (`saebench train` with train.source cache: the same seed reads the same batches in the same
order), runs `saebench eval` on each (held-out split: FVU, L0, dead fraction, CE-loss recovered and KL
score spliced in; gradient TopK with the clean run's gradients and without them, each run next to its
random baseline), and takes every latent's output score (Arad et al. 2025: steering.output_score,
amp 10, neutral prompt). One JSON line per SAE; the per-latent output scores and which latents fire on
--alive-tokens held-out tokens go to RUNS/gtopk-output-scores.json. A finished run is reused.
The paper's claims (GPT-2 small, layer 7): at equal L0, higher CE-loss recovered when spliced in, fewer
dead latents, latents that steer better (higher output scores); FVU a little worse.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import saebench as sb
from saebench.train import grad_key

HOOK = "blocks.1.hook_resid_post"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def quantiles(values: torch.Tensor) -> dict:
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9])).tolist() if len(values) else [float("nan")] * 3
    return {
        "mean": round(float(values.mean()), 4),
        **{k: round(v, 4) for k, v in zip(("p10", "p50", "p90"), q, strict=True)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-tokens", type=int, default=2_000_000)
    p.add_argument("--tokens", type=int, default=6_000_000)
    p.add_argument("--n-latents", type=int, default=3072)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--betas", type=float, nargs="+", default=[1.0])
    p.add_argument("--alive-tokens", type=int, default=20_000)
    p.add_argument("--score-latents", type=int, default=None, help="output scores of the first N latents (all)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--set", nargs="*", default=[], help="more run-config overrides for every run")
    args = p.parse_args()
    runs = Path(args.runs_dir)
    common = [
        f"runs_dir={runs}",
        f"harvest.hooks=[{HOOK}]",
        f"harvest.n_tokens={args.cache_tokens}",
        f"harvest.cache_dir={runs / 'gtopk-cache'}",
        "train.source=cache",
        f"train.n_tokens={args.tokens}",
        f"sae.n_latents={args.n_latents}",
        f"sae.k={args.k}",
        *args.set,
    ]
    specs = {"topk": ["sae.activation=topk"]}
    for beta in args.betas:
        specs[f"gradient_topk_beta{beta:g}"] = ["sae.activation=gradient_topk", f"sae.gradient_beta={beta}"]
    start = time.perf_counter()
    sb.harvest_from_config(CONFIG, [*common, "harvest.gradients=true", "name=gtopk-cache"])
    harvest_s = time.perf_counter() - start

    model = sb.load_model("tiny")
    rc = sb.load_config(CONFIG, common)
    held_out = sb.load_contexts(dataclasses.replace(rc.data, split="test"), model.tokenizer, show_progress=False)
    alive_rows = sb.Harvester(model, [HOOK], gradients=True)
    n_ctx = min(len(held_out), -(-args.alive_tokens // held_out.tokens.shape[1]))
    sample, _ = alive_rows.activations(held_out.tokens[:n_ctx], held_out.special_mask[:n_ctx])
    scores = {}
    for name, extra in specs.items():
        run_dir = runs / f"gtopk-{name}"
        gradients = "activation=gradient_topk" in extra[0]
        start = time.perf_counter()
        if not (run_dir / "sae").exists():
            sb.train_from_config(CONFIG, [*common, *extra, f"name=gtopk-{name}", f"harvest.gradients={gradients}"])
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = sb.eval_from_config(run_dir)[HOOK]
        eval_s = time.perf_counter() - start
        sae = sb.Run(run_dir).load_sae()
        fires = sae.encode(sample[HOOK], sample[grad_key(HOOK)] if gradients else None).ne(0).any(0)
        start = time.perf_counter()
        latents = range(args.score_latents or sae.cfg.n_latents)
        out = torch.tensor([sb.output_score(model, sae, f, hook=HOOK) for f in latents])
        score_s = time.perf_counter() - start
        scores[name] = {"output_score": out.tolist(), "fires": fires[: len(out)].tolist()}
        sides = ("sae", "sae_without_gradients", "random_baseline")
        keys = ("fvu", "l0", "dead_fraction", "ce_recovered", "kl_score", "ce_sae", "kl_sae")
        row = {
            "run": name,
            "hook": HOOK,
            "n_latents": sae.cfg.n_latents,
            "k": sae.cfg.k,
            "train_tokens": args.tokens,
            "cache_tokens": args.cache_tokens,
            **{side: {k: round(result[side][k], 4) for k in keys} for side in sides if side in result},
            "output_score_all": quantiles(out),
            "output_score_alive": quantiles(out[fires[: len(out)]]),
            "alive_on_sample": round(float(fires.float().mean()), 4),
            "seconds": {
                "harvest": round(harvest_s),
                "train": round(train_s),
                "eval": round(eval_s),
                "score": round(score_s),
            },
        }
        print(json.dumps(row), flush=True)
    (runs / "gtopk-output-scores.json").write_text(json.dumps(scores) + "\n")


if __name__ == "__main__":
    main()
