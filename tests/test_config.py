"""Recipe loading and validation (rlrefine/config.py)."""

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rlrefine.config import RecipeConfig, RecipeError, load_recipe, parse_overrides

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_tiny_recipe_loads_with_its_values():
    cfg = load_recipe(RECIPES / "tiny.yaml")
    assert cfg.data.kind == "shapes" and cfg.model.encoder.kind == "evaluator" and cfg.model.encoder.frozen
    assert cfg.model.num_refine_layers == 4
    assert cfg.pretrain.layer_weights == "linear"


def test_overrides_are_parsed_as_yaml_and_merged():
    cfg = load_recipe(RECIPES / "tiny.yaml", ["pretrain.steps=7", "pretrain.lr=3e-4", "model.encoder.frozen=true"])
    assert cfg.pretrain.steps == 7 and cfg.pretrain.lr == pytest.approx(3e-4) and cfg.model.encoder.frozen is True
    assert cfg.model.d_model == 128  # untouched keys keep the recipe's value
    assert parse_overrides(["a.b=[1, 2]", "c=x"]) == {"a": {"b": [1, 2]}, "c": "x"}


def test_unknown_key_names_the_key_and_lists_allowed_ones():
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny.yaml", ["pretrain.stepz=5"])
    msg = str(err.value)
    assert "unknown key 'pretrain.stepz'" in msg
    assert "steps" in msg and "batch_size" in msg  # the valid choices are listed


def test_a_dot_in_a_compare_variant_name_is_explained():
    with pytest.raises(RecipeError, match="variant's name cannot contain '.'"):
        load_recipe(RECIPES / "tiny.yaml", ["compare.dico_lr2.5e-5={lr: 2.5e-5}"])


def test_all_problems_reported_together():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["model.d_model=abc", "pretrain.layer_weights=cubic", "data.shapes.num_train=-1"])
    msg = str(err.value)
    assert "3 problems" in msg
    assert "model.d_model" in msg and "pretrain.layer_weights" in msg and "'linear'" in msg and "data.shapes.num_train" in msg


TINY_COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny_coco"


def _user_paths(tmp_path) -> list[str]:
    """paths.* overrides pointing the real-scale recipe at files that exist (checkpoints: empty files; validation
    only checks that they are there)."""
    ann = tmp_path / "dataset_coco.json"
    ann.write_text('{"images": []}')
    for name in ("vitb32.pt", "pacs.pth"):
        (tmp_path / name).write_bytes(b"")
    return [f"paths.annotations={ann}", f"paths.images={tmp_path}", f"paths.encoder_checkpoint={tmp_path / 'vitb32.pt'}",
            f"paths.reward_checkpoint={tmp_path / 'pacs.pth'}"]


def test_grid_stage_is_for_resnet_towers():
    assert load_recipe(RECIPES / "tiny.yaml", ["model.encoder.grid_stage=3"]).model.encoder.grid_stage == 3
    with pytest.raises(RecipeError, match="grid_stage is for open_clip ResNet towers .* not kind 'tiny_vit'"):
        load_recipe(RECIPES / "tiny.yaml", ["model.encoder.kind=tiny_vit", "model.encoder.grid_stage=3"])
    with pytest.raises(RecipeError, match="model.encoder.grid_stage"):
        load_recipe(RECIPES / "tiny.yaml", ["model.encoder.grid_stage=5"])


def test_missing_user_paths_are_errors_before_training(tmp_path):
    with pytest.raises(RecipeError, match="model.encoder.checkpoint '/nope/vitb32.pt' does not exist"):
        load_recipe(None, ["model.encoder.kind=open_clip", "model.encoder.model_name=ViT-B-32", "model.encoder.checkpoint=/nope/vitb32.pt"])
    # the real-scale recipe names every path it still needs, then validates once the user gives them
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "coco_vitb32.yaml")
    msg = str(err.value)
    for key in ("annotations", "images", "encoder_checkpoint", "reward_checkpoint"):
        assert f"paths.{key}=/your/path" in msg
    assert "data.coco.annotations refers to ${paths.annotations}" in msg
    cfg = load_recipe(RECIPES / "coco_vitb32.yaml", _user_paths(tmp_path))
    assert cfg.model.encoder.model_name == "ViT-B-32-quickgelu"
    assert cfg.data.coco.image_root == str(tmp_path) and cfg.model.encoder.checkpoint == str(tmp_path / "vitb32.pt")


