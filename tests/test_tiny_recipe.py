"""The tiny recipe's data and the induction measurements, against brute force."""

import pytest
import torch

import saebench as sb
from saebench.circuits import induction_summary, repeated_random_tokens
from saebench.zoo.tiny import (
    TinyConfig,
    chunked_copy_contexts,
    copy_task_rows_at,
    induction_report,
    repeated_random_contexts,
    scattered_copy_contexts,
    sinusoids,
    with_repeated_spans,
)


def test_repeated_spans_copy_a_span_and_mask_only_the_unpredictable_labels():
    cfg = TinyConfig(repeat_share=1.0, random_span_share=0.5, span_len=(4, 10), context_size=40)
    text = torch.arange(1000, 1000 + 8 * 40).reshape(8, 40)  # every token distinct, so a copy is unambiguous
    tokens, labels = with_repeated_spans(text, cfg, torch.Generator().manual_seed(0), vocab_size=500)
    n_random = 0
    for row in range(8):
        changed = (tokens[row] != text[row]).nonzero().squeeze(-1)
        assert len(changed) > 0
        random = bool((tokens[row] < 500).any())
        n_random += random
        masked = (labels[row] == -100).nonzero().squeeze(-1).tolist()
        if random:
            first = (tokens[row] < 500).nonzero().squeeze(-1)
            a, n = int(first[0]), len(first) // 2
            b = int(first[n])
            assert tokens[row, a : a + n].tolist() == tokens[row, b : b + n].tolist()
            assert masked == list(range(a, a + n)) + [b]
        else:
            b, n = int(changed[0]), len(changed)
            src = [i for i in range(40 - n) if text[row, i : i + n].tolist() == tokens[row, b : b + n].tolist()]
            assert len(src) == 1 and src[0] + n <= b
            assert masked == [b]
        unmasked = [i for i in range(40) if i not in masked]
        assert labels[row, unmasked].tolist() == tokens[row, unmasked].tolist()
    assert 0 < n_random < 8
    untouched, _ = with_repeated_spans(text, TinyConfig(repeat_share=0.0), torch.Generator().manual_seed(0), 500)
    assert torch.equal(untouched, text)


def test_copy_task_contexts_tile_one_random_span_and_train_on_its_repeats():
    cfg = TinyConfig(span_len=(5, 9), context_size=30)
    tokens, labels = repeated_random_contexts(16, cfg, torch.Generator().manual_seed(1), vocab_size=50)
    for row in range(16):
        assert tokens[row, 0] == 0 and bool((tokens[row, 1:] > 0).all()) and bool((tokens[row] < 50).all())
        period = next(p for p in range(5, 10) if torch.equal(tokens[row, 1 + p :], tokens[row, 1 : 30 - p]))
        assert labels[row, : period + 2].eq(-100).all()
        assert torch.equal(labels[row, period + 2 :], tokens[row, period + 2 :])


def _induction_predicts(tokens: torch.Tensor, p: int) -> bool:
    """Brute force: the token before p occurred earlier, and the token after that occurrence is tokens[p]."""
    earlier = [i for i in range(1, p - 1) if tokens[i] == tokens[p - 1]]
    return bool(earlier) and int(tokens[earlier[-1] + 1]) == int(tokens[p])


@pytest.mark.parametrize("make", [chunked_copy_contexts, scattered_copy_contexts])
def test_untiled_copy_layouts_train_only_on_tokens_induction_predicts(make):
    cfg = TinyConfig(span_len=(4, 9), context_size=40)
    vocab = 10**6  # no chance collisions, so "predicted by induction" is unambiguous
    tokens, labels = make(12, cfg, torch.Generator().manual_seed(2), vocab)
    assert (
        tokens.shape == labels.shape == (12, 40) and bool((tokens[:, 0] == 0).all()) and bool((tokens[:, 1:] > 0).all())
    )
    n_labelled = 0
    for row in range(12):
        for p in range(40):
            if labels[row, p] != -100:
                assert labels[row, p] == tokens[row, p] and _induction_predicts(tokens[row], p)
                n_labelled += 1
            else:  # every induction-predictable position of a copy is trained on, except in the random filler (none)
                assert not _induction_predicts(tokens[row], p)
    assert n_labelled >= 12 * 3


def test_chunked_copy_contexts_change_the_copy_distance_within_a_row():
    cfg = TinyConfig(span_len=(3, 12), context_size=128)
    tokens, labels = chunked_copy_contexts(8, cfg, torch.Generator().manual_seed(3), 10**6)
    for row in range(8):
        distances = set()
        for p in range(1, 128):
            if labels[row, p] != -100:
                distances.add(p - max(i for i in range(1, p - 1) if tokens[row, i] == tokens[row, p]))
        assert len(distances) >= 2  # no single fixed-distance head predicts every copy


