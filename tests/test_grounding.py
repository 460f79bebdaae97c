"""Tests for rlrefine.metrics.grounding against hand-built scenes and the shapes references."""

from __future__ import annotations

import pytest

from rlrefine.data.shapes import Scene, SceneObject, ShapesConfig, generate_shapes
from rlrefine.metrics.grounding import caption_grounding_counts, grounding_scores

# A red circle above a blue square (same x column, 30 px apart).
TWO = Scene.from_objects(
    [
        SceneObject("circle", "red", "small", x=20, y=10, radius=6),
        SceneObject("square", "blue", "large", x=20, y=40, radius=11),
    ]
)
# Green cross left of a yellow triangle; an orange diamond below the triangle.
THREE = Scene.from_objects(
    [
        SceneObject("cross", "green", "small", x=10, y=20, radius=6),
        SceneObject("triangle", "yellow", "small", x=40, y=18, radius=6),
        SceneObject("diamond", "orange", "large", x=42, y=50, radius=11),
    ]
)


def test_complete_references_score_perfectly():
    splits = generate_shapes(ShapesConfig(num_train=150, num_val=5, num_test=5, num_test_novel=60, references="complete"))
    for name in ("train", "test_novel"):
        split = splits[name]
        captions = [c for refs in split.captions for c in refs]
        scenes = [s for refs, s in zip(split.captions, split.scenes) for _ in refs]
        scores = grounding_scores(captions, scenes)
        for key in ("precision", "recall", "object_accuracy", "relation_accuracy", "exact_match"):
            assert scores[key] == 1.0, (name, key)
        assert scores["num_relations"] > 0


def test_salient_references_are_precise_but_leave_objects_out():
    split = generate_shapes(ShapesConfig(num_train=300, num_val=5, num_test=5, num_test_novel=5))["train"]
    captions = [c for refs in split.captions for c in refs]
    scenes = [s for refs, s in zip(split.captions, split.scenes) for _ in refs]
    scores = grounding_scores(captions, scenes)
    assert scores["precision"] == scores["relation_accuracy"] == 1.0 and scores["hallucination_rate"] == 0.0
    assert 0.45 < scores["object_recall_multi"] < 0.75  # most references name one or two objects


def test_correct_caption():
    s = grounding_scores(["a small red circle above a large blue square"], [TWO])
    assert s["precision"] == s["object_accuracy"] == s["relation_accuracy"] == s["exact_match"] == 1.0
    assert (s["num_mentions"], s["num_objects"], s["num_relations"]) == (2.0, 2.0, 1.0)


def test_wrong_colour_lowers_precision_by_half():
    # "green square" is not in the scene: 1 of 2 mentions right, 1 of 2 objects named, the
    # relation's second argument is not in the scene, so the relation is wrong too.
    s = grounding_scores(["a red circle above a green square"], [TWO])
    assert s["precision"] == 0.5 and s["object_accuracy"] == 0.5 and s["recall"] == 0.5
    assert s["colour_recall"] == 0.5  # red named, blue not
    assert s["shape_recall"] == 1.0  # circle and square both named
    assert s["relation_accuracy"] == 0.0 and s["exact_match"] == 0.0


def test_micro_average_over_captions():
    # 1) perfect; 2) wrong relation; 3) one wrong object of three, relation (green cross left of
    # yellow triangle) true; 4) empty caption.
    captions = [
        "a red circle above a blue square",
        "a red circle below a blue square",
        "a green cross left of a yellow triangle and a purple diamond",
        "",
    ]
    scenes = [TWO, TWO, THREE, THREE]
    s = grounding_scores(captions, scenes)
    # mentions: 2 + 2 + 3 + 0 = 7, correct 2 + 2 + 2 = 6; objects 2 + 2 + 3 + 3 = 10, named 6.
    assert s["precision"] == pytest.approx(6 / 7)
    assert s["object_accuracy"] == pytest.approx(6 / 10)
    # relations stated: 1 + 1 + 1 = 3, true: 1 + 0 + 1 = 2.
    assert s["relation_accuracy"] == pytest.approx(2 / 3)
    # exact_match is about the objects only: captions 1 and 2 name exactly the scene's objects.
    assert s["exact_match"] == pytest.approx(2 / 4)
    # shapes named: 2 + 2 + 3 (diamond counted: shape word present) + 0 = 7 of 10.
    assert s["shape_recall"] == pytest.approx(7 / 10)


