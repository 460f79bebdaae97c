"""Rewards users bring (rewards/custom.py, rewards/weighted.py, rewards/grammar.py) and their recipe
kinds python / sum / grammar / cider: built by `build_reward`, checked before training, and used by
a few real fine-tuning steps."""

import json
from pathlib import Path

import pytest
import torch

from rewards.custom import RewardTargetError, check_reward, python_reward, resolve_target
from rewards.grammar import GrammarReward
from rewards.weighted import WeightedSum, weighted_sum
from rlrefine.cli import main
from rlrefine.config import RecipeError, load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
DATA = ["data.shapes.num_train=64", "data.shapes.num_val=8", "data.shapes.num_test=8", "data.shapes.num_test_novel=8"]


def test_weighted_sum_by_hand():
    terms = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 0.0])}
    assert weighted_sum(terms, {"a": 1.0, "b": 0.5}).tolist() == [2.5, 2.0]
    s = WeightedSum([("len", 2.0, python_reward("reward_examples:length_reward")), ("grammar", -1.0, GrammarReward())])
    out = s(None, ["there is a red circle", "circle a"])
    assert out.tolist() == [2.0 * 5 - 1.0, 2.0 * 2 - 0.0]
    assert set(s.term_scores(None, ["a red circle"])) == {"len", "grammar"}


def test_python_targets_classes_functions_and_kwargs():
    r = python_reward("reward_examples:WordCountReward", {"word": "blue"})
    assert r(None, ["a blue blue circle"]).tolist() == [0.5]
    f = python_reward("reward_examples:length_reward", {"scale": 0.5})
    assert f(None, ["a b c d"]).tolist() == [2.0]
    check_reward(r, "test")  # follows the protocol: no error


@pytest.mark.parametrize("target,match", [
    ("reward_examples", "not of the form"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("reward_examples:nope", "has no attribute 'nope'"),
    ("reward_examples:NOT_CALLABLE", "not a class or callable"),
])
def test_bad_targets_name_themselves(target, match):
    with pytest.raises(RewardTargetError, match=match):
        resolve_target(target)
    with pytest.raises(RecipeError, match=target.split(":")[0]):
        load_recipe(RECIPE, [f"finetune.reward={{kind: python, target: '{target}'}}"])


def test_a_reward_that_breaks_the_protocol_is_caught_by_the_probe():
    with pytest.raises(RewardTargetError, match=r"shape \(\) for 3 captions.*one float per caption"):
        check_reward(python_reward("reward_examples:one_score_per_batch"), "finetune.reward")


def test_recipe_rules_for_reward_kinds():
    cfg = load_recipe(RECIPE, ["finetune.reward={kind: sum, terms: [{weight: 1, reward: {kind: distilled}}, "
                               "{weight: 0.5, reward: {kind: grammar}}, {weight: 0.1, reward: {kind: grammar}}]}"])
    assert cfg.finetune.reward.term_names() == ["distilled", "grammar", "grammar_2"]
    for bad, match in [("{kind: sum}", "needs terms"), ("{kind: python}", "needs target"),
                       ("{kind: cider, target: 'a:b'}", "target apply to reward kind python only"),
                       ("{kind: grammar, terms: [{reward: {kind: cider}}]}", "terms apply to reward kind sum only")]:
        with pytest.raises(RecipeError, match=match):
            load_recipe(RECIPE, [f"finetune.reward={bad}"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny pretrained captioner (tiny ViT, K = 2) with a word tokenizer of the shapes captions."""
    from tests_tiny_model import tiny_captioner

    return tiny_captioner(tmp_path_factory.mktemp("tiny_model") / "model")


def _finetune(tmp_path, model, reward: str, *extra) -> int:
    return main(["finetune", "--config", str(RECIPE), f"run_dir={tmp_path}", "threads=1", *DATA, f"finetune.init={model}",
                 "finetune.steps=2", "finetune.batch_size=2", "finetune.num_candidates=2", "finetune.max_len=8",
                 "finetune.warmup_steps=1", "finetune.log_every=1", f"finetune.reward={reward}", *extra])


def _scalars(stage_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in stage_dir.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_finetune_with_a_python_reward(tmp_path, tiny_model):
    assert _finetune(tmp_path, tiny_model, "{kind: python, target: 'reward_examples:WordCountReward', kwargs: {word: red}}") == 0
    assert (tmp_path / "finetune" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "finetune" / "report.json").read_text())["steps"] == 2


def test_finetune_with_a_sum_logs_every_term(tmp_path, tiny_model):
    reward = ("{kind: sum, terms: [{weight: 1, reward: {kind: cider}}, {weight: 0.5, name: fluency, reward: {kind: grammar}}]}")
    assert _finetune(tmp_path, tiny_model, reward, "finetune.method=scst") == 0
    tags = _scalars(tmp_path / "finetune")
    assert {"reward_terms/cider", "reward_terms/fluency", "layer_2/reward_terms/fluency"} <= tags


def test_a_broken_reward_stops_before_any_training(tmp_path, tiny_model, capsys):
    code = _finetune(tmp_path, tiny_model, "{kind: python, target: 'reward_examples:one_score_per_batch'}")
    assert code == 2
    err = capsys.readouterr().err
    assert "reward_examples:one_score_per_batch" in err and "one float per caption" in err
    assert not (tmp_path / "finetune" / "model").exists() and not (tmp_path / "finetune" / "checkpoints").exists()
