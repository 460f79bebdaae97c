"""rewards.matching: the towers read before pooling, the head's attention pattern, the gated score, and the head
trained, saved and loaded through train-evaluator and distill-reward on a tiny shapes world."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from rewards import DistilledScore, LearnedScore
from rewards.evaluator import EvaluatorConfig, build_dual_encoder, shapes_attribute_groups, swap_accuracy
from rewards.matching import MatchingHead, MatchingHeadConfig, gated_score, image_features, text_features

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RESNET = dict(embed_dim=32, image_size=32, patch_size=8, vision_width=8, vision_layers=(1, 1, 1, 1), vision_head_width=8,
              text_width=32, text_heads=2, text_layers=1, context_length=24)


def _resnet_clip():
    torch.manual_seed(0)
    cfg = EvaluatorConfig(model_name="rlrefine-test-matching", **RESNET)
    _, model, tokenizer, preprocess = build_dual_encoder(cfg.model_name, cfg.model_cfg())
    return model.eval(), tokenizer, preprocess


def test_towers_read_before_pooling_give_the_pooled_embeddings_exactly():
    model, tokenizer, preprocess = _resnet_clip()
    pixels = preprocess(torch.randint(0, 255, (3, 32, 32, 3), dtype=torch.uint8))
    with torch.no_grad():
        pooled, grid = image_features(model.visual, pixels, stage=3)
        tokens = tokenizer(["a red circle", "a blue square above a red circle"])
        emb, per_token, mask = text_features(model, tokens)
        assert torch.equal(pooled, model.visual(pixels))
        # the text tower runs only up to the longest caption (causal: the padding after it changes nothing)
        assert torch.allclose(emb, model.encode_text(tokens), atol=1e-5)
    assert grid.shape == (3, 4, 128 + 256)  # stage 3 of a 32 px ResNet: 2 x 2 cells, its 128 channels and stage 4's 256
    eot = tokens.argmax(-1)  # open_clip BPE: eot is the largest id
    assert per_token.shape[:2] == mask.shape == (2, int(eot.max()) + 1)
    assert mask.sum(1).tolist() == (eot + 1).tolist()  # up to and including eot
    with pytest.raises(ValueError, match="stages 0"):
        image_features(model.visual, pixels, stage=5)


def test_directions_look_back_on_half_the_heads_and_ahead_on_the_others():
    head = MatchingHead(text_width=8, image_channels=4, grid_cells=4, width=8, layers=1, heads=2)
    bias = head.directions(3)
    inf = float("-inf")
    assert torch.equal(bias[0], torch.tensor([[0.0, inf, inf], [-0.5, 0.0, inf], [-1.0, -0.5, 0.0]]))
    assert torch.equal(bias[1], torch.tensor([[0.0, -0.5, -1.0], [inf, 0.0, -0.5], [inf, inf, 0.0]]))
    assert head.coords.tolist() == [[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]  # (x right, y down)


def test_gated_score_takes_away_up_to_lambda_where_the_head_says_false():
    cos, logit = torch.tensor([0.6, 0.6, 0.2]), torch.tensor([math.inf, 0.0, -math.inf])
    assert torch.allclose(gated_score(cos, logit, w=2.5, bias=0.1, score_weight=1.0), torch.tensor([1.6, 1.1, -0.4]))


def _two_squares(n, seed):
    """A red and a blue square on black, one above the other or side by side: a world where a pooled embedding can
    hold both colours but the relation is in where they are."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    truth = []
    for i in range(n):
        a, b = rng.integers(2, 12, size=2), rng.integers(18, 28, size=2)
        vertical = bool(rng.integers(2))
        if not vertical:
            a, b = a[::-1], b[::-1]
        (ra, ca), (rb, cb) = (a, b) if rng.integers(2) else (b, a)
        images[i, ra - 2:ra + 3, ca - 2:ca + 3] = (230, 30, 30)  # red
        images[i, rb - 2:rb + 3, cb - 2:cb + 3] = (40, 60, 230)  # blue
        rel = ("above" if ra < rb else "below") if vertical else ("left of" if ca < cb else "right of")
        truth.append(rel)
    return images, truth


