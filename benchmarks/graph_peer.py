"""circuit-tracer 0.5.0's attribution graph of the same prompt through the same transcoders: run by
benchmarks/graph.py and tests/test_graph.py in circuit-tracer's own venv (.cache/circuit-tracer-venv), never
imported by saebench.

    .cache/circuit-tracer-venv/bin/python benchmarks/graph_peer.py IN.safetensors OUT.safetensors [--repeats N]

IN holds tiny's folder (`tiny_dir`, bytes), the prompt's tokens [pos] (BOS first) and per layer L the transcoder
as saebench exports it: L.W_enc [d_in n], L.b_enc [n] (its pre-activation at x = 0), L.W_dec [n d], L.b_dec [d],
L.W_skip [d_in d] (skip transcoders), L.k [] (TopK) or L.threshold [n] (JumpReLU). tiny becomes a
HookedTransformer (GPT-2 weights, LayerNorm not folded), each transcoder reads ln2.hook_normalized (before ln2's
weight and bias, as on saebench's bridge) and writes hook_mlp_out.
OUT: adjacency, active_features [n 3], activation_values, logit_tokens, logit_probabilities, seconds (the
fastest of --repeats runs) and peak_rss_mb.
"""

# pyright: reportMissingImports=false, reportCallIssue=false
# (its imports are circuit-tracer venv's: another TransformerLens than .venv's)
import argparse
import resource
import sys
import time

import torch
from circuit_tracer import attribute
from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.transcoder.activation_functions import JumpReLU
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast


class TopK(torch.nn.Module):
    """saebench's TopK inference rule: the k largest pre-activations per token, ReLU'd."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    torch.set_grad_enabled(True)
    data = load_file(args.inputs)
    tiny = bytes(data["tiny_dir"].tolist()).decode()
    hf = GPT2LMHeadModel.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        model_name="tiny",
        default_prepend_bos=False,
        device="cpu",
    )
    layers = {}
    for i in range(cfg.n_layers):
        w = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"{i}.")}
        act = TopK(int(w["k"])) if "k" in w else JumpReLU(w["threshold"], 0.1)
        tc = SingleLayerTranscoder(
            cfg.d_model, w["W_enc"].shape[1], act, i, skip_connection="W_skip" in w, device="cpu", dtype=torch.float32
        )
        with torch.no_grad():
            tc.W_enc.copy_(w["W_enc"].T)
            tc.b_enc.copy_(w["b_enc"])
            tc.W_dec.copy_(w["W_dec"])
            tc.b_dec.copy_(w["b_dec"])
            if tc.W_skip is not None:
                tc.W_skip.copy_(w["W_skip"].T)  # circuit-tracer's skip is x W_skip^T
        layers[i] = tc
    model = TransformerLensReplacementModel(cfg)
    model.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{tiny}/tokenizer.json", bos_token="<|endoftext|>")
    model._configure_replacement_model(TranscoderSet(layers, "ln2.hook_normalized", "hook_mlp_out"))
    tokens = data["tokens"]
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        graph = attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=256)
        best = min(best, time.perf_counter() - start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_file(
        {
            "adjacency": graph.adjacency_matrix.contiguous(),
            "active_features": graph.active_features.contiguous(),
            "activation_values": graph.activation_values.contiguous(),
            "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
            "logit_probabilities": graph.logit_probabilities.contiguous(),
            "input_tokens": graph.input_tokens.contiguous(),
            "seconds": torch.tensor(best),
            "peak_rss_mb": torch.tensor(rss_mb),
        },
        args.out,
    )
    print(f"circuit-tracer: {best:.2f} s, peak RSS {rss_mb:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
