"""Planted-feature recovery that tells SAE families apart (after SynthSAEBench).

    python benchmarks/synthetic.py                       # the base regime: every family + plain TopK
    python benchmarks/synthetic.py --sweep --steps 1000  # n_latents / n_true and k / true L0 in {0.5, 1, 2}
    python benchmarks/synthetic.py --families topk topk:enc_init_scale=1 topk:lr=1e-3,decay_fraction=0 \
 # trainer options
    python benchmarks/synthetic.py --set rank=16 --cells 4,1 --families topk topk:init=subspace  # low-rank data
    python benchmarks/synthetic.py --families hierarchical_topk --cells 1,2 --k-primes 2,4,8,16  # one SAE at each k'

The base regime: d 64, 768 planted features (5x superposition), true L0 8, Zipf frequencies, a
quarter of the features in parent/3-children trees (children exclusive, only with their parent),
correlated firing in groups of 8 (latent correlation 0.3), lognormal magnitudes (sigma 0.5),
noise 0.02. The `random` row is the floor: random unit decoder directions with TopK codes at matched
scale (no training). Every family trains at its defaults on the same stream; the `plain_topk` row is an
independent 25-line TopK (Adam 1e-3 constant, unit-norm tied init, median b_dec, no AuxK, no
clipping), the reference each family should match; `plain_batchtopk` is the same with BatchTopK's
selection, the family's own floor. `saelens_topk` / `saelens_batchtopk` / `saelens_jumprelu` train
SAELens' own TopK / BatchTopK / JumpReLU (its trainer and defaults: lr 3e-4 constant, decoder-norm
rescaling, AuxK; JumpReLU's threshold from 0.01, bandwidth 0.05, "step" L0) on the same stream, in
the peers venv of benchmarks/peers.py: an independent implementation of each family. SAELens'
JumpReLU takes an L0 coefficient rather than k: `saelens_jumprelu:l0_coef=0.15,tries=3` trains it at
`tries` coefficients toward L0 = k (peers.l0_search), the first l0_coef (in saebench's units, λ of
FVU + λ L0 / k) * E||x - mean||^2 / k in SAELens' (which sums the squared error over d), a row each;
`threshold=quantile` starts its thresholds at each latent's 1 - k/n quantile of a first batch (saebench's
rule) instead of 0.01; `ste_to_input=true` sets its jumprelu_ste_to_input (saebench's default estimator).
One JSON line per (regime, family, seed); with --k-primes, a per-token family's line also holds "by_k": the
same metrics of the one SAE encoded at each k' (mcc_live counts only the latents that fire at that k').
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from saebench.sae import SAEConfig
from saebench.synthetic import PlantedFeatures, SyntheticConfig, iter_synthetic_bench, random_row, score_sae

BASE = SyntheticConfig(
    d=64,
    n_true=768,
    true_l0=8.0,
    zipf_exponent=0.5,
    children=3,
    tree_fraction=0.5,
    child_prob=0.5,
    correlation=0.3,
    corr_group=8,
    magnitude="lognormal",
    magnitude_sigma=0.5,
    noise_std=0.02,
    seed=0,
)
PEER_FAMILIES = ("saelens_topk", "saelens_batchtopk", "saelens_jumprelu")
FAMILIES = (
    "random",
    "topk",
    "abstopk",
    "batchtopk",
    "mutual_choice",
    "feature_choice",
    "jumprelu",
    "hierarchical_topk",
    "topk+matryoshka",
    "batchtopk+matryoshka",
    "plain_topk",
    "plain_batchtopk",
)


def plain_sae(
    planted: PlantedFeatures,
    n_latents: int,
    k: int,
    steps: int,
    batch: int,
    lr: float = 1e-3,
    seed: int = 0,
    rule: str = "topk",
):
    """The reference: a TopK (or BatchTopK) SAE with nothing but Adam. -> (encode, W_dec [n d]).

    rule "batchtopk": the batch keeps its k*batch largest ReLU'd pre-activations in training; at
    inference a latent fires above one threshold, the EMA (0.99) of the training cut-offs."""
    torch.manual_seed(seed)
    d = planted.cfg.d
    W_dec = torch.randn(n_latents, d)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.T.clone()
    stream = planted.stream(batch, seed)(0)
    b_dec = next(stream).median(dim=0).values
    b_enc = torch.zeros(n_latents)
    params = [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]
    opt = torch.optim.Adam(params, lr=lr)
    threshold = torch.zeros(())

    def encode(x, train: bool = False):
        nonlocal threshold
        pre = ((x - b_dec) @ W_enc + b_enc).relu()
        if rule == "topk":
            top = pre.topk(k, dim=-1)
            return torch.zeros(len(x), n_latents).scatter(-1, top.indices, top.values)
        if train:
            cut = pre.flatten().topk(k * len(x)).values[-1].detach()
            threshold = cut if threshold == 0 else 0.99 * threshold + 0.01 * cut
            return torch.where(pre >= cut, pre, 0)
        return torch.where(pre > threshold, pre, 0)

    for _, x in zip(range(steps), stream, strict=False):
        loss = (encode(x, train=True) @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return encode, W_dec.detach()


SAELENS_SCRIPT = r"""
import importlib.util, json, sys
import torch
import sae_lens
from sae_lens import SAETrainer
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

