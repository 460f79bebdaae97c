"""Graduality and length shaping of per-layer rewards (docs/design.md, "Shaping"). Pure functions.

Layer k runs 0..K (0 = z_0, K = final). ``schedule`` is also re-exported by ``rlrefine.losses``
for the latent graduality loss, so the two halves of the method share one definition.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["embedding_progress", "length_budget", "progress", "schedule", "shape_rewards"]


def schedule(kind: str, K: int, eps: float = 0.01) -> torch.Tensor:
    """Fraction of the distance still to go after layer k, ``s(k)`` for k = 0..K  -> ``[K+1]``.

    * ``linear``:    s(k) = 1 - k/K                      (each layer removes 1/K of the distance)
    * ``geometric``: s(k) = (eps^(k/K) - eps) / (1 - eps)  (each layer removes the same share of
      what remains; later steps are smaller in absolute terms)

    Both have s(0) = 1 and s(K) = 0. ``eps`` in (0, 1) sets how steep the geometric decay is.
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    k = torch.arange(K + 1, dtype=torch.float64) / K
    if kind == "linear":
        s = 1.0 - k
    elif kind == "geometric":
        if not 0.0 < eps < 1.0:
            raise ValueError(f"geometric schedule needs 0 < eps < 1, got {eps}")
        s = (eps ** k - eps) / (1.0 - eps)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; choose 'linear' or 'geometric'")
    s[0], s[-1] = 1.0, 0.0  # exact endpoints regardless of rounding
    return s.float()


def length_budget(layers: Sequence[int] | torch.Tensor, K: int, len_min: float,
                  len_max: float) -> torch.Tensor:
    """Allowed caption length per layer: ``L_k = L_min + (L_max - L_min) * k / K``  -> ``[L]``."""
    k = torch.as_tensor(layers, dtype=torch.float32)
    return len_min + (len_max - len_min) * k / K


def progress(rewards: torch.Tensor, r0: torch.Tensor, rK: torch.Tensor, eps: float = 1e-4,
             clip: tuple[float, float] = (-1.0, 2.0)) -> torch.Tensor:
    """``p = (r - r0) / (rK - r0)``, per image; ``rewards`` is ``[B, ...]``, ``r0``/``rK`` are ``[B]``.

    The denominator keeps its sign but its magnitude is clamped to at least ``eps`` (so rK ~ r0
    does not explode), and p is clipped to ``clip``.
    """
    shape = (-1,) + (1,) * (rewards.dim() - 1)
    den = (rK - r0).reshape(shape)
    sign = torch.where(den < 0, -1.0, 1.0).to(rewards.dtype)
    den = sign * den.abs().clamp(min=eps)
    p = (rewards - r0.reshape(shape)) / den
    return p.clamp(min=clip[0], max=clip[1])


def embedding_progress(candidates: torch.Tensor, e0: torch.Tensor, eK: torch.Tensor, eps: float = 1e-4,
                       clip: tuple[float, float] = (-1.0, 2.0)) -> torch.Tensor:
    """Progress measured in text-embedding space, the quantity the graduality score G reads (docs/design.md):

        p = 1 - D(e_c, e_K) / D(e_0, e_K),   D(a, b) = 1 - cos(a, b)

    per image; ``candidates`` is ``[B, ..., D]`` (the reward's text embeddings of the candidates),
    ``e0``/``eK`` are ``[B, D]`` (the captions decoded greedily from z_0 and at layer K). A denominator
    below ``eps`` (z_0 already decodes the final caption) is raised to ``eps``; p is clipped to ``clip``.
    """
    B, D = e0.shape
    c = F.normalize(candidates.float(), dim=-1)
    shape = (B,) + (1,) * (candidates.dim() - 2) + (D,)
    e0n, eKn = F.normalize(e0.float(), dim=-1).view(shape), F.normalize(eK.float(), dim=-1).view(shape)
    dist = 1.0 - (c * eKn).sum(-1)  # [B, ...]
    start = (1.0 - (e0n * eKn).sum(-1)).clamp(min=eps)  # [B, 1, ...]
    return (1.0 - dist / start).clamp(min=clip[0], max=clip[1])


def shape_rewards(rewards: torch.Tensor, layers: Sequence[int] | torch.Tensor, K: int,
                  r0: torch.Tensor, rK: torch.Tensor, sched: torch.Tensor, lambda_grad: float,
                  lambda_len: float, lengths: torch.Tensor, len_min: float, len_max: float,
                  progress_clip: tuple[float, float] = (-1.0, 2.0),
                  eps: float = 1e-4, progress_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Graduality- and length-shaped rewards for candidates decoded at several layers.

        p_k(c)  = clip((r(c) - r0) / (rK - r0), progress_clip)
        r~_k(c) = r(c) - lambda_grad * |p_k(c) - (1 - s(k))| * [k < K]
                       - lambda_len  * max(0, len(c) - L_k) / L_max
        L_k     = L_min + (L_max - L_min) * k / K

    Args:
        rewards: ``[B, L, n]`` raw rewards of n candidates at each selected layer.
        layers: ``[L]`` layer indices (ints in 0..K) of the second axis.
        K: number of refinement layers.
        r0: ``[B]`` reward of the caption decoded from z_0; rK: ``[B]`` reward of the final
            layer's greedy caption.
        sched: ``[K+1]`` schedule s(k) (see :func:`schedule`).
        lambda_grad, lambda_len: penalty weights.
        lengths: ``[B, L, n]`` caption lengths (tokens or words, same unit as len_min/len_max).
        len_min, len_max: length budget at layer 0 and at layer K.
        progress_clip: range p is clipped to.
        eps: smallest |rK - r0| used as the progress denominator.
        progress_values: ``[B, L, n]`` progress measured another way (e.g. :func:`embedding_progress`);
            replaces the reward progress p_k(c) when given.

    Returns:
        ``(shaped [B, L, n], progress [B, L, n])``. The last layer is judged on quality (and
        length) alone.
    """
    k = torch.as_tensor(layers, dtype=torch.long, device=rewards.device)  # [L]
    if rewards.dim() != 3 or rewards.shape[1] != k.numel():
        raise ValueError(f"rewards must be [B, L={k.numel()}, n]; got {tuple(rewards.shape)}")
    if int(k.min()) < 0 or int(k.max()) > K:
        raise ValueError(f"layers must lie in 0..{K}; got {k.tolist()}")
    sched = sched.to(device=rewards.device, dtype=rewards.dtype)
    if progress_values is None:
        p = progress(rewards, r0.to(rewards), rK.to(rewards), eps=eps, clip=progress_clip)
    elif progress_values.shape != rewards.shape:
        raise ValueError(f"progress_values must have the rewards' shape {tuple(rewards.shape)}; got {tuple(progress_values.shape)}")
    else:
        p = progress_values.to(rewards)
    target = (1.0 - sched[k]).view(1, -1, 1)  # [1, L, 1] ideal progress 1 - s(k)
    not_last = (k < K).to(rewards.dtype).view(1, -1, 1)
    budget = length_budget(k.cpu(), K, len_min, len_max).to(rewards).view(1, -1, 1)
    excess = (lengths.to(rewards.dtype) - budget).clamp(min=0.0) / len_max
    shaped = rewards - lambda_grad * (p - target).abs() * not_last - lambda_len * excess
    return shaped, p
