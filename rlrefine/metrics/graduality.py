"""Graduality of a refinement captioner: does each layer do its share of the work? (docs/design.md)

Where this sits in the flow: ``trainers -> **metrics** / evaluate``. Pure functions on tensors and
floats; ``evaluate`` feeds them latents Z or the evaluator's text embeddings of each layer's
captions, plus the schedule s(k) from :func:`rewards.shaping.schedule`.

* :func:`progress_curve`     π_k = 1 − D(e_k, e_K) / D(e_0, e_K), distances pooled over samples
* :func:`graduality`         G = 1 − mean_{k=1..K−1} |π_k − (1 − s(k))|
* :func:`layer_score`        P = Σ w_k perf_k / Σ w_k
* :func:`refinement_score`   RS = (1 − α) perf_K + α G
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["progress_curve", "graduality", "layer_score", "refinement_score"]

_DISTANCES = ("euclidean", "cosine")


def progress_curve(embeddings: Tensor, distance: str = "euclidean", eps: float = 1e-8,
                   estimator: str = "pooled") -> Tensor:
    """Progress of each layer toward the final one, over N samples.

    ``embeddings`` is **sample-major**, [N, K+1, *F]: for each of N samples, one representation per
    layer 0..K (the layout of the captioner's latents Z [B, K+1, M, d]; trailing feature dims are
    flattened, so Z can be passed as is). With D the Euclidean distance (``distance="euclidean"``, for
    latents) or the cosine distance 1 − cos(e_k, e_K) (``distance="cosine"``, for text embeddings of
    the captions decoded at each layer):

    * ``estimator="pooled"`` (default): π_k = 1 − Σ_i D(e_k^i, e_K^i) / Σ_i D(e_0^i, e_K^i), the
      distances pooled over samples before the ratio; the same as the per-sample progress averaged
      with weights D(e_0^i, e_K^i).
    * ``estimator="mean"``: the plain mean over samples of π_k^i = 1 − D(e_k^i, e_K^i) / D(e_0^i, e_K^i).
      A sample whose layer-0 caption happens to lie near its final one has a tiny denominator and
      an unbounded π_k^i: on captions, 5–7% of images with π_1^i < −1 moved the mean by up to 0.25
      and ranked models backwards (docs/shapes_world.md, "Measuring G"), hence the pooled default.

    The result [K+1] has π_0 = 0 and π_K = 1 by construction. π_k is not clipped: a layer that
    overshoots or moves away from the final representation gives π_k > 1 or < 0, which
    :func:`graduality` then penalises.

    Samples whose start and end coincide (D(e_0, e_K) <= eps) have no defined progress and are
    left out; if every sample is degenerate a ValueError is raised.
    """
    if distance not in _DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {list(_DISTANCES)}")
    if estimator not in ("pooled", "mean"):
        raise ValueError(f"unknown estimator {estimator!r}; choose 'pooled' or 'mean'")
    e = torch.as_tensor(embeddings)
    if e.dim() < 3:
        raise ValueError(f"embeddings must be [N, K+1, *features], got shape {tuple(e.shape)}")
    N, K1 = e.shape[:2]
    if K1 < 2:
        raise ValueError(f"embeddings need at least 2 layers (0 and K), got {K1}")
    e = e.reshape(N, K1, -1).double()
    final = e[:, -1:, :]  # [N, 1, F]
    if distance == "euclidean":
        dist = (e - final).norm(dim=-1)  # [N, K+1]
    else:
        dist = 1.0 - torch.nn.functional.cosine_similarity(e, final.expand_as(e), dim=-1, eps=eps)
    start = dist[:, 0]
    valid = start > eps
    if not valid.any():
        raise ValueError("progress_curve: every sample has D(e_0, e_K) = 0, progress is undefined")
    if estimator == "pooled":
        curve = 1.0 - dist[valid].sum(dim=0) / start[valid].sum()
    else:
        curve = (1.0 - dist[valid] / start[valid, None]).mean(dim=0)  # mean over [N_valid, K+1]
    curve[0] = 0.0
    curve[-1] = 1.0
    return curve.float()


def _as_1d(x: Tensor | Sequence[float], name: str) -> Tensor:
    t = x.detach().double().flatten() if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t


def graduality(progress: Tensor | Sequence[float], schedule: Tensor | Sequence[float]) -> float:
    """Graduality score of a progress curve against a schedule.

        G = 1 − mean_{k=1..K−1} |π_k − (1 − s(k))|

    ``progress`` = π_0..π_K (from :func:`progress_curve`) and ``schedule`` = s(0)..s(K) (the
    fraction of the distance still to go after layer k; s(0) = 1, s(K) = 0), both of length K+1.
    1 − s(k) is the ideal progress. G = 1 means exactly on schedule; the end points are excluded
    because they are fixed by construction. For K = 1 there is no intermediate layer and G = 1 by
    definition. G can be negative when progress is far off (|π_k − ideal| > 1 on average).
    """
    pi = _as_1d(progress, "progress")
    s = _as_1d(schedule, "schedule")
    if pi.shape != s.shape:
        raise ValueError(f"progress and schedule must both have length K+1, got {pi.numel()} and {s.numel()}")
    if pi.numel() < 2:
        raise ValueError(f"progress needs at least 2 entries (layers 0 and K), got {pi.numel()}")
    if pi.numel() == 2:
        return 1.0
    return float(1.0 - (pi[1:-1] - (1.0 - s[1:-1])).abs().mean())


def layer_score(perf: Tensor | Sequence[float], weights: Tensor | Sequence[float]) -> float:
    """Layer-weighted performance P = Σ_k w_k perf_k / Σ_k w_k over layers k = 1..K.

    ``perf`` [K] is the chosen evaluator's score per layer, ``weights`` [K] the layer weights
    (e.g. :func:`rlrefine.losses.layer_weights`), non-negative with a positive sum.
    """
    p = _as_1d(perf, "perf")
    w = _as_1d(weights, "weights")
    if p.shape != w.shape:
        raise ValueError(f"perf and weights must have the same length K, got {p.numel()} and {w.numel()}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return float((w * p).sum() / w.sum())


def refinement_score(perf_K: float, G: float, alpha: float = 0.5) -> float:
    """Refinement score RS = (1 − α) · perf_K + α · G, α in [0, 1].

    Mixes the final layer's quality perf_K with the graduality G; perf_K should be on a scale
    comparable to G (e.g. a CLIP-S-like score in [0, ~1]) for α to mean what it says. Report the
    two components beside RS.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float((1.0 - alpha) * float(perf_K) + alpha * float(G))
