"""Batched sampling: deterministic for a seed, top-k and temperature as documented, makemore's marks."""

from __future__ import annotations

import torch

from backprop_ninja.data import END_TOKEN, Vocabulary
from backprop_ninja.models import MLPConfig, build_model
from backprop_ninja.sampling import mark, sample_tokens, sample_words

VOCAB = Vocabulary(tuple("abcdé -'."))


def small_model(seed=3, block_size=3):
    config = MLPConfig("mlp", vocab_size=VOCAB.size, block_size=block_size, n_embd=4, n_hidden=9)
    return build_model(config, torch.Generator().manual_seed(seed))


def test_samples_are_deterministic_for_a_seed():
    model = small_model()
    first = sample_words(model, VOCAB, 50, torch.Generator().manual_seed(11), max_len=12)
    again = sample_words(model, VOCAB, 50, torch.Generator().manual_seed(11), max_len=12)
    other = sample_words(model, VOCAB, 50, torch.Generator().manual_seed(12), max_len=12)
    assert first == again
    assert first != other


def test_each_row_stops_at_its_first_end_token_and_stays_stopped():
    tokens = sample_tokens(small_model(), 200, torch.Generator().manual_seed(5), max_len=15)  # (200, 15)
    ended = (tokens == END_TOKEN).cumsum(1) > 0  # (200, 15) at or after the first end token
    assert bool((tokens[ended] == END_TOKEN).all())
    words = [VOCAB.decode(row) for row in tokens.tolist()]
    assert all(len(w) <= 15 for w in words)
    assert any(len(w) > 0 for w in words)


def test_top_k_one_is_the_greedy_word_of_a_one_at_a_time_decoder():
    model = small_model(block_size=2)
    words = sample_words(model, VOCAB, 7, torch.Generator().manual_seed(0), max_len=10, top_k=1)
    context, greedy = [END_TOKEN, END_TOKEN], []
    for _ in range(10):  # the lecture's sampling loop, one word, argmax instead of a draw
        ix = int(model.logits(torch.tensor([context])).argmax(1))
        if ix == END_TOKEN:
            break
        greedy.append(ix)
        context = context[1:] + [ix]
    assert words == [VOCAB.decode(greedy + [END_TOKEN])] * 7


def test_top_k_draws_only_among_the_k_most_likely_first_characters():
    model = small_model()
    logits = model.logits(torch.zeros((1, 3), dtype=torch.long))[0]  # (V,) the first position's
    allowed = set(torch.topk(logits, 3).indices.tolist())
    tokens = sample_tokens(model, 500, torch.Generator().manual_seed(1), max_len=1, top_k=3)  # (500, 1)
    assert set(tokens[:, 0].tolist()) <= allowed
    assert len(set(tokens[:, 0].tolist())) > 1


def test_a_low_temperature_concentrates_on_the_most_likely_character():
    model = small_model()
    hot = sample_tokens(model, 400, torch.Generator().manual_seed(2), max_len=1, temperature=5.0)
    cold = sample_tokens(model, 400, torch.Generator().manual_seed(2), max_len=1, temperature=0.05)
    top = int(model.logits(torch.zeros((1, 3), dtype=torch.long)).argmax())
    assert (cold == top).float().mean() > (hot == top).float().mean()
    assert len(set(hot[:, 0].tolist())) > len(set(cold[:, 0].tolist()))


def test_a_thousand_words_come_back_from_one_batched_call():
    words = sample_words(small_model(), VOCAB, 1000, torch.Generator().manual_seed(9), max_len=20)
    assert len(words) == 1000


def test_marks_sort_samples_as_makemore_does():
    splits = {"train": ["emma", "ava"], "val": ["mia"], "test": ["ava", "zoe"]}
    assert mark(["ava", "mia", "zoe", "bob", ""], splits) == ["in train", "in val", "in test", "new", "new"]
