"""COCO captions in the **Karpathy split** format (``dataset_coco.json``).

Where it sits: `rlrefine.data`, beside `shapes`; returns a `CaptionSplit` whose images are file
paths, decoded lazily by `rlrefine.data.datasets.CaptionDataset`.

The file (Karpathy & Fei-Fei 2015, the split every captioning paper reports on) looks like::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "restval" | "val" | "test", "cocoid": 391895,
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...]}, ...]}, ...]}

The image path is ``image_root / filepath / filename`` (``filepath`` may be missing, as in the
Flickr8k/30k files of the same format). ``restval`` (the 30k COCO val images outside the 5k
val/test) is merged into ``train`` by default, as in the standard 113k-image training split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rlrefine.data.split import CaptionSplit

__all__ = ["load_karpathy_split", "KARPATHY_SPLITS"]

KARPATHY_SPLITS = ("train", "val", "test")


def load_karpathy_split(
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str = "train",
    merge_restval: bool = True,
    max_images: int | None = None,
    check_files: bool = False,
) -> CaptionSplit:
    """The images of one Karpathy ``split`` ("train", "val" or "test") with all their captions.

    ``merge_restval``: count "restval" images as "train". ``max_images``: keep the first N
    (debug runs). ``check_files``: raise FileNotFoundError now for missing image files instead of
    when they are first read. Captions are the ``raw`` sentences, whitespace-stripped; empty ones
    are dropped, and an image left without captions is an error that names it.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r}; expected one of {list(KARPATHY_SPLITS)}")
    ann_path, root = Path(annotations), Path(image_root)
    if not ann_path.is_file():
        raise FileNotFoundError(f"Karpathy annotation file not found: {ann_path} (dataset_coco.json)")
    if not root.is_dir():
        raise FileNotFoundError(f"COCO image root not found: {root}")
    with open(ann_path) as f:
        data = json.load(f)
    if "images" not in data:
        raise ValueError(f"{ann_path} is not in the Karpathy format: no top-level 'images' list")
    wanted = {split, "restval"} if (split == "train" and merge_restval) else {split}

    paths: list[str] = []
    captions: list[list[str]] = []
    ids: list = []
    for entry in data["images"]:
        if entry.get("split") not in wanted:
            continue
        path = root / entry.get("filepath", "") / entry["filename"]
        refs = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
        if not refs:
            raise ValueError(f"{ann_path}: image {entry['filename']} has no non-empty caption")
        if check_files and not path.is_file():
            raise FileNotFoundError(f"image listed in {ann_path} not found: {path}")
        paths.append(str(path))
        captions.append(refs)
        ids.append(entry.get("cocoid", entry.get("imgid", entry["filename"])))
        if max_images is not None and len(paths) >= max_images:
            break
    return CaptionSplit(
        images=paths, captions=captions, scenes=None, image_ids=ids, is_label=np.zeros(len(paths), dtype=bool)
    )