def test_coco_recipe_keeps_the_dico_reference_settings(tmp_path):
    cfg = load_recipe(RECIPES / "coco_vitb32.yaml", _user_paths(tmp_path))
    pacs = str(tmp_path / "pacs.pth")
    f = cfg.finetune
    # aimagelab/DiCO main.py + scripts/train_dico_coco.sh: beta 0.2, tau 300, 5 beams, length 30, lr 1e-6 constant, 8 images
    assert (f.method, f.dico.beta, f.dico.tau, f.num_candidates, f.dico.generation, f.max_len) == ("dico", 0.2, 300, 5, "beam", 30)
    assert (f.lr, f.lr_schedule, f.warmup_steps, f.batch_size) == (1e-6, "constant", 0, 8)
    # training reward: PAC-S as 2.0 * cos, no prefix, no clamp; evaluation: official PAC-S / RefPAC-S
    r = f.reward
    assert (r.kind, r.model_name, r.checkpoint, r.scale, r.prefix, r.clamp) == ("pac", "ViT-B-32-quickgelu", pacs, 2.0, "", False)
    e = cfg.evaluate
    assert (e.evaluator.kind, e.evaluator.scale, e.evaluator.prefix, e.evaluator.clamp) == ("pac", None, None, None)
    assert e.extra_rewards["refpac"].kind == "refpac" and e.extra_rewards["refpac"].checkpoint == pacs
    assert cfg.variant("scst").method == "scst" and cfg.variant("dico").dico.tau == 300
    # every reward / encoder is the QuickGELU architecture the PAC-S and OpenAI weights need
    sections = [cfg.model.encoder, r, e.evaluator, *e.extra_rewards.values(), cfg.distill.teacher]
    assert {s.model_name for s in sections} == {"ViT-B-32-quickgelu"}
    # the pipeline: no learned evaluator; the text student of PAC-S as DiCO trains on it for dico_distilled; DiCO
    # against PAC-S and against the student, SCST, the report
    from rlrefine.pipeline import stages

    assert [s.name for s in stages(cfg)] == ["pretrain", "distill-reward", "finetune", "report"]
    d = cfg.distill
    assert (d.student_kind, d.teacher.scale, d.teacher.prefix, d.teacher.clamp) == ("text", 2.0, "", False)
    assert cfg.variant("dico_distilled").reward.kind == "distilled" and cfg.variant("dico_distilled").dico.tau == 300



@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_validates(recipe, tmp_path):
    """Every shipped recipe loads (the real-scale ones once given their outside paths) and starts with a comment
    that says how to run it."""
    text = (RECIPES / recipe).read_text()
    assert text.startswith("#") and "rlrefine " in text.split("\n\n")[0]
    overrides = _user_paths(tmp_path) if "paths:" in text else []
    assert isinstance(load_recipe(RECIPES / recipe, overrides), RecipeConfig)


def test_path_references_are_resolved_and_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("paths: {images: /data/x}\nrun_dir: ${paths.images}/run\nfinetune: {init: '${paths.nope}'}\n")
    with pytest.raises(RecipeError, match=r"finetune.init: unknown reference '\$\{paths.nope\}'"):
        load_recipe(recipe)
    recipe.write_text("paths: {images: /data/x}\nrun_dir: ${paths.images}/run\n")
    assert load_recipe(recipe).run_dir == "/data/x/run"
    assert load_recipe(recipe, ["paths.images=/elsewhere"]).run_dir == "/elsewhere/run"  # overrides first, then references
    with pytest.raises(RecipeError, match="unknown key 'paths.imagez'"):
        load_recipe(recipe, ["paths.imagez=/x"])


def test_override_no_is_the_string_no():
    """`no` is a documented mixed_precision choice; YAML 1.1 would read it as the boolean false."""
    assert parse_overrides(["pretrain.mixed_precision=no", "a=yes", "b=off", "c=true", "d=False"]) == {
        "pretrain": {"mixed_precision": "no"}, "a": "yes", "b": "off", "c": True, "d": False}
    cfg = load_recipe(RECIPES / "tiny.yaml", ["pretrain.mixed_precision=no", "finetune.mixed_precision=no",
                                              "model.encoder.frozen=no"])
    assert cfg.pretrain.mixed_precision == "no" and cfg.finetune.mixed_precision == "no"
    assert cfg.model.encoder.frozen is False  # boolean fields still take yes/no


