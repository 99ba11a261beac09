import json

import pytest
import torch
from safetensors.torch import load_file

import saebench as sb
from saebench.zoo.tiny import TINY_DIR


def test_tiny_reloads_bit_identically(tiny):
    from transformers import GPT2LMHeadModel

    saved = load_file(str(TINY_DIR / "model.safetensors"))
    hf = GPT2LMHeadModel.from_pretrained(str(TINY_DIR)).eval()
    state = hf.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    again = sb.load_model("tiny")
    tokens = torch.randint(0, tiny.cfg.d_vocab, (2, 16))
    assert torch.equal(tiny(tokens), again(tokens))
    with torch.no_grad():
        assert torch.allclose(tiny(tokens), hf(tokens).logits, atol=1e-4)


def test_tiny_model_card_reports_heldout_bpb():
    card = json.loads((TINY_DIR / "training.json").read_text())
    assert card["heldout_bits_per_byte"] <= 1.6
    text = (TINY_DIR / "MODEL_CARD.md").read_text()
    assert str(card["heldout_bits_per_byte"]) in text and text.count("```") == 6


def test_tiny_is_a_working_language_model(tiny):
    """The bundled LM predicts held-out text far better than chance (uniform = ln 4096 = 8.3 nats)."""
    ctx = sb.load_contexts(
        sb.DataConfig(split="test", max_documents=100, context_size=64), tiny.tokenizer, show_progress=False
    )
    loss = tiny(ctx.tokens[:16], return_type="loss")
    assert loss < 4.5


def test_local_folder_loads(tmp_path, tiny):
    import shutil

    shutil.copytree(TINY_DIR, tmp_path / "copy")
    model = sb.load_model(str(tmp_path / "copy"))
    tokens = torch.randint(0, tiny.cfg.d_vocab, (1, 8))
    assert torch.equal(model(tokens), tiny(tokens))


def test_missing_models_fail_clearly(tmp_path):
    with pytest.raises(sb.ModelError, match="model folder not found"):
        sb.load_model("./no/such/folder")
    with pytest.raises(sb.ModelError, match="not a Hugging Face model folder"):
        sb.load_model(str(tmp_path))
    with pytest.raises(sb.ModelError, match="not in the Hugging Face cache.*hf download gpt2"):
        sb.load_model("gpt2")


def test_is_causal_tells_decoders_from_encoders(tiny, minilm):
    from saebench.models import is_causal

    assert is_causal(tiny) and not is_causal(minilm)
