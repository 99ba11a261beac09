"""saebench against SAELens: TopK (or JumpReLU) SAEs on the same activations, width, k, batch and tokens, in one run.

    python benchmarks/peers.py [--tokens 2000000] [--batch 4096] [--expansion 16] [--k 32] \
[--lr-grid 3e-4,1e-3,2e-3,4e-3] [--family jumprelu [--saelens-tries 3]]

Harvests `tiny` blocks.1.hook_resid_post activations once (train split for training, the
held-out split for FVU), trains saebench's TopK SAE in this process and SAELens' TopK SAE in
its own venv (.cache/peers-venv, made on first use: torch 2.13.0 CPU, then sae-lens from PyPI),
each with its own default learning rate and schedule. Prints one JSON line per tool and one
with the ratios: FVU (saebench's should be no worse) and training tokens/s.
--lr-grid then trains both tools again at each learning rate of one shared grid (each with its
own schedule) and prints a line per (tool, lr) and the best FVU of each.
--family jumprelu: saebench's JumpReLU reaches L0 = k by itself; SAELens' (its defaults: threshold
param from 0.01, bandwidth 0.05, "step" L0) needs its l0_coefficient tuned, so it trains at up to
--saelens-tries coefficients (`l0_search`: the first is saebench's final λ in SAELens' units, the
next ones step toward L0 = k), a line each, then the FVU of each tool at matched L0. --saelens-threshold
quantile starts SAELens' thresholds where saebench starts its own.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import saebench as sb

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".cache" / "peers-venv"
HOOK = "blocks.1.hook_resid_post"

# prepended to the SAELens scripts here and in synthetic.py (they run in the peers venv, without saebench)
QUANTILE_START = r"""
def start_at_quantile(sae, x, k):  # saebench's JumpReLU init: each latent's 1 - k/n quantile of its pre-activations
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        sae.threshold.data = pre.quantile(1 - k / pre.shape[1], dim=0).clamp(min=1e-3).float()
"""

SAELENS_SCRIPT = r"""
import json, sys, time
import torch
from safetensors.torch import load_file
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig

path, n_tokens, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n_latents, k, out_dir, lr = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], float(sys.argv[7])
family, l0_coefficient, threshold = sys.argv[8], float(sys.argv[9]), sys.argv[10]
data = load_file(path)
train, test = data["train"], data["test"]
torch.manual_seed(0)
common = dict(d_in=train.shape[1], d_sae=n_latents, device="cpu", dtype="float32")
if family == "jumprelu":
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, l0_coefficient=l0_coefficient))
else:
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=k))
if family == "jumprelu" and threshold == "quantile":
    start_at_quantile(sae, train[:batch], k)
steps = n_tokens // batch

def provider():
    for step in range(steps):
        i = (step * batch) % (len(train) - batch + 1)
        yield train[i:i + batch]

cfg = SAETrainerConfig(
    n_checkpoints=0, checkpoint_path=out_dir, save_final_checkpoint=False, total_training_samples=steps * batch,
    device="cpu", autocast=False, lr=lr, lr_end=lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=0,
    adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=batch,
    dead_feature_window=1000, feature_sampling_window=2000,
)
trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
start = time.perf_counter()
trainer.fit()
seconds = time.perf_counter() - start
with torch.no_grad():
    x_hat = sae.decode(sae.encode(test))
    fvu = float((test - x_hat).pow(2).sum() / (test - test.mean(0)).pow(2).sum())
    l0 = float((sae.encode(test) != 0).float().sum(-1).mean())
import sae_lens
coef = {"l0_coefficient": l0_coefficient} if family == "jumprelu" else {}
print(json.dumps({"tool": f"sae_lens {sae_lens.__version__}", "family": family, "lr": lr, **coef,
                  "fvu": round(fvu, 4), "l0": round(l0, 2), "train_seconds": round(seconds, 1),
                  "tokens_per_s": round(steps * batch / seconds)}))
