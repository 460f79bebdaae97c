"""rewards.text_student + rlrefine.trainers.distill_text: an open_clip image tower kept exact, a small text tower
distilled onto the teacher through the shared loop, saved, and loaded back as reward kind `distilled`."""
import json
from pathlib import Path

import open_clip
import pytest
import torch

from rewards import DistilledScore, PACScore, TextStudentScore
from rewards.loading import register_model_config
from rewards.registry import RewardContext, build_reward
from rewards.text_student import TextStudentConfig, build_text_student
from rlrefine.config import RewardSection
from rlrefine.trainers.distill_text import distill_text_student
from test_distill import COLOURS, tiny_colour_data

TINY_NAME = "test-text-student-teacher"
TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A random tiny CLIP saved as an open_clip state dict, loaded as a user loads PAC-S (from_pretrained)."""
    register_model_config(TINY_NAME, TINY)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_NAME, pretrained=None)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


def tiny_teacher(path) -> PACScore:
    return PACScore.from_pretrained(TINY_NAME, path)


def student_cfg(**kw) -> TextStudentConfig:
    base = dict(width=16, layers=1, heads=2, context_length=12, steps=60, images_per_step=16, max_pairs_per_image=8,
                lr=3e-3, warmup_steps=5, hard_neighbours=2, holdout_fraction=0.25, timing_repeats=1, log_every=5)
    return TextStudentConfig(**{**base, **kw})


def candidates(n_images):
    """(image, layer, caption) as the captioner's candidates: every colour at two layers for every other image."""
    return [(i, layer, f"a {c} square") for i in range(0, n_images, 2) for layer in (1, 2) for c in COLOURS]


def test_student_shares_the_image_towers_embedding_and_scores_by_protocol(teacher_checkpoint):
    teacher = tiny_teacher(teacher_checkpoint)
    student = build_text_student(teacher, TextStudentConfig(width=8, layers=1, heads=2, context_length=12))
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(student.embed_images(images), teacher.embed_images(images))
    assert student.tokenizer(["a red circle"]).shape == (1, 12)
    scores = student(images, ["a red circle", "a blue square", "a red circle"], image_index=[0, 0, 1])
    assert scores.shape == (3,) and bool((scores >= 0).all())
    assert student.embed_texts(["a red circle"]).shape == (1, 16)  # the teacher's embedding space
    with pytest.raises(ValueError, match="pass a word vocabulary exactly when"):
        build_text_student(teacher, TextStudentConfig(tokenizer="word"))


def test_text_student_distils_through_the_loop_and_loads_as_distilled(teacher_checkpoint, tmp_path):
    data = tiny_colour_data(48)
    teacher = tiny_teacher(teacher_checkpoint)
    logged = {}
    report = distill_text_student(student_cfg(), teacher, data, tmp_path, candidates=candidates(48),
                                  on_log=lambda d, step: logged.setdefault(step, d))
    # the dual student's report fields, from the saved student scored through the protocol
    assert report["spearman"] > report["init/spearman"] + 0.2 and report["spearman"] > 0.6, report
    for key in ("kendall", "spearman_per_image", "argmax_agreement", "argmax_regret", "speedup", "fidelity/text_cos"):
        assert key in report, key
    assert report["fidelity/image_cos"] == pytest.approx(1.0, abs=1e-5)  # the image tower is the teacher's own
    assert report["decisions"] > 0 and 0 <= report["decision_agreement"] <= 1  # held-out (image, layer) choices
    losses = [d["distill/embedding_loss"] for _, d in sorted(logged.items())]
    assert losses[-1] < 0.5 * losses[0], losses
    # the folder is a text student: `distilled` loads it by its manifest, and so does a recipe section
    manifest = json.loads((tmp_path / "text_student.json").read_text())
    assert manifest["student_kind"] == "text" and manifest["metrics"]["spearman"] == report["spearman"]
    loaded = DistilledScore.from_dir(tmp_path)
    assert isinstance(loaded, TextStudentScore)
    built = build_reward(RewardSection(kind="distilled", path=str(tmp_path)), RewardContext(run_dir=tmp_path))
    images = torch.from_numpy(data["images"][:3])
    caps = ["a red square", "a blue square", "one green block", "a red square"]
    idx = torch.tensor([0, 0, 1, 2])
    assert torch.allclose(built(images, caps, image_index=idx), loaded(images, caps, image_index=idx))
    assert torch.equal(loaded.embed_images(images), teacher.embed_images(images))  # exact image side, reloaded
    with pytest.raises(FileNotFoundError, match="neither student.json .* nor text_student.json"):
        DistilledScore.from_dir(tmp_path / "nothing")


def test_distill_reward_names_a_missing_student(capsys):
    from rlrefine import cli

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    assert cli.main(["distill-reward", "--config", str(recipe), "--student", "nope"]) == 2
    assert "--student nope: distill.extra_students has no student of that name" in capsys.readouterr().err


def test_word_text_student_keeps_its_vocabulary(teacher_checkpoint, tmp_path):
    data = tiny_colour_data(48)
    report = distill_text_student(student_cfg(tokenizer="word", steps=80), tiny_teacher(teacher_checkpoint), data,
                                  tmp_path, candidates=candidates(48))
    assert report["spearman"] > 0.6, report
    loaded = DistilledScore.from_dir(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and loaded.text_config["pool_type"] == "eos"
    ids = loaded.tokenizer(["a red square"])
    assert ids.shape == (1, 12) and int(ids[0, 4]) == loaded.word_vocab.eos_id  # bos a red square eos


def test_killed_text_distillation_resumes_to_identical_weights(teacher_checkpoint, tmp_path):
    data = tiny_colour_data(32)
    cfg = student_cfg(steps=20, checkpoint_every=5)

    class Crash(RuntimeError):
        pass

    def crash_at_12(step, **_):
        if step == 12:
            raise Crash

    from rlrefine.trainers.distill_text import TextDistillLoop, text_loop_settings

    crashed = TextDistillLoop(cfg, tiny_teacher(teacher_checkpoint), data, text_loop_settings(cfg, tmp_path / "b", device="cpu"),
                              candidates(32), on_step_end=crash_at_12)
    with pytest.raises(Crash):
        crashed.run()
    assert not (tmp_path / "b" / "text_student.pt").exists()
    distill_text_student(cfg, tiny_teacher(teacher_checkpoint), data, tmp_path / "b", candidates(32), resume=True, device="cpu")
    distill_text_student(cfg, tiny_teacher(teacher_checkpoint), data, tmp_path / "a", candidates(32), device="cpu")
    a, b = (torch.load(tmp_path / d / "text_student.pt", weights_only=True) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "text_student.json").read_text()) for d in ("a", "b"))
    assert (ma["w"], ma["bias"]) == (mb["w"], mb["bias"])
