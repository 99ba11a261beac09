"""Model forward with hooks -> activations, streamed through a shuffling buffer or cached on disk.

Cache layout (`saebench harvest`):
    <cache_dir>/manifest.json                        settings, widths, and the complete shards
    <cache_dir>/<hook>/shard_00000.safetensors       acts [n d], token_ids [n], context [n], position [n]
                                                     (+ grads [n d] with harvest.gradients)
A shard covers a fixed run of contexts, is written to a temp file and renamed, and enters the
manifest only once it is whole; a resumed run starts after the last listed shard. Under torchrun
ranks write disjoint shards of the same plan (`shard_plan`), so the cache equals a one-process one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saebench import distributed as dist
from saebench.atomic import atomic_save_file, atomic_write_text, clean_partial
from saebench.config import HarvestConfig, parse_dtype
from saebench.data import DataConfig, TokenContexts
from saebench.errors import ConfigError, DataError, HookError
from saebench.models import is_causal
from saebench.readers import read_json, read_safetensors
from saebench.train import grad_key

MANIFEST = "manifest.json"
FORMAT = "saebench-activations/1"


class _StopForward(Exception):
    pass


def check_hooks(model, hooks: list[str]) -> None:
    valid = list(model.hook_dict)
    for hook in hooks:
        if hook not in model.hook_dict:
            close = difflib.get_close_matches(hook, valid, n=3, cutoff=0.6)
            hint = (
                f"closest: {', '.join(close)}"
                if close
                else f"e.g. {', '.join(v for v in valid if v.endswith('hook_resid_post'))}"
            )
            raise HookError(f"model has no hook {hook!r}; {hint}")


def flatten_heads(act: torch.Tensor) -> torch.Tensor:
    """[batch pos head d_head] -> [batch pos (head d_head)]; other shapes unchanged."""
    return act.flatten(2) if act.dim() == 4 else act


class InputTap:
    """A transcoder reads `hook` and writes a later hook of the same forward pass: `keep` (a forward hook on `hook`)
    holds what it read until `take` (at the output hook)."""

    def __init__(self, hook: str):
        self.hook, self.x = hook, None

    def keep(self, act: torch.Tensor, hook=None) -> torch.Tensor:
        self.x = flatten_heads(act)
        return act

    def take(self, output_hook: str | None) -> torch.Tensor:
        x, self.x = self.x, None
        if x is None:
            raise ConfigError(
                f"{output_hook} runs before {self.hook}: a transcoder's sae.output_hook must come after its input hook"
            )
        return x


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the predictions from a kept token to a kept token (SAEBench's mask).
    logits: [batch pos vocab]; tokens, keep: [batch pos] -> scalar."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return (ce * (keep[:, :-1] & keep[:, 1:]).float()).sum()


class Harvester:
    """Runs the model on token contexts and returns the activations at `hooks`.

    Stops the forward pass once the last requested hook has fired. Multi-head hooks
    ([batch pos head d_head], e.g. attn.hook_z) are flattened to [batch pos (head d_head)].

    gradients: also return, under grad_key(hook), the gradient at each hook of the batch's summed
    next-token loss (`next_token_loss`, predictions between non-special tokens): one full forward
    and one backward per batch. A position's gradient holds its effect on every later counted
    prediction; the last position's is zero (it predicts nothing counted and nothing reads it).
    """

    def __init__(
        self,
        model,
        hooks: list[str],
        exclude_special: bool = True,
        out_dtype: torch.dtype = torch.float32,
        gradients: bool = False,
    ):
        check_hooks(model, hooks)
        if len(set(hooks)) != len(hooks):
            raise HookError(f"hooks are listed twice: {hooks}")
        if gradients and not is_causal(model):
            raise ConfigError("harvest.gradients needs a causal LM (the next-token loss); set harvest.gradients: false")
        self.model, self.hooks, self.gradients = model, list(hooks), gradients
        self.exclude_special, self.out_dtype = exclude_special, out_dtype
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, special_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """tokens: [batch pos] -> {hook: [batch pos d]}, multi-head hooks flattened (`flatten_heads`); with
        gradients also {grad_key(hook): [batch pos d]}, the loss counting predictions between tokens
        outside special_mask ([batch pos] bool; default: none special)."""
        out: dict[str, torch.Tensor] = {}

        def save(name: str, act: torch.Tensor) -> torch.Tensor:
            if self.gradients and not act.requires_grad:  # nothing upstream needs a gradient: start a leaf here
                act = act.detach().requires_grad_()
            out[name] = act
            if len(out) == len(self.hooks) and not self.gradients:
                raise _StopForward
            return act

        fwd_hooks = [(h, lambda act, hook, name=h: save(name, act)) for h in self.hooks]
        tokens = tokens.to(self.device)
        try:
            with torch.set_grad_enabled(self.gradients), self.model.hooks(fwd_hooks=fwd_hooks):
                logits = self.model(tokens)
                if self.gradients and not set(self.hooks) - set(out):
                    keep = torch.ones_like(tokens, dtype=torch.bool) if special_mask is None else ~special_mask
                    loss = next_token_loss(logits.float(), tokens, keep.to(self.device))
                    grads = torch.autograd.grad(loss, [out[h] for h in self.hooks], allow_unused=True)
                    for h, g in zip(self.hooks, grads, strict=True):
                        if g is None:
                            raise HookError(f"the model's loss does not depend on {h}: it has no gradient")
                        out[grad_key(h)] = g
        except _StopForward:
            pass
        missing = set(self.hooks) - set(out)
        if missing:
            raise HookError(f"hooks never fired in a forward pass: {sorted(missing)}")
        return {key: flatten_heads(act.detach()) for key, act in out.items()}

    @cached_property
    def widths(self) -> dict[str, int]:
        """hook -> its activations' width, from one forward pass on 4 BOS tokens (on first use)."""
        bos = getattr(self.model.tokenizer, "bos_token_id", None) or 0
        acts = self.forward(torch.full((1, 4), bos, dtype=torch.long))
        return {h: acts[h].shape[-1] for h in self.hooks}

    @property
    def columns(self) -> dict[str, int]:
        """Every key of `forward`'s output (the hooks, then their gradients) -> its width."""
        return {**self.widths, **{grad_key(h): d for h, d in self.widths.items() if self.gradients}}

    def device_activations(
        self, tokens: torch.Tensor, special_mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """tokens, special_mask: [batch pos] -> ({key: [n d]} in the model's device and dtype, keep [batch pos]);
        the keys are `columns`'."""
        acts = self.forward(tokens, special_mask)
        keep = ~special_mask if self.exclude_special else torch.ones_like(special_mask)
        keep_dev = keep.to(self.device)
        rows = {hook: check_finite(a[keep_dev], hook) for hook, a in acts.items()}
        return rows, keep

    def activations(
        self, tokens: torch.Tensor, special_mask: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """tokens, special_mask: [batch pos] -> ({hook: [n d]} on the CPU in out_dtype, keep [batch pos])."""
        rows, keep = self.device_activations(tokens, special_mask)
        return {hook: check_finite(r.to(self.out_dtype).cpu(), hook) for hook, r in rows.items()}, keep


def check_finite(acts: torch.Tensor, hook: str) -> torch.Tensor:
    if not torch.isfinite(acts).all():
        raise DataError(f"the model produced NaN/inf activations at {hook}; check the model dtype (try dtype: float32)")
    return acts


def stream_activations(
    harvester: Harvester,
    contexts: TokenContexts,
    batch_tokens: int,
    buffer_tokens: int = 262_144,
    n_tokens: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {key: [batch_tokens d]} training batches (the harvester's `columns`: hooks and gradients),
    shuffled through a buffer of bounded size.

    The buffer is filled with `buffer_tokens` rows, permuted (one permutation for every key, so
    rows stay aligned), and its first half is served before the next refill. Contexts cycle
    (reshuffled each epoch) until `n_tokens` rows were yielded, or for `epochs` passes.
    """
    if buffer_tokens < 2 * batch_tokens:
        raise DataError(f"buffer_tokens ({buffer_tokens}) must be at least twice the batch size ({batch_tokens})")
    gen = torch.Generator().manual_seed(seed)
    buffer: dict[str, torch.Tensor] = {
        h: torch.empty(0, d, dtype=harvester.out_dtype) for h, d in harvester.columns.items()
    }
    served = 0

    def context_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while epochs is None or epoch < epochs:
            order = torch.randperm(len(contexts), generator=gen) if epoch > 0 else torch.arange(len(contexts))
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                yield contexts.tokens[idx], contexts.special_mask[idx]
            epoch += 1

    source = context_batches()
    exhausted = False
    while not exhausted:
        while next(iter(buffer.values())).shape[0] < buffer_tokens:
            try:
                tokens, special = next(source)
            except StopIteration:
                exhausted = True
                break
            rows, _ = harvester.activations(tokens, special)
            buffer = {h: torch.cat([buffer[h], rows[h]]) for h in buffer}
        n = next(iter(buffer.values())).shape[0]
        perm = torch.randperm(n, generator=gen)
        buffer = {h: b[perm] for h, b in buffer.items()}
        n_out = n if exhausted else n // 2 - (n // 2) % batch_tokens  # the last batch of a finite stream may be short
        for i in range(0, n_out, batch_tokens):
            if n_tokens is not None and served >= n_tokens:
                return
            yield {h: b[i : i + batch_tokens] for h, b in buffer.items()}
            served += batch_tokens
        buffer = {h: b[n_out:] for h, b in buffer.items()}
        if exhausted:
            return


def _settings(
    model_name: str, harvester: Harvester, cfg: HarvestConfig, data: DataConfig, contexts: TokenContexts
) -> dict:
    digest = hashlib.sha256(contexts.tokens.numpy().tobytes()).hexdigest()
    return {
        **({"gradients": True} if harvester.gradients else {}),  # absent: a cache without them
        "format": FORMAT,
        "model": model_name,
        "hooks": {h: {"d": d} for h, d in harvester.widths.items()},
        "dtype": cfg.store_dtype,
        "n_tokens_requested": cfg.n_tokens,
        "exclude_special": cfg.exclude_special,
        "shard_contexts": cfg.shard_contexts,
        "context_size": contexts.tokens.shape[1],
        "dataset": asdict(data),
        "seed": data.seed,
        "contexts_sha256": digest,
    }


def _write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def hook_dirname(hook: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hook)


def shard_plan(contexts: TokenContexts, cfg: HarvestConfig, exclude_special: bool) -> list[dict]:
    """The shards a harvest of cfg.n_tokens writes: {"file", "n", "contexts": [start, end]} each.

    Shard i covers contexts [i * shard_contexts, ...); the last one ends at the first context that
    completes n_tokens and holds only the rows still needed. Known before any forward pass, so
    ranks can write disjoint shards of one cache."""
    per_context = (
        (~contexts.special_mask).sum(1) if exclude_special else torch.full((len(contexts),), contexts.tokens.shape[1])
    )
    plan, total = [], 0
    for index, start in enumerate(range(0, len(contexts), cfg.shard_contexts)):
        if total >= cfg.n_tokens:
            break
        counts = per_context[start : start + cfg.shard_contexts].cumsum(0)
        need = cfg.n_tokens - total
        end = start + min(int(torch.searchsorted(counts, torch.tensor(need))) + 1, len(counts))
        n = min(int(counts[end - start - 1]), need)
        plan.append({"file": f"shard_{index:05d}.safetensors", "n": n, "contexts": [start, end]})
        total += n
    return plan


def _write_shard(harvester: Harvester, contexts: TokenContexts, cache_dir: Path, shard: dict, batch_size: int) -> None:
    start, end = shard["contexts"]
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in harvester.columns}
    meta: dict[str, list[torch.Tensor]] = {"token_ids": [], "context": [], "position": []}
    for i in range(start, end, batch_size):
        j = min(i + batch_size, end)
        tokens, special = contexts.tokens[i:j], contexts.special_mask[i:j]
        rows, keep = harvester.activations(tokens, special)
        for key in parts:
            parts[key].append(rows[key])
        ctx_idx, pos = keep.nonzero(as_tuple=True)
        meta["token_ids"].append(tokens[keep].to(torch.int32))
        meta["context"].append((ctx_idx + i).to(torch.int32))
        meta["position"].append(pos.to(torch.int16))
    n = shard["n"]
    columns = {k: torch.cat(v)[:n].contiguous() for k, v in meta.items()}
    for h in harvester.hooks:
        tensors = {"acts": parts[h], **({"grads": parts[grad_key(h)]} if harvester.gradients else {})}
        tensors = {k: torch.cat(v)[:n].contiguous() for k, v in tensors.items()}
        atomic_save_file({**tensors, **columns}, cache_dir / hook_dirname(h) / shard["file"])


def harvest_to_disk(
    harvester: Harvester,
    contexts: TokenContexts,
    cache_dir: str | Path,
    cfg: HarvestConfig,
    data: DataConfig,
    model_name: str,
    max_shards: int | None = None,
) -> dict:
    """Write activations for every hook as sharded safetensors; resumes after the last whole shard.

    Under torchrun each rank writes the shards i with i % world == rank, a round of `world` shards
    at a time; rank 0 lists each finished round in the manifest. The cache is the one a single
    process writes. max_shards: stop after writing this many new shards (to test resumption).
    Returns the manifest.
    """
    cache_dir = Path(cache_dir)
    settings = _settings(model_name, harvester, cfg, data, contexts)
    manifest_path = cache_dir / MANIFEST
    if manifest_path.exists():
        manifest = read_json(manifest_path, f"delete {cache_dir} and rerun `saebench harvest CONFIG`")
        old = {k: manifest.get(k) for k in settings}
        if old != settings:
            diff = [k for k in settings if old[k] != settings[k]]
            raise DataError(
                f"{cache_dir} holds a cache made with other settings ({', '.join(diff)}); "
                "set harvest.cache_dir to a new folder or delete that one"
            )
    else:
        manifest = {**settings, "shards": [], "n_tokens": 0, "complete": False}
    dist.barrier()  # every rank has read the manifest before rank 0 rewrites it
    if manifest["complete"]:
        return manifest
    plan = shard_plan(contexts, cfg, harvester.exclude_special)
    todo = plan[len(manifest["shards"]) :][:max_shards]
    if dist.is_main():
        for folder in [cache_dir] + [cache_dir / hook_dirname(h) for h in harvester.hooks]:
            folder.mkdir(parents=True, exist_ok=True)
            clean_partial(folder)  # what a killed run was writing
    dist.barrier()
    world, rank = dist.world(), dist.rank()
    bar = tqdm(
        total=cfg.n_tokens,
        initial=manifest["n_tokens"],
        desc="harvest",
        unit="tok",
        unit_scale=True,
        disable=not dist.is_main(),
    )
    for first in range(0, len(todo), world):
        round_ = todo[first : first + world]
        if rank < len(round_):
            _write_shard(harvester, contexts, cache_dir, round_[rank], cfg.batch_size)
        dist.barrier()  # the round's shards are all on disk
        manifest["shards"] += round_
        manifest["n_tokens"] += sum(s["n"] for s in round_)
        manifest["complete"] = len(manifest["shards"]) == len(plan)
        if dist.is_main():
            _write_manifest(cache_dir, manifest)
        bar.update(sum(s["n"] for s in round_))
    bar.close()
    dist.barrier()
    return manifest


class ActivationStore:
    """Reads one hook's activations from a cache written by `harvest_to_disk`."""

    def __init__(self, cache_dir: str | Path, hook: str | None = None):
        self.cache_dir = Path(cache_dir)
        path = self.cache_dir / MANIFEST
        if not path.exists():
            raise DataError(
                f"no activation cache at {self.cache_dir} (missing {MANIFEST}); run `saebench harvest CONFIG` first"
            )
        self.manifest = read_json(path, f"delete {self.cache_dir} and rerun `saebench harvest CONFIG`")
        hooks: list[str] = list(self.manifest["hooks"])
        if hook is None:
            hook = hooks[0]
        if hook not in hooks:
            raise HookError(f"the cache at {self.cache_dir} has no hook {hook!r}; it has {', '.join(hooks)}")
        self.hook, self.d = hook, self.manifest["hooks"][hook]["d"]
        self.shards = self.manifest["shards"]
        self.gradients = bool(self.manifest.get("gradients"))

    def __len__(self) -> int:
        return sum(s["n"] for s in self.shards)

    def load_shard(self, i: int) -> dict[str, torch.Tensor]:
        path = self.cache_dir / hook_dirname(self.hook) / self.shards[i]["file"]
        return read_safetensors(path, "cpu", f"delete {self.cache_dir} and rerun `saebench harvest CONFIG`")

    def load_all(self, dtype: torch.dtype = torch.float32, key: str = "acts") -> torch.Tensor:
        """acts (or key "grads"): [n d]."""
        return torch.cat([self.load_shard(i)[key].to(dtype) for i in range(len(self.shards))])

    def iter_batches(
        self,
        batch_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        part: slice = slice(None),
        gradients: bool = False,
    ) -> Iterator:
        """One pass: [batch_tokens d] batches, shards in random order and rows shuffled in pairs of shards.
        part: which positions of the epoch's shard order to read (a rank's share: `distributed.shard`).
        gradients: yield {hook: acts, grad_key(hook): grads} dicts instead (the same rows in the same order)."""
        if gradients and not self.gradients:
            raise DataError(
                f"the cache at {self.cache_dir} has no gradients: harvest with harvest.gradients: true into another "
                "harvest.cache_dir"
            )
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else list(range(len(self.shards)))
        order = order[part]
        keys = ["acts", "grads"] if gradients else ["acts"]

        def out(rows: torch.Tensor):  # [b (keys d)] -> [b d] or the dict
            return {self.hook: rows[:, : self.d], grad_key(self.hook): rows[:, self.d :]} if gradients else rows

        carry = torch.empty(0, self.d * len(keys), dtype=dtype)
        for group in range(0, len(order), 2):
            shards = [self.load_shard(i) for i in order[group : group + 2]]
            rows = torch.cat([carry] + [torch.cat([s[k].to(dtype) for k in keys], -1) for s in shards])
            if shuffle:
                rows = rows[torch.randperm(len(rows), generator=gen)]
            n_full = len(rows) - len(rows) % batch_tokens
            for i in range(0, n_full, batch_tokens):
                yield out(rows[i : i + batch_tokens])
            carry = rows[n_full:]
        if len(carry):
            yield out(carry)


def store_dtype(cfg: HarvestConfig) -> torch.dtype:
    return parse_dtype(cfg.store_dtype, "harvest.store_dtype")
