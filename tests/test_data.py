import pytest
import torch
from transformers import PreTrainedTokenizerFast

from saebench.data import DataConfig, iter_texts, load_contexts, pack_texts, special_ids
from saebench.errors import DataError
from saebench.zoo.corpus import iter_documents
from saebench.zoo.tokenizer import train_bpe


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_bpe(["abc def ghi " * 20, "the quick brown fox"] * 5, vocab_size=300)


def test_packing_by_hand(tok):
    eot = tok.eos_token_id
    a = tok("abc def", add_special_tokens=False)["input_ids"]
    b = tok("the fox", add_special_tokens=False)["input_ids"]
    stream = a + [eot] + b + [eot]
    body = 3
    packed = pack_texts(["abc def", "the fox"], tok, context_size=body + 1, prepend_bos=True, show_progress=False)
    n = len(stream) // body
    expected = torch.tensor([[eot] + stream[i * body : (i + 1) * body] for i in range(n)])
    assert torch.equal(packed.tokens, expected)
    assert torch.equal(packed.special_mask, expected == eot)
    no_bos = pack_texts(["abc def", "the fox"], tok, context_size=body, prepend_bos=False, show_progress=False)
    assert torch.equal(no_bos.tokens, torch.tensor(stream[: n * body]).view(n, body))


def test_bert_contexts_get_cls_and_sep(minilm):
    tok = minilm.tokenizer
    bos, sep, eos = special_ids(tok)
    assert (bos, sep, eos) == (tok.cls_token_id, tok.sep_token_id, tok.sep_token_id)
    packed = pack_texts(["hello world"] * 10, tok, context_size=8, show_progress=False)
    assert (packed.tokens[:, 0] == tok.cls_token_id).all() and (packed.tokens[:, -1] == tok.sep_token_id).all()
    assert packed.special_mask[:, 0].all() and packed.special_mask[:, -1].all()


def test_same_seed_same_contexts(tok):
    cfg = DataConfig(split="test", max_documents=50, context_size=16, seed=3)
    a = load_contexts(cfg, tok, show_progress=False)
    b = load_contexts(cfg, tok, show_progress=False)
    c = load_contexts(DataConfig(split="test", max_documents=50, context_size=16, seed=4), tok, show_progress=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert sorted(map(tuple, a.tokens.tolist())) == sorted(map(tuple, c.tokens.tolist()))


def test_bundled_splits_are_disjoint_and_stable():
    test_ids = {d.doc_id for d in iter_documents("test")}
    train_ids = {d.doc_id for d in iter_documents("train", sources=("bible", "jargon"))}
    assert test_ids and train_ids and not test_ids & train_ids
    assert any(i.startswith("bible/") for i in test_ids) and any(i.startswith("python/") for i in test_ids)


def test_local_files_through_datasets(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"body": "json text one"}\n{"body": "json text two"}\n')
    assert list(iter_texts(DataConfig(path=str(tmp_path / "a.txt")))) == ["first line", "second line"]
    assert list(iter_texts(DataConfig(path=str(tmp_path / "b.jsonl"), text_field="body"))) == [
        "json text one",
        "json text two",
    ]
    with pytest.raises(DataError, match="no field 'text'"):
        list(iter_texts(DataConfig(path=str(tmp_path / "b.jsonl"))))
    with pytest.raises(DataError, match="dataset file not found"):
        list(iter_texts(DataConfig(path=str(tmp_path / "missing.txt"))))
    with pytest.raises(DataError, match="use files of one format"):
        list(iter_texts(DataConfig(path=str(tmp_path))))


def test_too_little_text(tok):
    with pytest.raises(DataError, match="fewer than one context"):
        pack_texts(["a"], tok, context_size=64, show_progress=False)
