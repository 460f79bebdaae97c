"""Torch-facing data: `CaptionDataset`, the label-mixing sampler and the collate function.

Where it sits: the top of `rlrefine.data`; trainers build a `torch.utils.data.DataLoader` from
these three pieces::

    ds = CaptionDataset(splits["train"], seed=cfg.seed)
    sampler = mixed_sampler(ds.is_label, num_samples=len(ds), seed=cfg.seed)  # 5 % label data
    loader = DataLoader(ds, batch_size=64, sampler=sampler,
                        collate_fn=make_collate(tokenizer, max_len=24))
    for epoch in ...:
        ds.set_epoch(epoch)  # before the loader's iterator is created (workers copy the dataset)

Each sample is ``{"image": uint8 [H, W, 3], "caption": str, "references": list[str], "index": int}``:
the training caption is one reference drawn deterministically from ``(seed, epoch, index)``, so a
run is reproducible however the loader's workers are scheduled, and every epoch sees another
paraphrase.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields
from typing import Any, Literal, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from rlrefine.data.split import CaptionSplit

__all__ = [
    "CaptionDataset",
    "BadImageError",
    "DataIssues",
    "sanitize_split",
    "DEFAULT_LABEL_WEIGHT",
    "example_weights",
    "mixed_sampler",
    "collate",
    "make_collate",
    "load_image",
]

logger = logging.getLogger(__name__)

DEFAULT_LABEL_WEIGHT = 0.05
"""Share of samples drawn from label-only data: enough to teach the extra visual concepts, small
enough that the model does not learn to answer in single words (DESIGN.md §2)."""


class BadImageError(RuntimeError):
    """An image file that cannot be opened or decoded; the message names the file."""


@dataclass
class DataIssues:
    """What the data policy (`rlrefine.config.DataSection`) skipped or changed, counted so a run can
    say so at its end instead of losing examples silently.

    * ``bad_images``: distinct images that could not be decoded and were skipped (``bad_image: skip``);
    * ``empty_captions``: empty or whitespace-only reference captions dropped when loading;
    * ``images_without_captions``: images dropped when loading because no caption was left;
    * ``captions_truncated``: distinct captions longer than ``max_caption_len`` tokens, cut to it
      (eos kept) when encoded.
    """

    bad_images: int = 0
    empty_captions: int = 0
    images_without_captions: int = 0
    captions_truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def add(self, other: "DataIssues | dict[str, int]") -> None:
        """Add another count (e.g. from another split or process) into this one."""
        other = other.as_dict() if isinstance(other, DataIssues) else other
        for name, value in other.items():
            setattr(self, name, getattr(self, name) + int(value))

    def summary(self) -> str:
        """One line for the end-of-run log, e.g. ``bad_images=1 empty_captions=0 ...``."""
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())


def sanitize_split(split: CaptionSplit, issues: DataIssues | None = None, name: str = "split") -> CaptionSplit:
    """``split`` without empty / whitespace-only captions and without images left with none.

    Both are counted in ``issues`` (when given) and logged as one warning; a clean split is
    returned unchanged (same object). Label-only examples follow the same rule.
    """
    issues = issues if issues is not None else DataIssues()
    captions = [[c for c in refs if isinstance(c, str) and c.strip()] for refs in split.captions]
    n_empty = sum(len(a) - len(b) for a, b in zip(split.captions, captions))
    keep = [i for i, refs in enumerate(captions) if refs]
    n_dropped = len(split) - len(keep)
    if n_empty == 0 and n_dropped == 0:
        return split
    issues.empty_captions += n_empty
    issues.images_without_captions += n_dropped
    logger.warning("%s: dropped %d empty or whitespace-only captions and %d images left without a caption",
                   name, n_empty, n_dropped)
    if not keep:
        raise ValueError(f"{name}: no image has a non-empty caption ({len(split)} images); check the annotations")
    clean = CaptionSplit(images=split.images, captions=captions, scenes=split.scenes,
                         image_ids=list(split.image_ids), is_label=split.is_label)
    return clean if n_dropped == 0 else clean.subset(keep)


def load_image(path: str, image_size: int | None = None) -> np.ndarray:
    """Decode ``path`` to RGB uint8 [H, W, 3]; with ``image_size``, resize the shorter side to
    it (bicubic) and centre-crop a square, as CLIP-style preprocessing does."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # forces the decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if image_size is not None:
        im = _fit_square(im, image_size)
    return np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def _fit_square(im, size: int):
    from PIL import Image

    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


