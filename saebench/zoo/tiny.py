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
from saebench.errors import ConfigError
from saebench.models import TINY_DIR
from saebench.zoo.tokenizer import token_byte_lengths, train_bpe


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
    train_tokens: int = 28_000_000
    # The induction circuit (issue 11; docs/benchmarks.md "An induction head"): a copy task on random
    # tokens ends the plateau and forms the circuit, then text takes most of each batch.
    repeat_share: float = 0.25  # text contexts given a repeated span, so induction pays off on text too
    random_span_share: float = 0.5  # of those, spans of uniform random tokens (the rest copy the text's own span)
    span_len: tuple[int, int] = (8, 48)
    copy_task_warm_steps: int = 500  # first steps: the copy task draws from a small vocabulary
    copy_task_warm_vocab: int = 64
    copy_task_steps: int = (
        6_835  # before this step (the whole default run), copy_task_share of each batch is the copy task
    )
    copy_task_vocab: int = 4096
    copy_task_grow_every: int = (
        100  # > 0: after the warm-up the copy vocabulary doubles every this many steps, up to copy_task_vocab
    )
    copy_task_share: float = 0.125
    copy_task_solo_steps: int = (
        1_100  # the whole batch is the copy task before this step too (at least through the warm-up)
    )
    # "tiled": [BOS r r r ...]; "chunked": [BOS a a b b ...], spans of random lengths;
    # "scattered": random tokens with one span repeated later
    copy_task_layout: str = "tiled"
    sinusoidal_positions: bool = True  # initialise the learned position embeddings as sinusoids
    init_std: float = (
        0.06  # normal init of the weights; GPT-2's 0.02 leaves the copy task on its plateau for > 1000 steps
    )
    max_minutes: float | None = None  # stop early at this wall time; the schedule still ends at train_tokens
    seed: int = 0
    threads: int | None = None

    def __post_init__(self):
        if self.copy_task_layout not in COPY_TASK_LAYOUTS:
            raise ConfigError(
                f"tiny.copy_task_layout: '{self.copy_task_layout}' is not one of {', '.join(COPY_TASK_LAYOUTS)}"
            )


def _gpt2_config(cfg: TinyConfig, tokenizer):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.context_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
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


def sinusoids(n_pos: int, d: int) -> torch.Tensor:
    """[n_pos d] sin/cos pairs at geometric frequencies (Vaswani et al.), each pair of unit norm:
    position p - 1 is a fixed rotation of position p, so a previous-token head is one linear map away."""
    freqs = 10_000 ** (-torch.arange(0, d, 2) / d)
    angles = torch.arange(n_pos)[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n_pos, d)


