"""An induction head of tiny traced through SAE features (docs/benchmarks.md, "Towards an induction head").

saebench train configs/tiny-attn.yaml      # hook_z and mlp_out SAEs on layer 0, one pass
python examples/induction_circuit.py runs/tiny-attn
"""

import argparse

import torch

import saebench as sb
from saebench.induction import summarize_induction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run of configs/tiny-attn.yaml")
    parser.add_argument("--prompts", type=int, default=8, help="held-out spans to repeat and trace")
    parser.add_argument("--span", type=int, default=32)
    args = parser.parse_args()

    model = sb.load_model("tiny")
    report = sb.induction_report(model)
    layer, head = divmod(int(report["induction"].argmax()), model.cfg.n_heads)
    print(f"induction scores on repeated random tokens (layer x head):\n{report['induction'].numpy().round(3)}")
    print(
        f"best: L{layer}H{head} {float(report['induction'][layer, head]):.3f}; loss on the first copy "
        f"{report['loss_first_copy']:.2f} nats, on the second {report['loss_second_copy']:.2f}"
    )
    ctx = sb.load_contexts(sb.DataConfig(split="test", max_documents=300), model.tokenizer, show_progress=False)
    prev = sb.head_scores(model, ctx)["prev_token"]
    print(f"previous-token scores on held-out text (layer x head):\n{prev.numpy().round(3)}")

    saes = sb.Run(args.run).load_saes(device="cpu")
    s = summarize_induction(model, saes, layer, head, ctx.tokens, span=args.span, n_prompts=args.prompts)
    print(
        f"\nL{layer}H{head} at {s.n_traces} second-copy tokens of {args.prompts} repeated held-out spans: "
        f"mean attention to the induction key {s.mean_attention:.3f}"
    )
    print("advantage = score(induction key) - score(key 3 earlier), share by component group:")
    for side, groups in (("key", s.key_groups), ("query", s.query_groups)):
        print(f"  {side} side: " + ", ".join(f"{g} {v:+.3f}" for g, v in groups.items() if abs(v) >= 0.005))
    for side, rows, what in (("key", s.key_features, "previous token"), ("query", s.query_features, "current token")):
        print(
            f"top {side}-side features (share; the query token it served most; its top-20 held-out examples' {what}):"
        )
        for name, share, query, token, how_often in rows:
            print(f"  {name:32s} {share:+.3f}  query {query!r:12s} {what} {token!r} in {how_often:.0%}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
