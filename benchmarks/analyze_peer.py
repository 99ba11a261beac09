"""SAEDashboard 0.8.0 computing feature dashboards on `tiny`, timed, for comparison with saebench's analysis pass.

    python benchmarks/analyze_peer.py [--contexts 64] [--features 32] [--sae SAELENS_DIR] [--minibatch-tokens 64]

SAEDashboard runs in its own venv (.cache/dashboard-venv, made on first use: torch 2.13.0 CPU first, then
sae-dashboard 0.8.0 with its dependencies pinned; see DASHBOARD_PINS). In this process `tiny`'s HF GPT-2 weights
are converted to a transformer_lens HookedTransformer state dict + config (no LayerNorm folding or centering, so
hook activations equal saebench's TransformerBridge ones; the peer checks that against reference activations of
the first contexts and fails if they differ by more than 1e-4 relative), the tokens go to a safetensors file, and
the SAELens-format SAE is copied with `rescale_acts_by_decoder_norm: true` (see _peer_sae_folder). The peer
script builds the model and SAE (untimed), does a small untimed warm-up run (4 contexts, 2 features), then times
`SaeVisRunner(cfg).run(...)`: the full default feature-centric dashboard data (feature tables, activation
histogram, logit table and histogram, top-activation and quantile sequence groups) for the given features.

run_sae_dashboard(...) returns the peer's JSON: tool, seconds, n_features, n_tokens, feature_tokens_per_s, and
max_act_first_feature (the max activation SAEDashboard found for features[0] over the tokens it does not ignore:
by default saebench's special tokens, so it is comparable to saebench's max over non-special positions).
Without --sae the CLI uses a random saebench TopK SAE and also prints saebench's own max for that feature.

For a fair comparison: SAEDashboard takes tokens, so `seconds` includes the model forward (stopped after the
hook's block) and, for TopK, a full-width SAE encode, repeated once per feature batch (minibatch_size_features,
default 256); `seconds_acts` is that part (plus its rolling correlation updates). Its cost is roughly a fixed
per-token part plus a per-feature part (Python-side histograms, 10 quantile groups + top group, logit tables,
feature-correlation tables), so compare at equal n_features and n_tokens. Its logits-histogram ticks are built
in steps of 1e-6 when a feature's logit range is under 0.3, as it often is on tiny (hundreds of thousands of
ticks, rounded one by one); that is part of what it does and takes a large share of the time here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_VENV = ROOT / ".cache" / "dashboard-venv"
TINY = ROOT / "saebench" / "zoo" / "tiny"
HOOK = "blocks.1.hook_resid_post"

# Exact versions that resolve together here. sae-dashboard 0.8.0 on PyPI requires transformers<4.57 and
# sae-lens<7, which caps transformer-lens at 2.17.0 (2.18 needs transformers>=4.57); transformer-lens 2.17.0
# needs numpy<2, and pyarrow 26 (pulled by datasets) needs numpy>=2, so pyarrow is pinned to 25.0.1.
# torch is pinned again in the same command so nothing upgrades it to a CUDA build.
DASHBOARD_PINS = [
    "sae-dashboard==0.8.0",
    "sae-lens==6.54.12",
    "transformer-lens==2.17.0",
    "transformers==4.56.2",
    "numpy==1.26.4",
    "pyarrow==25.0.1",
    "torch==2.13.0",
    "torchvision==0.28.0",
]
# decode-clt (a sae-dashboard dependency, used only for cross-layer transcoders) pulls torchvision and
# torchaudio; the torchvision 0.28.0 wheel here does not load against torch 2.13.0+cpu ("operator
# torchvision::nms does not exist") and then breaks `import transformers`, so both are removed again.
DASHBOARD_REMOVE = ["torchvision", "torchaudio"]
PROBE = "import sae_dashboard.sae_vis_runner, sae_lens, transformer_lens"

PEER_SCRIPT = r"""
import json, sys, time
from importlib.metadata import version
import torch
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from sae_lens import SAE
from sae_dashboard import sae_vis_runner as svr
from sae_dashboard.feature_data_generator import FeatureDataGenerator
from sae_dashboard.layout import SaeVisLayoutConfig
from sae_dashboard.sae_vis_data import SaeVisConfig

a = json.loads(sys.argv[1])
hook, features = a["hook"], a["features"]

# --- model and SAE (untimed) -------------------------------------------------------------------
model = HookedTransformer(HookedTransformerConfig(**json.loads(open(a["model_cfg"]).read())))
model.load_and_process_state_dict(load_file(a["model_weights"]), fold_ln=False, center_writing_weights=False,
                                  center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=False)
