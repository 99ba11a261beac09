"""The recipe for the bundled `tiny` causal LM: `saebench zoo train-tiny`.

A GPT-2-architecture model (Hugging Face `GPT2LMHeadModel`, so transformer-lens's Bridge
hooks it like any hub model) trained from scratch on the bundled corpus's train split.
Writes a Hugging Face folder: config.json, model.safetensors, tokenizer files, MODEL_CARD.md.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saebench.data import DataConfig, iter_texts, pack_texts
from saebench.zoo.tokenizer import token_byte_lengths, train_bpe

TINY_DIR = Path(__file__).parent / "tiny"


@dataclass
class TinyConfig:
    vocab_size: int = 4096
    n_layer: int = 2
    n_embd: int = 192
    n_head: int = 6
    context_size: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    train_tokens: int = 16_000_000
    max_minutes: float | None = None  # stop early at this wall time; the schedule still ends at train_tokens
    seed: int = 0
    threads: int | None = None


def _gpt2_config(cfg: TinyConfig, tokenizer):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.context_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=4 * cfg.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )


@torch.no_grad()
def bits_per_byte(model, tokens: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int = 64) -> float:
    """Sum of next-token NLL (bits) / UTF-8 bytes of the predicted tokens; tokens: [n_ctx ctx]."""
    model.eval()
    total_nats, total_bytes = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i : i + batch_size]
        logits = model(batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        nbytes = byte_lengths[batch[:, 1:].reshape(-1)]
        total_nats += float((nll * (nbytes > 0)).sum())
        total_bytes += int(nbytes.sum())
    return total_nats / math.log(2) / total_bytes


def _lr_at(step: int, total: int, cfg: TinyConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_tiny(out_dir: Path = TINY_DIR, cfg: TinyConfig = TinyConfig()) -> dict:
    from transformers import GPT2LMHeadModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    tokenizer = train_bpe(iter_texts(DataConfig(split="train")), cfg.vocab_size)
    train = pack_texts(iter_texts(DataConfig(split="train")), tokenizer, cfg.context_size).tokens
    test = pack_texts(iter_texts(DataConfig(split="test")), tokenizer, cfg.context_size).tokens
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer))
    model = GPT2LMHeadModel(_gpt2_config(cfg, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    total_steps = cfg.train_tokens // (cfg.batch_size * cfg.context_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=gen)
    bar = tqdm(range(total_steps), desc="train tiny", unit="step")
    steps_done, loss_ema = 0, None
    model.train()
    for step in bar:
        if cfg.max_minutes is not None and time.time() - started > 60 * cfg.max_minutes:
            break
        idx = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(order)]
        batch = train[idx]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total_steps, cfg)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = float(loss) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss)
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        steps_done = step + 1
    model.eval()
    bpb = bits_per_byte(model, test, byte_lengths)
    card = {
        "config": asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": steps_done,
        "train_tokens_seen": steps_done * cfg.batch_size * cfg.context_size,
        "train_split_tokens": train.numel(),
        "test_split_tokens": test.numel(),
        "heldout_bits_per_byte": round(bpb, 4),
        "final_train_loss_ema": round(loss_ema or float("nan"), 4),
        "minutes": round((time.time() - started) / 60, 2),
        "torch": torch.__version__,
    }
    samples = _samples(model, tokenizer)
    _write_folder(out_dir, model, tokenizer, card, samples)
    return card


@torch.no_grad()
def _samples(model, tokenizer, prompts=("In the beginning", "def main(", "A hacker is"), n_new: int = 48) -> list[str]:
    torch.manual_seed(0)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        gen = model.generate(ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=40, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, 1:]))
    return out


def _write_folder(out_dir: Path, model, tokenizer, card: dict, samples: list[str]) -> None:
    """Write next to out_dir, then swap in, so a crash never leaves a half-written model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tiny-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "MODEL_CARD.md").write_text(_model_card(card, samples))
    for stray in ("generation_config.json",):
        (tmp / stray).unlink(missing_ok=True)
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _model_card(card: dict, samples: list[str]) -> str:
    c = card["config"]
    lines = [
        "# tiny: saebench's bundled causal LM",
        "",
        f"GPT-2 architecture, {c['n_layer']} layers, d_model {c['n_embd']}, {c['n_head']} heads, "
        f"d_mlp {4 * c['n_embd']}, context {c['context_size']}, vocab {c['vocab_size']} (byte-level BPE), "
        f"{card['n_params']:,} parameters, tied embeddings, trained from scratch by `saebench zoo train-tiny`.",
        "",
        "## Data",
        "The bundled corpus (saebench/zoo/corpus.py): the King James Bible (Debian bible-kjv, one document per",
        "chapter), fortunes (Debian fortunes), the Jargon File (Debian jargon-text, one document per entry) and",
        "the Python standard library's source (one document per file, tests left out). A document is held out",
        "when the SHA-1 of its id falls in the lowest 5%; the held-out (`test`) split is never trained on.",
        f"Train split: {card['train_split_tokens']:,} tokens; test split: {card['test_split_tokens']:,} tokens.",
        "",
        "## Training",
        f"{card['steps']:,} AdamW steps of {c['batch_size']} x {c['context_size']} tokens "
        f"({card['train_tokens_seen']:,} tokens), lr {c['lr']} with warmup and cosine decay, {card['minutes']} CPU minutes.",
        "",
        "## Result",
        f"Held-out bits per byte: **{card['heldout_bits_per_byte']}** (next-token NLL in bits over the UTF-8 bytes of the",
        "predicted tokens, whole test split).",
        "",
        "## Samples (temperature 0.8, top-k 40)",
    ]
    for s in samples:
        lines += ["", "```", s, "```"]
    return "\n".join(lines) + "\n"
