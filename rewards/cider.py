"""CIDEr-D (Vedantam et al. 2015): the one implementation, used as the SCST reward and by the metric.

Where it sits: ``rlrefine.data -> rlrefine.models -> **rewards** -> ... -> rlrefine.metrics``.
`rlrefine.metrics.captions.cider_d` (the evaluation metric) calls :class:`CiderD` with document
frequencies from the evaluated corpus; the ``cider`` reward (:class:`CiderReward`) uses document
frequencies from the *training* corpus, as self-critical.pytorch's ``CiderD`` does for SCST. The
arithmetic follows pycocoevalcap's ``cider_scorer.py`` term for term (tested equal to it):

For a caption c with n-gram counts t_g (n = 1..4, captions PTB-tokenized):

    vec_n(c)[g] = t_g(c) · (log N − log max(1, df(g)))        N = number of reference *sets* (images)
    sim_n(c, r) = Σ_g min(vec_n(c)[g], vec_n(r)[g]) · vec_n(r)[g] / (‖vec_n(c)‖ ‖vec_n(r)‖)
                  · exp(−(ℓ(c) − ℓ(r))² / (2σ²))              σ = 6, ℓ = number of bigrams (sic, as
                                                              in the reference code)
    CIDEr-D(c, R) = 10 · mean_n (1/|R|) Σ_{r ∈ R} sim_n(c, r)

df(g) counts the reference sets that contain g. A norm of 0 leaves the dot product undivided (it is
0 then anyway). The reference vectors of an image depend only on its references and the document
frequencies, so :class:`CiderD` computes them once per distinct reference set and caches them:
an SCST step only has to count the candidates' n-grams.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import torch

from rlrefine.data.ptb import ptb_tokenize

from .registry import register_reward

NGRAM_MAX = 4
SIGMA = 6.0

Ngram = tuple[str, ...]


def ngram_counts(tokens: Sequence[str], n: int = NGRAM_MAX) -> Counter:
    """Counts of every 1..n-gram of a token list: ``["a", "a"]`` -> {("a",): 2, ("a", "a"): 1}."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


def document_frequencies(reference_sets: Iterable[Sequence[str]], n: int = NGRAM_MAX) -> tuple[dict[Ngram, float], int]:
    """df(g) = number of reference sets with g in any of their (already tokenized) captions, and
    the number of sets N."""
    df: dict[Ngram, float] = defaultdict(float)
    count = 0
    for refs in reference_sets:
        count += 1
        seen: set = set()
        for r in refs:
            seen.update(ngram_counts(r.split(), n))
        for g in seen:
            df[g] += 1.0
    return dict(df), count


class _Vec:
    """tf-idf vectors per n-gram order, their norms, and the length ℓ (bigram count)."""

    __slots__ = ("vec", "norm", "length")

    def __init__(self, counts: Counter, df: dict[Ngram, float], log_n: float, n: int):
        self.vec: list[dict[Ngram, float]] = [{} for _ in range(n)]
        sq = [0.0] * n
        self.length = 0
        for g, tf in counts.items():
            order = len(g) - 1
            v = float(tf) * (log_n - math.log(max(1.0, df.get(g, 0.0))))
            self.vec[order][g] = v
            sq[order] += v * v
            if order == 1:
                self.length += tf
        self.norm = [math.sqrt(s) for s in sq]


class CiderD:
    """CIDEr-D with fixed document frequencies.

    ``CiderD(reference_sets)``: df and N from these reference sets (each a list of raw captions; they
    are PTB-tokenized here). ``score(candidate, references)`` is CIDEr-D of one raw caption against
    raw references. Reference vectors are computed once per distinct reference set, when first
    needed (at most ``cache_size`` sets are kept: precomputing a COCO-sized corpus would hold
    millions of n-gram entries).
    """

    def __init__(self, reference_sets: Iterable[Sequence[str]], n: int = NGRAM_MAX, sigma: float = SIGMA,
                 tokenize=ptb_tokenize, cache_size: int = 100_000):
        self.n, self.sigma, self.tokenize, self.cache_size = n, sigma, tokenize, cache_size
        tokenized = [[tokenize(r) for r in refs] for refs in reference_sets]
        self.df, self.num_sets = document_frequencies(tokenized, n)
        if self.num_sets == 0:
            raise ValueError("CIDEr-D needs at least one reference set for its document frequencies")
        self.log_n = math.log(float(self.num_sets))
        self._cache: dict[tuple[str, ...], list[_Vec]] = {}

    def _vec(self, tokenized: str) -> _Vec:
        return _Vec(ngram_counts(tokenized.split(), self.n), self.df, self.log_n, self.n)

    def reference_vectors(self, references: Sequence[str]) -> list[_Vec]:
        """The cached vectors of one image's raw references (computed on first use)."""
        key = tuple(references)
        vecs = self._cache.get(key)
        if vecs is None:
            if not references:
                raise ValueError("CIDEr-D needs at least one reference caption per image")
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            vecs = self._cache[key] = [self._vec(self.tokenize(r)) for r in references]
        return vecs

    def _sim(self, c: _Vec, r: _Vec) -> float:
        """mean_n of sim_n(c, r) times the length penalty (see the module docstring), summed over n."""
        total = 0.0
        penalty = math.exp(-((c.length - r.length) ** 2) / (2 * self.sigma ** 2))
        for order in range(self.n):
            ref = r.vec[order]
            val = sum(min(v, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, v in c.vec[order].items())
            if c.norm[order] != 0 and r.norm[order] != 0:
                val /= c.norm[order] * r.norm[order]
            total += val * penalty
        return total

    def score(self, candidate: str, references: Sequence[str]) -> float:
        """CIDEr-D of one raw candidate caption against one image's raw references."""
        refs = self.reference_vectors(references)
        c = self._vec(self.tokenize(candidate))
        return 10.0 * sum(self._sim(c, r) for r in refs) / self.n / len(refs)

    def scores(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """:meth:`score` of candidate i against references[i]."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        return [self.score(c, r) for c, r in zip(candidates, references)]


class CiderReward:
    """The ``cider`` reward: CIDEr-D of each caption against its image's references (rewards protocol).

    Document frequencies come from ``corpus`` (the training captions, one list per image), as
    self-critical.pytorch's SCST reward does; the reference vectors of an image are computed once,
    the first time it is scored, so a step only counts the candidates' n-grams. ``references`` is required at call time (per image row); ``image_index``
    maps captions to rows as everywhere in the protocol.
    """

    needs_references = True

    def __init__(self, corpus: Sequence[Sequence[str]], device: str | torch.device = "cpu"):
        self.cider = CiderD(corpus)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, captions: Sequence[str], references: Sequence[Sequence[str]] | None = None,
                 image_index: torch.Tensor | None = None) -> torch.Tensor:
        if references is None:
            raise ValueError("the cider reward needs references (one list of reference captions per image row)")
        rows = range(len(captions)) if image_index is None else [int(i) for i in image_index]
        scores = self.cider.scores(captions, [references[i] for i in rows])
        return torch.tensor(scores, dtype=torch.float32, device=self.device)


def _build(section, ctx):
    if ctx.corpus is None:
        raise ValueError(f"{ctx.name}: the cider reward needs the training captions (its document frequencies)")
    return CiderReward(ctx.corpus(), device=ctx.device)


register_reward("cider", _build, "CIDEr-D against the image's references, document frequencies from the training captions "
                "(self-critical.pytorch's SCST reward)", needs_corpus=True)
