"""Grounded accuracy of captions against the shapes scenes (synthetic data only).

Where it sits: `rlrefine.metrics`, used by `evaluate` per refinement layer. Each caption is read
with `rlrefine.data.shapes.parse_caption` into (colour, shape) mentions and relations, then
compared with the `Scene` it describes. All rates are micro-averaged over the whole set:

* ``precision``       = mentioned (colour, shape) pairs that are in the scene / pairs mentioned
                        (distinct pairs per caption: "the blue square" said twice counts once)
* ``object_accuracy`` = scene objects whose colour AND shape are both named (as one mention) /
                        scene objects — the headline "names the right colour and shape for X % of
                        objects"; ``recall`` and ``object_recall`` are the same number
* ``object_recall_multi`` = the same over the images with 2 or more objects only (where a caption
                        can leave objects out; 0.0 when there are none)
* ``hallucination_rate`` = mentioned pairs that are NOT in the scene / pairs mentioned (1 − precision)
* ``colour_recall`` / ``shape_recall`` = scene objects whose colour / shape word occurs in the
                        caption at all (partial credit: early layers often get one right)
* ``relation_precision`` = stated relations that hold in the scene / relations stated; a relation
                        holds when both pairs are scene objects and ``Scene.relations`` has it (the
                        dominant-axis relation the references use); ``relation_accuracy`` is the same
                        number under its older name
* ``relation_recall_multi`` = images with 2 or more objects whose caption states at least one relation
                        that holds / images with 2 or more objects (how often a caption says where
                        things are)
* ``exact_match``     = captions whose set of mentions equals the scene's set of objects

`grammaticality` is the fraction of captions the shapes caption grammar produces
(`rlrefine.data.shapes.is_grammatical`, an exact recogniser).

A rate with an empty denominator (e.g. no relation stated anywhere) is 0.0; the counts beside the
rates (``num_captions``, ``num_mentions``, ``num_objects``, ``num_relations``, ``num_multi_images``) tell it
apart from a real zero.
"""

from __future__ import annotations

from typing import Sequence

from rlrefine.data.shapes import Scene, caption_grounding_counts, is_grammatical, parse_caption

__all__ = ["candidate_coverage", "caption_grounding_counts", "grammaticality", "grounding_scores"]

_COUNT_KEYS = (
    "mentions",
    "mentions_correct",
    "objects",
    "objects_named",
    "colours_named",
    "shapes_named",
    "relations",
    "relations_correct",
    "exact",
)


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def grounding_scores(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Grounded precision/recall of (colour, shape) mentions and relation accuracy of
    ``captions[i]`` against ``scenes[i]`` (see the module docstring for each formula)."""
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions but {len(scenes)} scenes")
    total = dict.fromkeys(_COUNT_KEYS, 0)
    multi_objects = multi_named = multi_images = multi_with_relation = 0
    for caption, scene in zip(captions, scenes):
        counts = caption_grounding_counts(caption, scene)
        for k, v in counts.items():
            total[k] += v
        if counts["objects"] >= 2:
            multi_objects += counts["objects"]
            multi_named += counts["objects_named"]
            multi_images += 1
            multi_with_relation += int(counts["relations_correct"] > 0)
    object_accuracy = _rate(total["objects_named"], total["objects"])
    precision = _rate(total["mentions_correct"], total["mentions"])
    return {
        "precision": precision,
        "hallucination_rate": 1.0 - precision if total["mentions"] else 0.0,
        "recall": object_accuracy,
        "object_accuracy": object_accuracy,
        "object_recall": object_accuracy,
        "object_recall_multi": _rate(multi_named, multi_objects),
        "colour_recall": _rate(total["colours_named"], total["objects"]),
        "shape_recall": _rate(total["shapes_named"], total["objects"]),
        "relation_accuracy": _rate(total["relations_correct"], total["relations"]),
        "relation_precision": _rate(total["relations_correct"], total["relations"]),
        "relation_recall_multi": _rate(multi_with_relation, multi_images),
        "exact_match": _rate(total["exact"], len(captions)),
        "num_captions": float(len(captions)),
        "num_mentions": float(total["mentions"]),
        "num_objects": float(total["objects"]),
        "num_relations": float(total["relations"]),
        "num_multi_images": float(multi_images),
    }


def grammaticality(captions: Sequence[str]) -> float:
    """Fraction of ``captions`` the shapes caption grammar produces (0.0 for no captions)."""
    return _rate(sum(is_grammatical(c) for c in captions), len(captions))


def candidate_coverage(candidates: Sequence[Sequence[str]], scenes: Sequence[Scene],
                       held_out: Sequence[tuple[str, str]] = ()) -> dict[str, float]:
    """What a fine-tuning method's candidates hold, per image (``candidates[i]``: the n candidates of image i):

    * ``true_relation``: share of the images with 2 or more objects where at least one candidate states a
      relation that holds in the scene (``images_multi`` of them);
    * ``unseen_pair``: share of the images holding a ``held_out`` colour–shape pair where at least one
      candidate names such a pair of the scene correctly (``images_unseen`` of them; 0.0 when none).

    A preference method can only prefer what its candidates contain: when these shares are low, the
    candidates, not the reward, limit what fine-tuning can teach."""
    if len(candidates) != len(scenes):
        raise ValueError(f"{len(candidates)} candidate lists but {len(scenes)} scenes")
    held = set(held_out)
    multi = with_relation = unseen = with_unseen = 0
    for cands, scene in zip(candidates, scenes):
        if len(scene.objects) >= 2:
            multi += 1
            with_relation += any(caption_grounding_counts(c, scene)["relations_correct"] > 0 for c in cands)
        present = {o.combo for o in scene.objects} & held
        if present:
            unseen += 1
            with_unseen += any(present & set(parse_caption(c).mentions) for c in cands)
    return {"true_relation": _rate(with_relation, multi), "images_multi": float(multi),
            "unseen_pair": _rate(with_unseen, unseen), "images_unseen": float(unseen)}
