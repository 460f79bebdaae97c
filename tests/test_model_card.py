"""Model cards (rlrefine/trainers/model_card.py): written with every saved captioner, provenance
without a git checkout, metrics replaced on each evaluation."""

import torch

from rlrefine.config import RecipeConfig
from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner
from rlrefine.trainers.model_card import (
    METRICS_BEGIN, git_commit, package_version, render_model_card, set_card_metrics, write_model_card,
)


def test_saved_captioner_carries_its_card(tmp_path):
    torch.manual_seed(0)
    model = RefinementCaptioner(CaptionerConfig(
        encoder=EncoderConfig(kind="tiny_vit", image_size=16, patch_size=8, width=16, depth=1, heads=2, stem_channels=0),
        d_model=16, num_slots=2, num_refine_layers=2, n_heads=2, readout_layers=1, vocab_size=10, max_len=6))
    card = render_model_card("Refinement captioner", "a test model", RecipeConfig(seed=5))
    model.save_pretrained(tmp_path / "m", model_card=card)
    text = (tmp_path / "m" / "README.md").read_text()
    assert (tmp_path / "m" / "config.json").is_file() and "# Refinement captioner" in text
    assert "seed: 5" in text and f"rlrefine {package_version()}" in text and "Not evaluated yet" in text
    RefinementCaptioner.from_pretrained(tmp_path / "m")  # the card does not disturb loading


def test_git_commit_is_none_outside_a_checkout(tmp_path):
    assert git_commit(tmp_path) is None
    commit = git_commit()
    assert commit is None or len(commit.split("+")[0]) == 40


def test_metrics_are_replaced_on_each_evaluation(tmp_path):
    write_model_card(tmp_path, "m", "x", RecipeConfig())
    set_card_metrics(tmp_path, "| CIDEr-D | 1.0 |")
    set_card_metrics(tmp_path, "| CIDEr-D | 2.0 |")
    text = (tmp_path / "README.md").read_text()
    assert "| CIDEr-D | 2.0 |" in text and "1.0 |" not in text and text.count(METRICS_BEGIN) == 1
    assert "run_dir: runs/default" in text  # the recipe is kept
    (tmp_path / "bare").mkdir()
    assert "| a | 1 |" in set_card_metrics(tmp_path / "bare", "| a | 1 |").read_text()  # no card yet: one is made
