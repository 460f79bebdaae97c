"""Caption diversity: the Vendi score of a set of captions (Friedman & Dieng 2023).

Where it sits: `rlrefine.metrics`, used by `evaluate` per refinement layer on the evaluator's text
embeddings of the decoded captions. Reward fine-tuning is known to collapse diversity (every image
gets the same safe caption); the Vendi score counts the "effective number of distinct captions".
"""

from __future__ import annotations

import torch

__all__ = ["vendi_score"]


def vendi_score(embeddings: torch.Tensor) -> float:
    """``VS = exp(−Σ_i λ_i log λ_i)`` with λ the eigenvalues of ``K / N``, ``K_ij = cos(e_i, e_j)``
    for the N rows of ``embeddings`` [N, D]. 1 when every row points the same way, N when all are
    orthogonal. The eigenvalues of K/N are the squared singular values of X/√N (X the unit rows),
    which costs O(N·D²) instead of O(N³)."""
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"vendi_score needs a non-empty [N, D] matrix, got shape {tuple(embeddings.shape)}")
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    lam = torch.linalg.svdvals(x / x.shape[0] ** 0.5) ** 2
    lam = lam[lam > 1e-12]
    lam = lam / lam.sum()  # trace(K/N) = 1 exactly; rounding otherwise lets VS dip below 1 (1 - 4e-16)
    return float(torch.exp(-(lam * lam.log()).sum()))