def test_repeated_mention_counts_once():
    c = caption_grounding_counts("a blue square and the blue square and a blue square", TWO)
    assert c["mentions"] == 1 and c["mentions_correct"] == 1 and c["objects_named"] == 1


def test_relation_checked_by_direction():
    # Orange diamond is below the yellow triangle (dy = 32 > dx = 2); "above" and "right of" are wrong.
    ok = caption_grounding_counts("an orange diamond below a yellow triangle", THREE)
    wrong = caption_grounding_counts("an orange diamond above a yellow triangle", THREE)
    side = caption_grounding_counts("an orange diamond right of a yellow triangle", THREE)
    assert ok["relations_correct"] == 1 and wrong["relations_correct"] == 0 and side["relations_correct"] == 0


def test_empty_inputs_and_mismatch():
    s = grounding_scores([""], [TWO])
    assert s["precision"] == 0.0 and s["num_mentions"] == 0.0 and s["object_accuracy"] == 0.0
    assert grounding_scores([], [])["num_captions"] == 0.0
    with pytest.raises(ValueError, match="2 captions but 1 scenes"):
        grounding_scores(["a", "b"], [TWO])


def test_recall_on_multi_object_images_hallucination_and_grammaticality():
    from rlrefine.metrics.grounding import grammaticality

    one = Scene.from_objects([SceneObject("circle", "red", "large", 20, 20, 10)])
    two = Scene.from_objects([SceneObject("circle", "red", "large", 20, 20, 10), SceneObject("square", "blue", "small", 50, 50, 6)])
    captions = ["a large red circle", "a large red circle and a small green cross"]
    s = grounding_scores(captions, [one, two])
    assert s["object_recall"] == pytest.approx(2 / 3)          # 1 of 1, 1 of 2
    assert s["object_recall_multi"] == pytest.approx(1 / 2)    # the two-object image alone
    assert s["hallucination_rate"] == pytest.approx(1 / 3)     # the green cross of 3 mentions
    assert grammaticality(captions + ["a large red circle and"]) == pytest.approx(2 / 3)


def test_relation_recall_on_multi_object_images_and_precision_by_hand():
    one = Scene.from_objects([SceneObject("circle", "red", "large", 20, 20, 10)])
    captions = [
        "a red circle above a blue square",                                 # TWO: holds
        "a green cross left of a yellow triangle and an orange diamond",    # THREE: holds
        "a green cross right of a yellow triangle",                         # THREE: wrong direction
        "a large red circle",                                               # one object: not counted
    ]
    s = grounding_scores(captions, [TWO, THREE, THREE, one])
    # 3 multi-object images, 2 of which state a relation that holds; 3 relations stated, 2 hold
    assert s["num_multi_images"] == 3.0 and s["relation_recall_multi"] == pytest.approx(2 / 3)
    assert s["num_relations"] == 3.0 and s["relation_precision"] == pytest.approx(2 / 3)
    assert s["relation_accuracy"] == s["relation_precision"]
    none = grounding_scores(["a red circle and a blue square"], [TWO])
    # no relation stated: both rates are 0.0 and the counts tell that apart from a wrong relation
    assert none["relation_recall_multi"] == 0.0 and none["relation_precision"] == 0.0 and none["num_relations"] == 0.0


def test_candidate_coverage_by_hand():
    from rlrefine.metrics.grounding import candidate_coverage

    one = Scene.from_objects([SceneObject("circle", "red", "large", 20, 20, 10)])
    cands = [["a red circle and a blue square", "a red circle above a blue square"],   # TWO: a true relation
             ["a green cross right of a yellow triangle", "a yellow triangle"],        # THREE: none holds
             ["a large red circle"]]                                                   # one object
    c = candidate_coverage(cands, [TWO, THREE, one], held_out=[("blue", "square"), ("red", "circle")])
    assert c["images_multi"] == 2.0 and c["true_relation"] == pytest.approx(1 / 2)
    # TWO and one hold a held-out pair; both have a candidate naming it
    assert c["images_unseen"] == 2.0 and c["unseen_pair"] == 1.0
    assert candidate_coverage([["a green square"]], [TWO], held_out=[("blue", "square")])["unseen_pair"] == 0.0
