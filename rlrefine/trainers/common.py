"""What every trainer needs: the accelerator, the data splits, the tokenizer, the captioner, and a
step-indexed batch stream.

The batch stream is a pure function of (seed, step): batch `s` holds the examples drawn by
`numpy.random.default_rng([seed, s])` with the configured mixing weights (label-only data low), and
for each example the reference caption drawn by the same generator. So the data position of a run
is just its step, and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlrefine.config import RecipeConfig
from rlrefine.data.datasets import BadImageError, DataIssues, sanitize_split
from rlrefine.data.shapes import ShapesConfig, generate_shapes
from rlrefine.data.tokenizer import CaptionTokenizer
from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner

log = logging.getLogger(__name__)


def make_accelerator(cfg: RecipeConfig, stage: str, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator that logs to TensorBoard under `<run_dir>/<stage>/tb`."""
    stage_dir = cfg.run_path / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    _import_distributed_nn_before_the_group()
    acc = Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_dir=str(stage_dir),
        # batch_size is the global batch, sliced per process by `batch_stream`, so one training step
        # is one scheduler step whatever the number of processes (accelerate would otherwise step a
        # prepared scheduler num_processes times per optimizer step).
        step_scheduler_with_optimizer=False,
    )
    set_seed(cfg.seed, device_specific=False)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return acc


def _import_distributed_nn_before_the_group() -> None:
    """Import `torch.distributed.nn` before accelerate creates the process group.

    Its functions take `group=group.WORLD` as a default argument, bound when the module is first
    imported. DDP imports it, so imported after the group exists it keeps the group alive after
    `destroy_process_group` until the interpreter is torn down. Then the gloo group's worker threads
    are destroyed mid-finalization and a finished two-process run sometimes aborts on exit
    ("terminate called without an active exception", exit code -6). Imported first, the default is
    None and the group goes when `end_training` destroys it.
    """
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.nn")