@pytest.mark.slow
def test_a_matching_head_on_frozen_random_towers_learns_a_relation():
    """Reading both towers before pooling, the head learns "red above blue" against "red below blue" from swaps alone
    (real towers, frozen at their random initialisation: their grid still says where the colours are)."""
    from rlrefine.data.shapes import INVERSE_RELATION
    from rlrefine.trainers.evaluator import MatchingBatch, matching_head_loss
    from rewards.matching import build_matching_head

    model, tokenizer, preprocess = _resnet_clip()
    head = build_matching_head(model, MatchingHeadConfig(width=32, heads=2, image_stage=2), 32)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    images, truth = _two_squares(512, seed=0)
    with torch.no_grad():
        _, grid = image_features(model.visual, preprocess(torch.from_numpy(images)), 2)

    def batch(rows):
        texts = [t for i in rows for t in (f"a red square {truth[i]} a blue square",
                                           f"a red square {INVERSE_RELATION[truth[i]]} a blue square")]
        b = MatchingBatch(texts, [k for k in range(len(rows)) for _ in (0, 1)], [1.0, 0.0] * len(rows),
                          [x for k in range(len(rows)) for x in (-1, 2 * k)], [], [], [])
        with torch.no_grad():
            _, tokens, mask = text_features(model, tokenizer(texts))
        return b, tokens, mask

    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = torch.randperm(448, generator=g)[:64].tolist()
        b, tokens, mask = batch(rows)
        loss, _ = matching_head_loss(head, b, tokens, mask, grid[rows], pairwise_weight=1.0, locate_weight=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = list(range(448, 512))
    b, tokens, mask = batch(held)
    with torch.no_grad():
        logits = head(tokens, mask, grid[held], torch.tensor(b.owner))
    assert (logits[0::2] > logits[1::2]).float().mean() >= 0.9


# ----------------------------------------------------------------------------------------- the stages
def _tiny_world():
    from rlrefine.data.shapes import ShapesConfig, generate_shapes

    return generate_shapes(ShapesConfig(image_size=32, num_train=96, num_val=16, num_test=8, num_test_novel=16,
                                        label_fraction=0.0, seed=1))


def _examples(split):
    from rlrefine.data.shapes import DEFAULT_HELD_OUT, matching_examples

    return lambda i, rng: matching_examples(split.scenes[i], 32, rng, 0.5, DEFAULT_HELD_OUT)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny evaluator trained with and without a matching head (the head's phase last)."""
    from rlrefine.trainers.evaluator import train_evaluator

    torch.set_num_threads(1)
    world, out = _tiny_world(), tmp_path_factory.mktemp("teacher")
    cfg = EvaluatorConfig(model_name="rlrefine-test-matching-teacher", **RESNET, steps=6, batch_size=16, warmup_steps=2,
                          neighbour_refresh_every=100, eval_every=0, eval_max_images=16,
                          matching_head=MatchingHeadConfig(steps=4, width=16, heads=2, batch_size=8, warmup_steps=1,
                                                           image_stage=2))
    reports = {}
    for name, c in (("plain", dataclasses.replace(cfg, matching_head=MatchingHeadConfig())), ("head", cfg)):
        reports[name] = train_evaluator(c, world["train"], world["val"], out / name, matching_examples=_examples(world["train"]))
    return out, reports, world


def test_train_evaluator_trains_the_head_last_and_leaves_the_dual_encoder_as_it_was(teacher_dir):
    out, reports, world = teacher_dir
    meta = json.loads((out / "head" / "evaluator.json").read_text())
    assert meta["matching_head"]["weights"] == "matching_head.pt" and meta["matching_head"]["image_stage"] == 2
    plain, head = LearnedScore.from_dir(out / "plain"), LearnedScore.from_dir(out / "head")
    assert plain.matching_head is None and head.matching_head is not None
    # the head phase trains nothing but the head: both towers (BatchNorm statistics too) are those without it
    a, b = plain.model.state_dict(), head.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.from_numpy(world["val"].images[:4])
    captions = [c[0] for c in world["val"].captions[:4]]
    assert torch.equal(plain.embed_images(images), head.embed_images(images))
    assert torch.equal(plain.embed_texts(captions), head.embed_texts(captions))
    cos, logit = head.match_logits(images, captions, torch.arange(4))
    expected = gated_score(cos, logit, head.w, head.bias, head.head_weight).clamp(min=0)
    assert torch.allclose(head(images, captions), expected, atol=1e-6)
    assert torch.allclose(plain(images, captions), (head.w * cos).clamp(min=0), atol=1e-5)
    # the report: the swap test scored by the whole evaluator, the dual encoder's own beside it
    r = reports["head"]
    assert {"swap_acc/relation", "dual_encoder/swap_acc/relation", "swap_acc/colour"} <= r.keys()
    assert "dual_encoder/swap_acc" not in reports["plain"]


def test_swap_accuracy_of_the_whole_score_matches_the_cosine_one_without_a_head(teacher_dir):
    from rewards.evaluator import evaluate_dual_encoder
    from rlrefine.data.split import images_and_captions

    out, _, world = teacher_dir
    plain = LearnedScore.from_dir(out / "plain")
    groups = shapes_attribute_groups()
    images, captions = images_and_captions(world["val"])
    by_reward = swap_accuracy(plain, images, captions, groups, 16, seed=0)
    by_cosine = evaluate_dual_encoder(plain.model, plain.tokenizer, plain.preprocess, world["val"], groups, 16, seed=0)
    assert {k: v for k, v in by_cosine.items() if k.startswith("swap")} == by_reward


def test_a_matching_head_needs_data_that_gives_examples(tmp_path):
    from rlrefine.trainers.evaluator import train_evaluator

    world = _tiny_world()
    cfg = EvaluatorConfig(**RESNET, steps=1, matching_head=MatchingHeadConfig(steps=1))
    with pytest.raises(ValueError, match="matching_head.steps=0"):
        train_evaluator(cfg, world["train"], None, tmp_path)
    with pytest.raises(ValueError, match="multiple of heads"):
        MatchingHeadConfig(width=10, heads=4)


def test_distilled_student_gets_its_own_head_from_the_teachers_verdicts(teacher_dir, tmp_path):
    from rewards.distill import DistillConfig, StudentHeadConfig
    from rlrefine.trainers.distill import distill_reward

    out, _, world = teacher_dir
    teacher = LearnedScore.from_dir(out / "head")
    cfg = DistillConfig(model_name="rlrefine-test-matching-student", embed_dim=32, image_size=32, vision_width=8,
                        vision_layers=(1, 1, 1, 1), vision_head_width=8, text_width=16, text_layers=1, context_length=20,
                        tokenizer="word", steps=3, images_per_step=8, max_images=48, warmup_steps=1, hard_neighbours=2,
                        head_example_images=16,
                        matching_head=StudentHeadConfig(steps=3, width=16, heads=2, batch_size=8, warmup_steps=1,
                                                        image_stage=2))
    seen = []
    report = distill_reward(cfg, teacher, world["train"], tmp_path, matching_examples=_examples(world["train"]),
                            on_log=lambda m, step: seen.append(m))
    assert any("matching/match_loss" in m for m in seen) and "speedup" in report
    student = DistilledScore.from_dir(tmp_path)
    assert student.matching_head is not None and student.head_weight == teacher.head_weight
    assert len(student.matching_head.blocks) == 1 and student.matching_head.blocks[0].cross_first
    images = torch.from_numpy(world["val"].images[:4])
    captions = [c[0] for c in world["val"].captions[:4]]
    cos, logit = student.match_logits(images, captions, torch.arange(4))
    assert torch.allclose(student(images, captions),
                          gated_score(cos, logit, student.w, student.bias, student.head_weight).clamp(min=0), atol=1e-6)
    with pytest.raises(ValueError, match="no matching head to imitate"):
        distill_reward(cfg, LearnedScore.from_dir(out / "plain"), world["train"], tmp_path / "x",
                       matching_examples=_examples(world["train"]))


def test_a_recipe_that_turns_the_students_head_on_keeps_the_students_own_defaults():
    """Overriding one key of distill.student.matching_head must not fall back to the teacher's (wider, two-block) head."""
    from pathlib import Path

    from rlrefine.config import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    cfg = load_recipe(recipe, ["distill.student.matching_head.steps=7", "evaluator.matching_head.steps=5"])
    student, teacher = cfg.distill.student.matching_head, cfg.evaluator.matching_head
    assert (student.steps, student.width, student.layers, student.cross_first) == (7, 32, 1, True)
    assert (teacher.steps, teacher.width, teacher.layers, teacher.cross_first, teacher.heads) == (5, 64, 2, False, 8)