def test_copy_task_takes_the_whole_batch_then_a_share_with_a_growing_vocabulary():
    cfg = TinyConfig(
        batch_size=32,
        copy_task_warm_steps=500,
        copy_task_warm_vocab=64,
        copy_task_grow_every=100,
        copy_task_vocab=4096,
        copy_task_solo_steps=1100,
        copy_task_share=0.125,
        copy_task_steps=6835,
    )
    steps = (0, 499, 500, 999, 1000, 1099, 1100, 6834, 6835)
    assert [copy_task_rows_at(s, cfg) for s in steps] == [
        (32, 64),
        (32, 64),
        (32, 128),
        (32, 2048),
        (32, 4096),
        (32, 4096),
        (4, 4096),
        (4, 4096),
        (0, 0),
    ]
    assert copy_task_rows_at(0, TinyConfig(copy_task_steps=0)) == (0, 0)


def test_sinusoidal_positions_make_the_previous_position_one_linear_map_away():
    pe = sinusoids(128, 192)
    assert torch.allclose(pe.reshape(128, 96, 2).norm(dim=-1), torch.ones(128, 96), atol=1e-5)
    w = 10_000 ** (-torch.arange(0, 192, 2) / 192)
    R = torch.block_diag(
        *[torch.tensor([[c, s], [-s, c]]) for c, s in zip(w.cos().tolist(), w.sin().tolist(), strict=True)]
    )
    assert torch.allclose(pe[1:] @ R, pe[:-1], atol=1e-4)  # one rotation takes every position to the one before


def test_induction_summary_matches_a_loop_over_positions():
    torch.manual_seed(0)
    span, n_seq = 5, 3
    tokens = repeated_random_tokens(n_seq, span, vocab_size=20, bos=7, seed=2)
    assert (
        tokens.shape == (n_seq, 1 + 2 * span) and bool((tokens[:, 0] == 7).all()) and bool((tokens[:, 1:] != 7).all())
    )
    assert torch.equal(tokens[:, 1 : 1 + span], tokens[:, 1 + span :])
    patterns = [torch.rand(n_seq, 2, 11, 11).softmax(-1) for _ in range(2)]
    logits = torch.randn(n_seq, 11, 20)
    got = induction_summary(patterns, logits, tokens, span)
    for layer in range(2):
        for head in range(2):
            want = [patterns[layer][s, head, 1 + span + t, 2 + t] for s in range(n_seq) for t in range(span)]
            assert float(got["induction"][layer, head]) == pytest.approx(float(torch.stack(want).mean()), rel=1e-6)
    logp = logits.log_softmax(-1)
    first = [-logp[s, i - 1, tokens[s, i]] for s in range(n_seq) for i in range(2, 1 + span)]
    second = [-logp[s, i - 1, tokens[s, i]] for s in range(n_seq) for i in range(2 + span, 1 + 2 * span)]
    assert got["loss_first_copy"] == pytest.approx(float(torch.stack(first).mean()), rel=1e-5)
    assert got["loss_second_copy"] == pytest.approx(float(torch.stack(second).mean()), rel=1e-5)


def test_the_model_card_and_the_hooked_model_agree_on_induction(tiny):
    from transformers import GPT2LMHeadModel

    from saebench.zoo.tiny import TINY_DIR

    hf = GPT2LMHeadModel.from_pretrained(TINY_DIR).eval()
    bos = tiny.tokenizer.bos_token_id
    card = induction_report(hf, tiny.cfg.d_vocab, bos, n_seq=8, span=20)
    hooked = sb.induction_report(tiny, n_seq=8, span=20)
    assert torch.allclose(torch.tensor(card["induction_scores"]), hooked["induction"], atol=2e-3)
    assert card["loss_second_copy"] == pytest.approx(hooked["loss_second_copy"], abs=2e-3)


def test_train_tiny_takes_recipe_options_and_refuses_unknown_ones(tmp_path):
    from test_cli import run_cli

    bad = run_cli("zoo", "train-tiny", "--out", str(tmp_path / "t"), "--set", "copy_task_stesp=10", cwd=tmp_path)
    assert (
        bad.returncode == 2
        and "unknown config key 'tiny.copy_task_stesp'" in bad.stderr
        and "copy_task_steps" in bad.stderr
    )
    assert not (tmp_path / "t").exists()
    from saebench.config import from_dict

    cfg = from_dict(TinyConfig, {"copy_task_steps": 2000, "init_std": 0.06, "span_len": [4, 8]}, "tiny")
    assert (cfg.copy_task_steps, cfg.init_std, tuple(cfg.span_len)) == (2000, 0.06, (4, 8))


def test_copy_task_vocabulary_warms_up_then_jumps_or_doubles():
    from saebench.zoo.tiny import copy_task_vocab_at

    jump = TinyConfig(copy_task_warm_steps=100, copy_task_warm_vocab=64, copy_task_vocab=4096, copy_task_grow_every=0)
    assert [copy_task_vocab_at(s, jump) for s in (0, 99, 100, 5000)] == [64, 64, 4096, 4096]
    grow = TinyConfig(copy_task_warm_steps=100, copy_task_warm_vocab=64, copy_task_vocab=1000, copy_task_grow_every=10)
    assert [copy_task_vocab_at(s, grow) for s in (99, 100, 109, 110, 120, 130, 140, 10_000)] == [
        64,
        128,
        128,
        256,
        512,
        1000,
        1000,
        1000,
    ]