class CaptionDataset(Dataset):
    """A `CaptionSplit` as a torch Dataset.

    ``seed``: with the epoch (`set_epoch`) and the index, picks the training caption among the
    references. ``image_size``: size path images are resized and centre-cropped to (None: keep
    the file's size; in-memory images are resized only when it differs from theirs).
    ``bad_image``: "error" raises `BadImageError` naming the file; "skip" logs a warning, counts
    it in ``num_bad_images`` (per process: workers keep their own count) and yields None, which
    `collate` drops.
    """

    def __init__(
        self,
        split: CaptionSplit,
        seed: int = 0,
        image_size: int | None = None,
        bad_image: Literal["error", "skip"] = "error",
    ) -> None:
        if bad_image not in ("error", "skip"):
            raise ValueError(f"bad_image must be 'error' or 'skip', got {bad_image!r}")
        empty = [i for i, refs in enumerate(split.captions) if not refs]
        if empty:
            raise ValueError(f"{len(empty)} images have no caption, e.g. image_id {split.image_ids[empty[0]]!r}")
        self.split = split
        self.seed = seed
        self.image_size = image_size
        self.bad_image = bad_image
        self.epoch = 0
        self.num_bad_images = 0

    def __len__(self) -> int:
        return len(self.split)

    @property
    def is_label(self) -> np.ndarray:
        """bool [N], True for label-only examples (feed it to `mixed_sampler`)."""
        return self.split.is_label

    def set_epoch(self, epoch: int) -> None:
        """Draw another reference per image from now on (deterministic in seed, epoch, index)."""
        self.epoch = int(epoch)

    def caption_index(self, index: int, epoch: int | None = None) -> int:
        """Which reference of image ``index`` is the training caption in ``epoch``."""
        n = len(self.split.captions[index])
        if n == 1:
            return 0
        e = self.epoch if epoch is None else epoch
        return int(np.random.default_rng([self.seed, e, index]).integers(n))

    def image(self, index: int) -> torch.Tensor:
        """uint8 [H, W, 3] of image ``index`` (may raise `BadImageError`)."""
        src = self.split.images[index]
        if isinstance(src, np.ndarray):
            arr = src
            if self.image_size is not None and arr.shape[:2] != (self.image_size, self.image_size):
                from PIL import Image

                arr = np.asarray(_fit_square(Image.fromarray(arr), self.image_size), dtype=np.uint8)
            return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
        return torch.from_numpy(load_image(src, self.image_size))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        index = int(index)
        try:
            image = self.image(index)
        except BadImageError as e:
            if self.bad_image == "error":
                raise
            self.num_bad_images += 1
            logger.warning("skipping bad image (%d so far): %s", self.num_bad_images, e)
            return None
        refs = self.split.captions[index]
        return {
            "image": image,
            "caption": refs[self.caption_index(index)],
            "references": list(refs),
            "index": index,
        }


def _groups(sources: Any) -> list[np.ndarray]:
    """Example indices of each group: [captioned, label] for a flag array, else one group per source."""
    if _is_flags(sources):
        flags = sources.cpu().numpy() if isinstance(sources, torch.Tensor) else np.asarray(sources, dtype=bool)
        return [np.flatnonzero(~flags), np.flatnonzero(flags)]
    sizes = [int(s) if isinstance(s, (int, np.integer)) else len(s) for s in sources]
    starts = np.cumsum([0, *sizes])
    return [np.arange(starts[g], starts[g + 1]) for g in range(len(sizes))]


