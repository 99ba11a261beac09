"""The analysis pass, side by side with a bare harvest + encode pass and with SAEDashboard, in one run.

    python benchmarks/analyze.py [--run runs/tiny] [--tokens 500000] [--memory-tokens 2000000,5000000]
                                 [--peer-contexts 256] [--peer-features 128] [--cases pass,memory,peer]

Uses the run's SAE (a random SAE of the same shape when the run has none, said in the output) on
a copy of the run, so the run's own store is never touched. Prints one JSON line per case:
  pass      the analysis pass vs the bare pass over the same tokens (tokens/s; goal ratio >= 0.6)
  memory    peak resident memory of `saebench analyze` in a fresh process at each token count
  peer      per feature-token throughput vs SAEDashboard 0.8.0 on the same model weights, SAE and
            tokens (its own venv, .cache/dashboard-venv; goal ratio >= 10)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import saebench as sb
from saebench.analysis import AnalysisConfig, sparse_codes
from saebench.config import load_config, to_dict
from saebench.harvest import Harvester
from saebench.pipeline import whole_contexts

ROOT = Path(__file__).resolve().parent.parent


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def bench_run(run: Path, into: Path) -> tuple[Path, str]:
    """A copy of the run's config and SAE in `into` (or a random SAE of tiny.yaml's shape)."""
    dst = into / "bench"
    dst.mkdir(parents=True)
    homes = list(sb.Run(run).saes.values()) if (run / "config.yaml").exists() else []
    if homes:
        shutil.copy(run / "config.yaml", dst / "config.yaml")
        shutil.copytree(homes[0].sae_dir, dst / "sae")
        return dst, f"trained SAE of {run}"
    rc = load_config(ROOT / "configs" / "tiny.yaml")
    (dst / "config.yaml").write_text(yaml.safe_dump(to_dict(rc)))
    hook = rc.harvest.hooks[0]
    sb.SAE(sb.SAEConfig(d_in=192, n_latents=rc.sae.expansion * 192, k=rc.sae.k, hook=hook, model=rc.model)).save(
        dst / "sae"
    )
    return dst, f"random SAE ({run} has no trained SAE)"


def bare_pass(run: Path, n_tokens: int, split: str, batch_size: int) -> dict:
    """Harvest + sparse encode of the same contexts the analysis reads, nothing else."""
    rc = load_config(run / "config.yaml")
    model = sb.load_model(rc.model, rc.device, rc.torch_dtype)
    sae = sb.SAE.load(run / "sae", rc.device)
    hook = sae.cfg.hook
    assert hook is not None
    harvester = Harvester(model, [hook], exclude_special=True)
    contexts = sb.load_contexts(dataclasses.replace(rc.data, split=split), model.tokenizer, show_progress=False)
    n_ctx, _ = whole_contexts(contexts, n_tokens)
    start, done, fires = time.perf_counter(), 0, 0
    with torch.no_grad():
        for i in range(0, n_ctx, batch_size):
            j = min(i + batch_size, n_ctx)
            x = harvester.device_activations(contexts.tokens[i:j], contexts.special_mask[i:j])[0][hook]
            _, _, values = sparse_codes(sae, x)
            fires += int((values != 0).sum())
            done += len(x)
    seconds = time.perf_counter() - start
    return {
        "tokens": done,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(done / seconds),
        "fires_per_token": round(fires / done, 2),
    }


def analysis_pass(run: Path, n_tokens: int, split: str, batch_size: int) -> dict:
    start = time.perf_counter()
    summary = sb.analyze(
        run, AnalysisConfig(n_tokens=n_tokens, split=split, batch_size=batch_size), show_progress=False
    )
    total = time.perf_counter() - start
    return {
        "tokens": summary["n_tokens"],
        "pass_seconds": summary["seconds"],
        "tokens_per_s": summary["tokens_per_s"],
        "total_seconds": round(total, 2),
        "store_mb": round(Path(summary["stores"][0]).stat().st_size / 2**20, 1),
    }


def peak_memory(run: Path, n_tokens: int, split: str) -> dict:
    """`saebench analyze` in a fresh process; its peak resident set from the kernel's accounting."""
    code = (
        "import resource, sys, json, saebench as sb\n"
        "from saebench.analysis import AnalysisConfig\n"
        f"s = sb.analyze({str(run)!r}, AnalysisConfig(n_tokens={n_tokens}, split={split!r}), show_progress=False)\n"
        "print(json.dumps({'peak_rss_gb': "
        "round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), **s}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "tokens": row["n_tokens"],
        "peak_rss_gb": row["peak_rss_gb"],
        "seconds": row["seconds"],
        "tokens_per_s": row["tokens_per_s"],
    }


