"""`CaptionTokenizer`: one interface over the three tokenizers a captioner can use.

Where it sits: `rlrefine.data`, used by the collate function (encode), the captioner's
``save_pretrained`` (save / from_dir) and every place that turns generated ids into text (decode).

Backends:

* ``word``: a word-level HF `tokenizers.Tokenizer` trained on the corpus (`CaptionTokenizer.train`):
  lowercase, split on whitespace and punctuation, special tokens ``<pad>``=0, ``<bos>``=1,
  ``<eos>``=2, ``<unk>``=3. The embedded default. Saved as ``tokenizer.json``.
* ``hf``: any local HF tokenizer (`transformers.AutoTokenizer`, ``local_files_only=True``). Its own
  pad/bos/eos are used (bos falls back to cls, eos to sep); missing ones are added as
  ``<pad>``/``<bos>``/``<eos>``.
* ``open_clip``: open_clip's bundled BPE (`open_clip.tokenizer.SimpleTokenizer`, shipped inside the
  package). bos/eos are its ``<start_of_text>``/``<end_of_text>``; open_clip pads with id 0, which is
  also the token "!", so a dedicated pad id (= its vocab size) is appended instead.

Every backend encodes to ``bos + tokens + eos`` and decodes by skipping a leading bos, stopping at
the first eos and dropping special tokens. `WordTokens` turns a word-level tokenizer into an open_clip-style one (fixed context, for
the reward students' text towers). ``save(dir)`` writes ``dir/caption_tokenizer.json``
(backend and special ids) plus ``dir/tokenizer.json`` (word, and hf fast tokenizers through
``save_pretrained``); ``from_dir(dir)`` restores any of them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["CaptionTokenizer", "PAD", "BOS", "EOS", "UNK", "SPECIAL_TOKENS", "WordTokens"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3 in a word-level tokenizer
_META_FILE = "caption_tokenizer.json"


class CaptionTokenizer:
    """Captions <-> id tensors. Build with `train`, `from_dir`, `from_hf` or `from_open_clip`.

    Attributes: ``kind`` ("word" | "hf" | "open_clip"), ``pad_id``, ``bos_id``, ``eos_id``,
    ``unk_id`` (None when the backend has none), ``vocab_size`` (ids are in ``[0, vocab_size)``).
    """

    def __init__(
        self,
        backend: Any,
        kind: str,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        unk_id: int | None,
        vocab_size: int,
    ) -> None:
        self.backend = backend
        self.kind = kind
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        self.vocab_size = vocab_size
        self.special_ids = frozenset(i for i in (pad_id, bos_id, eos_id, unk_id) if i is not None)

    def __repr__(self) -> str:
        return (
            f"CaptionTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    # ------------------------------------------------------------------------------ constructors
    @classmethod
    def train(cls, texts: Iterable[str], min_freq: int = 1) -> "CaptionTokenizer":
        """A word-level tokenizer over ``texts``: words seen at least ``min_freq`` times get an id,
        the rest map to ``<unk>``. Ids 0..3 are ``<pad> <bos> <eos> <unk>``."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ and runs of punctuation
        trainer = trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=list(SPECIAL_TOKENS))
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls._from_word_level(tok)

    @classmethod
    def _from_word_level(cls, tok: Any) -> "CaptionTokenizer":
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"word-level tokenizer lacks the special tokens {missing}")
        return cls(tok, "word", ids[PAD], ids[BOS], ids[EOS], ids[UNK], tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "CaptionTokenizer":
        """Load what `save` wrote to ``directory`` (or a bare word-level ``tokenizer.json``)."""
        d = Path(directory)
        meta_path, tok_path = d / _META_FILE, d / "tokenizer.json"
        if not meta_path.is_file() and not tok_path.is_file():
            raise FileNotFoundError(
                f"no tokenizer in {d}: expected {tok_path} or {meta_path}. Create one with "
                f"CaptionTokenizer.train(captions).save({str(d)!r}) (or from_hf / from_open_clip, then save)."
            )
        meta = {"kind": "word"}
        if meta_path.is_file():
            with open(meta_path) as f:
                meta = json.load(f)
        kind = meta["kind"]
        if kind == "word":
            from tokenizers import Tokenizer

            return cls._from_word_level(Tokenizer.from_file(str(tok_path)))
        if kind == "hf":
            return cls.from_hf(d)
        if kind == "open_clip":
            return cls.from_open_clip()
        raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected word, hf or open_clip)")

    @classmethod
    def from_hf(cls, local_dir: str | os.PathLike) -> "CaptionTokenizer":
        """Any HF tokenizer saved in ``local_dir`` (never downloads). pad/bos/eos are mapped to the
        tokenizer's own (bos <- cls, eos <- sep when absent) or added as new special tokens."""
        from transformers import AutoTokenizer

        d = Path(local_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"HF tokenizer directory not found: {d}")
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        bos = tok.bos_token if tok.bos_token is not None else tok.cls_token
        eos = tok.eos_token if tok.eos_token is not None else tok.sep_token
        added = {}
        if tok.pad_token is None:
            added["pad_token"] = PAD
        if bos is None:
            added["bos_token"] = BOS
        if eos is None:
            added["eos_token"] = EOS
        if added:
            tok.add_special_tokens(added)
        bos = tok.bos_token if tok.bos_token is not None else tok.cls_token
        eos = tok.eos_token if tok.eos_token is not None else tok.sep_token
        pad_id = tok.convert_tokens_to_ids(tok.pad_token)
        bos_id, eos_id = tok.convert_tokens_to_ids(bos), tok.convert_tokens_to_ids(eos)
        if len({pad_id, eos_id}) < 2:
            # A pad equal to eos would make the loss ignore eos: the model would never learn to stop.
            tok.add_special_tokens({"pad_token": PAD})
            pad_id = tok.convert_tokens_to_ids(PAD)
        unk_id = tok.unk_token_id
        return cls(tok, "hf", pad_id, bos_id, eos_id, unk_id, len(tok))

    @classmethod
    def from_open_clip(cls) -> "CaptionTokenizer":
        """open_clip's bundled byte-level BPE (49408 tokens) plus a dedicated pad id 49408."""
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer()
        pad_id = len(tok.encoder)
        return cls(tok, "open_clip", pad_id, tok.sot_token_id, tok.eot_token_id, None, pad_id + 1)

    # ---------------------------------------------------------------------------------- saving
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``directory/caption_tokenizer.json`` and, for word/hf, ``directory/tokenizer.json``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "word":
            self.backend.save(str(d / "tokenizer.json"))
        elif self.kind == "hf":
            self.backend.save_pretrained(str(d))
        meta = {
            "kind": self.kind,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "unk_id": self.unk_id,
            "vocab_size": self.vocab_size,
        }
        with open(d / _META_FILE, "w") as f:
            json.dump(meta, f, indent=1)

    # ------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos. A caption that spells a control token ("<eos>", "<pad>")
        gets ``<unk>`` there (dropped when the backend has no unk), never the control id itself:
        otherwise it would end the caption early or vanish from the loss."""
        return self.tokenize_batch([text])[0]

    def word_ids(self, words: Sequence[str], key: str) -> torch.Tensor:
        """The token ids of ``words``, each exactly one known token; otherwise a ValueError naming the recipe
        ``key`` that listed them. LongTensor [len(words)]."""
        ids = []
        for word in words:
            got = self.tokenize(word)
            if len(got) != 1 or got[0] == self.unk_id:
                raise ValueError(f"{key}: {word!r} is not one token of the caption vocabulary (it tokenizes to {got}); "
                                 f"list words that occur in the training captions")
            ids.append(got[0])
        return torch.tensor(ids, dtype=torch.long)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`tokenize` of many captions, in one call to the backend where it has a batch encoder."""
        if self.kind == "word":
            # encode_batch_fast (newer tokenizers; older ones fall back): the same ids without the offsets we never read
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            rows = [e.ids for e in encode(list(texts), add_special_tokens=False)]
        elif self.kind == "hf":
            rows = [list(r) for r in self.backend(list(texts), add_special_tokens=False)["input_ids"]]
        else:
            rows = [self.backend.encode(t) for t in texts]
        control = (self.pad_id, self.bos_id, self.eos_id)
        for r, ids in enumerate(rows):
            if any(i in control for i in ids):
                rows[r] = [self.unk_id if i in control else i for i in ids if i not in control or self.unk_id is not None]
        return rows

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``bos + tokens + eos`` of one caption, cut to ``max_len`` ids with eos kept last."""
        if not isinstance(text, str):
            raise TypeError(f"caption must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"caption is empty or whitespace-only: {text!r}")
        ids = self.tokenize(text)
        if not ids:
            raise ValueError(f"caption {text!r} encodes to no tokens")
        if max_len is not None:
            if max_len < 3:
                raise ValueError(f"max_len must be >= 3 (bos, one token, eos), got {max_len}")
            ids = ids[: max_len - 2]
        return [self.bos_id, *ids, self.eos_id]

    def encode_batch(self, texts: Sequence[str], max_len: int | None = None) -> torch.Tensor:
        """LongTensor [B, T]: each row ``bos + tokens + eos`` (at most ``max_len`` ids, eos kept
        at the end when truncating), right-padded with ``pad_id`` to the longest row."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of captions, got a single str")
        rows = []
        for i, t in enumerate(texts):
            try:
                rows.append(self.encode(t, max_len))
            except ValueError as e:
                raise ValueError(f"caption {i} of the batch: {e}") from None
        if not rows:
            raise ValueError("encode_batch got an empty list of captions")
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    # ------------------------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence: a leading bos skipped, cut at the first eos, specials dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence, got shape {tuple(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        ids = list(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]  # bos may equal eos (GPT-2 style): skip it before looking for eos
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        ids = [i for i in ids if i not in self.special_ids and 0 <= i < self.vocab_size]
        if self.kind == "word":
            return " ".join(self.backend.id_to_token(i) for i in ids)
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True).strip()
        return self.backend.decode(ids).strip()

    def decode_batch(self, ids: torch.Tensor | Sequence) -> list | str:
        """Decode ``ids [..., T]`` into a nested list of str with the leading dims, e.g. ids
        [B, L, n, T] -> ``out[b][l][j]``. A single [T] sequence gives a str."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 0:
                raise ValueError("decode_batch needs at least one dimension [..., T]")
            depth = ids.dim() - 1
            ids = ids.tolist()
        else:
            depth, x = 0, ids
            while len(x) and isinstance(x[0], (list, tuple, torch.Tensor)):
                depth, x = depth + 1, x[0]

        def rec(x, d):
            return self.decode(x) if d == 0 else [rec(y, d - 1) for y in x]

        return rec(ids, depth)


def build_tokenizer(section: Any, train_captions: Iterable[str], save_dir: str | os.PathLike | None = None) -> CaptionTokenizer:
    """The tokenizer a recipe's `tokenizer` section names: trained on ``train_captions`` (``kind: word``,
    words seen fewer than ``min_freq`` times become <unk>), a local HF tokenizer (``hf``, ``path``), or
    open_clip's bundled BPE (``open_clip``); saved to ``save_dir`` when given."""
    if section.kind == "word":
        tokenizer = CaptionTokenizer.train(train_captions, min_freq=section.min_freq)
    elif section.kind == "hf":
        tokenizer = CaptionTokenizer.from_hf(section.path)
    else:
        tokenizer = CaptionTokenizer.from_open_clip()
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer


class WordTokens:
    """open_clip-style tokenizer over a word-level :class:`CaptionTokenizer`: captions ->
    LongTensor ``[N, context_length]`` = ``bos + words + eos``, padded with ``pad_id`` (a long
    caption is cut with eos kept last; an empty one is just ``bos eos``)."""

    def __init__(self, vocab: CaptionTokenizer, context_length: int):
        self.vocab, self.context_length = vocab, int(context_length)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        v, n = self.vocab, self.context_length
        out = np.full((len(texts), n), v.pad_id, dtype=np.int64)
        for row, words in enumerate(v.tokenize_batch(texts)):
            words = words[:n - 2]
            out[row, 0], out[row, 1:len(words) + 1], out[row, len(words) + 1] = v.bos_id, words, v.eos_id
        return torch.from_numpy(out)
