"""The `grammar` reward: 1.0 when a caption is a sentence of the shapes caption grammar, else 0.0.

Where it sits: ``rewards``, on top of ``rlrefine.data.shapes.is_grammatical`` (the exact recogniser
of the grammar the shapes references are generated from). A fluency term for the embedded default,
meant to be added to a learned reward with a ``sum`` (Cho et al. 2022 add a grammar term to CLIP-S
so that fine-tuning does not drift into word lists), e.g.
``reward: {kind: sum, terms: [{weight: 1, reward: {kind: distilled}}, {weight: 0.5, reward: {kind: grammar}}]}``.
"""

from __future__ import annotations

import torch

from rlrefine.data.shapes import is_grammatical

from .registry import register_reward


class GrammarReward:
    """r(I, c) = 1[c is grammatical]; images and references are ignored (rewards protocol)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, captions, references=None, image_index=None) -> torch.Tensor:
        return torch.tensor([1.0 if is_grammatical(c) else 0.0 for c in captions], dtype=torch.float32, device=self.device)


def _build(section, ctx):
    if ctx.data_kind is not None and ctx.data_kind != "shapes":
        raise ValueError(f"{ctx.name}: reward kind 'grammar' recognises the shapes caption grammar; data.kind is "
                         f"'{ctx.data_kind}' (use a python reward for your own fluency term)")
    return GrammarReward(device=ctx.device)


register_reward("grammar", _build, "1 if the caption is in the shapes caption grammar, else 0 (shapes data)")
