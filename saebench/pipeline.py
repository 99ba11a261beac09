"""Config-driven jobs shared by the CLI and notebooks: config -> model -> data -> activations."""

from __future__ import annotations

from pathlib import Path

from saebench import distributed as dist
from saebench.config import RunConfig, load_config
from saebench.data import TokenContexts, load_contexts
from saebench.harvest import Harvester, harvest_to_disk, store_dtype
from saebench.models import load_model


def harvest_from_config(cfg: RunConfig | str | Path, overrides: list[str] = (), max_shards: int | None = None) -> dict:
    """Run the config's harvest into its cache folder; returns the manifest (+ "cache_dir").
    Under torchrun the ranks write disjoint shards of the one cache."""
    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg, list(overrides))
    model = load_model(cfg.model, dist.init(cfg.device), cfg.torch_dtype)
    harvester = Harvester(model, cfg.harvest.hooks, cfg.harvest.exclude_special, store_dtype(cfg.harvest))
    contexts = load_contexts(cfg.data, model.tokenizer)
    cache_dir = Path(cfg.harvest.cache_dir) if cfg.harvest.cache_dir else cfg.run_dir / "activations"
    manifest = harvest_to_disk(harvester, contexts, cache_dir, cfg.harvest, cfg.data, cfg.model, max_shards=max_shards)
    return {**manifest, "cache_dir": str(cache_dir)}


def _sae_config(cfg: RunConfig, d_in: int, hook: str):
    from saebench.errors import ConfigError
    from saebench.sae import SAEConfig

    s = cfg.sae
    if s.d_in is not None and s.d_in != d_in:
        raise ConfigError(
            f"sae.d_in is {s.d_in} but {hook} of {cfg.model} has width {d_in}: set sae.d_in={d_in} or remove it"
        )
    return SAEConfig(
        d_in=d_in,
        n_latents=s.n_latents or s.expansion * d_in,
        activation=s.activation,
        k=s.k,
        matryoshka=s.matryoshka,
        matryoshka_reduce=s.matryoshka_reduce,
        matryoshka_random=s.matryoshka_random,
        aux_coef=s.aux_coef,
        k_aux=s.k_aux,
        dead_tokens=s.dead_tokens,
        zipf_exponent=s.zipf_exponent,
        hook=hook,
        model=cfg.model,
    )


