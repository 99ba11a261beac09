"""Labelled probing tasks from the bundled corpus, and their activations and mean-pooled features.

A task's samples each mean-pool a context's activations over a mask of positions (SAEBench's convention:
BOS, EOS and separators left out); a token-level sample's mask keeps one position. Each class is probed
one-vs-rest on samples balanced as SAEBench's `prepare_probe_data` balances them.
- source: which corpus source (bible, fortunes, jargon, python) a context comes from. Each source's
  documents are packed into contexts of their own, and a sample pools all of a context's tokens.
- code (tokens of the python source, by Python's `tokenize`): keyword, identifier, string, comment.
- text (tokens of bible, fortunes, jargon): capitalised (a word [A-Z][a-z]+), digit (a run of 0-9), verse_start
  (a bible verse's first word: the corpus strips the verse numbers, so a verse's start is what is left of them).
A BPE token has a class when its characters, leading whitespace aside, all lie in one span of that class
(and for capitalised and verse_start, it begins the span); where spans overlap the later class in these
lists wins.
"""

from __future__ import annotations

import io
import keyword
import math
import re
import tokenize
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from saebench.data import special_ids
from saebench.errors import DataError
from saebench.evals.settings import ProbingSettings
from saebench.harvest import Harvester
from saebench.zoo.corpus import SOURCES, iter_documents

CODE_CLASSES = ("keyword", "identifier", "string", "comment")
TEXT_CLASSES = ("capitalised", "digit", "verse_start")
TEXT_PATTERNS = (r"\b[A-Z][a-z]+\b", r"[0-9]+", r"(?m)^\w+")
FROM_START = (0, 2)  # a capitalised or verse_start token begins its word


@dataclass
class ProbeTask:
    """Labelled samples. tokens, mask: [n ctx] (mask: the positions a sample mean-pools); labels: [n], an index
    into classes; train: [n] bool, the probes' train split (the rest is their test split)."""

    name: str
    classes: list[str]
    tokens: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    train: torch.Tensor


Span = tuple[int, int, int]  # a document's characters [start, end) of one class


def python_spans(text: str) -> list[Span]:
    """The CODE_CLASSES spans of Python source, by Python's tokenize."""
    starts = np.cumsum([0] + [len(line) + 1 for line in text.split("\n")])
    spans = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NAME:
                cls = "keyword" if keyword.iskeyword(tok.string) else "identifier"
            elif tok.type in (tokenize.STRING, tokenize.COMMENT):
                cls = "string" if tok.type == tokenize.STRING else "comment"
            else:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            spans.append((int(starts[r0 - 1]) + c0, int(starts[r1 - 1]) + c1, CODE_CLASSES.index(cls)))
    except (tokenize.TokenError, SyntaxError):
        pass  # a file tokenize cannot finish keeps the spans read before the error
    return spans


def text_spans(text: str, verses: bool = False) -> list[Span]:
    """The TEXT_CLASSES spans of prose (verse_start only where `verses`: each line is a verse)."""
    patterns = TEXT_PATTERNS[: 3 if verses else 2]
    return [(m.start(), m.end(), c) for c, pattern in enumerate(patterns) for m in re.finditer(pattern, text)]


def token_classes(text: str, spans: list[Span], offsets: list[tuple[int, int]], from_start: tuple = ()) -> list[int]:
    """Each token's class: that of the one span holding all its characters (leading whitespace aside; later
    spans paint over earlier ones), else -1; a class in from_start also needs the token to begin the span."""
    owner = np.full(len(text), -1)
    for i, (a, b, _) in enumerate(spans):
        owner[a:b] = i
    out = []
    for a, b in offsets:
        while a < b and text[a].isspace():
            a += 1
        ids = owner[a:b]
        span = spans[ids[0]] if len(ids) and ids[0] >= 0 and (ids == ids[0]).all() else None
        out.append(-1 if span is None or (span[2] in from_start and span[0] != a) else span[2])
    return out


