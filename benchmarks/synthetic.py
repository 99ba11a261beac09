"""Planted-feature recovery that tells SAE families apart (after SynthSAEBench).

    python benchmarks/synthetic.py                       # the base regime: every family + plain TopK
    python benchmarks/synthetic.py --sweep --steps 1000  # n_latents / n_true and k / true L0 in {0.5, 1, 2}
    python benchmarks/synthetic.py --families topk topk:enc_init_scale=1 topk:lr=1e-3,decay_fraction=0  # trainer options

The base regime: d 64, 768 planted features (5x superposition), true L0 8, Zipf frequencies, a
quarter of the features in parent/3-children trees (children exclusive, only with their parent),
correlated firing in groups of 8 (latent correlation 0.3), lognormal magnitudes (sigma 0.5),
noise 0.02. Every family trains at its defaults on the same stream; the `plain_topk` row is an
independent 25-line TopK (Adam 1e-3 constant, unit-norm tied init, median b_dec, no AuxK, no
clipping), the reference each family should match. One JSON line per (regime, family).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from saebench.synthetic import PlantedFeatures, SyntheticConfig, iter_synthetic_bench, score_sae

BASE = SyntheticConfig(d=64, n_true=768, true_l0=8.0, zipf_exponent=0.5, children=3, tree_fraction=0.5, child_prob=0.5,
                       correlation=0.3, corr_group=8, magnitude="lognormal", magnitude_sigma=0.5, noise_std=0.02, seed=0)
FAMILIES = ("topk", "abstopk", "batchtopk", "mutual_choice", "feature_choice", "topk+matryoshka", "batchtopk+matryoshka", "plain_topk")


def plain_topk(planted: PlantedFeatures, n_latents: int, k: int, steps: int, batch: int, lr: float = 1e-3, seed: int = 0):
    """The reference: a TopK SAE with nothing but Adam. -> (encode, W_dec [n d])."""
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

    def encode(x):
        top = ((x - b_dec) @ W_enc + b_enc).topk(k, dim=-1)
        return torch.zeros(len(x), n_latents).scatter(-1, top.indices, top.values.relu())

    for _, x in zip(range(steps), stream):
        loss = (encode(x) @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return encode, W_dec.detach()


def run(data: SyntheticConfig, families, width: float, k_ratio: float, steps: int, batch: int, regime: str):
    planted = PlantedFeatures(data)
    n_latents, k = round(width * data.n_true), max(1, round(k_ratio * data.true_l0))
    held_out, codes = planted.sample(16_384, torch.Generator().manual_seed(99))
    for family in families:
        t0 = time.perf_counter()
        if family == "plain_topk":
            encode, W_dec = plain_topk(planted, n_latents, k, steps, batch)
            row = {"activation": "plain_topk", "matryoshka": False, "n_latents": n_latents, "k": k,
                   **score_sae(encode, W_dec, planted, held_out, codes)}
        else:  # activation[+matryoshka][:train_key=value,...]
            name, _, sets = family.partition(":")
            activation, _, variant = name.partition("+")
            overrides = {key: int(value) if value.isdigit() else float(value) for key, value in (item.split("=") for item in sets.split(",") if item)}
            lr = overrides.pop("lr", None)
            row = next(iter_synthetic_bench((activation,), data, n_latents=n_latents, k=k, n_tokens=steps * batch, batch_size=batch,
                                            matryoshka=variant == "matryoshka", lr=lr, train_overrides=overrides))
        row = {"regime": regime, "family": family, "width": width, "k_ratio": k_ratio, "steps": steps, **row,
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), help="activation[+matryoshka][:train_key=value,...] or plain_topk")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="n_latents/n_true and k/true_l0 in {0.5, 1, 2}")
    ap.add_argument("--set", nargs="*", default=[], help="override the base regime, e.g. children=0 correlation=0")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(BASE, key))(value)
    data = SyntheticConfig(**{**asdict(BASE), **overrides})
    print(json.dumps({"regime": asdict(data)}), flush=True)
    families = args.families
    cells = [(w, r) for w in (0.5, 1.0, 2.0) for r in (0.5, 1.0, 2.0)] if args.sweep else [(1.0, 1.0)]
    for width, k_ratio in cells:
        run(data, families, width, k_ratio, args.steps, args.batch, "sweep" if args.sweep else "base")


if __name__ == "__main__":
    main()
