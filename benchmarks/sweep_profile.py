"""Where a streamed sweep spends its time: the source's batches, each cell's steps, and the rest.

    python benchmarks/sweep_profile.py [--tokens 300000] [--runs-dir runs/bench-sweep-profile]

Trains benchmarks/sweep.py's 8-cell grid from one stream (train_from_config with cells) with
SAETrainer.step and the batch source's `next` timed inside train_saes. One JSON line: the total, the
stream's share (model forward, shuffle buffer, the init sample's read), the steps per family and width,
and the rest (loading the model, tokenising, writing the SAEs). Checkpoints off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import saebench as sb
from saebench import train
from saebench.pipeline import train_from_config
from saebench.sweep import cell_config, grid_cells

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
GRID = ["sae.k=16,32", "sae.expansion=8,16", "sae.activation=topk,batchtopk"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--runs-dir", default="runs/bench-sweep-profile", help="emptied first")
    args = p.parse_args()
    shutil.rmtree(args.runs_dir, ignore_errors=True)
    sets = [f"runs_dir={args.runs_dir}", f"train.n_tokens={args.tokens}", "train.checkpoint_every=0", "name=sweep"]
    base = sb.load_config(CONFIG, sets)
    cells = {n: cell_config(base, n, s) for n, s in grid_cells(GRID).items()}
    seconds: dict[str, float] = defaultdict(float)
    step, batches = train.SAETrainer.step, train.BatchSource.batches

    def timed_step(self, x, *a, **kw):
        start = time.perf_counter()
        out = step(self, x, *a, **kw)
        seconds[f"steps {self.sae.cfg.activation} n={self.sae.cfg.n_latents}"] += time.perf_counter() - start
        return out

    def timed_batches(self, skip=0):
        it = batches(self, skip)
        while True:
            start = time.perf_counter()
            batch = next(it, None)
            seconds["stream"] += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    train.SAETrainer.step, train.BatchSource.batches = timed_step, timed_batches
    start = time.perf_counter()
    train_from_config(base, cells=cells)
    total = time.perf_counter() - start
    steps = sum(v for k, v in seconds.items() if k.startswith("steps"))
    row = {"tokens": args.tokens, "cells": len(cells), "total_s": round(total, 2)}
    row |= {k: round(v, 2) for k, v in sorted(seconds.items())}
    print(json.dumps(row | {"steps_s": round(steps, 2), "rest_s": round(total - steps - seconds["stream"], 2)}))


if __name__ == "__main__":
    main()