def labelled_contexts(
    texts: list[str], spans: list[list[Span]], tokenizer, context_size: int, from_start: tuple = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents packed as data.pack_texts packs them (BOS first, a separator between documents), with each
    token's class: (tokens, classes) [n ctx]; special positions have class -1."""
    bos, sep, eos = special_ids(tokenizer)
    prefix, suffix = [t for t in (bos,) if t is not None], [t for t in (eos,) if t is not None]
    body = context_size - len(prefix) - len(suffix)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    classes: list[int] = []
    for text, sp, tok, offsets in zip(texts, spans, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids += [*tok, sep]
        classes += [*token_classes(text, sp, offsets, from_start), -1]
    n = len(ids) // body

    def pack(x: list[int], before: list[int], after: list[int]) -> torch.Tensor:
        rows = [before + x[i * body : (i + 1) * body] + after for i in range(n)]
        return torch.tensor(rows, dtype=torch.long).reshape(n, context_size)

    return pack(ids, prefix, suffix), pack(classes, [-1] * len(prefix), [-1] * len(suffix))


def probing_tasks(tokenizer, split: str = "test", settings: ProbingSettings | None = None) -> list[ProbeTask]:
    """settings.tasks from the bundled corpus' `split` documents, packed into settings.context_size contexts.
    Per source, a seeded draw of n_train + n_test contexts (fewer, in the same ratio, where a source has
    fewer): the first n_train are the train split; token tasks draw up to n_train / n_test tokens per class
    from the train / test contexts."""
    s = settings or ProbingSettings()
    gen = torch.Generator().manual_seed(s.seed)
    drawn = {}
    for source in SOURCES:
        texts = [doc.text for doc in iter_documents(split, (source,))]
        if source == "python":
            tokens, classes = labelled_contexts(texts, [python_spans(t) for t in texts], tokenizer, s.context_size)
        else:
            spans = [text_spans(t, verses=source == "bible") for t in texts]
            tokens, classes = labelled_contexts(texts, spans, tokenizer, s.context_size, FROM_START)
        n_test = min(s.n_test, len(tokens) * s.n_test // (s.n_train + s.n_test))
        n_train = min(s.n_train, len(tokens) - n_test)
        keep = torch.randperm(len(tokens), generator=gen)[: n_train + n_test]
        drawn[source] = tokens[keep], classes[keep], torch.arange(len(keep)) < n_train
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    tasks = []
    for name in s.tasks:
        if name == "source":
            tokens, _, train = (torch.cat(t) for t in zip(*drawn.values(), strict=True))
            labels = torch.cat([torch.full((len(drawn[src][0]),), i) for i, src in enumerate(drawn)])
            tasks.append(ProbeTask(name, list(drawn), tokens, ~torch.isin(tokens, special), labels, train))
        else:
            names = CODE_CLASSES if name == "code" else TEXT_CLASSES
            sources = ["python"] if name == "code" else ["bible", "fortunes", "jargon"]
            tasks.append(token_task(name, names, [drawn[src] for src in sources], s.n_train, s.n_test, gen))
    return tasks


def token_task(name: str, classes, drawn, n_train: int, n_test: int, gen: torch.Generator) -> ProbeTask:
    """One sample per drawn token: up to n_train (n_test) tokens per class from the train (test) contexts."""
    tokens, labels, train = (torch.cat(t) for t in zip(*drawn, strict=True))
    picks = []
    for c, cls in enumerate(classes):
        for in_train, n in ((True, n_train), (False, n_test)):
            ctx, pos = ((labels == c) & (train[:, None] == in_train)).nonzero(as_tuple=True)
            if not len(ctx):
                raise DataError(
                    f"probing task {name}: no {cls} tokens in the drawn contexts; raise eval.probing.n_test"
                )
            pick = torch.randperm(len(ctx), generator=gen)[:n]
            picks.append((ctx[pick], pos[pick], torch.full((len(pick),), c), torch.full((len(pick),), in_train)))
    ctx, pos, label, in_train = (torch.cat(t) for t in zip(*picks, strict=True))
    mask = torch.zeros(len(ctx), tokens.shape[1], dtype=torch.bool)
    mask[torch.arange(len(ctx)), pos] = True
    return ProbeTask(name, list(classes), tokens[ctx], mask, label, in_train)


@torch.no_grad()
def masked_activations(
    model, hook: str, tasks: list[ProbeTask], batch_size: int = 64, show_progress: bool = True
) -> list[torch.Tensor]:
    """Per task, the activations at hook of its masked positions in the order of task.mask.nonzero():
    [m d] float32 on the CPU; one forward pass per distinct context of all the tasks."""
    unique, inverse = torch.unique(torch.cat([t.tokens for t in tasks]), dim=0, return_inverse=True)
    rows, cols = torch.cat([t.mask for t in tasks]).nonzero(as_tuple=True)
    src = inverse[rows]
    harvester = Harvester(model, [hook])
    out = torch.empty(0)
    for i in tqdm(range(0, len(unique), batch_size), desc="probing contexts", disable=not show_progress):
        acts = harvester.forward(unique[i : i + batch_size])[hook].float().cpu()
        out = out if len(out) else torch.empty(len(rows), acts.shape[-1])
        here = (src >= i) & (src < i + batch_size)
        out[here] = acts[src[here] - i, cols[here]]
    return list(out.split([int(t.mask.sum()) for t in tasks]))


@torch.no_grad()
def pooled(x: torch.Tensor, task: ProbeTask, sae=None, batch: int = 8192) -> torch.Tensor:
    """The mean over each sample's masked positions of sae.encode(x) (of x without an SAE): x [m d] -> [n f]."""
    rows = task.mask.nonzero()[:, 0]
    out = torch.empty(0)
    for i in range(0, len(x), batch):
        f = x[i : i + batch]
        if sae is not None:
            f = sae.encode(f.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
        out = out if len(out) else torch.zeros(len(task.labels), f.shape[-1])
        out.index_add_(0, rows[i : i + batch], f)
    return out / task.mask.sum(1, keepdim=True)


def balanced(task: ProbeTask, c: int, train: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's prepare_probe_data: class c's samples of one split (positives) and as many others (negatives),
    ceil(positives / other classes) drawn from each other class, then that many drawn from those.
    -> (sample indices [2p], labels [2p] 1 / 0); p shrinks to the negatives found if they are fewer."""
    split = task.train if train else ~task.train
    pos = ((task.labels == c) & split).nonzero()[:, 0]
    others = [((task.labels == o) & split).nonzero()[:, 0] for o in range(len(task.classes)) if o != c]
    each = math.ceil(len(pos) / len(others))
    neg = torch.cat([o[torch.randperm(len(o), generator=gen)[:each]] for o in others])
    neg = neg[torch.randperm(len(neg), generator=gen)[: len(pos)]]
    pos = pos[: len(neg)]
    return torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])


def class_splits(task: ProbeTask, seed: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
    """Per class, the balanced (train, test) sets, each (indices, labels); the same sets for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return [(balanced(task, c, True, gen), balanced(task, c, False, gen)) for c in range(len(task.classes))]
