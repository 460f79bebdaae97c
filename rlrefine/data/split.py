"""`CaptionSplit`: the one container every dataset loader returns, and its on-disk cache.

Where it sits: the bottom of the flow (`rlrefine.data`). Loaders (`shapes`, `coco`, `imagefolder`)
build a `CaptionSplit`; `rlrefine.data.datasets.CaptionDataset` turns one into torch samples.

A split holds, row-aligned:

* ``images``: ``np.ndarray uint8 [N, H, W, 3]`` for in-memory data (shapes), or a ``list[str]`` of
  file paths for disk datasets (decoded lazily by `CaptionDataset`);
* ``captions``: ``list[list[str]]``, the reference captions of each image (5 for shapes and COCO,
  one label text for label-only examples);
* ``scenes``: ``list[Scene] | None``, the ground-truth scene of each image (shapes only);
* ``image_ids``: one id per image (str for shapes and image folders, the ``cocoid`` int for COCO);
* ``is_label``: ``np.ndarray[bool] [N]``, True for label-only ("ImageNet style") examples.

`save_split` / `load_split` write and read ``<dir>/<name>.npz`` (images, is_label) plus
``<dir>/<name>.json`` (captions, scenes, ids, paths), so a generated dataset can be cached in a
run directory and reloaded bit-identically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CaptionSplit", "save_split", "load_split", "hash_unit", "hash_split"]


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

    def all_captions(self) -> list[str]:
        """Every reference caption, flattened (e.g. to train a tokenizer)."""
        return [c for refs in self.captions for c in refs]


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


def _paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}.npz", d / f"{name}.json"


def save_split(split: CaptionSplit, directory: str | os.PathLike, name: str) -> None:
    """Write ``split`` to ``directory/name.npz`` + ``directory/name.json``.

    Each file is written to a temporary name and renamed, so a killed run never leaves a
    half-written cache that `load_split` would accept.
    """
    from rlrefine.data.shapes import Scene  # local: shapes imports this module

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = _paths(d, name)
    arrays = {"is_label": split.is_label}
    if split.in_memory:
        arrays["images"] = split.images
    meta = {
        "format": "rlrefine.CaptionSplit/1",
        "num_images": len(split),
        "captions": split.captions,
        "image_ids": list(split.image_ids),
        "image_paths": None if split.in_memory else list(split.images),
        "scenes": None if split.scenes is None else [asdict(s) for s in split.scenes],
    }
    for s in split.scenes or []:
        if not isinstance(s, Scene):
            raise TypeError(f"scenes must be rlrefine.data.shapes.Scene, got {type(s).__name__}")
    # np.savez appends ".npz" to names that lack it, so the temp name must end with it too.
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)  # uncompressed: 20k 64x64 images load in well under a second
    os.replace(tmp, npz_path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, json_path)


def load_split(directory: str | os.PathLike, name: str) -> CaptionSplit:
    """Read a split written by `save_split`; FileNotFoundError names the missing file."""
    from rlrefine.data.shapes import Scene

    npz_path, json_path = _paths(directory, name)
    for p in (npz_path, json_path):
        if not p.is_file():
            raise FileNotFoundError(f"cached split file not found: {p} (write it with rlrefine.data.save_split)")
    with open(json_path) as f:
        meta = json.load(f)
    with np.load(npz_path) as arrays:
        is_label = arrays["is_label"]
        images = arrays["images"] if meta["image_paths"] is None else list(meta["image_paths"])
    scenes = None if meta["scenes"] is None else [Scene.from_dict(s) for s in meta["scenes"]]
    return CaptionSplit(
        images=images,
        captions=[list(c) for c in meta["captions"]],
        scenes=scenes,
        image_ids=list(meta["image_ids"]),
        is_label=is_label,
    )
