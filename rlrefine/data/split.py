"""`CaptionSplit`: the one container every dataset loader returns, and its on-disk cache.

Where it sits: the bottom of the flow (`rlrefine.data`). Loaders (`shapes`, `coco`, `imagefolder`)
build a `CaptionSplit`; `rlrefine.data.batches` draws training batches from one. `sanitize_split` applies
the bad-data policy to captions, counted in `DataIssues`.

A split holds, row-aligned:

* ``images``: ``np.ndarray uint8 [N, H, W, 3]`` for in-memory data (shapes), or a ``list[str]`` of
  file paths for disk datasets (decoded lazily, `rlrefine.data.images.load_image`);
* ``captions``: ``list[list[str]]``, the reference captions of each image (5 for shapes and COCO,
  one label text for label-only examples);
* ``scenes``: ``list[Scene] | None``, the ground-truth scene of each image (shapes only);
* ``image_ids``: one id per image (str for shapes and image folders, the ``cocoid`` int for COCO);
* ``is_label``: ``np.ndarray[bool] [N]``, True for label-only ("ImageNet style") examples.

The on-disk cache of a split (`save_split` / `load_split`) is `rlrefine.data.cache`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["CaptionSplit", "DataIssues", "hash_split", "hash_unit", "image_rows", "images_and_captions", "sanitize_split"]


@dataclass
class CaptionSplit:
    """Images with their reference captions (row-aligned); see the module docstring."""

    images: np.ndarray | list[str]
    """uint8 [N, H, W, 3] in memory, or N file paths (disk datasets)."""
    captions: list[list[str]]
    """Reference captions per image (label-only examples: one label text)."""
    scenes: list[Any] | None = None
    """Ground-truth `Scene` per image (shapes), else None."""
    image_ids: list = field(default_factory=list)
    """One id per image; filled with 0..N-1 when left empty."""
    is_label: np.ndarray | None = None
    """bool [N]; True for label-only examples. All False when left None."""

    def __post_init__(self) -> None:
        n = len(self.images)
        if not self.image_ids:
            self.image_ids = list(range(n))
        if self.is_label is None:
            self.is_label = np.zeros(n, dtype=bool)
        self.is_label = np.asarray(self.is_label, dtype=bool)
        lengths = {
            "images": n,
            "captions": len(self.captions),
            "image_ids": len(self.image_ids),
            "is_label": len(self.is_label),
        }
        if self.scenes is not None:
            lengths["scenes"] = len(self.scenes)
        if len(set(lengths.values())) != 1:
            raise ValueError(f"CaptionSplit fields are not row-aligned: lengths {lengths}")
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise ValueError(
                    f"in-memory images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_memory(self) -> bool:
        """True when ``images`` is an array, False when it holds file paths."""
        return isinstance(self.images, np.ndarray)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "CaptionSplit":
        """The rows ``indices`` as a new split (images copied for arrays)."""
        idx = np.asarray(indices, dtype=np.int64)
        images = self.images[idx] if self.in_memory else [self.images[i] for i in idx]
        return CaptionSplit(
            images=images,
            captions=[self.captions[i] for i in idx],
            scenes=None if self.scenes is None else [self.scenes[i] for i in idx],
            image_ids=[self.image_ids[i] for i in idx],
            is_label=self.is_label[idx],
        )

    def captioned_references(self) -> list[list[str]]:
        """The reference lists of the captioned (not label-only) images: e.g. CIDEr-D's corpus."""
        return [list(refs) for refs, is_label in zip(self.captions, self.is_label) if not is_label]

    def all_captions(self) -> list[str]:
        """Every reference caption, flattened (e.g. to train a tokenizer)."""
        return [c for refs in self.captions for c in refs]


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


def hash_unit(name: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by ``(seed, name)``: the first 8 bytes of sha256("<seed>:<name>") / 2^64.

    The same file name lands in the same place on every machine, Python version and run (unlike
    ``hash()``, which is salted per process), and adding or removing other images moves nothing.
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(name: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """"test" if u < test_fraction, "val" if u < test_fraction + val_fraction, else "train", where
    u = `hash_unit(name, seed)`: a split for data whose format has none, stable per image."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"fractions must be >= 0 and sum to <= 1, got val {val_fraction}, test {test_fraction}")
    u = hash_unit(name, seed)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def images_and_captions(split: Any) -> tuple[Any, list[list[str]]]:
    """``(images, captions)`` of a `CaptionSplit` or a dict with those keys: in-memory images as a uint8
    tensor [N, H, W, 3] (file paths stay a list), each image's captions as a list."""
    import torch

    get = split.get if isinstance(split, dict) else (lambda k: getattr(split, k))
    images, captions = get("images"), get("captions")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    captions = [[c] if isinstance(c, str) else list(c) for c in captions]
    if len(images) != len(captions):
        raise ValueError(f"split has {len(images)} images but {len(captions)} caption lists")
    return images, captions


def image_rows(images: Any, idx: Sequence[int]) -> Any:
    """Rows ``idx`` of `images_and_captions`'s images: a uint8 tensor, or PIL images for file paths."""
    import torch

    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(list(idx), dtype=torch.long)]
    from PIL import Image

    return [Image.open(images[i]).convert("RGB") for i in idx]