def with_repeated_spans(
    batch: torch.Tensor, cfg: TinyConfig, gen: torch.Generator, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a span of some contexts to a later place in the same context: tokens, labels [batch ctx].

    A random span's first copy, and each copy's first token, are unpredictable, so their labels are
    -100 (not trained on); the rest of the second copy is predictable only by induction.
    """
    tokens, labels = batch.clone(), batch.clone()
    ctx = tokens.shape[1]
    lo, hi = cfg.span_len
    for row in range(len(tokens)):
        if float(torch.rand((), generator=gen)) >= cfg.repeat_share:
            continue
        n = int(torch.randint(lo, min(hi, (ctx - 2) // 2) + 1, (), generator=gen))
        a = int(torch.randint(1, ctx - 2 * n + 1, (), generator=gen))
        b = int(torch.randint(a + n, ctx - n + 1, (), generator=gen))
        if float(torch.rand((), generator=gen)) < cfg.random_span_share:
            tokens[row, a : a + n] = torch.randint(1, vocab_size, (n,), generator=gen)
            labels[row, a : a + n] = -100
        tokens[row, b : b + n] = tokens[row, a : a + n]
        labels[row, b : b + n] = tokens[row, a : a + n]
        labels[row, b] = -100
    return tokens, labels


def repeated_random_contexts(
    n: int, cfg: TinyConfig, gen: torch.Generator, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS r r r ...] with r a span of uniform random tokens, tiled to the context: tokens, labels [n ctx]."""
    ctx = cfg.context_size
    tokens = torch.zeros(n, ctx, dtype=torch.long)
    labels = torch.full((n, ctx), -100)
    lo, hi = cfg.span_len
    for row in range(n):
        span = int(torch.randint(lo, hi + 1, (), generator=gen))
        r = torch.randint(1, vocab_size, (span,), generator=gen)
        tokens[row, 1:] = r.repeat(ctx // span + 1)[: ctx - 1]
        labels[row, 1 + span + 1 :] = tokens[row, 1 + span + 1 :]
    return tokens, labels


def scattered_copy_contexts(
    n: int, cfg: TinyConfig, gen: torch.Generator, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random tokens after BOS, one span copied to a random later place: tokens, labels [n ctx].

    Only the copy's tokens after its first are labelled: the offset differs per row, so no fixed
    relative position predicts them, only a lookup of where the current token occurred before.
    """
    ctx = cfg.context_size
    tokens = torch.randint(1, vocab_size, (n, ctx), generator=gen)
    tokens[:, 0] = 0
    labels = torch.full((n, ctx), -100)
    lo, hi = cfg.span_len
    for row in range(n):
        span = int(torch.randint(lo, min(hi, (ctx - 1) // 2) + 1, (), generator=gen))
        a = int(torch.randint(1, ctx - 2 * span + 1, (), generator=gen))
        b = int(torch.randint(a + span, ctx - span + 1, (), generator=gen))
        tokens[row, b : b + span] = tokens[row, a : a + span]
        labels[row, b + 1 : b + span] = tokens[row, b + 1 : b + span]
    return tokens, labels


def chunked_copy_contexts(
    n: int, cfg: TinyConfig, gen: torch.Generator, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[BOS a a b b c c ...], each of a, b, c... uniform random tokens of its own length: tokens, labels [n ctx].

    The distance back to a token's first occurrence changes from chunk to chunk, so no head at a
    fixed distance predicts the second copies; each copy's first token is unpredictable and unlabelled.
    """
    ctx = cfg.context_size
    tokens = torch.zeros(n, ctx, dtype=torch.long)
    labels = torch.full((n, ctx), -100)
    lo, hi = cfg.span_len
    for row in range(n):
        pos = 1
        while pos < ctx:
            span = int(torch.randint(lo, hi + 1, (), generator=gen))
            r = torch.randint(1, vocab_size, (span,), generator=gen)
            chunk = torch.cat([r, r])[: ctx - pos]
            tokens[row, pos : pos + len(chunk)] = chunk
            labels[row, pos + span + 1 : pos + len(chunk)] = chunk[span + 1 :]
            pos += len(chunk)
    return tokens, labels


@torch.no_grad()
def induction_report(model, vocab_size: int, bos: int, n_seq: int = 64, span: int = 40, seed: int = 0) -> dict:
    """circuits.induction_summary for the Hugging Face model, rounded for the model card."""
    from saebench.circuits import induction_summary, repeated_random_tokens

    tokens = repeated_random_tokens(n_seq, span, vocab_size, bos, seed)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the fused kernels return no attention weights
    out = model(tokens, output_attentions=True)
    model.set_attn_implementation(previous)
    summary = induction_summary(list(out.attentions), out.logits, tokens, span)
    return {
        "induction_scores": [[round(float(x), 3) for x in row] for row in summary["induction"]],
        "loss_first_copy": round(summary["loss_first_copy"], 3),
        "loss_second_copy": round(summary["loss_second_copy"], 3),
    }


COPY_TASK_LAYOUTS = {
    "tiled": repeated_random_contexts,
    "chunked": chunked_copy_contexts,
    "scattered": scattered_copy_contexts,
}


def copy_task_rows_at(step: int, cfg: TinyConfig) -> tuple[int, int]:
    """How many of the batch's rows are the copy task at this step, and the ids they draw from."""
    if step >= cfg.copy_task_steps:
        return 0, 0
    solo = step < max(cfg.copy_task_warm_steps, cfg.copy_task_solo_steps)
    return (cfg.batch_size if solo else round(cfg.copy_task_share * cfg.batch_size)), copy_task_vocab_at(step, cfg)


def copy_task_vocab_at(step: int, cfg: TinyConfig) -> int:
    if step < cfg.copy_task_warm_steps:
        return cfg.copy_task_warm_vocab
    if cfg.copy_task_grow_every <= 0:
        return cfg.copy_task_vocab
    doublings = (step - cfg.copy_task_warm_steps) // cfg.copy_task_grow_every + 1
    return min(cfg.copy_task_vocab, cfg.copy_task_warm_vocab * 2**doublings)


def _lr_at(step: int, total: int, cfg: TinyConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_tiny(out_dir: Path = TINY_DIR, cfg: TinyConfig | None = None) -> dict:
    from transformers import GPT2LMHeadModel

    cfg = cfg or TinyConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    tokenizer = train_bpe(iter_texts(DataConfig(split="train")), cfg.vocab_size)
    bos = tokenizer.bos_token_id
    assert isinstance(bos, int)
    train = pack_texts(iter_texts(DataConfig(split="train")), tokenizer, cfg.context_size).tokens
    test = pack_texts(iter_texts(DataConfig(split="test")), tokenizer, cfg.context_size).tokens
    byte_lengths = torch.tensor(token_byte_lengths(tokenizer))
    model = GPT2LMHeadModel(_gpt2_config(cfg, tokenizer))
    if cfg.sinusoidal_positions:
        with torch.no_grad():
            wpe = model.transformer.wpe.weight
            wpe.copy_(
                sinusoids(*wpe.shape) * model.transformer.wte.weight.norm(dim=-1).mean() / math.sqrt(wpe.shape[1] / 2)
            )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
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
        batch, labels = with_repeated_spans(train[idx], cfg, gen, len(tokenizer))
        n_copy, vocab = copy_task_rows_at(step, cfg)
        if n_copy:
            batch[:n_copy], labels[:n_copy] = COPY_TASK_LAYOUTS[cfg.copy_task_layout](
                n_copy, cfg, gen, min(vocab, len(tokenizer))
            )
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total_steps, cfg)
        loss = model(batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = float(loss) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss)
        if step % 100 == 0:
            induction = max(
                max(row) for row in induction_report(model, len(tokenizer), bos, n_seq=16)["induction_scores"]
            )
        bar.set_postfix(loss=f"{loss_ema:.3f}", induction=f"{induction:.2f}")
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
        **induction_report(model, len(tokenizer), bos),
        "final_train_loss_ema": round(loss_ema or float("nan"), 4),
        "minutes": round((time.time() - started) / 60, 2),
        "torch": torch.__version__,
    }
    _write_folder(out_dir, model, tokenizer, card, _samples(model, tokenizer))
    return card


@torch.no_grad()
def _samples(model, tokenizer, prompts=("In the beginning", "def main(", "A hacker is"), n_new: int = 48) -> list[str]:
    torch.manual_seed(0)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        gen = model.generate(
            ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=40, pad_token_id=tokenizer.pad_token_id
        )
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
    (tmp / "generation_config.json").unlink(missing_ok=True)
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _induction_recipe_lines(c: dict) -> list[str]:
    lines = []
    if c["copy_task_steps"] > 0:
        layout = {
            "tiled": "[BOS r r r ...]",
            "chunked": "[BOS a a b b ...]",
            "scattered": "random tokens with one span repeated later",
        }
        lo, hi = c["span_len"]
        solo = max(c["copy_task_warm_steps"], c.get("copy_task_solo_steps", 0))
        vocab = f"ids below {c['copy_task_warm_vocab']} for the first {c['copy_task_warm_steps']:,} steps"
        vocab += (
            f", then twice as many every {c['copy_task_grow_every']} steps up to {c['copy_task_vocab']}"
            if c["copy_task_grow_every"] > 0
            else f", then ids below {c['copy_task_vocab']}"
        )
        lines += [
            f"A copy task ({layout[c.get('copy_task_layout', 'tiled')]}, spans of {lo}-{hi} uniform random tokens, "
            "loss on the repeats only;",
            f"{vocab}) takes the whole batch for the first {solo:,} steps, then {c['copy_task_share']:.0%} of it",
            f"until step {c['copy_task_steps']:,}; the rest is text.",
        ]
    if c["repeat_share"] > 0:
        lines += [
            f"{c['repeat_share']:.0%} of the text contexts get a span copied later into the same context "
            f"({c['random_span_share']:.0%} of those",
            "spans replaced by random tokens first, whose first copy is not trained on).",
        ]
    return lines


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
        f"({card['train_tokens_seen']:,} tokens), lr {c['lr']} with warmup and cosine decay, "
        f"{card['minutes']} CPU minutes.",
        f"Weights start at normal({c['init_std']}); position embeddings as sinusoids: {c['sinusoidal_positions']}.",
        *_induction_recipe_lines(c),
        "",
        "## Result",
        f"Held-out bits per byte: **{card['heldout_bits_per_byte']}** "
        "(next-token NLL in bits over the UTF-8 bytes of the",
        "predicted tokens, whole test split).",
        "",
        "Induction, on 64 sequences [BOS r r] with r 40 uniform random tokens: mean attention from each",
        "second-copy token to the token after its first occurrence, per head (rows: layers):",
        "",
        *[f"    layer {i}: " + "  ".join(f"{x:.3f}" for x in row) for i, row in enumerate(card["induction_scores"])],
        "",
        f"Loss on the first copy {card['loss_first_copy']} nats, on the second {card['loss_second_copy']} nats.",
        "",
        "## Samples (temperature 0.8, top-k 40)",
    ]
    for s in samples:
        lines += ["", "```", s, "```"]
    return "\n".join(lines) + "\n"
