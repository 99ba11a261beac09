"""Time to trace one (layer, head, query) through SAE features, in one run.

    python benchmarks/trace.py [--repeats 5] [--skip-gpt2]

Cases: `tiny` with SAEs on every upstream sublayer (attn hook_z + mlp_out of layer 0, 8x width)
tracing layer 1; a gpt2-small-sized model with random weights (12 layers, d 768; built
locally, nothing downloaded) with 24576-latent SAEs (random weights: the cost does not depend
on training) on attn_out and mlp_out of every layer below 6, tracing layer 6. Prints one JSON
line per case (median seconds, goal < 1 s on CPU for tiny).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import saebench as sb
from saebench.circuits import trace_attention

PROMPT = (
    "And God said, Let there be light: and there was light. "
    "And God saw the light, that it was good: and God divided the light from the darkness."
)


def random_sae(hook: str, d_in: int, n: int, k: int = 32) -> sb.SAE:
    return sb.SAE(sb.SAEConfig(d_in=d_in, n_latents=n, k=k, hook=hook), seed=hash(hook) % 1000).eval()


def time_case(name: str, model, layer: int, saes: dict, repeats: int) -> None:
    trace_attention(model, PROMPT, layer, 0, saes=saes)  # warm-up
    times = []
    for head in range(repeats):
        start = time.perf_counter()
        r = trace_attention(model, PROMPT, layer, head % model.cfg.n_heads, saes=saes)
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "case": name,
                "layer": layer,
                "n_saes": len(saes),
                "sae_latents": sorted({s.cfg.n_latents for s in saes.values()}),
                "query_pos": r.query_pos,
                "q_components": len(r.q_names),
                "median_s": round(statistics.median(times), 4),
                "min_s": round(min(times), 4),
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-gpt2", action="store_true")
    args = ap.parse_args()
    tiny = sb.load_model("tiny")
    d, z = tiny.cfg.d_model, tiny.cfg.n_heads * tiny.cfg.d_head
    saes = {
        "blocks.0.attn.hook_z": random_sae("blocks.0.attn.hook_z", z, 8 * z),
        "blocks.0.hook_mlp_out": random_sae("blocks.0.hook_mlp_out", d, 8 * d),
    }
    time_case("tiny", tiny, 1, saes, args.repeats)
    if args.skip_gpt2:
        return
    from transformers import GPT2Config, GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tiny.tokenizer), n_positions=256, n_embd=768, n_layer=12, n_head=12)
        ).save_pretrained(tmp)
        tiny.tokenizer.save_pretrained(tmp)
        gpt2 = sb.load_model(tmp)
        hooks = [f"blocks.{i}.hook_{s}_out" for i in range(6) for s in ("attn", "mlp")]
        time_case("gpt2_small_random", gpt2, 6, {h: random_sae(h, 768, 24576) for h in hooks}, args.repeats)


if __name__ == "__main__":
    main()