model.eval()
data = load_file(a["tokens"])
tokens = data["tokens"]
check = None
if "ref_acts" in data:
    with torch.inference_mode():
        _, cache = model.run_with_cache(data["ref_tokens"], names_filter=hook)
    got, ref = cache[hook].float(), data["ref_acts"].float()
    rel = float(((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).max())
    check = {"contexts": int(ref.shape[0]), "max_rel_err": rel}
    if not rel < a["check_tol"]:
        sys.exit(f"HookedTransformer {hook} differs from saebench's bridge: max relative error {rel:.3g}")
sae = SAE.load_from_disk(a["sae_dir"], device="cpu")
sae.eval()
if a["skip_fold"]:  # decoder rows not unit-norm: keep the SAE's own TopK activations (see the harness)
    sae.fold_W_dec_norm = lambda: None

# --- light instrumentation (a max over [n_ctx ctx] per feature, one clock read per feature batch) ---
seq_max = []
class _SeqGen(svr.SequenceDataGenerator):
    def get_sequences_data(self, feat_acts, *args, **kwargs):
        seq_max.append(float(feat_acts.max()))
        return super().get_sequences_data(feat_acts, *args, **kwargs)
svr.SequenceDataGenerator = _SeqGen
acts_seconds = [0.0]
_get_feature_data = FeatureDataGenerator.get_feature_data
def _timed_get_feature_data(self, *args, **kwargs):
    t = time.perf_counter()
    out = _get_feature_data(self, *args, **kwargs)
    acts_seconds[0] += time.perf_counter() - t
    return out
FeatureDataGenerator.get_feature_data = _timed_get_feature_data

def config(feats):
    layout = SaeVisLayoutConfig.default_feature_centric_layout()
    layout.seq_cfg.top_acts_group_size = a["n_top"]
    return SaeVisConfig(hook_point=hook, features=feats, minibatch_size_features=a["minibatch_size_features"],
                        minibatch_size_tokens=a["minibatch_size_tokens"], device="cpu", dtype="float32",
                        ignore_tokens=set(a["ignore_tokens"]), feature_centric_layout=layout, verbose=False)

# --- warm-up (untimed, small): 4 contexts, 2 features ------------------------------------------
svr.SaeVisRunner(config(features[:2])).run(encoder=sae, model=model, tokens=tokens[:4])
seq_max.clear(); acts_seconds[0] = 0.0

# --- timed: the dashboard computation ---------------------------------------------------------
start = time.perf_counter()
vis = svr.SaeVisRunner(config(features)).run(encoder=sae, model=model, tokens=tokens)
seconds = time.perf_counter() - start

f0 = vis.feature_data_dict[features[0]]
groups = f0.sequence_data.seq_group_data
n_tokens = tokens.numel()
print(json.dumps({
    "tool": f"sae_dashboard {version('sae-dashboard')}",
    "seconds": round(seconds, 4),
    "seconds_acts": round(acts_seconds[0], 4),
    "n_features": len(features), "n_tokens": n_tokens, "n_contexts": int(tokens.shape[0]), "ctx": int(tokens.shape[1]),
    "feature_tokens_per_s": round(len(features) * n_tokens / seconds, 1),
    "first_feature": features[0],
    "max_act_first_feature": seq_max[0],
    "max_act_first_feature_all_tokens": float(vis.feature_stats.max[0]),
    "top_group_title_first_feature": groups[0].title,
    "n_sequence_groups_first_feature": len(groups),
    "n_top_examples_first_feature": len(groups[0].seq_data),
    "ignore_tokens": a["ignore_tokens"],
    "minibatch_size_tokens": a["minibatch_size_tokens"], "minibatch_size_features": a["minibatch_size_features"],
    "n_feature_batches": -(-len(features) // a["minibatch_size_features"]),
    "fold_W_dec_norm": "skipped" if a["skip_fold"] else "ran (decoder rows unit-norm: a no-op)",
    "activation_check": check, "threads": torch.get_num_threads(),
    "versions": {p: version(p) for p in ("sae-lens", "transformer-lens", "transformers", "torch")},
}))
"""


def ensure_dashboard_venv() -> Path:
    """Makes .cache/dashboard-venv once (torch 2.13.0 CPU first, then the pinned sae-dashboard stack)."""
    python = DASHBOARD_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DASHBOARD_VENV)], check=True)
    if subprocess.run([str(python), "-c", PROBE], capture_output=True).returncode != 0:
        pip = [str(python), "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "torch==2.13.0"], check=True)
        subprocess.run([*pip, "install", *DASHBOARD_PINS], check=True)
        subprocess.run([*pip, "uninstall", "-y", *DASHBOARD_REMOVE], check=True)
        probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(
                f"{DASHBOARD_VENV}: sae_dashboard does not import after install:\n{probe.stderr[-3000:]}"
            )
    return python


def tiny_hooked_transformer_files(out_dir: Path, folder: Path = TINY) -> tuple[Path, Path]:
    """tiny's HF GPT-2 weights as a transformer_lens HookedTransformer state dict (what
    transformer_lens.pretrained.weight_conversions.convert_gpt2_weights produces, without any
    folding) + HookedTransformerConfig kwargs as JSON. Returns (weights, config) paths."""
    hf = json.loads((folder / "config.json").read_text())
    if (
        hf.get("model_type") != "gpt2"
        or hf.get("scale_attn_by_inverse_layer_idx")
        or not hf.get("scale_attn_weights", True)
    ):
        raise ValueError(f"{folder}: only plain GPT-2 configs are supported")
    n_layers, d_model, n_heads = hf["n_layer"], hf["n_embd"], hf["n_head"]
    d_head = d_model // n_heads
    cfg = {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_ctx": hf["n_positions"],
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf.get("n_inner") or 4 * d_model,
        "d_vocab": hf["vocab_size"],
        "act_fn": hf["activation_function"],
        "eps": hf["layer_norm_epsilon"],
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "original_architecture": "GPT2LMHeadModel",
        "model_name": folder.name,
        "init_weights": False,
        "device": "cpu",
    }
    w = {k.removeprefix("transformer."): v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    sd = {"embed.W_E": w["wte.weight"], "pos_embed.W_pos": w["wpe.weight"]}
    for i in range(n_layers):
        p = f"h.{i}."
        sd[f"blocks.{i}.ln1.w"], sd[f"blocks.{i}.ln1.b"] = w[p + "ln_1.weight"], w[p + "ln_1.bias"]
        W_Q, W_K, W_V = torch.tensor_split(w[p + "attn.c_attn.weight"], 3, dim=1)  # [d_model, n_heads*d_head] each
        for name, W in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)):
            sd[f"blocks.{i}.attn.{name}"] = W.reshape(d_model, n_heads, d_head).permute(1, 0, 2)
        b = w[p + "attn.c_attn.bias"].reshape(3, n_heads, d_head)
        sd[f"blocks.{i}.attn.b_Q"], sd[f"blocks.{i}.attn.b_K"], sd[f"blocks.{i}.attn.b_V"] = b[0], b[1], b[2]
        sd[f"blocks.{i}.attn.W_O"] = w[p + "attn.c_proj.weight"].reshape(n_heads, d_head, d_model)
        sd[f"blocks.{i}.attn.b_O"] = w[p + "attn.c_proj.bias"]
        sd[f"blocks.{i}.ln2.w"], sd[f"blocks.{i}.ln2.b"] = w[p + "ln_2.weight"], w[p + "ln_2.bias"]
        sd[f"blocks.{i}.mlp.W_in"], sd[f"blocks.{i}.mlp.b_in"] = w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"]
        sd[f"blocks.{i}.mlp.W_out"], sd[f"blocks.{i}.mlp.b_out"] = w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"]
    sd["unembed.W_U"] = (w["lm_head.weight"] if "lm_head.weight" in w else w["wte.weight"]).T  # tied in tiny
    sd["unembed.b_U"] = torch.zeros(hf["vocab_size"])
    sd["ln_final.w"], sd["ln_final.b"] = w["ln_f.weight"], w["ln_f.bias"]
    weights, config = out_dir / "tl_model.safetensors", out_dir / "tl_config.json"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(weights))
    config.write_text(json.dumps(cfg, indent=1))
    return weights, config


def _peer_sae_folder(sae_dir: Path, out_dir: Path) -> tuple[Path, bool]:
    """Copy of the SAELens folder SAEDashboard can run. SaeVisRunner.run always calls encoder.fold_W_dec_norm(),
    which SAELens' TopKSAE refuses unless rescale_acts_by_decoder_norm is true. saebench's decoder rows are
    unit-norm, so setting it true changes nothing numerically (TopK sees pre * 1; the fold divides by 1).
    If the rows are not unit-norm, the flag is left alone and the peer skips the fold instead (returns True),
    keeping the SAE's own activations (what SAEDashboard's later Neuronpedia runner does for TopK)."""
    meta = json.loads((sae_dir / "cfg.json").read_text())
    norms = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"].float().norm(dim=-1)
    unit = bool((norms - 1).abs().max() < 1e-4)
    out = out_dir / "sae"
    shutil.copytree(sae_dir, out)
    skip_fold = False
    if meta.get("architecture") == "topk" and not meta.get("rescale_acts_by_decoder_norm", False):
        if unit:
            meta["rescale_acts_by_decoder_norm"] = True
        else:
            skip_fold = True
    (out / "cfg.json").write_text(json.dumps(meta, indent=1))
    return out, skip_fold


def _special_ids(folder: Path = TINY) -> list[int]:
    from transformers import AutoTokenizer

    return sorted(set(AutoTokenizer.from_pretrained(str(folder)).all_special_ids))


def reference_acts(tokens: torch.Tensor, hook: str = HOOK) -> torch.Tensor:
    """saebench's TransformerBridge activations at `hook`: [n_ctx ctx d]."""
    import saebench as sb

    model = sb.load_model("tiny")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hook)
    return cache[hook].float()


