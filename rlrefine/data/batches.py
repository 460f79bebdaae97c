"""Training batches and z_0 seeds: a step-indexed stream over a `CaptionSplit`.

Where it sits: `rlrefine.data`, read by every trainer. The batch stream is a pure function of
(seed, step): batch `s` holds the examples drawn by `numpy.random.default_rng([seed, s])` with the
configured mixing weights (label-only data low), and for each example the reference caption drawn by
the same generator. So the data position of a run is just its step, and a resumed run sees exactly
the batches the uninterrupted run would have seen. Several processes each take their slice of the
same global batch.

The bad-data policy (`data.bad_image`): an unreadable image raises `BadImageError` naming the file,
or with ``"skip"`` is dropped from its batch and counted once in `DataIssues.bad_images`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from rlrefine.data.images import BadImageError, load_image
from rlrefine.data.split import CaptionSplit, DataIssues
from rlrefine.data.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)

__all__ = ["Batch", "batch_stream", "drop_unreadable", "eval_z0_seeds", "load_images", "mixing_weights",
           "step_z0_seeds"]


@dataclass
class Batch:
    images: torch.Tensor  # [B, H, W, 3] uint8
    tokens: torch.Tensor  # [B, T]
    index: torch.Tensor  # [B] example indices into the split
    captions: list[str]
    z0_seeds: torch.Tensor | None = None  # [B] `step_z0_seeds` of the examples kept (bad images dropped)


def mixing_weights(split: CaptionSplit, label_weight: float) -> np.ndarray:
    """Per-example sampling probabilities: label-only examples share `label_weight` of the mass."""
    is_label = np.asarray(split.is_label, dtype=bool)
    n_lab, n_cap = int(is_label.sum()), int((~is_label).sum())
    if n_lab == 0 or n_cap == 0:
        return np.full(len(is_label), 1.0 / len(is_label))
    return np.where(is_label, label_weight / n_lab, (1.0 - label_weight) / n_cap)


def load_images(split: CaptionSplit, index: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] for the given examples (in-memory arrays, or files decoded with PIL)."""
    images = split.images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images[index])
    return torch.stack([torch.from_numpy(load_image(images[i], image_size)) for i in index])


def drop_unreadable(split: CaptionSplit, n: int, image_size: int, bad_image: str, issues: DataIssues,
                    name: str = "split") -> CaptionSplit:
    """Check the first `n` images of a file-backed split now (evaluation reads them at the end of a
    run): an unreadable one raises `BadImageError` up front, or with ``bad_image="skip"`` is dropped
    from the split and counted. In-memory splits are returned as they are."""
    if isinstance(split.images, np.ndarray):
        return split
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


def batch_stream(split: CaptionSplit, tokenizer: CaptionTokenizer, batch_size: int, seed: int, start_step: int,
                 max_len: int, label_weight: float, image_size: int, rank: int = 0, world: int = 1,
                 bad_image: str = "error", issues: DataIssues | None = None, num_workers: int = 0) -> Iterator[Batch]:
    """Batches for steps start_step, start_step+1, ...; each process takes its slice of the global batch.

    Process `rank` of `world` gets rows rank, rank + world, ... of the global batch of step s, so the
    processes together see exactly the single-process batch. Unreadable images raise
    `BadImageError`, or with ``bad_image="skip"`` are dropped from the batch (the rest of it is kept;
    each distinct image counted once in ``issues.bad_images`` and not read again). Captions longer
    than ``max_len`` tokens are truncated and counted once each in ``issues.captions_truncated``.
    ``num_workers`` > 0 decodes a batch's image files in that many threads (the batch is the same).
    """
    probs = mixing_weights(split, label_weight)
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 and not isinstance(split.images, np.ndarray) else None
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
            keep, arrays = _read_images(split, index, image_size, bad_image, known_bad, issues, step, pool)
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


def _decode(path: str, image_size: int) -> np.ndarray | BadImageError:
    try:
        return load_image(path, image_size)
    except BadImageError as e:
        return e


def _read_images(split: CaptionSplit, index: np.ndarray, image_size: int, bad_image: str, known_bad: set[int],
                 issues: DataIssues, step: int, pool: ThreadPoolExecutor | None = None) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Decode the images of `index` (file paths), in ``pool``'s threads when given; returns the positions kept
    and their uint8 tensors."""
    todo = [(pos, i) for pos, i in enumerate(index) if int(i) not in known_bad]
    paths = [split.images[i] for _, i in todo]
    decoded = list(pool.map(_decode, paths, [image_size] * len(paths))) if pool is not None else \
        [_decode(p, image_size) for p in paths]
    keep, arrays = [], []
    for (pos, i), image in zip(todo, decoded):
        if int(i) in known_bad:  # drawn twice in this batch
            continue
        if isinstance(image, BadImageError):
            if bad_image != "skip":
                raise BadImageError(f"{image} (set data.bad_image=skip to skip unreadable images)") from image
            known_bad.add(int(i))
            issues.bad_images += 1
            log.warning("skipping bad image (%d so far): %s", issues.bad_images, image)
            continue
        arrays.append(torch.from_numpy(image))
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
