"""The `scene` reward: the shapes world's ground truth as the reward, the bound on what any learned reward can teach.

Where it sits: ``rewards``, on ``rlrefine.data.shapes`` (the scenes, `parse_caption`, the caption grammar). The
reward protocol hands a reward images, not their index, so each image's scene is found by its bytes
(`rlrefine.data.shapes.image_digest`) among the recipe's own shapes splits (`RewardContext.scenes`). Fine-tuning
against it asks: with a reward that knows every object and relation, what does the method teach this captioner?

Per caption c of an image whose scene has N objects (`scene_score`):

    r = (objects named right − 2 · objects named that are not there) / N
        + 0.25 · min(relations that hold, N − 1) − 1.0 · relations that do not hold
        (−1 for a caption outside the shapes caption grammar)

plus a tie-break below 0.05 that depends on the caption's words only. Without it the many exact ties go to the
first candidate (`rlrefine.losses.dico_loss`), the most likely beam, and DiCO drifts to one phrasing
(docs/shapes_world.md, "DiCO against the ground truth").
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from rlrefine.data.shapes import Scene, caption_grounding_counts, image_digest, is_grammatical

from .protocol import caption_image_index
from .registry import register_reward

HALLUCINATION = 2.0  # cost of naming an object the image lacks, against 1 for each object named right (both / N)
RELATION = 0.25  # pay for each relation that holds, up to N − 1 of them
FALSE_RELATION = 1.0  # cost of each stated relation that does not hold
UNGRAMMATICAL = -1.0
TIE_BREAK = 0.05


def scene_score(caption: str, scene: Scene) -> float:
    """The ground-truth score of ``caption`` against ``scene`` (module docstring), without the tie-break; it counts
    what the grounding metrics count (`rlrefine.data.shapes.caption_grounding_counts`)."""
    if not is_grammatical(caption):
        return UNGRAMMATICAL
    c = caption_grounding_counts(caption, scene)
    right, false = c["mentions_correct"], c["relations"] - c["relations_correct"]
    return ((right - HALLUCINATION * (c["mentions"] - right)) / c["objects"]
            + RELATION * min(c["relations_correct"], c["objects"] - 1) - FALSE_RELATION * false)


def tie_break(caption: str) -> float:
    """A number in [0, TIE_BREAK) fixed by the caption's text."""
    return TIE_BREAK * int(hashlib.md5(caption.encode()).hexdigest()[:8], 16) / 2 ** 32


class SceneReward:
    """r(I, c) = `scene_score` + `tie_break`; ``scenes``: ``{image_digest: Scene}`` (rewards protocol)."""

    def __init__(self, scenes: dict[str, Scene], device: str | torch.device = "cpu"):
        self.scenes, self.device = scenes, torch.device(device)

    @torch.no_grad()
    def __call__(self, images, captions, references=None, image_index=None) -> torch.Tensor:
        pixels = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        rows = caption_image_index(len(pixels), len(captions), image_index).tolist()
        found = []
        for image in pixels:
            scene = self.scenes.get(image_digest(image))
            if scene is None:
                raise ValueError("reward kind 'scene': an image is not one of this recipe's shapes images, so its "
                                 "scene is unknown; the scene reward only scores the recipe's own data")
            found.append(scene)
        return torch.tensor([scene_score(c, found[i]) + tie_break(c) for c, i in zip(captions, rows)],
                            dtype=torch.float32, device=self.device)


def _build(section, ctx):
    if ctx.data_kind != "shapes" or ctx.scenes is None:
        raise ValueError(f"{ctx.name}: reward kind 'scene' reads the shapes world's ground truth; data.kind is "
                         f"'{ctx.data_kind}' (only data.kind: shapes has scenes)")
    return SceneReward(ctx.scenes(), device=ctx.device)


register_reward("scene", _build, "the shapes scene itself: objects named right, minus twice those not there, per "
                                 "object; relations that hold, minus those that do not (shapes data; a bound on what "
                                 "a learned reward can teach)")
