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


def test_all_problems_reported_together():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["model.d_model=abc", "pretrain.layer_weights=cubic", "data.shapes.num_train=-1"])
    msg = str(err.value)
    assert "3 problems" in msg
    assert "model.d_model" in msg and "pretrain.layer_weights" in msg and "'linear'" in msg and "data.shapes.num_train" in msg


def test_missing_user_paths_are_errors_before_training(tmp_path):
    with pytest.raises(RecipeError, match="model.encoder.checkpoint '/nope/vitb32.pt' does not exist"):
        load_recipe(None, ["model.encoder.kind=open_clip", "model.encoder.model_name=ViT-B-32", "model.encoder.checkpoint=/nope/vitb32.pt"])
    # the real-scale recipe validates once the user points it at real files
    ann = tmp_path / "dataset_coco.json"
    ann.write_text('{"images": []}')
    ckpt = tmp_path / "vitb32.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(RecipeError, match="data.coco.annotations"):
        load_recipe(RECIPES / "coco_vitb32_xe.yaml")
    cfg = load_recipe(RECIPES / "coco_vitb32_xe.yaml", [f"data.coco.annotations={ann}", f"data.coco.image_root={tmp_path}",
                                                        f"model.encoder.checkpoint={ckpt}"])
    assert cfg.model.encoder.model_name == "ViT-B-32"


def test_dico_recipe_validates_with_user_paths_and_keeps_the_paper_hyperparameters(tmp_path):
    ann = tmp_path / "dataset_coco.json"
    ann.write_text('{"images": []}')
    ckpt, pacs = tmp_path / "vitb32.pt", tmp_path / "pacs.pth"
    ckpt.write_bytes(b"")
    pacs.write_bytes(b"")
    paths = [f"data.coco.annotations={ann}", f"data.coco.image_root={tmp_path}", f"model.encoder.checkpoint={ckpt}"]
    with pytest.raises(RecipeError, match="pacs_vitb32.pth' does not exist"):
        load_recipe(RECIPES / "coco_vitb32_dico.yaml", paths)
    pac_paths = [f"{key}.checkpoint={pacs}" for key in ("distill.teacher", "finetune.reward", "evaluate.evaluator",
                                                          "evaluate.extra_rewards.pac")]
    cfg = load_recipe(RECIPES / "coco_vitb32_dico.yaml", paths + pac_paths)
    f = cfg.finetune
    assert (f.method, f.beta, f.num_candidates, f.generation, f.max_len, f.lr) == ("dico", 0.2, 5, "beam", 30, 1e-6)
    assert (f.reward.kind, f.reward.model_name, f.reward.checkpoint) == ("pac", "ViT-B-32", str(pacs))
    assert cfg.variant("scst").method == "scst"


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
