"""saebench's attribution graph against circuit-tracer 0.5.0's on tiny: one prompt of --tokens tokens (BOS, then a
random token span and its repeat: an induction prompt), one transcoder per layer; the time (fastest of --repeats,
after one warm-up) and the process's peak RSS of each tool, how far apart the two graphs are (the same active
features, the largest difference between their pre-pruning edge weights), and saebench's induction edge (into the
top logit from the first copy's next token, the head that carries it, its QK explanation's top key-side components).

    python benchmarks/graph.py RUN [--tokens 32] [--repeats 3]   # RUN: transcoders, e.g. configs/tiny-transcoders.yaml
    python benchmarks/graph.py --random [--latents 1536 --k 16]  # random transcoders (error nodes keep it exact)

circuit-tracer runs in its own venv (.cache/circuit-tracer-venv: python3 -m venv, then pip install torch==2.13.0,
then circuit-tracer==0.5.0) through benchmarks/graph_peer.py; one JSON line per tool, then one with the ratios.
Each transcoder goes to it reading TransformerLens' ln2.hook_normalized (before ln2's weight and bias, as the
bridge's blocks.L.ln2.hook_normalized); one reading blocks.L.ln2.hook_out is rewritten exactly to read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import saebench as sb
from saebench.circuits import _ln
from saebench.graph import AttributionGraph, split_dictionaries, transcoder_layer
from saebench.models import TINY_DIR

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".cache" / "circuit-tracer-venv" / "bin" / "python"


def induction_prompt(model, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """[1 n_tokens]: BOS, a random span of (n_tokens - 1) // 2 + 1 tokens, then its start again."""
    gen = torch.Generator().manual_seed(seed)
    span = torch.randint(10, model.cfg.d_vocab, ((n_tokens - 1) // 2 + 1,), generator=gen)
    body = torch.cat([span, span])[: n_tokens - 1]
    return torch.cat([torch.tensor([model.tokenizer.bos_token_id]), body])[None]


def export_for_circuit_tracer(model, transcoders: dict[str, sb.SAE], tokens: torch.Tensor, path: Path) -> None:
    """Write benchmarks/graph_peer.py's input: tiny's folder, the tokens and each layer's transcoder (a per-token
    TopK family's k, or a thresholded family's threshold)."""
    out = {"tiny_dir": torch.tensor(list(str(TINY_DIR).encode()), dtype=torch.uint8), "tokens": tokens[0]}
    for tc in transcoders.values():
        i = transcoder_layer(tc)
        assert i is not None
        W_enc, W_skip = tc.W_enc.detach(), getattr(tc, "W_skip", None)
        b_enc = tc.pre_acts(torch.zeros(1, tc.cfg.d_in))[0].detach()
        b_dec = tc.b_dec.detach().clone()
        if str(tc.cfg.hook).endswith("ln2.hook_out"):  # y = x w + b for TransformerLens' x (ln2.hook_normalized)
            w, b = _ln(model, i, "ln2")
            W_enc, b_enc = w[:, None] * W_enc, b_enc + b @ W_enc
            if W_skip is not None:
                W_skip, b_dec = w[:, None] * W_skip.detach(), b_dec + b @ W_skip.detach()
        layer = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": tc.W_dec.detach(), "b_dec": b_dec}
        layer |= {"W_skip": W_skip.detach()} if W_skip is not None else {}
        layer |= {"threshold": tc.threshold} if tc.cfg.family.threshold else {"k": torch.tensor(tc.cfg.k)}
        out |= {f"{i}.{k}": v.contiguous().float() for k, v in layer.items()}
    save_file(out, str(path))


def circuit_tracer_graph(model, transcoders: dict[str, sb.SAE], tokens: torch.Tensor, repeats: int = 1) -> dict:
    """circuit-tracer's graph of the tokens (benchmarks/graph_peer.py's output)."""
    with tempfile.TemporaryDirectory() as tmp:
        export_for_circuit_tracer(model, transcoders, tokens, Path(tmp) / "in.safetensors")
        cmd = [str(PEER_PYTHON), str(ROOT / "benchmarks" / "graph_peer.py"), f"{tmp}/in.safetensors"]
        subprocess.run([*cmd, f"{tmp}/out.safetensors", "--repeats", str(repeats)], check=True)
        return load_file(f"{tmp}/out.safetensors")


def compare(graph: AttributionGraph, peer: dict) -> dict:
    """Where the two graphs differ: features (layer, position, feature), their values, logit tokens, edge weights."""
    ours = torch.tensor([[n.layer, n.position, n.feature] for n in graph.nodes if n.kind == "feature"]).reshape(-1, 3)
    same = ours.shape == peer["active_features"].shape and bool((ours == peer["active_features"]).all())
    values = torch.tensor([n.value for n in graph.nodes if n.kind == "feature"])
    logits = [n.token_id for n in graph.nodes if n.kind == "logit"]
    out = {"same_features": same, "same_logits": logits == peer["logit_tokens"].tolist(), "features": len(ours)}
    if same and out["same_logits"]:
        out["max_value_diff"] = float((values - peer["activation_values"]).abs().max()) if len(values) else 0.0
        out["max_edge_diff"] = float((graph.adjacency - peer["adjacency"]).abs().max())
        out["max_edge"] = float(graph.adjacency.abs().max())
    return out


def induction_edge(graph: AttributionGraph) -> dict:
    """On `induction_prompt`: whether the top logit is the induction completion, the embedding at another position
    that weighs most into it (the first copy's next token: `expected`), and the head carrying most of that edge."""
    n, span = len(graph.tokens), (len(graph.tokens) - 1) // 2 + 1
    expected = n - span  # the position after the last token's first occurrence
    logits = [i for i, x in enumerate(graph.nodes) if x.kind == "logit"]
    top = max(logits, key=lambda i: graph.nodes[i].value)
    embeds = [i for i, x in enumerate(graph.nodes) if x.kind == "embedding" and x.position < n - 1]
    source = max(embeds, key=lambda i: abs(float(graph.adjacency[top, i])))
    split = graph.attention([(source, top)])[0]
    layer, head = divmod(int(split.abs().argmax()), split.shape[1])
    r = graph.qk(layer, head, n - 1, graph.nodes[source].position)
    return {
        "top_logit_is_induction": graph.nodes[top].token_id == graph.tokens[expected],
        "edge_source": graph.nodes[source].position,
        "expected": expected,
        "top_head": f"L{layer}H{head}",
        "head_share": float(split[layer, head] / graph.adjacency[top, source]),
        "key_side_top": [r.k_names[i] for i in r.key_marginals().argsort(descending=True)[:5].tolist()],
    }


def random_transcoders(n_latents: int, k: int) -> dict[str, sb.SAE]:
    """One random skip transcoder per layer of tiny, firing on every token."""
    out = {}
    for i in range(2):
        hook = f"blocks.{i}.ln2.hook_normalized"
        extra: dict = {"kind": "skip_transcoder", "output_hook": f"blocks.{i}.hook_mlp_out"}
        if "kind" not in {f.name for f in dataclasses.fields(sb.SAEConfig)}:  # before saebench knew transcoders
            extra = {}
        tc = sb.SAE(sb.SAEConfig(d_in=192, n_latents=n_latents, k=k, hook=hook, model="tiny", **extra), seed=i)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            tc.b_enc.normal_(0.3, 0.1, generator=gen)
            tc.b_dec.normal_(0, 0.1, generator=gen)
        tc.W_skip = torch.nn.Parameter(0.05 * torch.randn(192, 192, generator=gen))
        out[hook] = tc
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a run of transcoders (configs/tiny-transcoders.yaml)")
    p.add_argument("--random", action="store_true", help="random transcoders instead of a run's")
    p.add_argument("--latents", type=int, default=1536)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if (args.run is None) == (not args.random):
        p.error("give a RUN of transcoders or --random")
    model = sb.load_model("tiny")
    if args.random:
        transcoders = random_transcoders(args.latents, args.k)
    else:
        transcoders = split_dictionaries(sb.Run(args.run).load_saes())[0]
    tokens = induction_prompt(model, args.tokens)
    sb.attribution_graph(model, transcoders, tokens)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        graph = sb.attribution_graph(model, transcoders, tokens)
        seconds.append(time.perf_counter() - start)
    ours = {
        "tool": "saebench",
        "seconds": min(seconds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "nodes": len(graph.nodes),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(ours), flush=True)
    print(json.dumps({"induction": induction_edge(graph)}), flush=True)
    if not PEER_PYTHON.exists():
        print(json.dumps({"circuit_tracer": f"skipped: no venv at {PEER_PYTHON} (see this script's docstring)"}))
        return
    peer = circuit_tracer_graph(model, transcoders, tokens, args.repeats + 1)  # its first run is its warm-up
    theirs = {
        "tool": "circuit-tracer 0.5.0",
        "seconds": float(peer["seconds"]),
        "peak_rss_mb": float(peer["peak_rss_mb"]),
    }
    print(json.dumps(theirs))
    ratios = {"speedup": theirs["seconds"] / ours["seconds"], "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    print(json.dumps(ratios | compare(graph, peer)))


if __name__ == "__main__":
    main()
