"""A weighted sum of rewards (the `sum` kind): r(I, c) = Σ_t w_t · r_t(I, c).

Where it sits: ``rewards``. As TRL's GRPO takes a list of reward functions with weights, and as Cho
et al. (2022) add a grammar term to CLIP-S against degenerate captions. Every term is scored on the
same call (same images, captions, references, image_index); :meth:`WeightedSum.term_scores` returns
them by name so a trainer can log each term (finetune: ``reward_terms/<name>``).
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses

import torch

from .registry import build_reward, register_reward


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_t w_t · r_t over the named term scores (float32, CPU): {"a": [1, 2], "b": [3, 0]}, {a: 1, b: 0.5}
    -> [2.5, 2]."""
    total = None
    for name, scores in terms.items():
        part = weights[name] * scores.detach().float().cpu()
        total = part if total is None else total + part
    return total


class WeightedSum:
    """``WeightedSum([(name, weight, reward), ...])``: a reward (rewards protocol) summing weighted terms."""

    def __init__(self, terms: Sequence[tuple[str, float, object]]):
        if not terms:
            raise ValueError("a sum reward needs at least one term")
        names = [n for n, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"sum reward term names must be unique, got {names}")
        self.terms = list(terms)
        self.weights = {n: float(w) for n, w, _ in terms}

    @torch.no_grad()
    def term_scores(self, images, captions, references=None, image_index=None) -> dict[str, torch.Tensor]:
        """name -> the term's (unweighted) scores [len(captions)]."""
        return {name: torch.as_tensor(r(images, captions, references=references, image_index=image_index)).float()
                for name, _, r in self.terms}

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(terms, self.weights)

    def __call__(self, images, captions, references=None, image_index=None) -> torch.Tensor:
        return self.combine(self.term_scores(images, captions, references=references, image_index=image_index))

    def embed_texts(self, texts):
        """The first term that embeds texts does (for the text-embedding progress curve)."""
        for _, _, r in self.terms:
            if hasattr(r, "embed_texts"):
                return r.embed_texts(texts)
        raise AttributeError("no term of this sum reward embeds texts")


def _build(section, ctx):
    names = section.term_names()
    return WeightedSum([(n, t.weight, build_reward(t.reward, dataclasses.replace(ctx, name=f"{ctx.name}.terms[{n}]")))
                        for n, t in zip(names, section.terms)])


register_reward("sum", _build, "a weighted sum of `terms` ([{weight: w, reward: {...}}, ...]), each logged as "
                "reward_terms/<name>", uses=("terms",), needs=("terms",))
