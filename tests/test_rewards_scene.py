"""The `scene` reward (rewards/scene.py): the shapes world's ground truth as a reward, by hand, built from a recipe
(each image's scene found by its bytes), its errors, and the fine-tuning loop running on it."""

import numpy as np
import pytest
import torch

from rewards.registry import build_reward
from rewards.scene import TIE_BREAK, SceneReward, scene_score, tie_break
from rlrefine.config import load_recipe
from rlrefine.data.batches import load_images
from rlrefine.data.shapes import Scene, SceneObject, image_digest
from rlrefine.data.sources import load_splits
from tests_tiny_model import DATA, RECIPE


def _scene() -> Scene:  # a red circle left of (and a little above) a blue square
    return Scene.from_objects([SceneObject("circle", "red", "large", 10, 20, 6), SceneObject("square", "blue", "large", 40, 28, 6)])


@pytest.mark.parametrize("caption,expected", [
    ("a red circle left of a blue square", 2 / 2 + 0.25),  # both objects, a relation that holds
    ("a large red circle and a large blue square", 2 / 2),  # both objects, no relation
    ("a red circle above a blue square", 2 / 2 - 1.0),  # the wrong axis: the offsets are 30 across, 8 down
    ("a blue square right of a red circle", 2 / 2 + 0.25),  # the same relation, the other way round
    ("a large red circle and a large green square", (1 - 2.0) / 2),  # one object right, one that is not there
    ("a red circle left of a green square", (1 - 2.0) / 2 - 1.0),  # a relation with a missing object does not hold
    ("circle red a", -1.0),  # outside the caption grammar
])
def test_scene_score_by_hand(caption, expected):
    assert scene_score(caption, _scene()) == pytest.approx(expected)


def test_tie_break_is_small_and_fixed_by_the_words():
    values = [tie_break(f"a red circle left of a blue square {i}") for i in range(50)]
    assert all(0.0 <= v < TIE_BREAK for v in values) and len(set(values)) == 50
    assert tie_break("a red circle") == tie_break("a red circle")


def test_scene_reward_from_a_recipe_finds_each_image_s_scene():
    cfg = load_recipe(RECIPE, [*DATA, "finetune.reward={kind: scene}"])
    reward = build_reward(cfg.finetune.reward, cfg.reward_context("finetune.reward"))
    split = load_splits(cfg.data)["test"]
    idx = np.arange(6)
    images = load_images(split, idx, cfg.data.image_size)
    captions = [split.captions[i][0] for i in idx] + ["a red circle left of a blue square"] * 2
    image_index = list(range(6)) + [0, 1]
    got = reward(images, captions, image_index=image_index)
    want = [scene_score(c, split.scenes[idx[i]]) + tie_break(c) for c, i in zip(captions, image_index)]
    torch.testing.assert_close(got, torch.tensor(want))
    # a reference never names an object the image lacks, nor a false relation
    assert all(scene_score(split.captions[i][0], split.scenes[i]) > 0 for i in idx)
    assert SceneReward({image_digest(images[0].numpy()): split.scenes[0]})(images[:1], ["x"]).shape == (1,)


def test_scene_reward_errors_name_the_problem():
    cfg = load_recipe(RECIPE, [*DATA, "finetune.reward={kind: scene}"])
    reward = build_reward(cfg.finetune.reward, cfg.reward_context("finetune.reward"))
    with pytest.raises(ValueError, match="not one of this recipe's shapes images"):
        reward(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), ["a red circle"])
    ctx = cfg.reward_context("finetune.reward")
    ctx.data_kind, ctx.scenes = "coco", None
    with pytest.raises(ValueError, match="only data.kind: shapes has scenes"):
        build_reward(cfg.finetune.reward, ctx)


def test_dico_fine_tunes_against_the_scene_reward(tmp_path):
    """Two DiCO steps of the tiny captioner through the loop, with the scene reward on the recipe's own images."""
    import json

    from rlrefine.trainers.finetune import finetune
    from tests_tiny_model import tiny_captioner

    model = tiny_captioner(tmp_path / "xe")
    finetune(load_recipe(RECIPE, [f"run_dir={tmp_path}", "threads=1", *DATA, f"finetune.init={model}", "finetune.steps=2",
                                  "finetune.batch_size=2", "finetune.num_candidates=2", "finetune.max_len=8",
                                  "finetune.warmup_steps=1", "finetune.reward={kind: scene}", "finetune.num_eval_images=4"]))
    report = json.loads((tmp_path / "finetune" / "report.json").read_text())
    assert report["steps"] == 2
