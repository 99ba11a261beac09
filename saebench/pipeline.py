"""Config-driven jobs shared by the CLI and notebooks: config -> model -> data -> activations."""

from __future__ import annotations

from pathlib import Path

from saebench.config import RunConfig, load_config
from saebench.data import load_contexts
from saebench.harvest import Harvester, harvest_to_disk, store_dtype
from saebench.models import load_model


def harvest_from_config(cfg: RunConfig | str | Path, overrides: list[str] = (), max_shards: int | None = None) -> dict:
    """Run the config's harvest into its cache folder; returns the manifest (+ "cache_dir")."""
    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg, list(overrides))
    model = load_model(cfg.model, cfg.device, cfg.torch_dtype)
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
        raise ConfigError(f"sae.d_in is {s.d_in} but {hook} of {cfg.model} has width {d_in}: set sae.d_in={d_in} or remove it")
    return SAEConfig(
        d_in=d_in, n_latents=s.n_latents or s.expansion * d_in, activation=s.activation, k=s.k, matryoshka=s.matryoshka,
        aux_coef=s.aux_coef, k_aux=s.k_aux, dead_tokens=s.dead_tokens, zipf_exponent=s.zipf_exponent, hook=hook, model=cfg.model,
    )


def train_from_config(cfg: RunConfig | str | Path, overrides: list[str] = (), resume: bool = False, stop_after_steps: int | None = None):
    """`saebench train`: harvest (streamed or cached) and train the config's SAE into runs/<name>/."""
    import yaml

    from saebench.config import to_dict
    from saebench.errors import ConfigError
    from saebench.harvest import ActivationStore, stream_activations
    from saebench.atomic import atomic_write_text
    from saebench.harvest import hook_dirname
    from saebench.train import TrainConfig, train_sae, train_saes

    if not isinstance(cfg, RunConfig):
        cfg = load_config(cfg, list(overrides))
    hooks = cfg.harvest.hooks
    t = cfg.train
    if t.source not in ("stream", "cache"):
        raise ConfigError(f"train.source must be stream or cache, got {t.source!r}")
    run_dir = cfg.run_dir
    if not resume and ((run_dir / "metrics.jsonl").exists() or any(run_dir.glob("*/metrics.jsonl"))):
        from saebench.errors import DataError

        raise DataError(f"{run_dir} already holds a training run: pass --resume to continue it, or set name to a new run")
    model = load_model(cfg.model, cfg.device, cfg.torch_dtype)
    harvester = Harvester(model, hooks, cfg.harvest.exclude_special, store_dtype(cfg.harvest))
    sae_cfgs = {hook_dirname(h): _sae_config(cfg, harvester.widths[h], h) for h in hooks}
    if t.source == "cache":
        if len(hooks) > 1:
            raise ConfigError("train.source: cache trains one hook at a time; use train.source: stream for several hooks")
        manifest = harvest_from_config(cfg)
        store = ActivationStore(manifest["cache_dir"], hooks[0])
        source = lambda epoch: store.iter_batches(t.batch_size, seed=cfg.seed * 1000 + epoch)
    else:
        contexts = load_contexts(cfg.data, model.tokenizer)
        chunk = min(t.batch_size, cfg.harvest.buffer_tokens // 2)
        source = lambda epoch: stream_activations(
            harvester, contexts, batch_tokens=chunk, buffer_tokens=cfg.harvest.buffer_tokens,
            batch_size=cfg.harvest.batch_size, seed=cfg.seed * 1000 + epoch, epochs=1)
    train_cfg = TrainConfig(
        n_tokens=t.n_tokens, batch_size=t.batch_size, lr=t.lr, warmup_steps=t.warmup_steps, decay_fraction=t.decay_fraction,
        grad_clip=t.grad_clip, enc_init_scale=t.enc_init_scale, log_every=t.log_every, checkpoint_every=t.checkpoint_every, seed=cfg.seed, device=cfg.device,
        wandb_project=t.wandb_project,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if len(sae_cfgs) == 1:
        sae, report = train_sae(next(iter(sae_cfgs.values())), source, train_cfg, run_dir=run_dir, resume=resume, stop_after_steps=stop_after_steps)
        return sae, {**report, "run_dir": str(run_dir)}
    saes, reports = train_saes(sae_cfgs, source, train_cfg, run_dir=run_dir, resume=resume, stop_after_steps=stop_after_steps)
    return saes, {"saes": reports, "run_dir": str(run_dir)}


def eval_from_config(run_dir: str | Path) -> dict:
    """`saebench eval RUN`: core metrics on held-out activations and CE/KL with the SAE spliced in,
    each next to a random-SAE baseline; written to RUN/eval.json."""
    import json

    from saebench.data import TokenContexts
    from saebench.errors import DataError
    from saebench.evaluate import evaluate_sae, random_baseline, spliced_losses
    from saebench.harvest import stream_activations
    from saebench.sae import SAE
    from saebench.atomic import atomic_write_text

    run_dir = Path(run_dir)
    sae_dirs = [run_dir / "sae"] if (run_dir / "sae" / "cfg.json").exists() else sorted(p.parent for p in run_dir.glob("*/sae/cfg.json"))
    sae_dirs = [d if d.name == "sae" else d / "sae" for d in sae_dirs]
    if not (run_dir / "config.yaml").exists() or not sae_dirs:
        raise DataError(f"{run_dir} is not a finished training run (needs config.yaml and sae/); train it with `saebench train`")
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
        acts = torch_cat(b[hook] for b in stream_activations(harvester, contexts, batch_tokens=4096, buffer_tokens=8192, n_tokens=cfg.eval.n_tokens, batch_size=cfg.harvest.batch_size, epochs=1))
        baseline = random_baseline(sae)
        result = {
            "run": str(sae_dir.parent), "hook": hook, "split": cfg.eval.split,
            "sae": {**evaluate_sae(sae, acts), **spliced_losses(model, sae, hook, few)},
            "random_baseline": {**evaluate_sae(baseline, acts), **spliced_losses(model, baseline, hook, few)},
        }
        atomic_write_text(sae_dir.parent / "eval.json", json.dumps(result, indent=1) + "\n")
        results[hook] = result
    return results


def torch_cat(parts):
    import torch

    return torch.cat(list(parts))
