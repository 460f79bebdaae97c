"""Caption tokenization as the COCO caption evaluation does it, without Java.

Where this sits in the flow: ``data`` (the bottom), so that both the CIDEr-D reward
(``rewards.cider``) and the evaluation metrics (``rlrefine.metrics.captions``) tokenize the same way.

The COCO evaluation runs Stanford's PTBTokenizer (``pycocoevalcap.tokenizer``), which needs Java.
:func:`ptb_tokenize` re-implements what it does to captions in pure Python so that scores never
depend on whether Java is installed: lower-case; split off punctuation, ``$``, ``%``,
possessive/contraction clitics (``man's`` -> ``man 's``, ``don't`` -> ``do n't``, ``cannot`` ->
``can not``, ``gonna`` -> ``gon na``); keep hyphenated words, decimals, times, ``a/b`` and dotted
abbreviations (``p.m.``) whole; then drop pycocoevalcap's punctuation list (quotes,
``. , ; : ! ? - -- ...``). Brackets become ``-lrb-``/``-rrb-`` (etc.) and, exactly as in
pycocoevalcap (whose removal list has them upper-case while ``-lowerCase`` lower-cases them), are
*kept*. On ordinary captions it reproduces the Java tokenizer token for token (tested against it
when Java is present, in tests/test_metrics_captions.py).
"""

from __future__ import annotations

import re

__all__ = ["PTB_PUNCTUATIONS", "ptb_tokenize"]

# pycocoevalcap/tokenizer/ptbtokenizer.py: tokens dropped after PTB tokenization. Kept verbatim
# (with its upper-case bracket names, which never match lower-cased output).
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")
# Words PTBTokenizer splits into two tokens.
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
# Abbreviations PTBTokenizer keeps with their final period.
_ABBREVIATIONS = frozenset(["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "mt", "prof", "inc", "co", "ltd"])
_DOTTED_ABBREV = re.compile(r"^(?:[a-z]\.){2,}$")  # u.s., p.m., a.m.
_LEAD = set("\"'`([{$")
_TRAIL = set("\"'`)]}.,;:!?%")


def _split_core(core: str) -> list[str]:
    """Split one whitespace-free chunk with no leading/trailing punctuation."""
    out: list[str] = []
    # "--" inside a chunk ("smiling--who") separates words.
    if "--" in core:
        parts = core.split("--")
        for i, p in enumerate(parts):
            if i:
                out.append("--")
            if p:
                out.extend(_split_core(p))
        return out
    # Commas / semicolons / other separators glued between words (not inside numbers like 1,000).
    m = re.search(r"(?<!\d)[,;!?]|[,;!?](?!\d)", core)
    if m:
        left, sep, right = core[: m.start()], core[m.start()], core[m.end() :]
        return _tokenize_chunk(left) + [sep] + _tokenize_chunk(right)
    if core in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[core])
    if core.endswith("n't") and len(core) > 3:
        return [core[:-3], "n't"]
    for clitic in _CLITICS:
        if core.endswith(clitic) and len(core) > len(clitic):
            return [core[: -len(clitic)], clitic]
    return [core]


def _tokenize_chunk(chunk: str) -> list[str]:
    """PTB-style tokens of one whitespace-free chunk (punctuation still included)."""
    head: list[str] = []
    tail: list[str] = []
    if chunk in _CLITICS or chunk == "n't":  # already split by the writer: "dog 's"
        return [chunk]
    # Leading quotes, brackets and currency.
    while chunk and chunk[0] in _LEAD:
        ch = chunk[0]
        head.append(_BRACKETS.get(ch, "``" if ch == '"' else ch))
        chunk = chunk[1:]
    # Trailing punctuation, innermost last.
    while chunk:
        if chunk.endswith("..."):
            tail.append("...")
            chunk = chunk[:-3]
            continue
        ch = chunk[-1]
        if ch not in _TRAIL:
            break
        if ch in "!?":  # PTB keeps a run like "!!" or "?!" as one token (not in the removal list)
            run = len(chunk) - len(chunk.rstrip("!?"))
            tail.append(chunk[-run:])
            chunk = chunk[:-run]
            continue
        if ch == ".":
            stem = chunk[:-1]
            if _DOTTED_ABBREV.match(chunk) or stem in _ABBREVIATIONS:
                break  # the period belongs to the abbreviation
        tail.append(_BRACKETS.get(ch, "''" if ch == '"' else ch))
        chunk = chunk[:-1]
    middle = _split_core(chunk) if chunk else []
    return head + middle + tail[::-1]


def ptb_tokenize(text: str) -> str:
    """Tokenize one caption the way pycocoevalcap's PTBTokenizer + punctuation removal does.

    Returns the tokens joined by single spaces (what the scorers expect); ``""`` for a caption
    with no words. See the module docstring for the rules.
    """
    text = text.replace("\n", " ").lower()
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_tokenize_chunk(chunk))
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)