def peer(run: Path, n_contexts: int, n_features: int) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from analyze_peer import run_sae_dashboard

    from saebench.interop import save_saelens

    rc = load_config(run / "config.yaml")
    model = sb.load_model(rc.model)
    sae = sb.SAE.load(run / "sae")
    assert sae.cfg.hook is not None
    contexts = sb.load_contexts(dataclasses.replace(rc.data, split="test"), model.tokenizer, show_progress=False)

    tokens = contexts.tokens[:n_contexts]
    n_tokens = int((~contexts.special_mask[:n_contexts]).sum())
    features = list(range(n_features))

    start = time.perf_counter()
    summary = sb.analyze(run, AnalysisConfig(n_tokens=n_tokens, split="test"), show_progress=False)
    wall = time.perf_counter() - start
    # like SAEDashboard's timer: the pass and everything after it, not loading the model and text
    seconds = summary["seconds"] + summary["finish_seconds"]
    store = sb.FeatureStore(run)
    ours_max = store.feature(features[0]).max_activation
    ours = {
        "tool": "saebench",
        "n_features": sae.cfg.n_latents,
        "n_tokens": n_tokens,
        "seconds": round(seconds, 2),
        "wall_seconds_with_loading": round(wall, 2),
        "feature_tokens_per_s": round(sae.cfg.n_latents * n_tokens / seconds),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_saelens(sae, Path(tmp) / "sae")
        theirs = run_sae_dashboard(tokens, Path(tmp) / "sae", sae.cfg.hook, features)
    return [
        ours,
        theirs,
        {
            "case": "peer",
            "ratio_feature_tokens_per_s": round(ours["feature_tokens_per_s"] / theirs["feature_tokens_per_s"], 1),
            "max_activation_feature0": {
                "saebench": round(ours_max, 4),
                "sae_dashboard": round(theirs["max_act_first_feature"], 4),
            },
        },
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(ROOT / "runs" / "tiny"))
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--split", default="train", help="tiny's held-out split holds only 223K tokens")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--memory-tokens", default="2000000,5000000")
    p.add_argument("--peer-contexts", type=int, default=256)
    p.add_argument("--peer-features", type=int, default=128)
    p.add_argument("--cases", default="pass,memory,peer")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run, what = bench_run(Path(args.run), Path(tmp))
        emit(
            {
                "case": "setup",
                "sae": what,
                "device": str(load_config(run / "config.yaml").device),
                "threads": torch.get_num_threads(),
            }
        )
        cases = args.cases.split(",")
        if "pass" in cases:
            bare = bare_pass(run, args.tokens, args.split, args.batch_size)
            ours = analysis_pass(run, args.tokens, args.split, args.batch_size)
            emit(
                {
                    "case": "pass",
                    "bare_harvest_encode": bare,
                    "analysis": ours,
                    "ratio_tokens_per_s": round(ours["tokens_per_s"] / bare["tokens_per_s"], 3),
                }
            )
        for n in [int(v) for v in args.memory_tokens.split(",") if v and "memory" in cases]:
            emit({"case": "memory", **peak_memory(run, n, args.split)})
        if "peer" in cases:
            for row in peer(run, args.peer_contexts, args.peer_features):
                emit({"case": "peer", **row} if "case" not in row else row)


if __name__ == "__main__":
    main()
