"""Reference-based caption metrics: BLEU-4, ROUGE-L, CIDEr-D (pure Python), METEOR and SPICE
(Java, only where their jars are present).

Where this sits in the flow: ``trainers -> **metrics** / evaluate``. BLEU, ROUGE-L, METEOR and SPICE
are pycocoevalcap's own scorers, so numbers are comparable with the COCO caption literature;
CIDEr-D is :class:`rewards.cider.CiderD`, the one implementation shared with the ``cider`` SCST
reward, tested equal to pycocoevalcap's ``Cider``. This module adds a Java-free tokenizer
(:mod:`rlrefine.data.ptb`) and availability checks.

Inputs everywhere: ``gts: dict[id, list[str]]`` (references, raw text) and
``res: dict[id, list[str]]`` (exactly one raw candidate per id, same ids). Each function tokenizes
both with :func:`ptb_tokenize` and returns the corpus score as a float.

Tokenization. The COCO evaluation runs Stanford's PTBTokenizer (``pycocoevalcap.tokenizer``),
which needs Java. :func:`ptb_tokenize` re-implements what it does to captions in pure Python so
that scores never depend on whether Java is installed: lower-case; split off punctuation,
``$``, ``%``, possessive/contraction clitics (``man's`` -> ``man 's``, ``don't`` -> ``do n't``,
``cannot`` -> ``can not``, ``gonna`` -> ``gon na``); keep hyphenated words, decimals, times,
``a/b`` and dotted abbreviations (``p.m.``) whole; then drop pycocoevalcap's punctuation list
(quotes, ``. , ; : ! ? - -- ...``). Brackets become ``-lrb-``/``-rrb-`` (etc.) and, exactly as in
pycocoevalcap (whose removal list has them upper-case while ``-lowerCase`` lower-cases them), are
*kept*. On ordinary captions it reproduces the Java tokenizer token for token (tested against it
when Java is present).

Empty candidates (or ones that are only punctuation) are allowed and score as nothing matched:
0 for CIDEr-D and ROUGE-L on that image, and for BLEU they add no n-grams and no length, which
lowers the corpus score through the precisions and the brevity penalty (all candidates empty ->
BLEU = 0).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "ptb_tokenize",
    "tokenize_corpus",
    "cider_d",
    "bleu4",
    "rouge_l",
    "meteor",
    "spice",
    "meteor_available",
    "spice_available",
    "caption_metrics",
]

from rlrefine.data.ptb import PTB_PUNCTUATIONS, ptb_tokenize  # noqa: F401 (re-exported)


def tokenize_corpus(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """:func:`ptb_tokenize` applied to every caption of a ``dict[id, list[str]]``."""
    return {k: [ptb_tokenize(c) for c in v] for k, v in captions.items()}


def _validate(gts: Mapping, res: Mapping) -> None:
    """Same ids on both sides, a non-empty list of references and exactly one candidate per id."""
    if not gts:
        raise ValueError("gts is empty: caption metrics need at least one image")
    if set(gts.keys()) != set(res.keys()):
        missing = sorted(map(str, set(gts) - set(res)))[:5]
        extra = sorted(map(str, set(res) - set(gts)))[:5]
        raise ValueError(f"gts and res must have the same ids; missing in res: {missing}, extra in res: {extra}")
    for k in gts:
        refs = gts[k]
        cand = res[k]
        if isinstance(refs, str) or not refs:
            raise ValueError(f"gts[{k!r}] must be a non-empty list of reference strings, got {refs!r}")
        if isinstance(cand, str):
            raise ValueError(f"res[{k!r}] must be a list with one caption, got the bare string {cand!r}")
        if len(cand) != 1:
            raise ValueError(f"res[{k!r}] must hold exactly one candidate caption, got {len(cand)}")


def _prepare(gts: Mapping, res: Mapping) -> tuple[dict, dict]:
    """Validate inputs and tokenize them; ids are kept in ``gts`` order."""
    _validate(gts, res)
    g = {k: [ptb_tokenize(t) for t in gts[k]] for k in gts}
    r = {k: [ptb_tokenize(res[k][0])] for k in gts}
    return g, r


def cider_d(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015, §CIDEr-D), the mean of the per-image scores.

    Computed by :class:`rewards.cider.CiderD`, the same code as the ``cider`` reward of SCST, with
    document frequencies from the references of the evaluated corpus, as pycocoevalcap's ``Cider``
    does (whose class name says CIDEr but which computes CIDEr-D; tests check the two agree): n = 1..4
    tf-idf vectors, candidate weights clipped by the reference's (``min(vec_hyp, vec_ref) * vec_ref``),
    a Gaussian length penalty exp(−δ²/2σ²) with σ = 6, mean over n and over references, times 10.
    The idf comes from this corpus, so scores on tiny corpora are not comparable with published
    numbers (a corpus of one image always scores 0: log(1) − log(df) = 0).
    """
    from rewards.cider import CiderD

    _validate(gts, res)
    scorer = CiderD([gts[k] for k in gts])
    return float(sum(scorer.score(res[k][0], gts[k]) for k in gts) / len(gts))


