"""rewards.text_student: the teacher's image tower kept exact, a small text tower distilled onto the
teacher's text embeddings (the student for CLIP-sized teachers)."""
import open_clip
import pytest
import torch

from rewards import PACScore
from rewards.loading import BatchedPreprocess, register_model_config
from rewards.text_student import TextStudentConfig, build_text_student, distill_text_tower

TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_teacher():
    name = register_model_config("test-text-student-teacher", TINY)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval().requires_grad_(False)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    return PACScore(model, BatchedPreprocess(pcfg["size"], pcfg["mean"], pcfg["std"]), open_clip.get_tokenizer(name))


def test_student_shares_the_teachers_image_embedding_and_scores_by_protocol():
    teacher = tiny_teacher()
    student = build_text_student(teacher, TextStudentConfig(width=8, layers=1, heads=2, context_length=12))
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(student.embed_images(images), teacher.embed_images(images))
    assert student.tokenizer(["a red circle"]).shape == (1, 12)
    scores = student(images, ["a red circle", "a blue square", "a red circle"], image_index=[0, 0, 1])
    assert scores.shape == (3,) and bool((scores >= 0).all())
    assert student.embed_texts(["a red circle"]).shape == (1, 16)  # the teacher's embedding space


def test_distillation_moves_the_text_tower_towards_the_teacher():
    teacher = tiny_teacher()
    cfg = TextStudentConfig(width=16, layers=1, heads=2, context_length=12, steps=60, batch_size=16, lr=3e-3)
    student = build_text_student(teacher, cfg)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    words = ["red", "blue", "green", "circle", "square", "small", "big", "left"]
    caps = [f"a {a} {b}" for a in words[:3] for b in words[3:]]
    index = [i % 4 for i in range(len(caps))]

    def cos():
        return float((student.embed_texts(caps) * teacher.embed_texts(caps)).sum(-1).mean())

    before = cos()
    losses = distill_text_tower(student, teacher, images, caps, index, cfg)
    assert cos() > before + 0.2, (before, cos())
    assert set(losses) == {"loss", "embedding_loss", "score_loss"}
