"""The recipe reference (rlrefine/recipe_reference.py, `rlrefine config`): generated from the schema,
docs/recipe.md current, every key of the typed sections described, and the annotated YAML loads back."""

from pathlib import Path

import yaml

from rlrefine import config as C
from rlrefine.cli import main
from rlrefine.config import RecipeConfig, load_recipe
from rlrefine.recipe_reference import REGENERATE, annotated_yaml, markdown_reference, section_class, type_name

ROOT = Path(__file__).resolve().parents[1]


def test_docs_recipe_md_is_current():
    current = (ROOT / "docs" / "recipe.md").read_text()
    assert current == markdown_reference(), f"docs/recipe.md is out of date with rlrefine/config.py: run `{REGENERATE}`"


def test_every_recipe_key_is_described():
    missing = [f"{name}.{key}" for name, cls in vars(C).items()
               if isinstance(cls, type) and issubclass(cls, C.Section) and cls is not C.Section
               for key, f in cls.model_fields.items()
               if not f.description and section_class(f.annotation)[0] is None]  # sections: their docstring
    assert missing == []


def test_type_names():
    import typing

    assert type_name(typing.Literal["a", "b"]) == "a | b"
    assert type_name(int | None) == "int or null"
    assert type_name(list[int]) == "list[int]"


def test_config_command_prints_a_resolved_described_recipe_that_loads_back(capsys):
    override = "finetune.reward={kind: sum, terms: [{weight: 1, reward: {kind: distilled}}, {weight: 0.5, reward: {kind: grammar}}]}"
    assert main(["config", str(ROOT / "recipes" / "tiny.yaml"), "pretrain.steps=7", override]) == 0
    text = capsys.readouterr().out
    assert "  steps: 7" in text and "# optimizer steps" in text and "batch_size: 512" in text  # a default filled in
    assert RecipeConfig.model_validate(yaml.safe_load(text)) == load_recipe(ROOT / "recipes" / "tiny.yaml", ["pretrain.steps=7", override])
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_reference()
    assert main(["config", "seed=3"]) == 0 and "seed: 3" in capsys.readouterr().out  # built-in defaults + overrides


def test_annotated_yaml_of_the_defaults_round_trips():
    cfg = RecipeConfig()
    assert RecipeConfig.model_validate(yaml.safe_load(annotated_yaml(cfg))) == cfg
