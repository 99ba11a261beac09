"""A sweep costs one model pass plus its SAEs' steps: an 8-cell grid on tiny, timed four ways, in one run.

    python benchmarks/sweep.py [--tokens 2000000] [--runs-dir runs/bench-sweep] [--grid sae.k=16,32 ...]

1. the model pass alone: what `saebench train` reads (load the model, tokenise, activation_source: the
   init sample's buffer fill, then --tokens rows), kept in memory;
2. each cell's SAE steps alone: train_saes on those rows (a tensor: no model), one cell at a time;
3. the sweep: every cell trained from one stream (`saebench sweep` without its eval);
4. one `saebench train` per cell (train_from_config), each with its own model pass.
The sweep's SAEs must equal the separate runs' (same seed, same data order): max_abs_diff, 0 on CPU.
Goal: sweep_s within 10% of pass_s + sum(steps_s). separate_s / sweep_s = (n P + S) / (P + S) for a pass P
and steps S, which tends to n (the cells) as the model pass dominates, as it does for any real model.
JSON lines: one per cell, then the summary. Checkpoints off (train.checkpoint_every=0) in every arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import saebench as sb
from saebench.harvest import Harvester, store_dtype
from saebench.pipeline import activation_source, train_from_config
from saebench.sweep import cell_config, grid_cells

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
GRID = ["sae.k=16,32", "sae.expansion=8,16", "sae.activation=topk,batchtopk"]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--grid", action="append", default=None, help=f"axes (default: {' '.join(GRID)})")
    p.add_argument("--runs-dir", default="runs/bench-sweep", help="emptied first")
    p.add_argument("--set", nargs="*", default=[], help="more run-config overrides")
    args = p.parse_args()
    runs = Path(args.runs_dir)
    shutil.rmtree(runs, ignore_errors=True)
    sets = [f"runs_dir={runs}", f"train.n_tokens={args.tokens}", "train.checkpoint_every=0", *args.set]
    base = sb.load_config(CONFIG, [*sets, "name=sweep"])
    cells = {n: cell_config(base, n, s) for n, s in grid_cells(args.grid or GRID).items()}
    hook, t = base.harvest.hooks[0], base.train

    def model_pass() -> torch.Tensor:  # as the sweep and each separate run do: load, tokenise, stream
        model = sb.load_model(base.model, base.device, base.torch_dtype)
        harvester = Harvester(model, [hook], base.harvest.exclude_special, store_dtype(base.harvest))
        source = activation_source(base, model, harvester)
        next(iter(source(0)))  # the init sample's read: a fresh stream fills its buffer first
        rows, n = [], 0
        for batch in source(0):
            rows.append(batch[hook])
            n += len(batch[hook])
            if n >= args.tokens:
                break
        return torch.cat(rows)[: args.tokens]

    model_pass()  # warm up: the first load and tokenisation pay for imports and cold files, no arm should
    acts, pass_s = timed(model_pass)
    steps = {}
    for name, cell in cells.items():
        sae_cfg = cell.sae.resolve(acts.shape[1], hook, base.model)
        train_cfg = dataclasses.replace(cell.train, seed=base.seed, device=base.device)
        _, steps[name] = timed(lambda c=sae_cfg, tc=train_cfg, x=acts: sb.train_sae(c, x, tc, show_progress=False))
    del acts
    _, sweep_s = timed(lambda: train_from_config(base, cells=cells))
    separate = {}
    for name, cell in cells.items():
        alone = dataclasses.replace(cell, runs_dir=str(runs / "separate"), name=name)
        _, separate[name] = timed(lambda a=alone: train_from_config(a))
    diffs = {}
    for name in cells:
        a, b = (load_file(str(runs / d / name / "sae" / "sae.safetensors")) for d in ("sweep", "separate"))
        diffs[name] = max(float((a[k] - b[k]).abs().max()) for k in a)
        n_latents = sb.SAE.load(runs / "sweep" / name / "sae").cfg.n_latents
        row = {"cell": name, "n_latents": n_latents, "steps_s": round(steps[name], 2)}
        print(json.dumps({**row, "separate_s": round(separate[name], 2), "max_abs_diff": diffs[name]}), flush=True)
    steps_s, separate_s, n = sum(steps.values()), sum(separate.values()), len(cells)
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                "cells": n,
                "batch_size": t.batch_size,
                "threads": torch.get_num_threads(),
                "pass_s": round(pass_s, 2),
                "steps_s": round(steps_s, 2),
                "sweep_s": round(sweep_s, 2),
                "sweep_over_pass_plus_steps": round(sweep_s / (pass_s + steps_s), 3),
                "separate_s": round(separate_s, 2),
                "separate_over_sweep": round(separate_s / sweep_s, 2),
                # the same ratio for a model whose pass costs 100x tiny's: it tends to the number of cells
                "separate_over_sweep_at_100x_pass": round((n * 100 * pass_s + steps_s) / (100 * pass_s + steps_s), 2),
                "max_abs_diff": max(diffs.values()),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