def _all_bool(xs: Sequence) -> bool:
    return len(xs) > 0 and all(isinstance(x, (bool, np.bool_)) for x in xs)


def example_weights(
    sources: np.ndarray | torch.Tensor | Sequence[bool] | Sequence[Sized | int],
    weights: Sequence[float] | None = None,
    label_weight: float = DEFAULT_LABEL_WEIGHT,
) -> torch.Tensor:
    """Per-example sampling weights (float64 [N], summing to 1) such that group g is drawn with
    probability ``weights[g] / sum(weights)``, uniformly within the group.

    ``sources`` is either a bool flag array (``is_label``: groups = [captioned, label-only],
    default weights ``[1 - label_weight, label_weight]``) or the datasets (or sizes) of a
    `torch.utils.data.ConcatDataset` in order (default weights: proportional to size). Empty
    groups are ignored: their share goes to the others.
    """
    groups = _groups(sources)
    if weights is None:
        if _is_flags(sources):
            if not 0.0 <= label_weight <= 1.0:
                raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
            weights = [1.0 - label_weight, label_weight]
        else:
            weights = [float(len(g)) for g in groups]
    if len(weights) != len(groups):
        raise ValueError(f"got {len(weights)} weights for {len(groups)} groups of examples")
    if any(w < 0 for w in weights):
        raise ValueError(f"sampling weights must be >= 0, got {list(weights)}")
    n = sum(len(g) for g in groups)
    out = torch.zeros(n, dtype=torch.float64)
    live = [(g, float(w)) for g, w in zip(groups, weights) if len(g) > 0]
    total = sum(w for _, w in live)
    if total <= 0:
        sizes = [len(g) for g in groups]
        raise ValueError(f"no example has a positive sampling weight (weights {list(weights)}, group sizes {sizes})")
    for g, w in live:
        out[torch.from_numpy(g)] = w / total / len(g)
    return out


def _is_flags(sources: Any) -> bool:
    if isinstance(sources, torch.Tensor):
        return sources.dtype == torch.bool
    if isinstance(sources, np.ndarray):
        return sources.dtype == bool
    return _all_bool(sources)


def mixed_sampler(
    sources: np.ndarray | torch.Tensor | Sequence[bool] | Sequence[Sized | int],
    weights: Sequence[float] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    label_weight: float = DEFAULT_LABEL_WEIGHT,
) -> WeightedRandomSampler:
    """A `WeightedRandomSampler` (with replacement, own seeded generator) that mixes captioned and
    label-only examples (or several datasets) by `example_weights`. Default: label-only examples
    make up ``label_weight`` = 5 % of the samples. ``num_samples`` defaults to the number of
    examples (one "epoch")."""
    w = example_weights(sources, weights, label_weight)
    gen = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(w, num_samples=num_samples or len(w), replacement=True, generator=gen)


def collate(batch: list[dict | None], tokenizer, max_len: int | None = None) -> dict[str, Any] | None:
    """Stack samples: ``images`` uint8 [B, H, W, 3], ``tokens`` Long [B, T] (bos ... eos, padded),
    ``captions`` list[str], ``references`` list[list[str]], ``index`` Long [B]. Skipped samples
    (None) are dropped; a batch with none left gives None."""
    items = [b for b in batch if b is not None]
    if not items:
        return None
    shapes = {tuple(b["image"].shape) for b in items}
    if len(shapes) > 1:
        raise ValueError(
            f"images of different sizes in one batch {sorted(shapes)}: give CaptionDataset an image_size"
        )
    captions = [b["caption"] for b in items]
    return {
        "images": torch.stack([b["image"] for b in items]),
        "tokens": tokenizer.encode_batch(captions, max_len),
        "captions": captions,
        "references": [b["references"] for b in items],
        "index": torch.tensor([b["index"] for b in items], dtype=torch.long),
    }


def make_collate(tokenizer, max_len: int | None = None):
    """`collate` with the tokenizer bound (picklable, for DataLoader workers)."""
    return functools.partial(collate, tokenizer=tokenizer, max_len=max_len)
