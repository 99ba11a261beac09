"""SAELens on-disk format: cfg.json + sae_weights.safetensors, both ways.

saebench -> SAELens: topk -> "topk"; batchtopk / mutual_choice / feature_choice -> "jumprelu"
(their inference rule is ReLU(pre) where pre > threshold); matryoshka keeps its latent order.
abstopk has no SAELens architecture. SAELens -> saebench: "topk" and "jumprelu"
(apply_b_dec_to_input either way; normalize_activations must be "none").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from saebench.errors import DataError
from saebench.sae import SAE, SAEConfig
from saebench.atomic import atomic_save_file, atomic_write_text

WEIGHTS = "sae_weights.safetensors"


def is_saelens_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "cfg.json").exists() and (folder / WEIGHTS).exists()


def save_saelens(sae: SAE, folder: str | Path) -> None:
    cfg = sae.cfg
    if cfg.activation == "abstopk":
        raise DataError("SAELens has no AbsTopK architecture; keep this SAE in saebench's format (sae.save)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = "topk" if cfg.activation == "topk" else "jumprelu"
    meta = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": cfg.model, "hook_name": cfg.hook, "saebench_activation": cfg.activation,
                     "saebench_k": cfg.k, "saebench_matryoshka": cfg.matryoshka},
    }
    if arch == "topk":
        meta.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    tensors = {k: v.detach().float().contiguous() for k, v in sae.named_parameters()}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().float().contiguous()
    atomic_save_file(tensors, folder / WEIGHTS)
    atomic_write_text(folder / "cfg.json", json.dumps(meta, indent=1) + "\n")


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    folder = Path(folder)
    meta = json.loads((folder / "cfg.json").read_text())
    arch = meta.get("architecture", "standard")
    if arch not in ("topk", "jumprelu"):
        raise DataError(f"{folder}: SAELens architecture {arch!r} is not supported (topk and jumprelu are)")
    if meta.get("normalize_activations", "none") != "none":
        raise DataError(f"{folder}: normalize_activations={meta['normalize_activations']!r} is not supported; fold it into the weights first")
    extra = meta.get("metadata") or {}
    activation = extra.get("saebench_activation") or ("topk" if arch == "topk" else "batchtopk")
    k = meta.get("k") or extra.get("saebench_k") or 32
    cfg = SAEConfig(
        d_in=meta["d_in"], n_latents=meta["d_sae"], activation=activation, k=min(k, meta["d_sae"]),
        matryoshka=extra.get("saebench_matryoshka"), hook=extra.get("hook_name", meta.get("hook_name")),
        model=extra.get("model_name", meta.get("model_name")),
    )
    w = load_file(str(folder / WEIGHTS))
    sae = SAE(cfg, device=device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name].float())
        if not meta.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
            sae.b_enc += sae.b_dec @ sae.W_enc
        if arch == "jumprelu":
            sae.threshold.copy_(w["threshold"].float())
    return sae.eval()