def all_processes(acc: Accelerator, flag: bool) -> bool:
    """True when `flag` is True on every process (one all-reduce; no communication on one process)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=acc.device)
    return float(acc.reduce(t, "sum").item()) == 0.0


class NonFiniteLossError(RuntimeError):
    """``max_nonfinite_steps`` non-finite losses (or gradients) in a row; a checkpoint was written."""


class NonFiniteGuard:
    """Backward + gradient clipping that skips a step whose loss or gradient is non-finite.

    The skip decision is the same on every process (a process that skipped backward would leave the
    others waiting in DDP's all-reduce): a step is skipped if any process is non-finite. After
    `limit` skipped steps in a row, a checkpoint is written and `NonFiniteLossError` says what to
    change (`advice`). `state["nonfinite_total"]` counts all skips (it is saved with checkpoints).
    """

    def __init__(self, acc: Accelerator, optimizer, ckpt, state: dict, limit: int, section: str, advice: str):
        self.acc, self.optimizer, self.ckpt, self.state = acc, optimizer, ckpt, state
        self.limit, self.section, self.advice = limit, section, advice
        self.run = 0

    def backward(self, step: int, loss: torch.Tensor, params, grad_clip: float) -> float | None:
        """The global (all-reduced) gradient norm, or None when the step must be skipped (no update)."""
        acc = self.acc
        grad_norm = None
        finite = all_processes(acc, bool(torch.isfinite(loss)))
        if finite:
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(params, grad_clip)
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.run = 0
            return float(grad_norm)
        self.run += 1
        self.state["nonfinite_total"] = self.state.get("nonfinite_total", 0) + 1
        what = f"non-finite gradient norm ({float(grad_norm)})" if grad_norm is not None else f"non-finite loss ({loss.item()})"
        log.warning("step %d: %s; step skipped, no update (%d in a row, %d in total)", step, what, self.run,
                    self.state["nonfinite_total"])
        acc.log({"train/nonfinite_steps": self.state["nonfinite_total"]}, step=step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.run >= self.limit:
            path = self.ckpt.save(step, self.state)
            raise NonFiniteLossError(
                f"{self.run} non-finite losses/gradients in a row at step {step} ({self.section}.max_nonfinite_steps="
                f"{self.limit}); checkpoint written to {path}. {self.advice}, then continue with --resume.")
        return None


def tensorboard_writer(acc: Accelerator):
    """The underlying `SummaryWriter` (for text, images and figures), or None off the main process."""
    if not acc.is_main_process:
        return None
    return acc.get_tracker("tensorboard", unwrap=True)


def load_splits(cfg: RecipeConfig, issues: DataIssues | None = None) -> dict:
    """The recipe's data as `{split_name: CaptionSplit}` (train, val, test, and test_novel for shapes).

    ``data.max_images`` keeps the first N images of each split (before the policy below).
    Every split goes through `sanitize_split` (empty captions and captionless images dropped);
    what was dropped is added to ``issues``.
    """
    data = cfg.data
    issues = issues if issues is not None else DataIssues()
    if data.kind == "shapes":
        s = data.shapes
        splits = generate_shapes(ShapesConfig(
            image_size=s.image_size, num_train=s.num_train, num_val=s.num_val, num_test=s.num_test,
            num_test_novel=s.num_test_novel, max_objects=s.max_objects, seed=s.seed, label_fraction=s.label_fraction,
            references=s.references,
        ))
    elif data.kind == "coco":  # Karpathy or official COCO captions, detected from the file
        from rlrefine.data.coco import load_coco

        c = data.coco
        splits = load_coco(c.annotations, c.image_root, c.use_restval, c.test_fraction, c.split_seed)
    elif data.kind == "csv":
        from rlrefine.data.captions_csv import load_caption_csv

        c = data.csv
        splits = load_caption_csv(c.path, c.image_root, c.val_fraction, c.test_fraction, c.split_seed)
    else:  # webdataset: materialised in memory (the step-indexed stream needs random access)
        from rlrefine.data.webdataset import load_webdataset_split

        w = data.webdataset
        train = load_webdataset_split(w.urls, data.image_size, w.max_samples, data.bad_image, issues)
        if w.val_urls is None:
            if len(train) <= w.num_val:
                raise ValueError(f"data.webdataset: {len(train)} samples cannot spare num_val={w.num_val} for val; give val_urls or lower num_val")
            train, val = train.subset(range(len(train) - w.num_val)), train.subset(range(len(train) - w.num_val, len(train)))
        else:
            val = load_webdataset_split(w.val_urls, data.image_size, None, data.bad_image, issues)
        test = val if w.test_urls is None else load_webdataset_split(w.test_urls, data.image_size, None, data.bad_image, issues)
        splits = {"train": train, "val": val, "test": test}
    if data.max_images is not None:
        splits = {name: split.subset(range(min(data.max_images, len(split)))) for name, split in splits.items()}
    empty = [name for name in ("train", "val", "test") if name in splits and len(splits[name]) == 0]
    if empty:
        raise ValueError(f"data ({data.kind}): the {', '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty; "
                         "check the annotations (COCO: the official layout needs a captions_*train*.json for train and "
                         "another file for val/test) or the split fractions")
    return {name: sanitize_split(split, issues, name) for name, split in splits.items()}


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
    kind, checkpoint = e.kind, e.checkpoint
    if kind == "evaluator":
        folder = cfg.run_path / "evaluator"
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"model.encoder.kind is 'evaluator' but no learned evaluator in '{folder}': run "
                f"`rlrefine train-evaluator --config <recipe>` first (`rlrefine run` does it for you)")
        kind, checkpoint = "open_clip", f"local-dir:{folder}"
    encoder = EncoderConfig(
        kind=kind, image_size=e.image_size, patch_size=e.patch_size, width=e.width, depth=e.depth,
        heads=e.heads, stem_channels=e.stem_channels, model_name=e.model_name, checkpoint=checkpoint, frozen=e.frozen,
        allow_gelu_for_openai_weights=e.allow_gelu_for_openai_weights,
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
    z0_seeds: torch.Tensor | None = None  # [B] `step_z0_seeds` of the examples kept (bad images dropped)


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


def drop_unreadable(split, n: int, image_size: int, bad_image: str, issues: DataIssues, name: str = "split"):
    """Check the first `n` images of a file-backed split now (evaluation reads them at the end of a
    run): an unreadable one raises `BadImageError` up front, or with ``bad_image="skip"`` is dropped
    from the split and counted. In-memory splits are returned as they are."""
    if isinstance(split.images, np.ndarray):
        return split
    from rlrefine.data.datasets import load_image

    bad = []
    for i in range(min(n, len(split))):
        try:
            load_image(split.images[i], image_size)
        except BadImageError as e:
            if bad_image != "skip":
                raise BadImageError(f"{name}: {e} (set data.bad_image=skip to skip unreadable images)") from e
            log.warning("%s: skipping bad image: %s", name, e)
            bad.append(i)
    if not bad:
        return split
    issues.bad_images += len(bad)
    bad_set = set(bad)
    return split.subset([i for i in range(len(split)) if i not in bad_set])


def batch_stream(split, tokenizer: CaptionTokenizer, batch_size: int, seed: int, start_step: int, max_len: int,
                 label_weight: float, image_size: int, rank: int = 0, world: int = 1,
                 bad_image: str = "error", issues: DataIssues | None = None) -> Iterator[Batch]:
    """Batches for steps start_step, start_step+1, ...; each process takes its slice of the global batch.

    Process `rank` of `world` gets rows rank, rank + world, ... of the global batch of step s, so the
    processes together see exactly the single-process batch. Unreadable images raise
    `BadImageError`, or with ``bad_image="skip"`` are dropped from the batch (the rest of it is kept;
    each distinct image counted once in ``issues.bad_images`` and not read again). Captions longer
    than ``max_len`` tokens are truncated and counted once each in ``issues.captions_truncated``.
    """
    probs = mixing_weights(split, label_weight)
    issues = issues if issues is not None else DataIssues()
    known_bad: set[int] = set()
    truncated: set[tuple[int, str]] = set()
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        index = rng.choice(len(probs), size=batch_size, p=probs)
        ref_draw = rng.random(batch_size)
        index, ref_draw = index[rank::world], ref_draw[rank::world]
        seeds = step_z0_seeds(seed, step, batch_size, rank, world)
        if isinstance(split.images, np.ndarray):
            keep = np.arange(len(index))
            images = torch.from_numpy(split.images[index])
        else:
            keep, arrays = _read_images(split, index, image_size, bad_image, known_bad, issues, step)
            images = torch.stack(arrays)
        index, ref_draw = index[keep], ref_draw[keep]
        captions = [split.captions[i][int(r * len(split.captions[i]))] for i, r in zip(index, ref_draw)]
        for i, c in zip(index, captions):
            if (int(i), c) not in truncated and len(tokenizer.tokenize(c)) > max_len - 2:
                truncated.add((int(i), c))
                issues.captions_truncated += 1
        yield Batch(
            images=images,
            tokens=tokenizer.encode_batch(captions, max_len),
            index=torch.from_numpy(index),
            captions=captions,
            z0_seeds=seeds[torch.from_numpy(keep)],
        )
        step += 1


def _read_images(split, index: np.ndarray, image_size: int, bad_image: str, known_bad: set[int],
                 issues: DataIssues, step: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Decode the images of `index` (file paths); returns the positions kept and their uint8 tensors."""
    from rlrefine.data.datasets import load_image

    keep, arrays = [], []
    for pos, i in enumerate(index):
        if int(i) in known_bad:
            continue
        try:
            arrays.append(torch.from_numpy(load_image(split.images[i], image_size)))
        except BadImageError as e:
            if bad_image != "skip":
                raise BadImageError(f"{e} (set data.bad_image=skip to skip unreadable images)") from e
            known_bad.add(int(i))
            issues.bad_images += 1
            log.warning("skipping bad image (%d so far): %s", issues.bad_images, e)
            continue
        keep.append(pos)
    if not arrays:
        raise BadImageError(f"step {step}: every image of the batch is unreadable ({len(index)} images, e.g. {split.images[index[0]]})")
    return np.asarray(keep, dtype=np.int64), arrays


def step_z0_seeds(seed: int, step: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Per-sample z_0 seeds for a training step: fresh noise each step, reproducible from (seed, step)."""
    rng = np.random.default_rng([seed, step, 7])
    return torch.from_numpy(rng.integers(0, 2**31 - 1, size=batch_size)[rank::world].astype(np.int64))


def eval_z0_seeds(index: torch.Tensor | np.ndarray, seed: int = 0) -> torch.Tensor:
    """Fixed z_0 seeds for evaluation: example i always starts from the same noise."""
    return torch.as_tensor(np.asarray(index), dtype=torch.long) * 1_000_003 + seed


from rlrefine.trainers.reward_factory import build_reward  # noqa: E402,F401 (its old home; kept importable)
