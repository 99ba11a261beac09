"""HierarchicalTopK on tiny beside TopK SAEs trained at each k (issue 25): five SAEs from one model pass.

    python benchmarks/hierarchical.py                                    # the issue's figure: K 64, k 8 16 32 64
    python benchmarks/hierarchical.py --tokens 2000000 --eval-only       # evaluate what an earlier call trained
    python benchmarks/hierarchical.py --tokens 100000 --ks 4 8 --set eval.n_tokens=5000 eval.n_contexts=4  # toy

From configs/tiny.yaml (blocks.1.hook_resid_post, n_latents 16 x 192 = 3072, its trainer): one hierarchical_topk
SAE at K = max(ks) and one topk SAE at each k in ks train on the same stream (sb.train_saes: one model forward
per batch for all of them), each into its own run folder runs/<prefix>-<family>-<k>, which `saebench eval`,
`analyze` and `app` open as any run. Each is then evaluated by `saebench eval`'s code (its eval section:
held-out FVU and L0, CE-loss recovered and KL score spliced in, a random SAE at matched scale), the
hierarchical one at every k' in ks as well (`saebench eval RUN --k ...`). One JSON line per (SAE, k').
Step times of the two families: benchmarks/train_step.py --activation topk hierarchical_topk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import saebench as sb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64], help="TopK's k; the hierarchical K is the max")
    p.add_argument("--tokens", type=int, default=8_000_000, help="training tokens (the same ones for every SAE)")
    p.add_argument("--prefix", default="tiny-hier", help="run folders: runs/<prefix>-<family>-<k>")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. runs_dir=/tmp")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs an earlier call trained")
    args = p.parse_args()
    base = sb.load_config(args.config, [f"train.n_tokens={args.tokens}", *args.set])
    (hook,) = base.harvest.hooks
    specs = [("hierarchical_topk", max(args.ks))] + [("topk", k) for k in args.ks]
    runs = {
        f"{args.prefix}-{a}-{k}": dataclasses.replace(
            base, name=f"{args.prefix}-{a}-{k}", sae=dataclasses.replace(base.sae, activation=a, k=k)
        )
        for a, k in specs
    }
    model = sb.load_model(base.model, base.device, base.torch_dtype)
    harvester = sb.Harvester(model, [hook], base.harvest.exclude_special)
    contexts = sb.load_contexts(base.data, model.tokenizer)

    def source(epoch: int):  # as `saebench train` streams (pipeline.train_from_config)
        chunk = min(base.train.batch_size, base.harvest.buffer_tokens // 2)
        return sb.stream_activations(
            harvester, contexts, chunk, base.harvest.buffer_tokens, batch_size=base.harvest.batch_size,
            seed=base.seed * 1000 + epoch, epochs=1,
        )  # fmt: skip

    sae_cfgs = {name: rc.sae.resolve(harvester.widths[hook], hook, base.model) for name, rc in runs.items()}
    if not args.eval_only:  # --eval-only leaves the trained runs' configs as they were written
        for rc in runs.values():
            sb.Run(rc.run_dir).write_config(rc)
        started, cpu = time.perf_counter(), time.process_time()
        sb.train_saes(sae_cfgs, source, base.train, dirs={name: rc.run_dir for name, rc in runs.items()})
        seconds = {"seconds": round(time.perf_counter() - started), "cpu_seconds": round(time.process_time() - cpu)}
        print(json.dumps({"trained": list(runs), "tokens": args.tokens, **seconds}), flush=True)
    for name, rc in runs.items():
        cfg = sae_cfgs[name]
        result = sb.eval_from_config(rc.run_dir, ks=args.ks if cfg.family.hierarchical else ())[hook]
        at = {cfg.k: result, **{int(k): r for k, r in result.get("by_k", {}).items()}}
        for k_prime, r in sorted(at.items()):
            sae, rand = r["sae"], r["random_baseline"]
            row = {"run": name, "activation": cfg.activation, "k": cfg.k, "k_prime": k_prime}
            row |= {m: round(sae[m], 4) for m in ("fvu", "l0", "ce_recovered", "kl_score", "dead_fraction")}
            row |= {"ce_sae": round(sae["ce_sae"], 4), "random_ce_recovered": round(rand["ce_recovered"], 4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
