"""A tiny pretrained captioner for fine-tuning tests (tiny ViT, K = 2, a word tokenizer of the shapes captions)."""

from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
DATA = ["data.shapes.num_train=64", "data.shapes.num_val=8", "data.shapes.num_test=8", "data.shapes.num_test_novel=8"]


def tiny_captioner(out: Path) -> Path:
    """Save a randomly initialised tiny captioner (and its tokenizer) to ``out``; returns ``out``."""
    from rlrefine.config import load_recipe
    from rlrefine.data.sources import load_splits
    from rlrefine.data.tokenizer import build_tokenizer
    from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner

    cfg = load_recipe(RECIPE, DATA)
    tok = build_tokenizer(cfg.tokenizer, load_splits(cfg.data)["train"].all_captions())
    torch.manual_seed(0)
    model = RefinementCaptioner(CaptionerConfig(
        encoder=EncoderConfig(kind="tiny_vit", image_size=32, patch_size=16, width=16, depth=1, heads=2, stem_channels=0),
        d_model=16, num_slots=2, num_refine_layers=2, n_heads=2, readout_layers=1, vocab_size=tok.vocab_size,
        max_len=12, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id))
    model.save_pretrained(out, tokenizer=tok)
    return out
