"""`rlrefine run` end to end on a micro version of recipes/tiny.yaml: every stage runs, is skipped
when its output exists, and the report compares XE with every fine-tuned variant."""

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest

from rlrefine.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"

MICRO = [
    "data.shapes.num_train=96", "data.shapes.num_val=16", "data.shapes.num_test=16", "data.shapes.num_test_novel=16",
    "model.d_model=32", "model.n_heads=2", "model.num_slots=4", "model.num_refine_layers=2", "model.readout_layers=1",
    "model.encoder.width=32", "model.encoder.depth=1", "model.encoder.heads=2", "model.encoder.stem_channels=8",
    "pretrain.steps=4", "pretrain.batch_size=8", "pretrain.eval_every=4", "pretrain.num_eval_images=8", "pretrain.warmup_steps=1",
    "evaluator.steps=3", "evaluator.preference_steps=2", "evaluator.batch_size=8", "evaluator.eval_max_images=8",
    "distill.candidate_images=4", "distill.candidate_beams=2", "distill.student.steps=3", "distill.student.images_per_step=4",
    "finetune.steps=2", "finetune.batch_size=2", "finetune.num_candidates=2", "finetune.max_len=12", "finetune.warmup_steps=1",
    "evaluate.num_images=6",
]


# SCST against CIDEr-D beside DiCO: the override the README documents.
SCST_CIDER = "compare.scst_cider={method: scst, reward: {kind: cider}}"
# The teacher-reward ablation the recipe leaves out of its default: it draws as dico does, so the candidate
# diagnostic shares their start.
TEACHER = "compare.dico_teacher={reward: {kind: learned}}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One micro run at the default log level; what a user would see on the console (stderr, where
    logging and progress bars go) is kept in console.txt, the Python warnings in warnings.json.
    METEOR is switched off (the recipe's evaluate.java_metrics: false) because its Java start costs ~10 s per
    layer and model. Every fine-tuning variant runs with two seeds."""
    out = tmp_path_factory.mktemp("pipeline")
    console = io.StringIO()
    with contextlib.redirect_stderr(console), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # as a plain `python` run shows them (deprecations hidden)
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        code = main(["run", str(RECIPE), f"run_dir={out}", "threads=1", "compare.seeds=2", *MICRO, SCST_CIDER, TEACHER])
    (out / "console.txt").write_text(console.getvalue())
    (out / "warnings.json").write_text(json.dumps([f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]))
    assert code == 0, console.getvalue()[-3000:]
    return out


def test_every_stage_writes_its_output(run_dir):
    for marker in ("evaluator/report.json", "pretrain/model/config.json", "pretrain/report.json", "distill/report.json",
                   "finetune_dico/model/config.json", "finetune_scst/model/config.json", "report/compare.md",
                   "report/compare.png", "report/XE/metrics.json", "report/dico/metrics.md"):
        assert (run_dir / marker).exists(), marker
    assert list((run_dir / "pretrain" / "tb").rglob("events.out.tfevents*"))


def test_default_output_is_quiet(run_dir):
    """One line per stage and progress bars: no open_clip or accelerate internals, no warning."""
    lines = [ln for ln in (run_dir / "console.txt").read_text().replace("\r", "\n").splitlines() if ln.strip()]
    for i, stage in enumerate(["train-evaluator", "pretrain", "distill-reward", "finetune", "report"], 1):
        assert any(f"[{i}/5] {stage} done" in ln for ln in lines), stage
    third_party = [ln for ln in lines if " INFO " in ln and not (" rlrefine." in ln or " rewards." in ln)]
    assert third_party == []
    for chatter in ("Parsing model identifier", "root:", "accelerate", "initialized randomly", "Removed shared tensor"):
        assert not [ln for ln in lines if chatter in ln], chatter
    # The one warning a 4-step micro model earns honestly: it decodes the same caption at every layer.
    honest = "text progress undefined"
    assert [ln for ln in lines if ("WARNING" in ln or "Warning" in ln) and honest not in ln] == []
    assert json.loads((run_dir / "warnings.json").read_text()) == []


def test_report_compares_xe_and_every_variant_per_layer(run_dir):
    table = (run_dir / "report" / "compare.md").read_text()
    for name in ("| XE |", "| dico |", "| scst |", "| grpo |", "| scst_cider |"):
        assert name in table
    result = json.loads((run_dir / "report" / "compare.json").read_text())
    dico = result["dico"]
    assert len(dico["layers"]) == 3  # layers 0..K with K = 2
    assert set(dico) >= {"G", "G_latent", "P", "RS", "kl_ref", "progress_text", "ideal_progress"}
    assert dico["ideal_progress"] == pytest.approx([0.0, 0.5, 1.0])
    assert result["XE"].get("kl_ref") is None  # the reference itself
    # SCST against CIDEr-D, reported beside DiCO: its CIDEr-D at layer K
    assert result["scst_cider"]["final"]["CIDEr-D"]["mean"] >= 0.0 and result["scst_cider"]["layers"][-1]["layer"] == 2
    # every saved model says where it came from, and the report's evaluation is in its card
    card = (run_dir / "finetune_scst_cider" / "model" / "README.md").read_text()
    assert "## Evaluation" in card and "| layer |" in card and "kind: cider" in card and "rlrefine " in card
    for d in ("pretrain/model", "evaluator", "distill"):
        assert (run_dir / d / "README.md").is_file(), d
    import yaml

    ran = yaml.safe_load((run_dir / "finetune_scst_cider" / "recipe.yaml").read_text())["finetune"]
    assert ran["method"] == "scst" and ran["reward"]["kind"] == "cider"
    for row in dico["layers"]:
        assert 0.0 <= row["object_accuracy"] <= 1.0 and row["CIDEr-D"] >= 0.0 and row["evaluator"] >= 0.0
        assert 0.0 <= row["grammaticality"] <= 1.0 and 1.0 <= row["vendi"] <= 6 and 0.0 <= row["hallucination_rate"] <= 1.0
        # the counts behind the rates: a relation rate of 0.0 over no stated relation is told apart from a wrong one
        assert row["num_captions"] == 6 and row["num_relations"] >= 0 and 0 < row["num_multi_images"] <= 6
        assert 0.0 <= row["relation_recall_multi"] <= 1.0 and 0.0 <= row["relation_precision"] <= 1.0


def test_report_writes_each_models_captions_and_the_candidate_diagnostic(run_dir):
    from rlrefine.config import load_recipe
    from rlrefine.data.sources import load_splits

    rows = [json.loads(line) for line in (run_dir / "report" / "dico" / "captions_test.jsonl").read_text().splitlines()]
    test = load_splits(load_recipe(RECIPE, MICRO).data)["test"]
    assert len(rows) == 6 and [r["image_id"] for r in rows] == test.image_ids[:6]
    for row, scene in zip(rows, test.scenes):
        assert len(row["captions"]) == 3  # layers 0..K
        assert [(o["colour"], o["shape"], o["x"], o["y"]) for o in row["objects"]] == \
            [(o.colour, o.shape, o.x, o.y) for o in scene.objects]
    assert (run_dir / "report" / "test_novel" / "grpo" / "captions_test_novel.jsonl").is_file()
    diagnostic = json.loads((run_dir / "report" / "candidates.json").read_text())
    assert set(diagnostic) == {"dico", "dico_teacher", "scst", "grpo", "scst_cider"}
    for when in ("start", "end"):
        test_d, novel_d = diagnostic["dico"]["test"][when], diagnostic["dico"]["test_novel"][when]
        assert 0.0 <= test_d["true_relation"] <= 1.0 and test_d["images_multi"] > 0
        assert novel_d["images_unseen"] == 6 and 0.0 <= novel_d["unseen_pair"] <= 1.0  # every test_novel image has one
    assert "Candidates at layer K" in (run_dir / "report" / "compare.md").read_text()


def test_every_variant_runs_with_each_seed_and_the_report_gives_mean_and_std(run_dir):
    assert (run_dir / "finetune_dico_seed1" / "model" / "config.json").is_file()
    assert (run_dir / "finetune_dico_teacher_seed1" / "model" / "config.json").is_file()
    for stem in ("compare", "compare_test_novel"):
        result = json.loads((run_dir / "report" / f"{stem}.json").read_text())
        assert set(result) == {"XE", "dico", "dico_teacher", "scst", "grpo", "scst_cider"}
        final = result["dico"]["final"]
        for key in ("object_recall", "object_recall_multi", "hallucination_rate", "grammaticality"):
            assert set(final[key]) == {"mean", "std", "n"} and final[key]["n"] == 2, key
            per_seed = [run["final"][key] for run in result["dico"]["per_seed"]]
            assert final[key]["mean"] == pytest.approx(sum(per_seed) / 2)
        assert result["dico"]["seeds"] == 2 and isinstance(result["XE"]["final"]["object_recall"], float)
        assert result["dico"]["kl_ref"]["n"] == 2
    table = (run_dir / "report" / "compare.md").read_text()
    assert "Split 'test_novel'" in table and " ± " in table


def test_distill_benchmark_rescores_the_held_out_pairs(run_dir, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "distill.py"
    spec = importlib.util.spec_from_file_location("benchmarks_distill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--config", str(RECIPE), "--threads", "1", "--repeats", "1", "--warmup", "0", f"run_dir={run_dir}", *MICRO])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "distill"
    held = json.loads((run_dir / "distill" / "heldout_pairs.json").read_text())
    assert r["pairs"] == len(held["caption"]) > 0
    report = json.loads((run_dir / "distill" / "report.json").read_text())
    # the same student and teacher on the same pairs: the distill stage's own figures again
    for k in ("spearman", "kendall", "argmax_agreement"):
        assert r[k] == pytest.approx(report[k], abs=1e-3, nan_ok=True), k
    assert r["speedup"] > 0 and set(r["met"]) == {"spearman", "argmax_agreement", "speedup"}
    # which tower limits the ranking: in the stage's report and again in the benchmark
    for k in ("image_cos", "text_cos", "image_side_argmax_agreement", "text_side_argmax_agreement"):
        assert r["fidelity"][k] == pytest.approx(report[f"fidelity/{k}"], abs=1e-3), k
    assert -1 <= r["fidelity"]["image_cos"] <= 1 and -1 <= r["fidelity"]["text_cos"] <= 1
    cosines = [row["cosine"] for row in r["sensitivity"]]
    assert cosines == sorted(cosines, reverse=True) and {0.999, 0.99} <= set(cosines)
    assert all(0 <= row["image_argmax_agreement"] <= 1 and 0 <= row["text_argmax_agreement"] <= 1 for row in r["sensitivity"])
    # the choices DiCO makes: one held-out image's beams at one layer, for every layer 0..K (K = 2)
    d = r["decisions"]
    assert d["candidates_per_decision"] == 2 and [row["layer"] for row in d["by_layer"]] == [0, 1, 2]
    assert d["decisions"] == sum(row["decisions"] for row in d["by_layer"]) > 0
    assert all(0 <= row["argmax_agreement"] <= 1 and row["argmax_regret"] >= 0 for row in [d, *d["by_layer"]])


def test_run_skips_done_stages(run_dir, caplog):
    before = (run_dir / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["run", str(RECIPE), f"run_dir={run_dir}", "threads=1", "compare.seeds=2", *MICRO, SCST_CIDER, TEACHER]) == 0
    assert (run_dir / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert "skipped" in caplog.text


def test_bad_recipe_is_rejected_before_any_work(tmp_path, capsys):
    assert main(["pretrain", "--config", str(RECIPE), f"run_dir={tmp_path}", "pretrain.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'pretrain.stepz'" in err and "steps" in err
    assert not (tmp_path / "pretrain").exists()


def test_caption_command_writes_json_for_a_folder(run_dir, tmp_path, capsys):
    from PIL import Image
    import numpy as np

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "caps.json"
    model = run_dir / "finetune_dico" / "model"
    assert main(["caption", "--config", str(RECIPE), f"run_dir={run_dir}", "data.bad_image=skip", "--images", str(folder),
                 "--model", str(model), "--layer", "all", "--out", str(out)]) == 0
    caps = json.loads(out.read_text())
    assert set(caps) == {"im0.png", "im1.png", "im2.png", "broken.jpg"}
    assert set(caps["im0.png"]) == {"layer_0", "layer_1", "layer_2"} and "error" in caps["broken.jpg"]
    # without the skip policy a corrupt image is an error that names it
    capsys.readouterr()
    assert main(["caption", "--config", str(RECIPE), f"run_dir={run_dir}", "--images", str(folder), "--model", str(model)]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_pretrain_on_the_evaluator_tower_trains_the_evaluator_first(tmp_path, capsys):
    # `rlrefine pretrain` on a fresh run directory: the evaluator stage runs first, then pretraining
    code = main(["pretrain", "--config", str(RECIPE), f"run_dir={tmp_path}", "threads=1", "model.encoder.kind=evaluator", *MICRO])
    assert code == 0
    assert (tmp_path / "evaluator" / "open_clip_config.json").is_file()
    assert (tmp_path / "pretrain" / "model" / "config.json").is_file()
    # the lower-level builder still names the missing stage when called without it
    from rlrefine.config import load_recipe
    from rlrefine.trainers.pretrain import encoder_overrides

    cfg = load_recipe(RECIPE, [f"run_dir={tmp_path / 'fresh'}", *MICRO])
    with pytest.raises(FileNotFoundError, match="rlrefine train-evaluator"):
        encoder_overrides(cfg)


def test_report_reuses_evaluations_that_are_still_valid(run_dir, caplog):
    from rlrefine.config import load_recipe
    from rlrefine.report import cached_evaluation

    cfg = load_recipe(RECIPE, [f"run_dir={run_dir}", "threads=1", "compare.seeds=2", *MICRO, SCST_CIDER, TEACHER])
    model, out = run_dir / "finetune_dico" / "model", run_dir / "report" / "dico"
    assert cached_evaluation(cfg, model, out, "test")["model"] == str(model)
    assert cached_evaluation(cfg, model, out, "test_novel") is None  # another split
    fewer = load_recipe(RECIPE, [f"run_dir={run_dir}", *MICRO, "evaluate.num_images=3"])
    assert cached_evaluation(fewer, model, out, "test") is None  # other settings
    metrics = out / "metrics.json"
    old = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({**old, "metrics_version": 1}))  # computed with an older metric definition
    assert cached_evaluation(cfg, model, out, "test") is None
    metrics.write_text(json.dumps(old))
    assert cached_evaluation(cfg, model, out, "test") is not None
    (model / "model.safetensors").touch()  # the model changed after its evaluation
    assert cached_evaluation(cfg, model, out, "test") is None


def test_tensorboard_has_one_run_per_stage_with_its_hyperparameters(run_dir):
    """Each training stage writes one TensorBoard run, <stage>/tb, with its hyper-parameters in it (the
    hparams logging used to open a second, timestamped run under every stage)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in ("evaluator", "pretrain", "distill", "finetune_dico", "finetune_grpo"):
        files = list((run_dir / stage / "tb").rglob("events.out.tfevents*"))
        assert {f.parent for f in files} == {run_dir / stage / "tb"}, stage
        acc = EventAccumulator(str(run_dir / stage / "tb"))
        acc.Reload()
        assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams"), stage
        assert "train/loss" in acc.Tags()["scalars"], stage


def test_position_aware_pretraining_keys(tmp_path, capsys):
    """`model.image_token_pos`, the emphasis words and the locate loss train and save (the emphasis and locate terms
    are logged); a word that is not in the vocabulary, a weight with no words, or the locate loss on data without
    scenes is a recipe error that says what to do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    words = "pretrain.emphasis_words=[above, below, left, right]"
    keys = ["model.image_token_pos=true", words, "pretrain.emphasis_weight=1.0", "pretrain.emphasis_caption_weight=1.0",
            "pretrain.locate_weight=1.0", "pretrain.log_every=1"]
    assert main(["pretrain", "--config", str(RECIPE), f"run_dir={tmp_path}", "threads=1", *MICRO, *keys]) == 0
    from rlrefine.models import RefinementCaptioner

    model = RefinementCaptioner.from_pretrained(tmp_path / "pretrain" / "model")
    assert model.config.image_token_pos and model.image_pos is not None
    assert model.config.locate_head and model.locate_head is not None  # pretrain.locate_weight > 0 gives the head
    events = EventAccumulator(str(next((tmp_path / "pretrain" / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    emphasis = [e.value for e in events.Scalars("train/emphasis")]
    assert len(emphasis) == 4 and all(v > 0 for v in emphasis)
    locate = [e.value for e in events.Scalars("train/locate")]
    assert len(locate) == 4 and all(v > 0 for v in locate)
    # every shapes XE report says whether the captioner knows where things are (rlrefine.data.shapes_probes)
    position = json.loads((tmp_path / "pretrain" / "report.json").read_text())["test"]["position"]
    assert position["relation_true_over_inverted_images"] > 0 and 0.0 <= position["relation_true_over_inverted"] <= 1.0
    capsys.readouterr()
    bad = ["pretrain.emphasis_words=[above, sideways]", "pretrain.emphasis_weight=1.0"]
    assert main(["pretrain", "--config", str(RECIPE), f"run_dir={tmp_path / 'bad'}", "threads=1", *MICRO, *bad]) == 2
    assert "'sideways' is not one token of the caption vocabulary" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(RECIPE), f"run_dir={tmp_path / 'bad'}", *MICRO, "pretrain.emphasis_weight=1"]) == 2
    assert "pretrain.emphasis_words, which is empty" in capsys.readouterr().err