synthetic_py, args = sys.argv[1], json.loads(sys.argv[2])
# the file alone: saebench's package is not installed here
spec = importlib.util.spec_from_file_location("planted", synthetic_py)
planted_mod = sys.modules["planted"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(planted_mod)
planted = planted_mod.PlantedFeatures(planted_mod.SyntheticConfig(**args["data"]))
held_out, codes = planted.sample(16_384, torch.Generator().manual_seed(args["seed"] + 99))
torch.manual_seed(args["seed"])
common = dict(d_in=planted.cfg.d, d_sae=args["n_latents"], device="cpu", dtype="float32")
rule = args["rule"]
sae = (
    BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common, k=args["k"])) if rule == "batchtopk"
    else JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        **common, l0_coefficient=args["l0_coefficient"], jumprelu_ste_to_input=args["ste_to_input"]
    ))
    if rule == "jumprelu" else TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=args["k"]))
)
if rule == "jumprelu" and args["threshold"] == "quantile":
    start_at_quantile(sae, planted.sample(args["batch"], torch.Generator().manual_seed(args["seed"] + 7))[0], args["k"])
stream = planted.stream(args["batch"], args["seed"])(0)
cfg = SAETrainerConfig(
    n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
    total_training_samples=args["steps"] * args["batch"],
    device="cpu", autocast=False, lr=args["lr"], lr_end=args["lr"], lr_scheduler_name="constant", lr_warm_up_steps=0,
    adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=args["batch"],
    dead_feature_window=1000, feature_sampling_window=2000,
    logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
)
SAETrainer(cfg=cfg, sae=sae, data_provider=stream).fit()
sae.eval()

def encode(x):  # inference: TopK per token, or BatchTopK's JumpReLU at the learned threshold (SAELens' own conversion)
    if rule == "topk":
        return sae.encode(x)
    if rule == "jumprelu":  # codes of the unit-norm decoder rows below
        return sae.encode(x) * sae.W_dec.norm(dim=-1)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
    return torch.where(pre > sae.topk_threshold, pre, 0)

W_dec = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
row = planted_mod.score_sae(encode, W_dec, planted, held_out, codes)
with torch.no_grad():
    x_hat = encode(held_out) @ W_dec + sae.b_dec
    row["fvu"] = round(float((held_out - x_hat).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()), 4)
