"""Text -> packed fixed-length token contexts.

Documents are tokenized without special tokens, joined into one stream with the tokenizer's
separator (EOS, or SEP for BERT-style models) between them, and cut into contexts. With
`prepend_bos` each context starts with BOS (CLS for BERT-style models); encoder models also
end each context with SEP. `special_mask` marks every special-token position, which the
harvester leaves out by default.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.errors import DataError
from saebench.zoo.corpus import iter_documents

LOCAL_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass
class DataConfig:
    """Where text comes from and how it becomes contexts."""

    path: str = "bundled"  # "bundled", a local .txt/.jsonl/.json/.parquet/.csv file or folder, or a hub dataset name
    split: str = "train"  # bundled: train | test | all; hub: any split name
    text_field: str = "text"
    context_size: int = 128
    prepend_bos: bool = True
    max_documents: int | None = None
    shuffle_contexts: bool = True
    seed: int = 0


@dataclass
class TokenContexts:
    """tokens, special_mask: [n_ctx ctx] (int64, bool)."""

    tokens: torch.Tensor
    special_mask: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def iter_texts(cfg: DataConfig) -> Iterator[str]:
    """The documents' texts, in a fixed order."""
    texts = (doc.text for doc in iter_documents(cfg.split)) if cfg.path == "bundled" else _datasets_texts(cfg)
    for i, text in enumerate(texts):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            return
        yield text


def _datasets_texts(cfg: DataConfig) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    path = Path(cfg.path).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files:
            raise DataError(
                f"no .txt/.jsonl/.json/.parquet/.csv files in {path}: point data.path at a file or a folder of them"
            )
        formats = {LOCAL_FORMATS.get(p.suffix) for p in files}
        if None in formats or len(formats) != 1:
            raise DataError(f"{path}: use files of one format among {', '.join(LOCAL_FORMATS)}")
        fmt = formats.pop()
        assert fmt is not None
        ds = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train")
    elif cfg.path.startswith((".", "/", "~")) or Path(cfg.path).suffix in LOCAL_FORMATS:
        raise DataError(f"dataset file not found: {cfg.path} (check data.path, or use 'bundled')")
    else:
        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split, streaming=True)
        except Exception as e:  # the hub raises many kinds; all mean "not available here"
            raise DataError(
                f"dataset {cfg.path!r} is not a local file and could not be loaded from the Hugging Face hub "
                f"({type(e).__name__}); download it where the hub is reachable, or point data.path at local files"
            ) from None
    for row in cast(Iterable[dict], ds):
        if cfg.text_field not in row:
            raise DataError(
                f"dataset rows have no field {cfg.text_field!r} (fields: {', '.join(row)}): set data.text_field"
            )
        yield row[cfg.text_field]


def pack_texts(
    texts: Iterable[str], tokenizer, context_size: int, prepend_bos: bool = True, show_progress: bool = True
) -> TokenContexts:
    """Tokenize and pack documents into contexts: tokens [n_ctx ctx]."""
    bos, sep, eos = special_ids(tokenizer)
    prefix = [bos] if prepend_bos and bos is not None else []
    suffix = [eos] if eos is not None else []
    body = context_size - len(prefix) - len(suffix)
    if body < 1:
        raise DataError(f"context_size {context_size} is too small for the special tokens this model needs")
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [sep], dtype=np.int64))
        batch.clear()

    for text in tqdm(texts, desc="tokenize", unit="doc", disable=not show_progress, leave=False):
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_ctx = len(stream) // body
    if n_ctx == 0:
        raise DataError(f"the dataset holds {len(stream)} tokens, fewer than one context of {context_size}")
    chunks = stream[: n_ctx * body].reshape(n_ctx, body)
    parts = (
        [np.full((n_ctx, 1), t, dtype=np.int64) for t in prefix]
        + [chunks]
        + [np.full((n_ctx, 1), t, dtype=np.int64) for t in suffix]
    )
    tokens = torch.from_numpy(np.concatenate(parts, axis=1))
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)
    return TokenContexts(tokens, torch.isin(tokens, special))


def special_ids(tokenizer) -> tuple[int | None, int, int | None]:
    """(BOS to prepend, separator between documents, EOS to append) for this tokenizer."""
    if tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:  # BERT-style encoder
        return tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.sep_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise DataError("the tokenizer has no BOS/EOS token to separate documents")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else sep
    return bos, sep, None


def load_contexts(cfg: DataConfig, tokenizer, show_progress: bool = True) -> TokenContexts:
    """Documents -> packed contexts, shuffled by cfg.seed when cfg.shuffle_contexts."""
    ctx = pack_texts(iter_texts(cfg), tokenizer, cfg.context_size, cfg.prepend_bos, show_progress)
    if cfg.shuffle_contexts:
        perm = torch.randperm(len(ctx), generator=torch.Generator().manual_seed(cfg.seed))
        ctx = TokenContexts(ctx.tokens[perm], ctx.special_mask[perm])
    return ctx