def test_reward_options_apply_to_the_clip_family_only(tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"")
    cfg = load_recipe(None, ["finetune.reward.kind=pac", "finetune.reward.model_name=ViT-B-32-quickgelu",
                             f"finetune.reward.checkpoint={ckpt}", "finetune.reward.scale=2.0", "finetune.reward.prefix=",
                             "finetune.reward.clamp=false"])
    assert (cfg.finetune.reward.scale, cfg.finetune.reward.prefix, cfg.finetune.reward.clamp) == (2.0, "", False)
    with pytest.raises(RecipeError, match="scale apply to reward kinds clip, refclip, pac, refpac only"):
        load_recipe(None, ["finetune.reward.kind=distilled", "finetune.reward.scale=2.0"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(lst)
    with pytest.raises(RecipeError, match="dotted.key=value"):
        load_recipe(None, ["pretrain.steps"])


_keys = st.sampled_from(["run_dir", "seed", "data", "data.kind", "data.shapes.num_train", "model.d_model", "model.encoder.kind",
                         "pretrain.steps", "pretrain.lr", "pretrain.layer_weights", "tokenizer.kind", "bogus", "model.bogus.x"])
_values = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12), st.booleans(), st.none(),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5), st.lists(st.tuples(_keys, _values), max_size=3))
def test_fuzz_recipe_loader_only_raises_recipe_error(tree, overrides):
    """Whatever a user writes (file or overrides), the loader returns a valid config or raises RecipeError."""
    raw: dict = {}
    for dotted, value in tree.items():
        node = raw
        parts = dotted.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = node[p] = {}
            node = nxt
        node[parts[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in overrides]
        try:
            cfg = load_recipe(path, items)
        except RecipeError as err:
            assert str(err)
        else:
            assert isinstance(cfg, RecipeConfig)


def test_compare_takes_seeds_beside_named_variants():
    cfg = load_recipe(RECIPES / "tiny.yaml", ["compare.seeds=3", "compare.extra.lambda_grad=1.0"])
    assert cfg.compare.seeds == 3 and list(cfg.compare.variants)[-1] == "extra"
    assert cfg.variant("extra", seed=2).output == "finetune_extra_seed2" and cfg.variant("extra").lambda_grad == 1.0
    with pytest.raises(RecipeError, match="compare.seeds"):
        load_recipe(RECIPES / "tiny.yaml", ["compare.seeds=0"])
    with pytest.raises(RecipeError, match="compare.oops must be a mapping"):
        load_recipe(RECIPES / "tiny.yaml", ["compare.oops=3"])
    with pytest.raises(RecipeError, match="compare.extra.lambda_gradd"):
        load_recipe(RECIPES / "tiny.yaml", ["compare.extra.lambda_gradd=1.0"])


def test_a_variant_set_to_null_is_left_out_of_the_run():
    cfg = load_recipe(RECIPES / "tiny.yaml", ["compare.scst=null", "compare.grpo=null", "compare.mix={dico: {generation: mix}}"])
    assert "scst" not in cfg.compare.variants and "grpo" not in cfg.finetune_runs()
    assert list(cfg.compare.variants)[-1] == "mix" and cfg.variant("mix").dico.generation == "mix"


def test_a_variant_with_another_reward_kind_does_not_inherit_the_base_rewards_keys():
    cfg = load_recipe(RECIPES / "tiny.yaml", ["finetune.reward={kind: sum, terms: [{weight: 1, reward: {kind: distilled}}]}",
                                              "compare.teacher.reward.kind=learned"])
    assert cfg.variant("teacher").reward.kind == "learned" and cfg.variant("teacher").reward.terms == []
    assert cfg.variant("dico").reward.kind == "sum" and len(cfg.variant("dico").reward.terms) == 1


def test_a_named_student_is_distilled_only_when_a_reward_reads_it():
    from rlrefine.pipeline import stages

    text = "distill.extra_students.text={student_kind: text, text_student: {tokenizer: word, steps: 7}}"
    cfg = load_recipe(RECIPES / "tiny.yaml", [text])
    assert list(cfg.distillations()) == [None]  # defined, read by no reward: not distilled
    cfg = load_recipe(RECIPES / "tiny.yaml", [text, "compare.dico_text={reward: {kind: distilled, student: text}}"])
    named = cfg.distillations()["text"]
    assert (named.student_kind, named.text_student.tokenizer, named.text_student.steps) == ("text", "word", 7)
    assert named.teacher == cfg.distill.teacher and named.candidate_images == cfg.distill.candidate_images  # the rest inherited
    assert cfg.distill_dir("text") == cfg.run_path / "distill_text"
    names = [s.name for s in stages(cfg)]
    assert names[names.index("pretrain") + 1:names.index("finetune")] == ["distill-reward", "distill-reward[text]"]
    with pytest.raises(RecipeError, match="names student\\(s\\) txt, which distill.extra_students does not define"):
        load_recipe(RECIPES / "tiny.yaml", [text, "compare.x={reward: {kind: distilled, student: txt}}"])
    with pytest.raises(RecipeError, match="distill.extra_students.text.text_student.widht"):
        load_recipe(RECIPES / "tiny.yaml", ["distill.extra_students.text={text_student: {widht: 8}}"])
    with pytest.raises(RecipeError, match="give path .* or student .*, not both"):
        load_recipe(RECIPES / "tiny.yaml", [text, "compare.x={reward: {kind: distilled, student: text, path: /tmp}}"])
    with pytest.raises(RecipeError, match="text student keeps an open_clip image tower; the teacher is kind 'cider'"):
        load_recipe(RECIPES / "tiny.yaml", ["distill.student_kind=text", "distill.teacher={kind: cider}"])