print(json.dumps({"tool": f"sae_lens {sae_lens.__version__}", "lr": args["lr"], **row}))
"""


def saelens_sae(
    data: SyntheticConfig,
    rule: str,
    n_latents: int,
    k: int,
    steps: int,
    batch: int,
    seed: int,
    lr: float = 3e-4,
    l0_coefficient: float = 0.0,
    threshold: str = "default",
    ste_to_input: bool = False,
) -> dict:
    """Train and score SAELens' own TopK, BatchTopK or JumpReLU on the same planted stream (in the peers venv).
    threshold: JumpReLU's start, SAELens' "default" (0.01) or saebench's "quantile" rule; ste_to_input: its
    jumprelu_ste_to_input (Anthropic's estimator, saebench's default)."""
    from peers import QUANTILE_START, ensure_peers_venv

    args = {
        "data": asdict(data),
        "rule": rule,
        "n_latents": n_latents,
        "k": k,
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "lr": lr,
        "l0_coefficient": l0_coefficient,
        "threshold": threshold,
        "ste_to_input": ste_to_input,
    }
    synthetic_py = Path(__file__).resolve().parent.parent / "saebench" / "synthetic.py"
    run = subprocess.run(
        [str(ensure_peers_venv()), "-c", QUANTILE_START + SAELENS_SCRIPT, str(synthetic_py), json.dumps(args)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"SAELens run failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _number(value: str) -> bool | int | float | str:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'subspace' -> 'subspace'."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.isdigit():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def parse_spec(spec: str) -> tuple[str, bool, dict, dict]:
    """'topk+matryoshka:enc_init_scale=0.3,k_aux=64' -> (activation, matryoshka, SAEConfig options, \
TrainConfig options)."""
    name, _, sets = spec.partition(":")
    activation, _, variant = name.partition("+")
    options = {key: _number(value) for key, value in (item.split("=") for item in sets.split(",") if item)}
    sae_options = {key: options.pop(key) for key in list(options) if key in SAEConfig.__dataclass_fields__}
    return activation, variant == "matryoshka", sae_options, options


def run(
    data: SyntheticConfig,
    families,
    width: float,
    k_ratio: float,
    steps: int,
    batch: int,
    regime: str,
    seed: int = 0,
    ks: tuple[int, ...] = (),
):
    planted = PlantedFeatures(data)
    n_latents, k = round(width * data.n_true), max(1, round(k_ratio * data.true_l0))
    held_out, codes = planted.sample(
        16_384, torch.Generator().manual_seed(seed + 99)
    )  # iter_synthetic_bench's held-out set
    for family in families:
        t0 = time.perf_counter()
        if family == "random":
            rows = [random_row(planted, n_latents, k, held_out, codes)]
        elif family in ("plain_topk", "plain_batchtopk"):
            encode, W_dec = plain_sae(
                planted, n_latents, k, steps, batch, seed=seed, rule=family.removeprefix("plain_")
            )
            rows = [
                {
                    "activation": family,
                    "matryoshka": False,
                    "n_latents": n_latents,
                    "k": k,
                    **score_sae(encode, W_dec, planted, held_out, codes),
                }
            ]
        elif family.partition(":")[0] in PEER_FAMILIES:
            from peers import l0_search

            name, _, sae_options, options = parse_spec(family)
            rule, lr = name.removeprefix("saelens_"), options.get("lr", 3e-4)
            threshold = str(options.get("threshold", "default"))
            ste = bool(sae_options.get("ste_to_input", False))

            def train(coef: float = 0.0, rule=rule, lr=lr, family=family, threshold=threshold, ste=ste) -> dict:
                start = time.perf_counter()
                row = saelens_sae(data, rule, n_latents, k, steps, batch, seed, lr, coef, threshold, ste)
                head = {"activation": family, "matryoshka": False, "n_latents": n_latents, "k": k}
                return {**head, **row, "seconds": round(time.perf_counter() - start, 1)}

            if rule == "jumprelu":  # it takes an L0 coefficient, not k: a row at each of `tries` toward L0 = k
                var = float((held_out - held_out.mean(0)).pow(2).sum(-1).mean())
                rows = l0_search(train, k, sae_options.get("l0_coef", 0.15) * var / k, int(options.get("tries", 3)))
            else:
                rows = [train()]
        else:
            activation, matryoshka, sae_options, train_options = parse_spec(family)
            lr = train_options.pop("lr", None)
            rows = [
                next(
                    iter_synthetic_bench(
                        (activation,),
                        data,
                        n_latents=n_latents,
                        k=k,
                        n_tokens=steps * batch,
                        batch_size=batch,
                        matryoshka=matryoshka,
                        lr=lr,
                        train_overrides=train_options,
                        sae_overrides=sae_options,
                        seed=seed,
                        ks=ks,
                    )
                )
            ]
        for row in rows:
            row = {
                "regime": regime,
                "family": family,
                "width": width,
                "k_ratio": k_ratio,
                "steps": steps,
                "seed": seed,
                **row,
                "seconds": row.get("seconds", round(time.perf_counter() - t0, 1)),
            }
            print(json.dumps(rounded(row)), flush=True)


def rounded(value):
    """Floats to 4 decimals, inside dicts too (by_k)."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--families",
        nargs="+",
        default=list(FAMILIES),
        help="activation[+matryoshka][:key=value,...] (SAEConfig or TrainConfig keys), random, plain_topk, "
        "plain_batchtopk, saelens_topk / saelens_batchtopk[:lr=...], "
        "or saelens_jumprelu[:lr=...,l0_coef=...,tries=...,threshold=quantile,ste_to_input=true]",
    )
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="n_latents/n_true and k/true_l0 in {0.5, 1, 2}")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (init and stream); the planted features stay"
    )
    ap.add_argument(
        "--cells",
        nargs="+",
        default=None,
        help="width,k_ratio cells instead of the base or the sweep, e.g. 1,1 2,1 1,0.5",
    )
    ap.add_argument("--set", nargs="*", default=[], help="override the base regime, e.g. children=0 correlation=0")
    ap.add_argument(
        "--k-primes", default="", metavar="K1,K2,...", help="also score each per-token SAE at these k' (by_k)"
    )
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(BASE, key))(value)
    data = SyntheticConfig(**{**asdict(BASE), **overrides})
    print(json.dumps({"regime": asdict(data)}), flush=True)
    families = args.families
    cells = [(w, r) for w in (0.5, 1.0, 2.0) for r in (0.5, 1.0, 2.0)] if args.sweep else [(1.0, 1.0)]
    if args.cells:
        cells = [tuple(float(v) for v in cell.split(",")) for cell in args.cells]
    regime = "cells" if args.cells else "sweep" if args.sweep else "base"
    ks = tuple(int(v) for v in args.k_primes.split(",") if v)
    for width, k_ratio in cells:
        for seed in args.seeds:
            run(data, families, width, k_ratio, args.steps, args.batch, regime, seed, ks)


if __name__ == "__main__":
    main()
