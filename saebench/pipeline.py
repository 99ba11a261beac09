"""Config-driven jobs shared by the CLI and notebooks:
a run config or a Run -> model -> data -> activations -> files."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from saebench import distributed as dist
from saebench.analysis import AnalysisConfig, accumulate, decoder_neighbours, logit_lens, whole_contexts
from saebench.config import RunConfig, apply_overrides, from_dict, load_config, to_dict
from saebench.data import TokenContexts, load_contexts
from saebench.errors import ConfigError, DataError
from saebench.evals.inputs import EvalInputs
from saebench.evals.suites import DEFAULT_SUITES, check_suites, run_suites
from saebench.evaluate import random_baseline
from saebench.harvest import ActivationStore, Harvester, harvest_to_disk, store_dtype, stream_activations
from saebench.models import is_causal, load_model, token_pieces
from saebench.runs import Run, activations_dir
from saebench.store import write_store
from saebench.train import grad_key, local_batch_size, refuse_overwrite, train_saes


def _run_config(cfg: RunConfig | str | Path, overrides: Sequence[str]) -> RunConfig:
    return cfg if isinstance(cfg, RunConfig) else load_config(cfg, list(overrides))


def harvest_from_config(
    cfg: RunConfig | str | Path, overrides: Sequence[str] = (), max_shards: int | None = None, model=None
) -> dict:
    """Run the config's harvest into its cache folder; returns the manifest (+ "cache_dir").
    Under torchrun the ranks write disjoint shards of the one cache."""
    cfg = _run_config(cfg, overrides)
    model = model or load_model(cfg.model, dist.init(cfg.device), cfg.torch_dtype)
    harvester = Harvester(
        model, cfg.harvest.hooks, cfg.harvest.exclude_special, store_dtype(cfg.harvest), cfg.harvest.gradients
    )
    contexts = load_contexts(cfg.data, model.tokenizer)
    cache_dir = activations_dir(cfg)
    manifest = harvest_to_disk(harvester, contexts, cache_dir, cfg.harvest, cfg.data, cfg.model, max_shards=max_shards)
    return {**manifest, "cache_dir": str(cache_dir)}


def activation_source(cfg: RunConfig, model, harvester: Harvester) -> Callable[[int], Iterator]:
    """epoch -> this rank's batches of the config's activations, what `saebench train` trains on: streamed from the
    model through the shuffling buffer, or read from the on-disk cache (harvested first when missing)."""
    local_batch = local_batch_size(cfg.train.batch_size)
    if cfg.train.source == "cache":
        manifest = harvest_from_config(cfg, model=model)
        store = ActivationStore(manifest["cache_dir"], cfg.harvest.hooks[0])
        if len(store.shards) < dist.world():
            raise ConfigError(
                f"the cache has {len(store.shards)} shard(s) for {dist.world()} ranks: lower harvest.shard_contexts"
            )

        def source(epoch: int) -> Iterator:
            return store.iter_batches(
                local_batch,
                seed=cfg.seed * 1000 + epoch,
                part=dist.shard(len(store.shards)),
                gradients=cfg.harvest.gradients,
            )
    else:
        contexts = load_contexts(cfg.data, model.tokenizer, show_progress=dist.is_main())
        mine = dist.shard(len(contexts))  # each rank runs the model on its own contexts
        contexts = TokenContexts(contexts.tokens[mine], contexts.special_mask[mine])
        chunk = min(local_batch, cfg.harvest.buffer_tokens // 2)

        def source(epoch: int) -> Iterator:
            return stream_activations(
                harvester,
                contexts,
                batch_tokens=chunk,
                buffer_tokens=cfg.harvest.buffer_tokens,
                batch_size=cfg.harvest.batch_size,
                seed=cfg.seed * 1000 + epoch,
                epochs=1,
            )

    return source


def train_from_config(
    cfg: RunConfig | str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    stop_after_steps: int | None = None,
    cells: dict[str, RunConfig] | None = None,
):
    """`saebench train`: harvest (streamed or cached) and train the config's SAEs into runs/<name>/.
    cells (`saebench sweep`): cell name -> its config (one hook; its sae section and its train section's
    optimiser knobs), every cell trained from the same model pass into runs/<name>/<cell>/."""
    cfg = _run_config(cfg, overrides)
    device = dist.init(cfg.device)
    t = cfg.train
    run = Run(cfg.run_dir)
    homes = Run.homes_for(run.path, {n: c.harvest.hooks[0] for n, c in cells.items()} if cells else cfg.harvest.hooks)
    hooks = list(dict.fromkeys(home.hook for home in homes.values()))
    cfg = dataclasses.replace(cfg, harvest=dataclasses.replace(cfg.harvest, hooks=hooks))  # a sweep: its cells' hooks
    if not resume and not dist.restarted():
        refuse_overwrite(h.path for h in homes.values())
    local_batch_size(t.batch_size)
    specs = cells or {h: cfg for h in homes}  # the config of each SAE
    if t.source == "cache" and (len(hooks) > 1 or any(spec.sae.transcoder for spec in specs.values())):
        raise ConfigError(
            "train.source: cache trains one hook at a time; use train.source: stream for several hooks or a transcoder"
        )
    model = load_model(cfg.model, device, cfg.torch_dtype)
    outputs = {n: specs[n].sae.output_hook_for(home.hook) for n, home in homes.items() if specs[n].sae.transcoder}
    read = list(dict.fromkeys([*hooks, *outputs.values()]))  # one model pass for inputs and outputs
    harvester = Harvester(model, read, cfg.harvest.exclude_special, store_dtype(cfg.harvest), cfg.harvest.gradients)
    widths = harvester.widths
    sae_cfgs = {
        n: specs[n].sae.resolve(widths[home.hook], home.hook, cfg.model, widths.get(outputs.get(n, home.hook)))
        for n, home in homes.items()
    }
    train_cfgs = {n: dataclasses.replace(specs[n].train, seed=cfg.seed, device=str(device)) for n in homes}
    source = activation_source(cfg, model, harvester)
    train_cfg = dataclasses.replace(t, seed=cfg.seed, device=str(device))
    if dist.is_main():
        run.write_config(cfg)
        for name, cell in (cells or {}).items():
            run.cell(name).write_config(cell)
    dirs = {n: home.path for n, home in homes.items()}
    saes, reports = train_saes(
        sae_cfgs, source, train_cfg, run.path, resume, stop_after_steps, dirs=dirs, train_cfgs=train_cfgs
    )
    if not cells and len(hooks) == 1:
        return saes.get(hooks[0]), {**reports.get(hooks[0], {}), "run_dir": str(run.path)}
    named = {homes[n].path.name: r for n, r in reports.items()}
    return {homes[n].path.name: s for n, s in saes.items()}, {"saes": named, "run_dir": str(run.path)}


def eval_from_config(
    run_dir: str | Path,
    suites: Sequence[str] = DEFAULT_SUITES,
    show_progress: bool = True,
    overrides: Sequence[str] = (),
    ks: Sequence[int] = (),
) -> dict[str, dict]:
    """`saebench eval RUN [--suite ...] [--set eval.KEY=VALUE]`: the named suites for every SAE of the run, each
    SAE next to a random SAE at matched scale, on held-out activations from one model pass for all of them; each
    SAE's eval.json keeps the sections of suites not run now. `overrides` change the run's config for this
    evaluation only. ks: the core figures at each k' too (`--k 8,16`; per-token families, SAE.check_k), in
    eval.json's "by_k" section keyed by k'. Returns hook (a sweep: cell name) -> eval.json.
    An SAE that ranks by the loss gradient gets the held-out gradients too (see evals.core); a transcoder the
    rows of its output hook, from the same pass."""
    check_suites(suites)
    run = Run(run_dir)
    homes = run.trained_homes()
    cfg = from_dict(RunConfig, apply_overrides(to_dict(run.config), overrides)) if overrides else run.config
    saes = run.load_saes()
    for sae in saes.values():
        for k in ks:
            sae.check_k(k)
    model = run.load_model()
    contexts = load_contexts(dataclasses.replace(cfg.data, split=cfg.eval.split), model.tokenizer)
    gradients = any(sae.cfg.family.gradients for sae in saes.values())
    outputs = {name: sae.cfg.output_hook or homes[name].hook for name, sae in saes.items()}  # where each writes
    read = sorted({*(home.hook for home in homes.values()), *outputs.values()})
    harvester = Harvester(model, read, cfg.harvest.exclude_special, gradients=gradients)
    batches = list(
        stream_activations(
            harvester,
            contexts,
            batch_tokens=4096,
            buffer_tokens=8192,
            n_tokens=cfg.eval.n_tokens,
            batch_size=cfg.harvest.batch_size,
            epochs=1,
        )
    )
    results = {}
    for name, sae in saes.items():
        hook = homes[name].hook
        acts = torch.cat([batch[hook] for batch in batches])
        targets = torch.cat([batch[outputs[name]] for batch in batches]) if sae.cfg.transcoder else None
        grads = torch.cat([batch[grad_key(outputs[name])] for batch in batches]) if sae.cfg.family.gradients else None
        baseline = random_baseline(sae, acts, targets=targets)
        inputs = EvalInputs(
            run, homes[name], cfg, model, sae, baseline, acts, contexts, grads, ks, show_progress, targets
        )
        results[name] = run_suites(inputs, suites, run.eval(name))
        run.write_eval(name, results[name])
    return results


DEFAULT_ANALYSIS_TOKENS = 2_000_000


def analyze(
    run_dir: str | Path,
    cfg: AnalysisConfig | None = None,
    resume: bool = False,
    restart: bool = False,
    show_progress: bool = True,
) -> dict:
    """`saebench analyze RUN`: one pass over held-out text through the model and every SAE of the run;
    writes each SAE's feature store (features.sqlite beside its sae/ folder). Returns a summary.
    A transcoder's features are encoded from its input hook (their examples) and its decoder rows are
    its output's (their logit lens).

    A checkpoint of the accumulators is written every cfg.checkpoint_tokens; `resume` continues an
    interrupted pass from it and ends with the same store as an uninterrupted one."""
    cfg = cfg or AnalysisConfig()
    run = Run(run_dir)
    homes = run.trained_homes()
    rc = run.config
    saes = run.load_saes()
    if cfg.k is not None:
        for sae in saes.values():
            sae.check_k(cfg.k)
    model = run.load_model()
    harvester = Harvester(model, sorted({home.hook for home in homes.values()}), exclude_special=True)
    contexts = load_contexts(
        dataclasses.replace(rc.data, split=cfg.split), model.tokenizer, show_progress=show_progress
    )
    available = int((~contexts.special_mask).sum())
    if cfg.n_tokens is not None and cfg.n_tokens > available:
        raise DataError(
            f"--tokens {cfg.n_tokens} is more than the {cfg.split!r} split holds ({available} tokens): "
            f"lower --tokens or pick a larger --split"
        )
    n_ctx, n_tokens = whole_contexts(contexts, cfg.n_tokens or min(DEFAULT_ANALYSIS_TOKENS, available))
    fingerprint = json.dumps(
        {
            "analysis": {**dataclasses.asdict(cfg), "checkpoint_tokens": None},
            "data": dataclasses.asdict(rc.data),
            "model": rc.model,
            "n_tokens": n_tokens,
            "saes": {str(home.sae_dir): (home.sae_dir / "sae.safetensors").stat().st_size for home in homes.values()},
        },
        sort_keys=True,
    )
    state_dir = run.analysis_state_dir
    accs, seconds, tokens_read = accumulate(
        harvester,
        {name: (sae, homes[name].hook) for name, sae in saes.items()},
        contexts,
        n_ctx,
        n_tokens,
        cfg,
        state_dir,
        fingerprint,
        resume,
        restart,
        show_progress,
    )

    finish_started = time.perf_counter()
    vocab = token_pieces(model)
    stores = []
    for name, sae in saes.items():
        home = homes[name]
        results = accs[name].finish(n_tokens)
        results.decoder = decoder_neighbours(sae.W_dec.detach(), cfg.n_neighbours)
        if is_causal(model):
            results.logit_lens = logit_lens(model, sae.W_dec.detach(), cfg.n_logit)
        else:
            results.notes["logit_lens_note"] = (
                "skipped: an encoder model's unembedding (MLM head) is not a trained next-token readout"
            )
        evaluation = run.eval(name)
        if evaluation is not None:
            results.notes["eval"] = evaluation
        meta = {
            "model": rc.model,
            "hook": home.hook,
            "run": str(run.path),
            "sae": str(home.sae_dir),
            "device": rc.device,
            "split": cfg.split,
            "data": dataclasses.asdict(rc.data),
            "activation": sae.cfg.activation,
            "kind": sae.cfg.kind,  # a transcoder's examples are where it reads; its logit lens what it writes
            "output_hook": sae.cfg.output_hook,
            "k": sae.cfg.k,
            "inference_k": cfg.k,  # k' the codes were taken at (`--k`); None: the SAE's own rule
            "d_in": sae.cfg.d_in,
            "signed": sae.cfg.family.signed,
            "n_examples": cfg.n_examples,
            "n_intervals": cfg.n_intervals,
            "per_interval": cfg.per_interval,
            "n_samples": cfg.n_samples,
            "seed": cfg.seed,
            "seconds": round(seconds, 2),
        }
        stores.append(str(write_store(home.store_path, results, contexts.tokens[:n_ctx], vocab, meta)))
    shutil.rmtree(state_dir, ignore_errors=True)
    return {
        "stores": stores,
        "n_tokens": n_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens_read / max(seconds, 1e-9)),
        "finish_seconds": round(time.perf_counter() - finish_started, 2),
    }


__all__ = [
    "activation_source",
    "analyze",
    "eval_from_config",
    "harvest_from_config",
    "train_from_config",
    "whole_contexts",
]
