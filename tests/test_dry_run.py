"""The dry run (rlrefine/dry_run.py) of the real-scale recipe, rehearsed on real COCO images.

`recipes/coco_vitb32.yaml` runs on `../shared/data/tiny_coco` (100 real COCO 2017 images in the
official layout, read in place) with random-weight checkpoints in the real formats: an open_clip
QuickGELU state dict for the encoder and a PAC-S `{"state_dict": ...}` file for the reward. The
fast tests shrink the models through overrides (seconds); the slow one keeps the recipe's real model
sizes (ViT-B-32-quickgelu, d_model 512, K = 6, the open_clip BPE) and is the acceptance run.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from rewards.loading import register_model_config
from rlrefine import cli
from rlrefine.config import load_recipe
from rlrefine.dry_run import DryRunError, _measure, dry_run_config, format_table

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "coco_vitb32.yaml"
TINY_COCO = ROOT.parent / "shared" / "data" / "tiny_coco"

STAGES = ["pretrain", "distill-reward", "finetune[dico]", "finetune[dico_distilled]", "finetune[scst]", "report"]
SMALL = "rlrefine-test-clip-small-quickgelu"  # a QuickGELU architecture small enough for seconds on 2 cores
SMALL_GELU = "rlrefine-test-clip-small"  # its GELU twin, to show the guard
_SMALL_CFG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(autouse=True)
def _no_java_metrics(request, monkeypatch):
    """METEOR / SPICE start a JVM per layer and model (tens of seconds on 2 busy cores): off in the fast tests
    (tests/test_metrics_captions.py covers them); the slow acceptance run keeps them."""
    if "slow" not in request.keywords:
        monkeypatch.setattr("rlrefine.metrics.captions.meteor_available", lambda: False)
        monkeypatch.setattr("rlrefine.metrics.captions.spice_available", lambda: False)


@pytest.fixture(scope="module")
def tiny_coco() -> Path:
    if not (TINY_COCO / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"the real-image fixture is not there: {TINY_COCO} (CI clones the repository with shared/ beside it)")
    return TINY_COCO


def fabricate_checkpoints(model_name: str, out: Path) -> tuple[Path, Path, torch.nn.Module]:
    """Random weights of `model_name` in the real formats: the encoder's plain open_clip state dict and the
    reward's PAC-S `{"state_dict": ...}` file (fp16; the model returned holds exactly the same values)."""
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # fp16-representable
    half = {k: v.half() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(half, out / "encoder.pt")
    torch.save({"state_dict": half}, out / "clip_ViT-B-32.pth")
    return out / "encoder.pt", out / "clip_ViT-B-32.pth", model


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    register_model_config(SMALL, {**_SMALL_CFG, "quick_gelu": True})
    register_model_config(SMALL_GELU, _SMALL_CFG)
    encoder, reward, _ = fabricate_checkpoints(SMALL, tmp_path_factory.mktemp("ckpt"))
    return encoder, reward


def _paths(tiny_coco: Path, encoder: Path, reward: Path) -> list[str]:
    return [f"paths.annotations={tiny_coco / 'annotations'}", f"paths.images={tiny_coco}",
            f"paths.encoder_checkpoint={encoder}", f"paths.reward_checkpoint={reward}"]


def _small_sizes() -> list[str]:
    """The recipe's models shrunk to seconds on 2 cores (the data, formats and DiCO settings as shipped)."""
    return ["device=cpu", f"model.encoder.model_name={SMALL}", "model.d_model=32", "model.num_slots=4",
            "model.num_refine_layers=2", "model.n_heads=2", "model.readout_layers=1", "data.image_size=64",
            "data.num_workers=0", "pretrain.batch_size=4", "pretrain.mixed_precision=no", "finetune.batch_size=2",
            "finetune.num_candidates=2", "finetune.max_len=8", "finetune.mixed_precision=no",
            f"finetune.reward.model_name={SMALL}", f"evaluate.evaluator.model_name={SMALL}",
            f"evaluate.extra_rewards.refpac.model_name={SMALL}", f"distill.teacher.model_name={SMALL}",
            "distill.candidate_images=3"]  # the captioner's candidates of 3 images: the path, at a third of its cost


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_dry_run_of_the_coco_recipe_on_real_images(tiny_coco, small_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["run", str(RECIPE), "--dry-run", f"run_dir={run_dir}", *_paths(tiny_coco, *small_checkpoints), *_small_sizes()]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| stage | dry run |" in out and "Projected wall time of the full recipe" in out
    report = json.loads((run_dir / "dry_run" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == STAGES
    cfg = load_recipe(RECIPE, argv[3:])
    full = {"pretrain": cfg.pretrain.steps, "distill-reward": cfg.distill.text_student.steps,
            "finetune[dico]": cfg.variant("dico").steps, "finetune[dico_distilled]": cfg.variant("dico_distilled").steps,
            "finetune[scst]": cfg.variant("scst").steps, "report": cfg.evaluate.num_images * 4}
    for row in report["stages"]:
        assert row["full_steps"] == full[row["stage"]]
        assert row["s_per_step"] > 0 and row["projected_s"] >= row["full_steps"] * row["s_per_step"] * 0.99
        assert row["peak_ram_gb"] > 0.1
    assert report["projected_total_s"] == pytest.approx(sum(r["projected_s"] for r in report["stages"]), rel=1e-3)
    assert report["stages"][0]["steps_run"] == 2 and report["images_per_split"] == 8
    # everything it wrote is under run_dir/dry_run: the stages' outputs, and the report evaluated each model
    assert _files_under(run_dir) == _files_under(run_dir / "dry_run")
    assert json.loads((run_dir / "dry_run" / "report" / "XE" / "metrics.json").read_text())["num_images"] == 8
    for variant in ("dico", "dico_distilled", "scst"):
        assert (run_dir / "dry_run" / f"finetune_{variant}" / "model").is_dir()
    # the distill stage trained the text student of PAC-S and dico_distilled fine-tuned against it
    student = json.loads((run_dir / "dry_run" / "distill" / "text_student.json").read_text())
    assert student["student_kind"] == "text" and student["text_tower"]["width"] == cfg.distill.text_student.width
    used = yaml.safe_load((run_dir / "dry_run" / "finetune_dico_distilled" / "recipe.yaml").read_text())
    assert used["finetune"]["reward"]["kind"] == "distilled"
    assert format_table(report).count("\n| ") == 7  # header + 6 stages


def test_dry_run_stops_at_the_first_broken_piece(tiny_coco, small_checkpoints, tmp_path, capsys):
    encoder, reward = small_checkpoints
    base = ["run", str(RECIPE), "--dry-run", f"run_dir={tmp_path / 'run'}"]
    # OpenAI-derived weights ({"state_dict": ...}, the PAC-S layout) in the GELU twin: refused at the first stage that
    # loads them, naming the -quickgelu architecture
    argv = [*base, *_paths(tiny_coco, reward, reward), *_small_sizes(), f"model.encoder.model_name={SMALL_GELU}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "stage 'pretrain'" in err and f"'{SMALL_GELU}' uses GELU" in err and f"'{SMALL}'" in err
    assert "model.encoder.allow_gelu_for_openai_weights=true" in err
    # the rewards are guarded the same way (rlrefine.models.clip_checkpoint, tested in test_rewards_clip.py)
    # a missing checkpoint is named before anything runs
    argv = [*base, *_paths(tiny_coco, encoder, tmp_path / "nope.pth"), *_small_sizes()]
    assert cli.main(argv) == 2
    assert "nope.pth' does not exist" in capsys.readouterr().err
    # stage commands take --dry-run too: pretrain alone
    assert cli.main(["pretrain", "--config", str(RECIPE), "--dry-run", f"run_dir={tmp_path / 'run2'}",
                     *_paths(tiny_coco, encoder, reward), *_small_sizes()]) == 0
    report = json.loads((tmp_path / "run2" / "dry_run" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["pretrain"]
    # a stage this recipe does not have (PAC-S is the teacher: no learned evaluator to train)
    assert cli.main(["train-evaluator", "--config", str(RECIPE), "--dry-run", *_paths(tiny_coco, encoder, reward)]) == 2
    assert "'train-evaluator' is not a stage of this recipe" in capsys.readouterr().err


def test_out_of_memory_names_the_setting_to_lower(tmp_path, small_checkpoints, tiny_coco):
    cfg = load_recipe(RECIPE, [f"run_dir={tmp_path}", *_paths(tiny_coco, *small_checkpoints)])

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.40 GiB")

    with pytest.raises(DryRunError, match=r"stage 'pretrain': out of memory .* lower pretrain.batch_size \(now 128\)"):
        _measure("pretrain", cfg, oom)
    with pytest.raises(DryRunError, match=r"stage 'finetune\[dico\]'.*finetune.batch_size \(now 8"):
        _measure("finetune[dico]", cfg, oom)


def test_dry_run_config_keeps_files_and_models_and_shortens_the_rest(tmp_path, small_checkpoints, tiny_coco):
    cfg = load_recipe(RECIPE, [f"run_dir={tmp_path}", *_paths(tiny_coco, *small_checkpoints)])
    dry = dry_run_config(cfg, steps=2, images=5)
    assert dry.run_path == tmp_path / "dry_run" and dry.data.max_images == 5
    assert (dry.pretrain.steps, dry.variant("scst").steps, dry.evaluate.num_images) == (2, 2, 5)
    assert dry.pretrain.batch_size == 128 and dry.model == cfg.model and dry.finetune.reward == cfg.finetune.reward
    assert dry.variant("scst").lr == cfg.variant("scst").lr
    capped = dry_run_config(cfg, steps=2, images=5, batch=4)
    assert (capped.pretrain.batch_size, capped.finetune.batch_size, capped.variant("scst").batch_size) == (4, 4, 4)
    # the students: their steps, images and timing shortened, their models and teacher kept; a named one too
    t, full = capped.distill.text_student, cfg.distill.text_student
    assert (t.steps, t.max_images, t.images_per_step, t.timing_repeats, capped.distill.candidate_images) == (2, 5, 4, 1, 5)
    assert (t.width, t.layers, t.context_length) == (full.width, full.layers, full.context_length)
    assert capped.distill.teacher == cfg.distill.teacher
    named = load_recipe(RECIPE, [f"run_dir={tmp_path}", *_paths(tiny_coco, *small_checkpoints),
                                 "distill.extra_students.wide={text_student: {width: 512, steps: 900}}"])
    wide = dry_run_config(named, steps=2, images=5, batch=4).distill.extra("wide").text_student
    assert (wide.width, wide.steps, wide.max_images) == (512, 2, 5)


@pytest.mark.slow
def test_dry_run_at_the_recipes_real_sizes(tiny_coco, tmp_path, capsys):
    """The acceptance run: ViT-B-32-quickgelu checkpoints in the real formats, every model size as the recipe ships
    (batches capped at 8 images on a CPU, scaled to the recipe's in the projection)."""
    encoder, reward, _ = fabricate_checkpoints("ViT-B-32-quickgelu", tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(RECIPE), "--dry-run", f"run_dir={run_dir}", *_paths(tiny_coco, encoder, reward)]) == 0
    report = json.loads((run_dir / "dry_run" / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == STAGES
    assert report["projected_total_s"] > 0