def bleu4(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) with pycocoevalcap's ``Bleu(4)`` scorer.

    Clipped n-gram precisions p_1..p_4 pooled over the corpus, geometric mean, brevity penalty
    exp(1 − R/C) when the total candidate length C is below the total "closest" reference length
    R. pycocoevalcap adds 1e-15 / 1e-9 to numerators / denominators, so a perfect match scores
    1 − O(1e-9), not exactly 1.
    """
    from pycocoevalcap.bleu.bleu import Bleu

    g, r = _prepare(gts, res)
    score, _ = Bleu(4).compute_score(g, r, verbose=0)
    return float(score[3])


def rouge_l(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> float:
    """Mean per-image ROUGE-L (Lin 2004) with pycocoevalcap's ``Rouge`` scorer.

    Per image: LCS-based precision and recall, each maximised over the references, combined as
    F_β = (1 + β²) P R / (R + β² P) with β = 1.2; 0 when there is no common token.
    """
    from pycocoevalcap.rouge.rouge import Rouge

    g, r = _prepare(gts, res)
    score, _ = Rouge().compute_score(g, r)
    return float(score)


def _pycocoevalcap_dir() -> str:
    import pycocoevalcap  # a namespace package: no __file__, one entry in __path__

    return os.path.abspath(next(iter(pycocoevalcap.__path__)))


def meteor_available() -> bool:
    """True when METEOR 1.5 can run: a ``java`` on PATH and pycocoevalcap's ``meteor-1.5.jar`` and
    its paraphrase table ``data/paraphrase-en.gz`` present."""
    if shutil.which("java") is None:
        return False
    d = os.path.join(_pycocoevalcap_dir(), "meteor")
    return os.path.isfile(os.path.join(d, "meteor-1.5.jar")) and os.path.isfile(
        os.path.join(d, "data", "paraphrase-en.gz")
    )


def spice_available() -> bool:
    """True when SPICE can run offline: ``java`` on PATH, ``spice-1.0.jar`` and the Stanford
    CoreNLP 3.6.0 jars (``lib/stanford-corenlp-3.6.0.jar`` and ``-models.jar``) already present.
    pycocoevalcap would otherwise try to download CoreNLP at run time; we never let it."""
    if shutil.which("java") is None:
        return False
    d = os.path.join(_pycocoevalcap_dir(), "spice")
    needed = ["spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"]
    return all(os.path.isfile(os.path.join(d, p)) for p in needed)


def meteor(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> float | None:
    """Corpus METEOR 1.5 (``-l en -norm``) through pycocoevalcap's ``Meteor`` (a Java subprocess),
    or ``None`` when :func:`meteor_available` is False ("unavailable", never 0)."""
    if not meteor_available():
        logger.debug("METEOR unavailable (needs java and pycocoevalcap's meteor-1.5.jar)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    g, r = _prepare(gts, res)
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(g, r)
    finally:
        del scorer  # closes the Java process
    return float(score)


def spice(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> float | None:
    """Corpus SPICE (Anderson et al. 2016) through pycocoevalcap's ``Spice``, or ``None`` when
    :func:`spice_available` is False (the CoreNLP jars are not shipped and are never downloaded)."""
    if not spice_available():
        logger.debug("SPICE unavailable (needs java, spice-1.0.jar and Stanford CoreNLP 3.6.0 jars)")
        return None
    from pycocoevalcap.spice.spice import Spice

    g, r = _prepare(gts, res)
    score, _ = Spice().compute_score(g, r)
    return float(score)


def caption_metrics(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]], java: bool = True
) -> dict[str, float | None]:
    """All reference-based metrics: ``{"BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE"}``;
    METEOR / SPICE are ``None`` where unavailable (see :func:`meteor`, :func:`spice`) or not asked
    for (``java=False``: each starts a Java process, seconds per call)."""
    return {
        "BLEU-4": bleu4(gts, res),
        "ROUGE-L": rouge_l(gts, res),
        "CIDEr-D": cider_d(gts, res),
        "METEOR": meteor(gts, res) if java else None,
        "SPICE": spice(gts, res) if java else None,
    }
