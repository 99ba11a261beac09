"""`saebench` command line: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed

from saebench import distributed, kernels
from saebench.analysis import AnalysisConfig
from saebench.app_launcher import launch
from saebench.circuits import trace_attention
from saebench.compare import compare
from saebench.config import apply_overrides, from_dict
from saebench.errors import ConfigError, SAEBenchError
from saebench.evals.suites import DEFAULT_SUITES, SUITES
from saebench.evaluate import EVAL_METRICS
from saebench.graph import INPUTS, attribution_graph, split_dictionaries
from saebench.models import load_model
from saebench.pipeline import analyze, eval_from_config, harvest_from_config, train_from_config
from saebench.readers import first_line
from saebench.runs import Run
from saebench.steering import generate, steer, steering_sweep
from saebench.sweep import sweep_from_config
from saebench.synthetic import PLANTED_ACTIVATIONS, SyntheticConfig, iter_synthetic_bench
from saebench.zoo.tiny import TINY_DIR, TinyConfig, train_tiny

ANALYSIS = AnalysisConfig()  # the defaults of `saebench analyze`


def _harvest(args: argparse.Namespace) -> None:

    manifest = harvest_from_config(args.config, args.set, max_shards=args.max_shards)
    print(
        json.dumps(
            {
                "cache_dir": manifest["cache_dir"],
                "tokens": manifest["n_tokens"],
                "shards": len(manifest["shards"]),
                "complete": manifest["complete"],
            }
        )
    )


def _train(args: argparse.Namespace) -> None:

    _, report = train_from_config(args.config, args.set, resume=args.resume, stop_after_steps=args.stop_after_steps)
    print(json.dumps(report))


# the columns `saebench sweep` and `saebench compare` print (all of them: `saebench compare --csv`)
SHOWN = ["sae", "activation", "k", "n_latents", "sae.fvu", "sae.l0", "sae.dead_fraction", "sae.ce_recovered"]


def _sweep(args: argparse.Namespace) -> None:

    analysis = AnalysisConfig(n_tokens=args.analyze_tokens) if args.analyze else None
    suites = args.suite.split(",")
    out = sweep_from_config(
        args.config, args.grid, args.zip, args.set, args.resume, suites, analysis, args.stop_after_steps
    )
    if out["evaluated"]:
        _print_table(compare([out["run_dir"]]), False)
    print(f"{len(out['cells'])} SAEs in {out['run_dir']}/<cell>/")


def _print_table(table, csv: bool) -> None:
    if csv:
        print(table.to_csv(index=False), end="")
    else:
        print(table[[c for c in SHOWN if c in table]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _compare(args: argparse.Namespace) -> None:

    _print_table(compare(args.run), args.csv)


def _eval(args: argparse.Namespace) -> None:

    suites = args.suite.split(",")
    given = {"explainer": args.explainer, "explainer_model": args.explainer_model}
    overrides = args.set + [f"eval.interp.{k}={json.dumps(v)}" for k, v in given.items() if v is not None]
    for hook, result in eval_from_config(args.run, suites, overrides=overrides, ks=args.k).items():
        print(hook)
        if "core" in suites:
            columns = {"sae": "sae", "sae_without_gradients": "sae no grad", "random_baseline": "random"}
            columns = {c: name for c, name in columns.items() if c in result}
            print(f"{'metric':<30}" + "".join(f"{name:>12}" for name in columns.values()), end="")
            print(f"    (CE and KL: {result['ce_convention']} convention)")
            for key in EVAL_METRICS:
                print(f"{key:<30}" + "".join(f"{result[c][key]:>12.4f}" for c in columns))
        for name in suites:
            if name != "core":
                print(f"{name}: {json.dumps(result[name])}")
        if args.k and "core" in suites:
            by_k = result["by_k"]
            print("at k'".ljust(30) + "".join(f"{f'sae@{k}':>12}{f'random@{k}':>12}" for k in by_k))
            for key in EVAL_METRICS:
                row = (f"{r['sae'][key]:>12.4f}{r['random_baseline'][key]:>12.4f}" for r in by_k.values())
                print(f"{key:<30}" + "".join(row))
        print(f"written to {result['run']}/eval.json")


def _k_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give k' values as integers separated by commas, e.g. 8,16,32"
        ) from None


def _analyze(args: argparse.Namespace) -> None:

    cfg = AnalysisConfig(
        n_tokens=args.tokens,
        split=args.split,
        n_examples=args.examples,
        batch_size=args.batch_size,
        checkpoint_tokens=args.checkpoint_tokens,
        seed=args.seed,
        k=args.k,
    )
    summary = analyze(args.run, cfg, resume=args.resume, restart=args.restart)
    print(json.dumps(summary))


def _app(args: argparse.Namespace) -> None:

    launch(args.run, host=args.host, port=args.port)


def _bench_synthetic(args: argparse.Namespace) -> None:

    data = SyntheticConfig(
        d=args.d,
        n_true=args.n_true,
        true_l0=args.true_l0,
        children=args.children,
        correlation=args.correlation,
        magnitude=args.magnitude,
        noise_std=args.noise,
    )
    for row in iter_synthetic_bench(
        tuple(args.activations.split(",")),
        data,
        n_tokens=args.tokens,
        matryoshka=args.matryoshka,
        batch_size=args.batch_size,
        lr=args.lr,
    ):
        print(json.dumps(row), flush=True)


def _parse_features(items: list[str]) -> dict[int, float]:

    out = {}
    for item in items:
        try:
            idx, val = item.split("=") if "=" in item else (item, "0")
            out[int(idx)] = float(val)
        except ValueError:
            raise ConfigError(f"--feature {item!r}: write INDEX=VALUE, e.g. --feature 123=8") from None
    return out


def _steer(args: argparse.Namespace) -> None:

    run = Run.open(args.run)
    model, sae = run.load_model(), run.load_sae(args.hook)
    features = _parse_features(args.feature)
    if args.sweep:
        (feature,) = features if len(features) == 1 else (None,)
        if feature is None:
            raise ConfigError("--sweep takes exactly one --feature")
        for row in steering_sweep(
            model,
            sae,
            feature,
            [float(v) for v in args.sweep.split(",")],
            args.prompt,
            mode=args.mode,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        ):
            print(json.dumps(row))
        return
    plain = generate(model, args.prompt, args.max_new_tokens, args.temperature, seed=args.seed)
    with steer(model, sae, features, mode=args.mode, positions=args.positions, unit=args.unit) as s:
        steered = generate(model, args.prompt, args.max_new_tokens, args.temperature, seed=args.seed, steering=s)
    print(
        json.dumps(
            {"prompt": args.prompt, "unsteered": plain, "steered": steered, "features": features, "mode": args.mode}
        )
    )


def _trace(args: argparse.Namespace) -> None:

    saes, model = {}, None
    for path in args.run:
        run = Run.open(path)
        model = model or run.load_model()
        saes.update({home.hook: run.load_sae(name) for name, home in run.trained_homes().items()})
    model = model or load_model(args.model)
    logit = tuple(int(t) for t in args.logit.split(",")) if args.logit else None
    r = trace_attention(
        model,
        args.prompt,
        args.layer,
        args.head,
        args.query_pos,
        args.key_pos,
        saes=saes,
        logit_tokens=(logit[0] if logit and len(logit) == 1 else logit),
    )
    print(
        f"layer {r.layer} head {r.head}: "
        f"query {r.query_pos} {r.tokens[r.query_pos]!r} -> key {r.key_pos} {r.tokens[r.key_pos]!r}; "
        f"score {r.score:.4f} (pairs sum to {float(r.pair_scores.sum()):.4f}), attention {r.pattern:.3f}"
    )
    print(r.top_pairs(args.top).to_string(index=False))
    print(r.marginals().head(args.top).to_string(index=False))
    print(r.ov_table(args.top).to_string(index=False))


def _graph(args: argparse.Namespace) -> None:

    runs = [Run.open(path) for path in args.run]
    saes = {h: sae for run in runs for h, sae in run.load_saes().items()}
    transcoders, others = split_dictionaries(saes)
    if not transcoders:
        raise ConfigError(
            f"{', '.join(args.run)} hold no transcoder (blocks.L.{' or blocks.L.'.join(INPUTS)} -> "
            "blocks.L.hook_mlp_out): give the run of transcoders trained by e.g. configs/tiny-transcoders.yaml"
        )
    graph = attribution_graph(
        runs[0].load_model(),
        transcoders,
        args.prompt,
        saes=others,
        max_n_logits=args.max_logits,
        desired_logit_prob=args.logit_prob,
    )
    path = graph.save(args.out or runs[0].graph_path(args.prompt), args.node_threshold, args.edge_threshold)
    kept = graph.prune(args.node_threshold, args.edge_threshold)
    replacement, completeness = graph.scores()
    print(
        json.dumps(
            {
                "graph": str(path),
                "nodes": int(kept.node_mask.sum()),
                "edges": int(kept.edge_mask.sum()),
                "nodes_before_pruning": len(graph.nodes),
                "replacement": replacement,
                "completeness": completeness,
            }
        )
    )


def _train_tiny(args: argparse.Namespace) -> None:
    given = {
        "train_tokens": args.tokens,
        "max_minutes": args.minutes,
        "n_layer": args.layers,
        "n_embd": args.d_model,
        "n_head": args.heads,
    }
    fields = {k: v for k, v in given.items() if v is not None}
    cfg = from_dict(TinyConfig, apply_overrides(fields, args.set, example="copy_task_steps=2000"), "tiny")
    card = train_tiny(Path(args.out) if args.out else TINY_DIR, cfg)
    print(json.dumps(card))


def _kernels_build(args: argparse.Namespace) -> None:

    reason = kernels.unavailable_reason()
    if reason is not None:
        raise SAEBenchError(f"cannot build the sparse kernels here ({reason}); they build on a machine with a CUDA GPU")
    if kernels.extension(verbose=args.verbose) is None:
        raise SAEBenchError(
            f"kernel build failed: {kernels._state['reason']} (rerun with --verbose for the compiler output)"
        )
    print(f"sparse kernels built in {kernels.build_dir()}")


def _hooks(args: argparse.Namespace) -> None:

    model = load_model(args.model)
    for name in model.hook_dict:
        print(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saebench", description="Sparse-autoencoder workbench.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("harvest", help="write a model's activations at the config's hooks to an on-disk cache")
    p.add_argument("config", help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. harvest.n_tokens=100000",
    )
    p.add_argument("--max-shards", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_harvest)

    p = sub.add_parser("train", help="train the config's SAE on its model's activations (runs/<name>/)")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its last checkpoint")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)

    p = sub.add_parser("sweep", help="train a grid of SAEs from one model pass (runs/<name>/<cell>/), then eval them")
    p.add_argument("config")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an axis of the grid (cartesian product), e.g. sae.k=16,32,64; keys: sae.*, harvest.hooks, train.lr, ...",
    )
    p.add_argument(
        "--zip", action="append", default=[], metavar="KEY=V1,V2", help="axes paired value by value (one axis)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of every cell")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES), help=f"eval suites, of: {', '.join(SUITES)}")
    p.add_argument("--analyze", action="store_true", help="also write each cell's feature store")
    p.add_argument("--analyze-tokens", type=int, default=None, help="tokens to analyse (default as saebench analyze)")
    p.add_argument("--resume", action="store_true", help="continue a killed sweep")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_sweep)

    p = sub.add_parser("compare", help="one row per SAE of the runs: settings and eval figures")
    p.add_argument("run", nargs="+", help="run directories (a sweep's SAEs are its cells)")
    p.add_argument("--csv", action="store_true", help="every column, as CSV")
    p.set_defaults(func=_compare)

    p = sub.add_parser("eval", help="evaluate a trained run on held-out text, next to a random-SAE baseline")
    p.add_argument("run", help="run directory, e.g. runs/tiny")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES), help=f"comma-separated suites, of: {', '.join(SUITES)}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an eval key, e.g. eval.n_tokens=50000 or eval.interp.n_features=100",
    )
    p.add_argument(
        "--k",
        type=_k_list,
        default=[],
        metavar="K1,K2,...",
        help="also evaluate at these k' latents per token (a per-token SAE, e.g. hierarchical_topk); eval.json by_k",
    )
    p.add_argument("--explainer", default=None, metavar="URL", help="interp: an OpenAI-compatible chat endpoint")
    p.add_argument("--explainer-model", default=None, metavar="NAME", help="interp: the model the endpoint serves")
    p.set_defaults(func=_eval)

    p = sub.add_parser("analyze", help="per-feature statistics and examples over held-out text -> RUN/features.sqlite")
    p.add_argument("run", help="run directory with a trained SAE, e.g. runs/tiny")
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens to analyse (default: 2M, or the whole split if smaller)"
    )
    p.add_argument(
        "--split", default=ANALYSIS.split, help="data split of the run's dataset (default: the held-out test split)"
    )
    p.add_argument("--examples", type=int, default=ANALYSIS.n_examples, help="top-activating examples kept per feature")
    p.add_argument("--batch-size", type=int, default=ANALYSIS.batch_size, help="contexts per model forward")
    p.add_argument("--seed", type=int, default=ANALYSIS.seed, help="seed of the per-feature uniform samples")
    p.add_argument("--k", type=int, default=None, help="encode at k' latents per token (a per-token SAE)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted analysis from its last checkpoint")
    p.add_argument("--restart", action="store_true", help="discard an interrupted analysis and start over")
    p.add_argument("--checkpoint-tokens", type=int, default=ANALYSIS.checkpoint_tokens, help=argparse.SUPPRESS)
    p.set_defaults(func=_analyze)

    p = sub.add_parser("app", help="open the web app on trained (and analysed) runs")
    p.add_argument("run", nargs="+", help="run directories; only these are ever opened")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8501)
    p.set_defaults(func=_app)

    p = sub.add_parser("steer", help="generate with SAE features pushed, next to the unsteered text")
    p.add_argument("run", help="run directory with a trained SAE")
    p.add_argument("--feature", action="append", required=True, metavar="INDEX=VALUE")
    p.add_argument("--prompt", default="")
    p.add_argument("--mode", default="add", choices=["add", "clamp", "conditional", "ablate", "orthogonal"])
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    p.add_argument("--unit", action="store_true", help="add: use the unit-normalised decoder row")
    p.add_argument("--hook", default=None, help="which SAE of a multi-hook run")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", default=None, metavar="S1,S2,...", help="scales to sweep for one feature")
    p.set_defaults(func=_steer)

    p = sub.add_parser("trace", help="attribute an attention head's score and output to SAE features")
    p.add_argument("run", nargs="*", help="run directories whose SAEs decompose the upstream residual stream")
    p.add_argument("--model", default="tiny", help="model when no run is given")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True)
    p.add_argument("--query-pos", type=int, default=-1)
    p.add_argument("--key-pos", type=int, default=None)
    p.add_argument(
        "--logit", default=None, metavar="TOKEN[,TOKEN]", help="direct logit attribution to a token id or a difference"
    )
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=_trace)

    p = sub.add_parser("graph", help="attribution graph of a prompt through a run's transcoders -> JSON")
    p.add_argument("run", nargs="+", help="the run of transcoders (one per layer or fewer), then runs of other SAEs")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default=None, help="JSON file (default: RUN/graphs/<the prompt's first words>-<hash>.json)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="share of the influence on the logits kept")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="share of the edge influence kept")
    p.add_argument("--max-logits", type=int, default=10, help="logit nodes: at most this many top tokens")
    p.add_argument("--logit-prob", type=float, default=0.95, help="logit nodes: until they hold this probability")
    p.set_defaults(func=_graph)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("synthetic", help="recover planted features; MCC, dead fraction and L0 per SAE family")
    p.add_argument("--activations", default=",".join(PLANTED_ACTIVATIONS))
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--n-true", type=int, default=2048)
    p.add_argument("--true-l0", type=float, default=8.0)
    p.add_argument("--children", type=int, default=0, help="children per parent in feature trees (0 = none)")
    p.add_argument("--correlation", type=float, default=0.0, help="latent correlation of features within a group")
    p.add_argument("--magnitude", choices=("uniform", "lognormal"), default="uniform")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--matryoshka", action="store_true")
    p.add_argument("--tokens", type=int, default=8_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None, help="default: the trainer's")
    p.set_defaults(func=_bench_synthetic)

    kern = sub.add_parser("kernels", help="the sparse-decoder CUDA kernels").add_subparsers(
        dest="kernels_command", required=True
    )
    p = kern.add_parser("build", help="compile the CUDA kernels now (otherwise they build on first use)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=_kernels_build)

    p = sub.add_parser("hooks", help="list a model's hook names")
    p.add_argument("model", nargs="?", default="tiny")
    p.set_defaults(func=_hooks)

    zoo = sub.add_parser("zoo", help="the bundled models").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("train-tiny", help="retrain the bundled tiny LM from its recipe")
    p.add_argument("--out", default=None, help="output folder (default: the bundled one)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: the recipe's, 28M)")
    p.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    p.add_argument("--layers", type=int, default=None, help="default 2")
    p.add_argument("--d-model", type=int, default=None, help="default 192")
    p.add_argument("--heads", type=int, default=None, help="default 6")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a recipe option (TinyConfig), e.g. copy_task_steps=2000",
    )
    p.set_defaults(func=_train_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torchrun = distributed.env_world() > 1
    rank = f" (rank {os.environ['RANK']})" if torchrun else ""
    # what a collective raises on the ranks that survive another rank's death
    peer_lost = (torch.distributed.DistBackendError, torch.distributed.DistNetworkError) if torchrun else ()
    try:
        args.func(args)
        distributed.shutdown()  # leave the process group, if this process joined one
    except SAEBenchError as e:
        print(f"saebench{rank}: error: {e}", file=sys.stderr)
        return 2
    except peer_lost as e:
        print(
            f"saebench{rank}: error: another rank stopped ({first_line(e)}); its error is above. "
            f"torchrun restarts from the last checkpoint with --max-restarts, or rerun with --resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("saebench: interrupted; completed work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`saebench hooks tiny | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
