"""Tests for rlrefine/metrics/text_stats.py, by hand."""

import pytest

from rlrefine.metrics.text_stats import has_repeated_ngram, text_stats


def test_text_stats_hand_values():
    captions = [
        "A red cube left of a blue ball.",  # 8 words; "a" twice but no repeated bigram
        "a red cube and a red cube",  # 7 words; bigrams "a red", "red cube" repeat
        "Blue ball!",  # 2 words
        "",  # 0 words
    ]
    s = text_stats(captions)
    assert s["mean_length"] == pytest.approx((8 + 7 + 2 + 0) / 4)
    # distinct: a, red, cube, left, of, blue, ball, and
    assert s["vocab_size"] == 8
    assert s["repeated_ngram_rate"] == pytest.approx(1 / 4)
    assert s["num_captions"] == 4


def test_repeated_ngram_definition():
    assert not has_repeated_ngram("a dog and a cat".split())  # unigram "a" repeats: not counted
    assert has_repeated_ngram("a dog and a dog".split())
    assert has_repeated_ngram("red red red".split())  # bigram "red red" occurs twice
    assert not has_repeated_ngram("red red".split())
    assert has_repeated_ngram("a dog and a cat".split(), n=1)
    assert not has_repeated_ngram("a dog and a dog".split(), n=3)
    assert not has_repeated_ngram([], n=2)


def test_text_stats_trigram_option_and_case_folding():
    s = text_stats(["The dog and the dog", "THE DOG"], n=3)
    assert s["repeated_ngram_rate"] == 0.0
    assert s["vocab_size"] == 3  # the, dog, and


def test_text_stats_rejects_empty_list_and_bare_string():
    with pytest.raises(ValueError):
        text_stats([])
    with pytest.raises(ValueError):
        text_stats("a caption")
