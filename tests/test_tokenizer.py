"""Tests for rlrefine.data.tokenizer.CaptionTokenizer (word-level, local HF, open_clip BPE)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlrefine.data.tokenizer import CaptionTokenizer

CAPTIONS = [
    "a small red circle above a large blue square",
    "there is a blue square under a red circle",
    "an image with a red circle , a blue square and a green cross",
    "red circle",
]


@pytest.fixture(scope="module")
def word():
    return CaptionTokenizer.train(CAPTIONS)


def test_special_ids_and_vocab(word):
    assert (word.pad_id, word.bos_id, word.eos_id, word.unk_id) == (0, 1, 2, 3)
    distinct_words = {w for c in CAPTIONS for w in c.split()}  # 18 words incl ","
    assert word.vocab_size == len(distinct_words) + 4 == 22


def test_round_trip(word):
    for c in CAPTIONS:
        ids = word.encode(c)
        assert ids[0] == word.bos_id and ids[-1] == word.eos_id and len(ids) == len(c.split()) + 2
        assert word.decode(ids) == c


def test_normalisation_and_unknown(word):
    # Lowercased, punctuation split off, unknown words -> <unk> (dropped when decoding).
    ids = word.encode("A RED circle, zebra!")
    assert ids == [1, *word.encode("a red circle ,")[1:-1], 3, 3, 2]
    assert word.decode(ids) == "a red circle ,"


def test_encode_batch_pads_and_truncates(word):
    batch = word.encode_batch(["red circle", "a small red circle above a large blue square"], max_len=6)
    a = word.encode("red circle")
    b = word.encode("a small red circle above a large blue square")
    assert batch.dtype == torch.long and batch.shape == (2, 6)
    assert batch[0].tolist() == a + [0, 0]  # bos red circle eos pad pad
    assert batch[1].tolist() == b[:5] + [2]  # bos + 4 tokens, eos kept at the end
    assert word.decode(batch[1]) == "a small red circle"
    # Without max_len the batch is as wide as its longest caption.
    assert word.encode_batch(["red circle", "red"]).shape == (2, 4)


def test_empty_caption_raises(word):
    with pytest.raises(ValueError, match="empty or whitespace-only"):
        word.encode_batch(["red circle", "   "])
    with pytest.raises(ValueError, match="caption 1 of the batch"):
        word.encode_batch(["red circle", ""])
    with pytest.raises(TypeError):
        word.encode_batch("red circle")
    with pytest.raises(ValueError, match="max_len"):
        word.encode("red circle", max_len=2)


def test_decode_stops_at_eos_and_batches(word):
    red, circle = word.encode("red circle")[1:3]
    assert word.decode([1, red, 2, circle, circle]) == "red"
    assert word.decode([red, 0, circle, 2]) == "red circle"  # no bos, pad dropped
    ids = word.encode_batch(CAPTIONS[:2] * 3).view(2, 3, -1)  # [B=2, L=3, T]
    out = word.decode_batch(ids)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    assert out[0][0] == CAPTIONS[0] and out[0][1] == CAPTIONS[1] and out[1][2] == CAPTIONS[1]
    assert word.decode_batch(ids[0, 0]) == CAPTIONS[0]  # a single [T] row gives a str


def test_training_is_order_independent():
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    a, b = CaptionTokenizer.train(CAPTIONS), CaptionTokenizer.train(shuffled)
    assert a.backend.get_vocab() == b.backend.get_vocab()


def test_min_freq():
    tok = CaptionTokenizer.train(["red circle", "red square"], min_freq=2)
    assert tok.vocab_size == 5  # 4 specials + "red"
    assert tok.encode("red square") == [1, 4, 3, 2]


def test_save_and_from_dir(word, tmp_path):
    word.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    back = CaptionTokenizer.from_dir(tmp_path)
    assert back.vocab_size == word.vocab_size
    assert torch.equal(back.encode_batch(CAPTIONS), word.encode_batch(CAPTIONS))


def test_from_dir_missing_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        CaptionTokenizer.from_dir(missing)
    assert str(missing) in str(e.value) and "CaptionTokenizer.train" in str(e.value)


def _tiny_hf_dir(path, **special):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "red": 2, "circle": 3, "above": 4, "blue": 5, "square": 6}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.normalizer = normalizers.Lowercase()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", **special).save_pretrained(path)
    return path


def test_from_hf_adds_missing_specials(tmp_path):
    tok = CaptionTokenizer.from_hf(_tiny_hf_dir(tmp_path / "hf"))
    # The tiny tokenizer has no pad/bos/eos: they are appended after its 7 tokens.
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (7, 8, 9, 0, 10)
    batch = tok.encode_batch(["a red circle", "a blue square above a red circle"])
    assert batch[0].tolist() == [8, 1, 2, 3, 9, 7, 7, 7, 7]
    assert tok.decode_batch(batch) == ["a red circle", "a blue square above a red circle"]
    tok.save(tmp_path / "saved")
    back = CaptionTokenizer.from_dir(tmp_path / "saved")
    assert back.kind == "hf" and torch.equal(back.encode_batch(["a red circle"]), batch[:1, :5])


def test_from_hf_uses_own_specials_and_bos_equal_eos(tmp_path):
    tok = CaptionTokenizer.from_hf(_tiny_hf_dir(tmp_path / "gpt2ish", bos_token="<|e|>", eos_token="<|e|>"))
    assert tok.bos_id == tok.eos_id == 7 and tok.pad_id == 8  # a separate pad, never eos
    ids = tok.encode_batch(["a red circle"])[0].tolist()
    assert ids == [7, 1, 2, 3, 7]
    assert tok.decode(ids) == "a red circle"  # the leading bos is not taken for eos


def test_from_hf_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        CaptionTokenizer.from_hf(tmp_path / "nothing")


def test_from_open_clip(tmp_path):
    tok = CaptionTokenizer.from_open_clip()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (49406, 49407, 49408, 49409)
    batch = tok.encode_batch(["a red circle above a blue square", "red"])
    assert batch[0, 0] == 49406 and batch[1].tolist()[2:] == [49407] + [49408] * (batch.shape[1] - 3)
    assert tok.decode_batch(batch) == ["a red circle above a blue square", "red"]
    tok.save(tmp_path)
    assert json.loads((tmp_path / "caption_tokenizer.json").read_text())["kind"] == "open_clip"
    assert CaptionTokenizer.from_dir(tmp_path).vocab_size == 49409