def run_sae_dashboard(
    tokens: torch.Tensor,
    sae_saelens_dir: Path,
    hook: str,
    features: list[int],
    minibatch_size_tokens: int = 64,
    n_top: int = 20,
    *,
    minibatch_size_features: int = 256,
    ignore_tokens: Iterable[int] | None = None,
    check_contexts: int = 4,
    check_tol: float = 1e-4,
) -> dict:
    """Times SAEDashboard 0.8.0 (SaeVisRunner, default feature-centric layout, top group of n_top) on `tokens`
    ([n_ctx ctx] int64, BOS first) for `features` of the SAELens-format SAE. minibatch_size_tokens is
    SAEDashboard's: *contexts* per forward pass. ignore_tokens: token ids SAEDashboard masks out (None:
    tiny's special tokens, like saebench's special_mask; () for SAEDashboard's default of none).
    check_contexts > 0 first checks the peer model against saebench's bridge on that many contexts."""
    python = ensure_dashboard_venv()
    ignore = _special_ids() if ignore_tokens is None else sorted(int(t) for t in ignore_tokens)
    with tempfile.TemporaryDirectory(prefix="analyze_peer_") as tmp:
        tmp = Path(tmp)
        weights, config = tiny_hooked_transformer_files(tmp)
        sae_dir, skip_fold = _peer_sae_folder(Path(sae_saelens_dir), tmp)
        tensors = {"tokens": tokens.to(torch.int64).contiguous()}
        if check_contexts > 0:
            tensors["ref_tokens"] = tensors["tokens"][:check_contexts].clone()
            tensors["ref_acts"] = reference_acts(tensors["ref_tokens"], hook).contiguous()
        save_file(tensors, str(tmp / "tokens.safetensors"))
        args = {
            "hook": hook,
            "features": [int(f) for f in features],
            "model_cfg": str(config),
            "model_weights": str(weights),
            "tokens": str(tmp / "tokens.safetensors"),
            "sae_dir": str(sae_dir),
            "skip_fold": skip_fold,
            "n_top": n_top,
            "minibatch_size_tokens": minibatch_size_tokens,
            "minibatch_size_features": minibatch_size_features,
            "ignore_tokens": ignore,
            "check_tol": check_tol,
        }
        run = subprocess.run(
            [str(python), "-W", "ignore", "-c", PEER_SCRIPT, json.dumps(args)], capture_output=True, text=True, cwd=tmp
        )
    if run.returncode != 0:
        raise RuntimeError(f"SAEDashboard run failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, default=64)
    p.add_argument("--features", type=int, default=32, help="features 0..N-1")
    p.add_argument("--sae", type=Path, default=None, help="SAELens folder (default: a random saebench TopK SAE)")
    p.add_argument("--minibatch-tokens", type=int, default=64)
    p.add_argument("--minibatch-features", type=int, default=256)
    p.add_argument("--n-top", type=int, default=20)
    args = p.parse_args()
    import saebench as sb
    from saebench.interop import load_saelens, save_saelens

    model = sb.load_model("tiny")
    ctx = sb.load_contexts(sb.DataConfig(split="test"), model.tokenizer)
    tokens, special = ctx.tokens[: args.contexts], ctx.special_mask[: args.contexts]
    features = list(range(args.features))
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = args.sae
        if sae_dir is None:
            sae = sb.SAE(sb.SAEConfig(d_in=192, n_latents=3072, activation="topk", k=32, hook=HOOK, model="tiny"))
            sae_dir = Path(tmp) / "sae"
            save_saelens(sae, sae_dir)
        sae = load_saelens(sae_dir).eval()
        hook = sae.cfg.hook or HOOK
        out = run_sae_dashboard(
            tokens,
            sae_dir,
            hook,
            features,
            args.minibatch_tokens,
            args.n_top,
            minibatch_size_features=args.minibatch_features,
        )
    acts, _ = sb.Harvester(model, [hook]).activations(tokens, special)
    with torch.no_grad():
        ours = float(sae.encode(acts[hook])[:, features[0]].max())
    out["saebench_max_act_first_feature"] = ours
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
