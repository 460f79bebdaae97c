"""Captions in a CSV file with the header ``image,caption`` (``data.kind: csv``).

Where it sits: `rlrefine.data`, beside `coco`; returns `CaptionSplit`s of file paths, decoded
lazily like COCO's. The layout most caption datasets are exported to::

    image,caption
    train2017/000000391895.jpg,A man with a red helmet on a small moped on a dirt road.
    train2017/000000391895.jpg,Man riding a motor bike on a dirt road on the countryside.
    ...

One row per caption, several rows per image (in any order); ``image`` is relative to the image
root (or absolute); other columns are ignored. The file has no split: each image goes to test,
val or train by `rlrefine.data.split.hash_split` of its path as written in the file. Empty
captions are kept as "" here and dropped (and counted) by `sanitize_split`, like COCO's.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from rlrefine.data.split import CaptionSplit, hash_split

__all__ = ["load_caption_csv", "CSV_COLUMNS"]

CSV_COLUMNS = ("image", "caption")


def load_caption_csv(path: str | os.PathLike, image_root: str | os.PathLike, val_fraction: float = 0.05,
                     test_fraction: float = 0.05, split_seed: int = 0) -> dict[str, CaptionSplit]:
    """``{"train", "val", "test"}`` from an ``image,caption`` CSV; images in first-appearance order."""
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"caption CSV not found: {path}")
    if not root.is_dir():
        raise FileNotFoundError(f"image root of the caption CSV not found: {root}")
    captions: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: the header must name the columns {list(CSV_COLUMNS)} (one row per caption); "
                             f"found {header or 'no header'}, missing {missing}")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            image = (row.get("image") or "").strip()
            if not image:
                raise ValueError(f"{path}, line {line}: empty 'image' cell")
            captions.setdefault(image, []).append((row.get("caption") or "").strip())
    rows: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for image in captions:
        rows[hash_split(image, split_seed, val_fraction, test_fraction)].append(image)
    return {name: CaptionSplit(images=[str(root / image) for image in images], captions=[captions[i] for i in images],
                               scenes=None, image_ids=list(images), is_label=np.zeros(len(images), dtype=bool))
            for name, images in rows.items()}
