"""SAELens on-disk format: cfg.json + sae_weights.safetensors, both ways (verified against SAELens 6.54.12).

saebench -> SAELens: topk and gradient_topk -> "topk" (SAELens passes no gradients: plain TopK);
jumprelu / batchtopk / mutual_choice / feature_choice -> "jumprelu" (their inference rule is ReLU(pre) where
pre > threshold); matryoshka keeps its latent order.
abstopk and transcoders are refused (saebench does not export them). The cfg carries sae_lens_version, so
SAELens 6 reads it as a 6.x config (hook_name and model_name in `metadata`), and model_from_pretrained_kwargs
{"center_writing_weights": False}: SAELens loads the model with from_pretrained_no_processing(**kwargs),
which gives the unprocessed activations saebench trains on. hook_z SAEs get reshape_activations "hook_z":
SAELens takes [... n_heads d_head] and flattens it as saebench's harvest does ([... (n_heads d_head)]).

SAELens -> saebench: "topk" and "jumprelu" (apply_b_dec_to_input either way; normalize_activations must
be "none"). A "jumprelu" folder is the jumprelu family (its threshold as given; a trained log-threshold of
log(max(threshold, 1e-30))), the batchtopk family when SAELens saved a BatchTopK for inference
(metadata training_architecture), or the family in saebench_activation of a folder saebench wrote.
TopK's rescale_acts_by_decoder_norm is folded into the weights (encode and decode unchanged);
reshape_activations "hook_z" is accepted (saebench's hook_z activations are already flattened);
hook_head_index (an SAE on one head) is refused. model_from_pretrained_kwargs that process the model
(fold_ln, center_writing_weights, ...) are reported on stderr and in sae.meta["note"]: saebench runs the
unprocessed model, so the SAE's activations may differ from the ones it was trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from saebench.atomic import atomic_save_file, atomic_write_text
from saebench.errors import DataError
from saebench.readers import read_json, read_safetensors
from saebench.sae import SAE, SAEConfig

WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the SAELens version these files are verified against
# from_pretrained kwargs that change hook activations relative to an unprocessed model
PROCESSING_KWARGS = ("fold_ln", "center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices")


def is_saelens_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "cfg.json").exists() and (folder / WEIGHTS).exists()


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """An SAE folder in either format: saebench's (cfg.json + sae.safetensors) or SAELens' (sae_weights.safetensors)."""
    folder = Path(folder)
    if is_saelens_folder(folder) and not (folder / "sae.safetensors").exists():
        return load_saelens(folder, device)
    if not (folder / "cfg.json").exists() or not (folder / "sae.safetensors").exists():
        raise DataError(f"no SAE at {folder} (needs cfg.json and sae.safetensors, or SAELens' {WEIGHTS})")
    return SAE.load(folder, device)


def save_saelens(sae: SAE, folder: str | Path) -> None:
    cfg = sae.cfg
    if cfg.family.signed or cfg.transcoder:
        what = f"{cfg.kind}s" if cfg.transcoder else f"AbsTopK SAEs or other signed families ({cfg.activation})"
        raise DataError(f"saebench does not export {what} to SAELens; keep this SAE in saebench's format (sae.save)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = "jumprelu" if cfg.family.threshold else "topk"
    hook_z = bool(cfg.hook and cfg.hook.endswith("hook_z"))
    meta: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook_z else "none",
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": cfg.model,
            "hook_name": cfg.hook,
            "hook_head_index": None,
            "model_from_pretrained_kwargs": {"center_writing_weights": False},
            "saebench_activation": cfg.activation,
            "saebench_k": cfg.k,
            "saebench_matryoshka": cfg.matryoshka,
            "saebench_gradient_beta": cfg.gradient_beta,
        },
    }
    if arch == "topk":
        meta.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    tensors = {k: v.float() for k, v in sae.state_tensors().items()}
    atomic_save_file(tensors, folder / WEIGHTS)
    atomic_write_text(folder / "cfg.json", json.dumps(meta, indent=1) + "\n")


def _field(meta: dict, key: str, *old: str) -> Any:
    """A 6.x metadata field, else the top-level (pre-6.0) key or its old names."""
    extra = meta.get("metadata") or {}
    for d, k in [(extra, key), (meta, key), *((meta, o) for o in old)]:
        if d.get(k) is not None:
            return d[k]
    return None


def processing_note(meta: dict, hook: str | None) -> str | None:
    """One line when model_from_pretrained_kwargs process the model (SAELens loads with
    from_pretrained_no_processing(**kwargs))."""
    kwargs = _field(meta, "model_from_pretrained_kwargs") or {}
    on = [k for k in PROCESSING_KWARGS if kwargs.get(k)]
    if not on:
        return None
    return (
        f"SAELens model_from_pretrained_kwargs {', '.join(f'{k}=True' for k in on)}: "
        "the SAE was trained on a processed HookedTransformer, saebench runs the unprocessed model, "
        f"so activations at {hook} may differ; check its reconstruction"
    )


def load_saelens(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    folder = Path(folder)
    meta = read_json(folder / "cfg.json", "copy the SAELens folder again")
    arch = meta.get("architecture", "standard")
    if arch not in ("topk", "jumprelu"):
        raise DataError(f"{folder}: SAELens architecture {arch!r} is not supported (topk and jumprelu are)")
    if meta.get("normalize_activations", "none") not in ("none", False, None):
        raise DataError(
            f"{folder}: normalize_activations={meta['normalize_activations']!r} is not supported; "
            "fold it into the weights first"
        )
    if meta.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise DataError(
            f"{folder}: reshape_activations={meta['reshape_activations']!r} is not supported (none and hook_z are)"
        )
    hook = _field(meta, "hook_name", "hook_point")
    head = _field(meta, "hook_head_index", "hook_point_head_index")
    if head is not None:
        raise DataError(
            f"{folder}: hook_head_index={head} (an SAE on one attention head) is not supported; "
            f"saebench feeds all heads of {hook} flattened, so use an SAE trained on all heads"
        )
    extra = meta.get("metadata") or {}
    batchtopk = "batchtopk" in (extra.get("training_architecture") or "")  # SAELens saves BatchTopK as JumpReLU
    activation = extra.get("saebench_activation") or ("topk" if arch == "topk" else "batchtopk" if batchtopk else arch)
    details = extra.get("training_architecture_details") or {}
    k = meta.get("k") or extra.get("saebench_k") or details.get("k") or details.get("target_l0") or 32
    cfg = SAEConfig(
        d_in=meta["d_in"],
        n_latents=meta["d_sae"],
        activation=activation,
        k=max(1, min(round(k), meta["d_sae"])),
        matryoshka=extra.get("saebench_matryoshka"),
        gradient_beta=extra.get("saebench_gradient_beta", SAEConfig.gradient_beta),
        hook=hook,
        model=_field(meta, "model_name"),
    )
    w = read_safetensors(folder / WEIGHTS, "cpu", "copy the SAELens folder again")
    sae = SAE(cfg, device=device)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name].float())
        if not meta.get(
            "apply_b_dec_to_input", True
        ):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
            sae.b_enc += sae.b_dec @ sae.W_enc
        if arch == "topk" and meta.get("rescale_acts_by_decoder_norm"):
            # SAELens: z = topk(pre * n), x_hat = (z / n) W_dec + b_dec, n = |W_dec rows|; exactly
            # z = topk(pre'), x_hat = z W_dec' + b_dec with W_enc' = W_enc n, b_enc' = b_enc n, W_dec' = W_dec / n.
            n = sae.W_dec.norm(dim=-1).clamp_min(1e-8)
            sae.W_enc *= n  # pyright: ignore[reportAttributeAccessIssue]
            sae.b_enc *= n
            sae.W_dec /= n[:, None]
        if arch == "jumprelu":
            sae.set_threshold(w["threshold"].float())
    sae.meta = dict(meta)
    if note := processing_note(meta, hook):
        sae.meta["note"] = note
        print(f"saebench: {folder}: {note}", file=sys.stderr)
    return sae.eval()
