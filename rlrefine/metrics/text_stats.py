"""Surface statistics of generated captions: length, vocabulary, repetition.

Where this sits in the flow: ``trainers -> **metrics** / evaluate``, computed per layer. Words are
the tokens of :func:`rlrefine.metrics.captions.ptb_tokenize` (lower-cased, punctuation dropped),
the same tokens BLEU / CIDEr-D see.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rlrefine.metrics.captions import ptb_tokenize

__all__ = ["text_stats", "has_repeated_ngram"]


def has_repeated_ngram(words: Sequence[str], n: int = 2) -> bool:
    """True when some n-gram (n consecutive words) occurs at least twice in ``words``.

    Any repeated m-gram with m >= n contains a repeated n-gram, so n = 2 also catches repeated
    trigrams and longer loops ("a dog and a dog and a dog").
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return any(c > 1 for c in grams.values())


def text_stats(captions: Sequence[str], n: int = 2) -> dict[str, float | int]:
    """Statistics of a list of captions (typically every caption decoded at one layer).

    * ``mean_length``: mean number of words per caption (empty captions count as 0 words).
    * ``vocab_size``: number of distinct words over all captions.
    * ``repeated_ngram_rate``: fraction of captions in which some word n-gram occurs twice or more
      (default n = 2: a repeated bigram, e.g. "a red cube and a red cube"; unigrams are not used
      because function words such as "a" legitimately repeat). The degenerate loops that reward
      hacking produces show up here first.
    * ``num_captions``: len(captions).

    An empty list is a ValueError (a caller bug, not a statistic).
    """
    if isinstance(captions, str):
        raise ValueError("text_stats takes a list of captions, got a single string")
    if len(captions) == 0:
        raise ValueError("text_stats: captions is empty")
    tokenized = [ptb_tokenize(c).split() for c in captions]
    vocab = {w for words in tokenized for w in words}
    return {
        "mean_length": sum(len(w) for w in tokenized) / len(tokenized),
        "vocab_size": len(vocab),
        "repeated_ngram_rate": sum(has_repeated_ngram(w, n) for w in tokenized) / len(tokenized),
        "num_captions": len(tokenized),
    }
