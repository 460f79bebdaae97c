"""What every trainer needs: the accelerator, the data splits, the tokenizer, the captioner, and a
step-indexed batch stream.

The batch stream is a pure function of (seed, step): batch `s` holds the examples drawn by
`numpy.random.default_rng([seed, s])` with the configured mixing weights (label-only data low), and
for each example the reference caption drawn by the same generator. So the data position of a run
is just its step, and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlrefine.config import RecipeConfig
from rlrefine.data.shapes import ShapesConfig, generate_shapes
from rlrefine.data.tokenizer import CaptionTokenizer
from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner

log = logging.getLogger(__name__)


def make_accelerator(cfg: RecipeConfig, stage: str, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator that logs to TensorBoard under `<run_dir>/<stage>/tb`."""
    stage_dir = cfg.run_path / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_dir=str(stage_dir),
    )
    set_seed(cfg.seed, device_specific=False)
    return acc


def tensorboard_writer(acc: Accelerator):
    """The underlying `SummaryWriter` (for text, images and figures), or None off the main process."""
    if not acc.is_main_process:
        return None
    return acc.get_tracker("tensorboard", unwrap=True)


def load_splits(cfg: RecipeConfig) -> dict:
    """The recipe's data as `{split_name: CaptionSplit}` (train, val, test, and test_novel for shapes)."""
    data = cfg.data
    if data.kind == "shapes":
        s = data.shapes
        return generate_shapes(ShapesConfig(
            image_size=s.image_size, num_train=s.num_train, num_val=s.num_val, num_test=s.num_test,
            num_test_novel=s.num_test_novel, max_objects=s.max_objects, seed=s.seed, label_fraction=s.label_fraction,
        ))
    from rlrefine.data.coco import load_karpathy

    return {
        split: load_karpathy(data.coco.annotations, data.coco.image_root, split=split, use_restval=data.coco.use_restval)
        for split in ("train", "val", "test")
    }


def build_tokenizer(cfg: RecipeConfig, train_split, save_dir: Path | None = None) -> CaptionTokenizer:
    """The recipe's tokenizer: trained on the training captions (word), or loaded from a local path."""
    tk = cfg.tokenizer
    if tk.kind == "word":
        texts = [c for refs in train_split.captions for c in refs]
        tokenizer = CaptionTokenizer.train(texts, min_freq=tk.min_freq)
    elif tk.kind == "hf":
        tokenizer = CaptionTokenizer.from_hf(tk.path)
    else:
        tokenizer = CaptionTokenizer.from_open_clip()
    if save_dir is not None:
        tokenizer.save(save_dir)
    return tokenizer


def captioner_config(cfg: RecipeConfig, tokenizer: CaptionTokenizer) -> CaptionerConfig:
    m, e = cfg.model, cfg.model.encoder
    encoder = EncoderConfig(
        kind=e.kind, image_size=e.image_size, patch_size=e.patch_size, width=e.width, depth=e.depth,
        heads=e.heads, model_name=e.model_name, checkpoint=e.checkpoint, frozen=e.frozen,
    )
    return CaptionerConfig(
        encoder=encoder, d_model=m.d_model, num_slots=m.num_slots, num_refine_layers=m.num_refine_layers,
        n_heads=m.n_heads, readout_layers=m.readout_layers, mlp_ratio=m.mlp_ratio, vocab_size=tokenizer.vocab_size,
        max_len=cfg.data.max_caption_len, z0_std=m.z0_std, dropout=m.dropout,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
    )


@dataclass
class Batch:
    images: torch.Tensor  # [B, H, W, 3] uint8
    tokens: torch.Tensor  # [B, T]
    index: torch.Tensor  # [B] example indices into the split
    captions: list[str]


def mixing_weights(split, label_weight: float) -> np.ndarray:
    """Per-example sampling probabilities: label-only examples share `label_weight` of the mass."""
    is_label = np.asarray(split.is_label, dtype=bool)
    n_lab, n_cap = int(is_label.sum()), int((~is_label).sum())
    if n_lab == 0 or n_cap == 0:
        return np.full(len(is_label), 1.0 / len(is_label))
    return np.where(is_label, label_weight / n_lab, (1.0 - label_weight) / n_cap)


def load_images(split, index: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] for the given examples (in-memory arrays, or files decoded with PIL)."""
    images = split.images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images[index])
    from rlrefine.data.datasets import load_image

    return torch.stack([torch.from_numpy(load_image(images[i], image_size)) for i in index])


def batch_stream(split, tokenizer: CaptionTokenizer, batch_size: int, seed: int, start_step: int, max_len: int,
                 label_weight: float, image_size: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
    """Batches for steps start_step, start_step+1, ...; each process takes its slice of the global batch."""
    probs = mixing_weights(split, label_weight)
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        index = rng.choice(len(probs), size=batch_size, p=probs)
        ref_draw = rng.random(batch_size)
        index, ref_draw = index[rank::world], ref_draw[rank::world]
        captions = [split.captions[i][int(r * len(split.captions[i]))] for i, r in zip(index, ref_draw)]
        yield Batch(
            images=load_images(split, index, image_size),
            tokens=tokenizer.encode_batch(captions, max_len),
            index=torch.from_numpy(index),
            captions=captions,
        )
        step += 1


def step_z0_seeds(seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Per-sample z_0 seeds for a training step: fresh noise each step, reproducible from (seed, step)."""
    rng = np.random.default_rng([seed, step, 7])
    return torch.from_numpy(rng.integers(0, 2**31 - 1, size=batch_size)[rank::world].astype(np.int64))


def eval_z0_seeds(index: torch.Tensor | np.ndarray, seed: int = 0) -> torch.Tensor:
    """Fixed z_0 seeds for evaluation: example i always starts from the same noise."""
    return torch.as_tensor(np.asarray(index), dtype=torch.long) * 1_000_003 + seed


def build_reward(section, cfg: RecipeConfig, device):
    """The reward a recipe section names (rewards protocol), on `device`, ready for inference."""
    import rewards

    kind = section.kind
    if kind == "learned":
        score = rewards.LearnedScore.from_dir(section.path or cfg.run_path / "evaluator", device=device)
    elif kind == "distilled":
        score = rewards.DistilledScore.from_dir(section.path or cfg.run_path / "distill", device=device)
    else:
        cls = {"clip": rewards.CLIPScore, "refclip": rewards.RefCLIPScore, "pac": rewards.PACScore, "refpac": rewards.RefPACScore}[kind]
        score = cls.from_pretrained(section.model_name, section.checkpoint, device=device)
    if hasattr(score, "batch_size"):
        score.batch_size = section.batch_size
    return score