def train_from_config(
    cfg: RunConfig | str | Path, overrides: list[str] = (), resume: bool = False, stop_after_steps: int | None = None
):
    """`saebench train`: harvest (streamed or cached) and train the config's SAE into runs/<name>/."""
    import yaml

    from saebench.atomic import atomic_write_text
    from saebench.config import to_dict
    from saebench.errors import ConfigError
    from saebench.harvest import ActivationStore, hook_dirname, stream_activations
    from saebench.train import TrainConfig, train_sae, train_saes

    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg, list(overrides))
    device = dist.init(cfg.device)
    hooks = cfg.harvest.hooks
    t = cfg.train
    if t.source not in ("stream", "cache"):
        raise ConfigError(f"train.source must be stream or cache, got {t.source!r}")
    run_dir = cfg.run_dir
    if (
        not resume
        and not dist.restarted()
        and ((run_dir / "metrics.jsonl").exists() or any(run_dir.glob("*/metrics.jsonl")))
    ):
        from saebench.errors import DataError

        raise DataError(
            f"{run_dir} already holds a training run: pass --resume to continue it, or set name to a new run"
        )
    if t.batch_size % dist.world():
        raise ConfigError(
            f"train.batch_size {t.batch_size} does not split over {dist.world()} ranks: make it a multiple of {dist.world()}"
        )
    model = load_model(cfg.model, device, cfg.torch_dtype)
    harvester = Harvester(model, hooks, cfg.harvest.exclude_special, store_dtype(cfg.harvest))
    sae_cfgs = {hook_dirname(h): _sae_config(cfg, harvester.widths[h], h) for h in hooks}
    local_batch = t.batch_size // dist.world()  # each rank's share of a global batch
    if t.source == "cache":
        if len(hooks) > 1:
            raise ConfigError(
                "train.source: cache trains one hook at a time; use train.source: stream for several hooks"
            )
        manifest = harvest_from_config(cfg)
        store = ActivationStore(manifest["cache_dir"], hooks[0])
        if len(store.shards) < dist.world():
            raise ConfigError(
                f"the cache has {len(store.shards)} shard(s) for {dist.world()} ranks: lower harvest.shard_contexts"
            )
        source = lambda epoch: store.iter_batches(
            local_batch, seed=cfg.seed * 1000 + epoch, part=dist.shard(len(store.shards))
        )
    else:
        contexts = load_contexts(cfg.data, model.tokenizer, show_progress=dist.is_main())
        mine = dist.shard(len(contexts))  # each rank runs the model on its own contexts
        contexts = TokenContexts(contexts.tokens[mine], contexts.special_mask[mine])
        chunk = min(local_batch, cfg.harvest.buffer_tokens // 2)
        source = lambda epoch: stream_activations(
            harvester,
            contexts,
            batch_tokens=chunk,
            buffer_tokens=cfg.harvest.buffer_tokens,
            batch_size=cfg.harvest.batch_size,
            seed=cfg.seed * 1000 + epoch,
            epochs=1,
        )
    train_cfg = TrainConfig(
        n_tokens=t.n_tokens,
        batch_size=t.batch_size,
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        decay_fraction=t.decay_fraction,
        grad_clip=t.grad_clip,
        enc_init_scale=t.enc_init_scale,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        seed=cfg.seed,
        device=device,
        distribute=t.distribute,
        wandb_project=t.wandb_project,
    )
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if len(sae_cfgs) == 1:
        sae, report = train_sae(
            next(iter(sae_cfgs.values())),
            source,
            train_cfg,
            run_dir=run_dir,
            resume=resume,
            stop_after_steps=stop_after_steps,
        )
        return sae, {**report, "run_dir": str(run_dir)}
    saes, reports = train_saes(
        sae_cfgs, source, train_cfg, run_dir=run_dir, resume=resume, stop_after_steps=stop_after_steps
    )
    return saes, {"saes": reports, "run_dir": str(run_dir)}


def eval_from_config(run_dir: str | Path) -> dict:
    """`saebench eval RUN`: core metrics on held-out activations and CE/KL with the SAE spliced in,
    each next to a random-SAE baseline; written to RUN/eval.json."""
    import json

    from saebench.atomic import atomic_write_text
    from saebench.data import TokenContexts
    from saebench.errors import DataError
    from saebench.evaluate import evaluate_sae, random_baseline, spliced_losses
    from saebench.harvest import stream_activations
    from saebench.sae import SAE

    run_dir = Path(run_dir)
    sae_dirs = run_sae_dirs(run_dir)
    if not (run_dir / "config.yaml").exists() or not sae_dirs:
        raise DataError(
            f"{run_dir} is not a finished training run (needs config.yaml and sae/); train it with `saebench train`"
        )
    cfg = load_config(run_dir / "config.yaml")
    model = load_model(cfg.model, cfg.device, cfg.torch_dtype)
    data = type(cfg.data)(**{**cfg.data.__dict__, "split": cfg.eval.split})
    contexts = load_contexts(data, model.tokenizer)
    n = min(cfg.eval.n_contexts, len(contexts))
    few = TokenContexts(contexts.tokens[:n], contexts.special_mask[:n])
    results = {}
    for sae_dir in sae_dirs:
        sae = SAE.load(sae_dir, cfg.device)
        hook = sae.cfg.hook
        harvester = Harvester(model, [hook], cfg.harvest.exclude_special)
        acts = torch_cat(
            b[hook]
            for b in stream_activations(
                harvester,
                contexts,
                batch_tokens=4096,
                buffer_tokens=8192,
                n_tokens=cfg.eval.n_tokens,
                batch_size=cfg.harvest.batch_size,
                epochs=1,
            )
        )
        baseline = random_baseline(sae, acts)
        result = {
            "run": str(sae_dir.parent),
            "hook": hook,
            "split": cfg.eval.split,
            "sae": {**evaluate_sae(sae, acts), **spliced_losses(model, sae, hook, few)},
            "random_baseline": {**evaluate_sae(baseline, acts), **spliced_losses(model, baseline, hook, few)},
        }
        atomic_write_text(sae_dir.parent / "eval.json", json.dumps(result, indent=1) + "\n")
        results[hook] = result
    return results


def torch_cat(parts):
    import torch

    return torch.cat(list(parts))


def run_sae_dirs(run_dir: Path) -> list[Path]:
    """The SAE folders of a run: RUN/sae, or RUN/<hook>/sae for a multi-hook run."""
    if (run_dir / "sae" / "cfg.json").exists():
        return [run_dir / "sae"]
    return sorted(p.parent for p in run_dir.glob("*/sae/cfg.json"))


def whole_contexts(contexts, n_tokens: int) -> tuple[int, int]:
    """The fewest leading contexts holding at least n_tokens non-special tokens: (contexts, their tokens)."""
    import torch

    cum = (~contexts.special_mask).sum(1).cumsum(0)
    n_ctx = min(int(torch.searchsorted(cum, torch.tensor(n_tokens))) + 1, len(cum))
    return n_ctx, int(cum[n_ctx - 1])


DEFAULT_ANALYSIS_TOKENS = 2_000_000
STATE_DIR = ".analysis"


def analyze(
    run_dir: str | Path, cfg=None, resume: bool = False, restart: bool = False, show_progress: bool = True
) -> dict:
    """`saebench analyze RUN`: one pass over held-out text through the model and every SAE of the run;
    writes each SAE's feature store (features.sqlite beside its sae/ folder). Returns a summary.

    A checkpoint of the accumulators is written every cfg.checkpoint_tokens; `resume` continues an
    interrupted pass from it and ends with the same store as an uninterrupted one."""
    import dataclasses
    import json
    import shutil
    import time

    from safetensors import safe_open
    from tqdm.auto import tqdm

    from saebench.analysis import AnalysisConfig, FeatureAccumulator, decoder_neighbours, logit_lens, sparse_codes
    from saebench.atomic import atomic_save_file
    from saebench.errors import DataError
    from saebench.models import is_causal
    from saebench.sae import SAE
    from saebench.store import STORE_NAME, write_store

    run_dir, cfg = Path(run_dir), cfg or AnalysisConfig()
    sae_dirs = run_sae_dirs(run_dir)
    if not (run_dir / "config.yaml").exists() or not sae_dirs:
        raise DataError(
            f"{run_dir} holds no trained SAE (needs config.yaml and sae/): train one with `saebench train CONFIG` first"
        )
    rc = load_config(run_dir / "config.yaml")
    model = load_model(rc.model, rc.device, rc.torch_dtype)
    saes = {d: SAE.load(d, rc.device) for d in sae_dirs}
    hook_of = {d: sae.cfg.hook or rc.harvest.hooks[0] for d, sae in saes.items()}
    harvester = Harvester(model, sorted(set(hook_of.values())), exclude_special=True)
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
    ctx = contexts.tokens.shape[1]

    device = harvester.device
    accs = {
        d: FeatureAccumulator(sae.cfg.n_latents, ctx, cfg, sae.cfg.activation == "abstopk", device)
        for d, sae in saes.items()
    }
    state_dir = run_dir / STATE_DIR
    state_path = state_dir / "state.safetensors"
    fingerprint = json.dumps(
        {
            "analysis": {**dataclasses.asdict(cfg), "checkpoint_tokens": None},
            "data": dataclasses.asdict(rc.data),
            "model": rc.model,
            "n_tokens": n_tokens,
            "saes": {str(d): (d / "sae.safetensors").stat().st_size for d in sae_dirs},
        },
        sort_keys=True,
    )
    start_ctx = tokens_done = 0
    if state_path.exists():
        with safe_open(str(state_path), "pt") as f:
            meta = f.metadata()
        if restart:
            shutil.rmtree(state_dir)
        elif not resume:
            raise DataError(
                f"an interrupted analysis ({meta['tokens_done']} of {n_tokens} tokens) is in {state_dir}: "
                f"pass --resume to continue it or --restart to start over"
            )
        elif meta["fingerprint"] != fingerprint:
            raise DataError(
                f"the interrupted analysis in {state_dir} used other settings: rerun with the same ones, or pass --restart"
            )
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(state_path), device=str(device))
            for k, (d, acc) in enumerate(accs.items()):
                acc.load(tensors, f"sae{k}")
            start_ctx, tokens_done = int(meta["contexts_done"]), int(meta["tokens_done"])

    started, tokens_before = time.perf_counter(), tokens_done
    bar = tqdm(
        total=n_tokens, initial=tokens_done, desc="analyze", unit="tok", unit_scale=True, disable=not show_progress
    )
    since_checkpoint = 0
    for i in range(start_ctx, n_ctx, cfg.batch_size):
        j = min(i + cfg.batch_size, n_ctx)
        acts, keep = harvester.device_activations(contexts.tokens[i:j], contexts.special_mask[i:j])
        b, pos = keep.to(device).nonzero(as_tuple=True)
        row_token = (b + i) * ctx + pos
        for d, sae in saes.items():
            accs[d].update(*sparse_codes(sae, acts[hook_of[d]]), row_token)
        tokens_done += len(row_token)
        since_checkpoint += len(row_token)
        bar.update(len(row_token))
        if since_checkpoint >= cfg.checkpoint_tokens and j < n_ctx:
            state_dir.mkdir(exist_ok=True)
            tensors = {k: v for n, acc in enumerate(accs.values()) for k, v in acc.state(f"sae{n}").items()}
            atomic_save_file(
                tensors,
                state_path,
                {"fingerprint": fingerprint, "contexts_done": str(j), "tokens_done": str(tokens_done)},
            )
            since_checkpoint = 0
    bar.close()
    seconds = time.perf_counter() - started

    finish_started = time.perf_counter()
    tok = model.tokenizer
    vocab = tok.batch_decode([[t] for t in range(len(tok))])
    vocab += [f"<{t}>" for t in range(len(vocab), int(model.cfg.d_vocab))]
    stores = []
    for d, sae in saes.items():
        results = accs[d].finish(n_tokens)
        results.decoder = decoder_neighbours(sae.W_dec.detach(), cfg.n_neighbours)
        if is_causal(model):
            results.logit_lens = logit_lens(model, sae.W_dec.detach(), cfg.n_logit)
        else:
            results.notes["logit_lens_note"] = (
                "skipped: an encoder model's unembedding (MLM head) is not a trained next-token readout"
            )
        eval_path = d.parent / "eval.json"
        if eval_path.exists():
            results.notes["eval"] = json.loads(eval_path.read_text())
        meta = {
            "model": rc.model,
            "hook": hook_of[d],
            "run": str(run_dir),
            "sae": str(d),
            "device": rc.device,
            "split": cfg.split,
            "data": dataclasses.asdict(rc.data),
            "activation": sae.cfg.activation,
            "k": sae.cfg.k,
            "d_in": sae.cfg.d_in,
            "signed": sae.cfg.activation == "abstopk",
            "n_examples": cfg.n_examples,
            "n_intervals": cfg.n_intervals,
            "per_interval": cfg.per_interval,
            "n_samples": cfg.n_samples,
            "seed": cfg.seed,
            "seconds": round(seconds, 2),
        }
        stores.append(str(write_store(d.parent / STORE_NAME, results, contexts.tokens[:n_ctx], vocab, meta)))
    shutil.rmtree(state_dir, ignore_errors=True)
    return {
        "stores": stores,
        "n_tokens": n_tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round((tokens_done - tokens_before) / max(seconds, 1e-9)),
        "finish_seconds": round(time.perf_counter() - finish_started, 2),
    }
