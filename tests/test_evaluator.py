"""rewards.evaluator: attribute swaps and a short real training run on a tiny shapes fixture."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from rewards import CLIPScore, LearnedScore
from rewards.evaluator import EvaluatorConfig, swap_attribute
from rlrefine.trainers.evaluator import train_evaluator

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}
SHAPES = ("circle", "square", "triangle")
GROUPS = {"colour": tuple(COLOURS), "shape": SHAPES}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def tiny_shapes(n, size=16, seed=0):
    """One coloured shape on black per image; three captions naming its colour and shape."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        c, s = list(COLOURS)[rng.integers(3)], SHAPES[rng.integers(3)]
        r = int(rng.integers(size // 5, size // 3 + 1))
        cy, cx = rng.integers(r, size - r, size=2)
        if s == "circle":
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif s == "square":
            m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        else:
            m = (abs(yy - cy) <= r) & (abs(xx - cx) <= (yy - cy + r) / 2)
        images[i][m] = COLOURS[c]
        captions.append([f"a {c} {s}", f"there is a {c} {s}", f"one {c} {s} on black"])
    return {"images": images, "captions": captions}


def test_swap_attribute_stays_in_group():
    rng = random.Random(0)
    shapes = SHAPES + ("cross",)
    groups = {"colour": tuple(COLOURS), "shape": shapes}
    plurals = ("circles", "squares", "triangles", "crosses")
    for _ in range(50):
        new, group = swap_attribute("Two red crosses left of a blue circle", groups, rng)
        assert new != "Two red crosses left of a blue circle"
        words_old = "Two red crosses left of a blue circle".split()
        words_new = new.split()
        diff = [(a, b) for a, b in zip(words_old, words_new) if a != b]
        assert len(diff) == 1 and len(words_new) == len(words_old)
        old, rep = diff[0]
        if group == "colour":
            assert old in COLOURS and rep in COLOURS
        else:  # plural kept: "crosses" -> "squares", "circle" -> "triangle"
            assert (old in shapes and rep in shapes) or (old in plurals and rep in plurals)
    assert swap_attribute("a cat on a mat", GROUPS, rng) is None
    assert swap_attribute("A red circle", GROUPS, rng, group="shape")[0].startswith("A red ")
    assert swap_attribute("Red", [["red", "blue"]], rng) == ("Blue", "0")


def test_train_evaluator_improves_swap_accuracy(tmp_path):
    cfg = EvaluatorConfig(
        model_name="rlrefine-test-evaluator", embed_dim=32, image_size=16, patch_size=4,
        vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_heads=2,
        text_layers=1, context_length=12, steps=50, batch_size=32, lr=3e-3, warmup_steps=5,
        neighbour_refresh_every=25, eval_every=0, attribute_groups=GROUPS)
    seen = []
    metrics = train_evaluator(cfg, tiny_shapes(120), tiny_shapes(40, seed=1), tmp_path,
                              on_log=lambda m, step: seen.append((step, m)))
    assert metrics["swap_acc"] >= metrics["init/swap_acc"] + 0.1, metrics
    assert 0.0 <= metrics["r1_i2t"] <= 1.0 and "swap_acc/colour" in metrics
    assert any("evaluator/hard_negative_loss" in m for _, m in seen)
    meta = json.loads((tmp_path / "evaluator.json").read_text())
    assert meta["weights"] == "evaluator.pt" and meta["model_cfg"]["embed_dim"] == 32
    # loads like any other open_clip reward, both ways
    val = tiny_shapes(8, seed=2)
    imgs, caps = torch.from_numpy(val["images"]), [c[0] for c in val["captions"]]
    a = LearnedScore.from_dir(tmp_path)(imgs, caps)
    b = CLIPScore.from_pretrained(f"local-dir:{tmp_path}", w=meta["w"], text_prefix="")(imgs, caps)
    assert a.shape == (8,) and torch.allclose(a, b, atol=1e-6)


def test_relation_swaps_stay_in_their_pair_and_are_reported_as_one_kind():
    from rewards.evaluator import shapes_attribute_groups

    groups = shapes_attribute_groups()
    rng = random.Random(0)
    seen = set()
    for _ in range(50):
        new, group = swap_attribute("a red circle above a blue square", groups, rng, group="relation")
        assert new == "a red circle below a blue square" and group == "relation"
        new, group = swap_attribute("there is a red circle to the left of a blue square", groups, rng, group="relation:side")
        seen.add(new)
    assert seen == {"there is a red circle to the right of a blue square"}


def test_preference_rate_counts_images_whose_preferred_caption_beats_every_other():
    import torch

    from rlrefine.data.shapes_probes import preference_rate

    table = {"full": 2.0, "half": 1.0, "best": 3.0, "tie": 2.0}
    reward = lambda images, captions: torch.tensor([table[c] for c in captions])  # noqa: E731
    images = torch.zeros(4, 2, 2, 3, dtype=torch.uint8)
    out = preference_rate(reward, images, ["full", "full", "full", "full"], [["half"], ["half", "best"], ["tie"], []])
    assert out == {"rate": 1 / 3, "images": 3.0}  # image 1 loses to "best", image 2 ties (not strictly above)


def _misnamed_pairs(data):
    """(better, worse) per image of `tiny_shapes`: its caption, and the same plus an object it does not hold."""
    def pair(i, rng):
        colour, shape = data["captions"][i][0].split()[1:3]
        other = rng.choice([c for c in COLOURS if c != colour])
        return [(f"a {colour} {shape}", f"a {colour} {shape} and a {other} {rng.choice(SHAPES)}")]
    return pair


def test_preference_pairs_teach_the_evaluator_to_order_them(tmp_path):
    from rlrefine.data.shapes_probes import preference_rate

    train, val = tiny_shapes(120), tiny_shapes(40, seed=1)
    cfg = EvaluatorConfig(
        model_name="rlrefine-test-evaluator", embed_dim=32, image_size=16, patch_size=4,
        vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_heads=2,
        text_layers=1, context_length=12, steps=50, batch_size=32, lr=3e-3, warmup_steps=5,
        neighbour_refresh_every=25, eval_every=0, attribute_groups=GROUPS)
    with pytest.raises(ValueError, match="preference_pairs=0"):
        train_evaluator(dataclasses.replace(cfg, preference_pairs=1), train, None, tmp_path / "none")
    pairs = _misnamed_pairs(val)
    rng = random.Random(0)
    held_out = [pairs(i, rng)[0] for i in range(40)]
    images = torch.from_numpy(val["images"])
    rates, towers = {}, {}
    # no pairs; pairs throughout; pairs in 30 extra steps that train the text tower only
    for name, pairs_per_image, extra in (("none", 0, 0), ("joint", 1, 0), ("text_only", 1, 30)):
        seen = []
        train_evaluator(dataclasses.replace(cfg, preference_pairs=pairs_per_image, preference_steps=extra), train, None,
                        tmp_path / name, on_log=lambda m, step: seen.append(m), preference_pairs=_misnamed_pairs(train))
        assert any("evaluator/preference_loss" in m for m in seen) == bool(pairs_per_image)
        score = LearnedScore.from_dir(tmp_path / name)
        rates[name] = preference_rate(score, images, [b for b, _ in held_out], [[w] for _, w in held_out])["rate"]
        towers[name] = score.model.visual.state_dict()
    assert rates["joint"] >= 0.9 and rates["joint"] >= rates["none"] + 0.2, rates
    assert rates["text_only"] >= 0.9, rates
    # the text-only phase leaves the image tower exactly as contrastive training left it (BatchNorm included)
    assert all(torch.equal(towers["none"][k], towers["text_only"][k]) for k in towers["none"])
    assert not all(torch.equal(towers["none"][k], towers["joint"][k]) for k in towers["none"])