"""


def ensure_peers_venv() -> Path:
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import sae_lens"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sae-lens==6.54.12"], check=True)
    return python


def harvest(n_train: int, n_test: int) -> dict[str, torch.Tensor]:
    model = sb.load_model("tiny")
    harvester = sb.Harvester(model, [HOOK])
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        contexts = sb.load_contexts(sb.DataConfig(split=split), model.tokenizer)
        out[split] = torch.cat(
            [b[HOOK] for b in sb.stream_activations(harvester, contexts, batch_tokens=8192, n_tokens=n, seed=0)]
        )[:n].float()
    return out


SAELENS_DEFAULT_LR = 3e-4  # SAELens' SAETrainerConfig default


def l0_search(train, k: float, coef: float, tries: int) -> list[dict]:
    """SAELens' JumpReLU at up to `tries` L0 coefficients toward mean L0 = k. train(coef) -> a row with "l0".
    Each next coefficient is a secant step in log L0 against log coef (slope -1 at first, kept in [-4, -0.25]),
    by a factor of at most 100."""
    rows: list[dict] = []
    for _ in range(tries):
        rows.append({**train(coef), "l0_coefficient": coef})
        slope = -1.0
        if len(rows) > 1:
            (c0, l0), (c1, l1) = ((r["l0_coefficient"], max(r["l0"], 1e-2)) for r in rows[-2:])
            slope = math.log(l1 / l0) / math.log(c1 / c0) if c1 != c0 else -1.0
        coef *= min(100.0, max(0.01, (max(rows[-1]["l0"], 1e-2) / k) ** (-1 / min(-0.25, max(-4.0, slope)))))
    return rows


def fvu_at_l0(rows: list[dict], l0: float) -> float | None:
    """FVU at this L0, linear in log L0 between the two rows around it; None when no two rows bracket it."""
    pts = sorted((r["l0"], r["fvu"]) for r in rows if r["l0"] > 0)
    for (a, fa), (b, fb) in zip(pts, pts[1:], strict=False):
        if a <= l0 <= b and a < b:
            return round(fa + (fb - fa) * math.log(l0 / a) / math.log(b / a), 4)
    return None


def run_saebench(acts: dict[str, torch.Tensor], args: argparse.Namespace, lr: float | None) -> dict:
    d = acts["train"].shape[1]
    cfg = sb.SAEConfig(d_in=d, n_latents=args.expansion * d, k=args.k, activation=args.family)
    start = time.perf_counter()
    sae, report = sb.train_sae(
        cfg,
        acts["train"],
        sb.TrainConfig(n_tokens=args.tokens, batch_size=args.batch, lr=lr, seed=0),
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    m = sb.evaluate_sae(sae, acts["test"])
    return {
        "tool": f"saebench {sb.__version__}",
        "lr": lr if lr is not None else round(sb.TrainConfig().resolved_lr(cfg.n_latents), 7),
        **({"l0_coef": round(report["l0_coef"], 5)} if "l0_coef" in report else {}),
        "fvu": round(m["fvu"], 4),
        "l0": round(m["l0"], 2),
        "train_seconds": round(seconds, 1),
        "tokens_per_s": round(args.tokens // args.batch * args.batch / seconds),
    }


def run_saelens(
    python: Path, path: Path, args: argparse.Namespace, n_latents: int, lr: float, tmp: str, l0_coefficient: float = 0
) -> dict:
    run = subprocess.run(
        [
            str(python),
            "-c",
            QUANTILE_START + SAELENS_SCRIPT,
            str(path),
            str(args.tokens),
            str(args.batch),
            str(n_latents),
            str(args.k),
            tmp,
            str(lr),
            args.family,
            str(l0_coefficient),
            args.saelens_threshold,
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        sys.exit(f"SAELens run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--test-tokens", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--saebench-lr", type=float, default=None, help="saebench's lr (default: its n-scaled rule)")
    p.add_argument(
        "--lr-grid", type=str, default="", help="comma-separated lrs to train both tools at, after the default runs"
    )
    p.add_argument("--family", choices=("topk", "jumprelu"), default="topk")
    p.add_argument("--saelens-tries", type=int, default=3, help="jumprelu: SAELens l0_coefficients tried (l0_search)")
    p.add_argument(
        "--saelens-l0-coef",
        type=float,
        default=None,
        help="jumprelu: SAELens' first l0_coefficient (default: "
        "saebench's final λ in SAELens' units, λ * E||x - mean||^2 / k, as SAELens sums the squared error over d)",
    )
    p.add_argument(
        "--saelens-threshold",
        choices=("default", "quantile"),
        default="default",
        help="jumprelu: SAELens' thresholds start at its 0.01 (default) or at each latent's 1 - k/n quantile of the "
        "first batch (saebench's rule; SAELens' threshold moves by about its lr per step, so from 0.01 it needs "
        "thousands of steps to reach a sparse L0)",
    )
    args = p.parse_args()
    python = ensure_peers_venv()
    acts = harvest(args.tokens, args.test_tokens)
    d = acts["train"].shape[1]
    n_latents = args.expansion * d
    common = {
        "model": "tiny",
        "hook": HOOK,
        "d_in": d,
        "n_latents": n_latents,
        "k": args.k,
        "batch": args.batch,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.safetensors"
        save_file({k: v.contiguous() for k, v in acts.items()}, str(path))
        ours = run_saebench(acts, args, args.saebench_lr)
        print(json.dumps({**common, **ours}), flush=True)

        def saelens(lr: float, coef: float = 0.0) -> dict:
            row = run_saelens(python, path, args, n_latents, lr, tmp, coef)
            print(json.dumps({**common, **row}), flush=True)
            return row

        matched = {}
        if args.family == "jumprelu":
            var = float((acts["train"] - acts["train"].mean(0)).pow(2).sum(-1).mean())
            start = args.saelens_l0_coef or ours["l0_coef"] * var / args.k
            rows = l0_search(lambda c: saelens(SAELENS_DEFAULT_LR, c), args.k, start, args.saelens_tries)
            theirs = min(rows, key=lambda r: abs(math.log(max(r["l0"], 1e-2) / ours["l0"])))  # nearest in L0
            matched = {"l0_saebench": ours["l0"], "l0_saelens": theirs["l0"]}
            matched["saelens_fvu_at_saebench_l0"] = fvu_at_l0(rows, ours["l0"])
        else:
            theirs = saelens(SAELENS_DEFAULT_LR)
        print(
            json.dumps(
                {
                    "fvu_saebench_minus_saelens": round(ours["fvu"] - theirs["fvu"], 4),
                    **matched,
                    "tokens_per_s_ratio_saebench_to_saelens": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                }
            ),
            flush=True,
        )
        if not args.lr_grid:
            return
        best = {"saebench": ours, "sae_lens": theirs}
        for lr in (float(v) for v in args.lr_grid.split(",")):
            ours_lr = run_saebench(acts, args, lr)
            print(json.dumps({**common, **ours_lr}), flush=True)
            for name, row in (("saebench", ours_lr), ("sae_lens", saelens(lr, theirs.get("l0_coefficient", 0.0)))):
                if row["fvu"] < best[name]["fvu"]:
                    best[name] = row
        print(
            json.dumps(
                {
                    "best_fvu_saebench": best["saebench"]["fvu"],
                    "best_lr_saebench": best["saebench"]["lr"],
                    "best_fvu_saelens": best["sae_lens"]["fvu"],
                    "best_lr_saelens": best["sae_lens"]["lr"],
                    "best_fvu_saebench_minus_saelens": round(best["saebench"]["fvu"] - best["sae_lens"]["fvu"], 4),
                }
            )
        )


if __name__ == "__main__":
    main()
