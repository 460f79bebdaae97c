"""COCO captions in the **Karpathy split** format (``dataset_coco.json``) or the **official COCO
caption** format (``annotations/captions_train2017.json`` ...), detected from the file content.

Where it sits: `rlrefine.data`, beside `shapes`; returns `CaptionSplit`s whose images are file
paths, decoded lazily by `rlrefine.data.datasets.CaptionDataset`. `load_coco` is the entry point
(`data.kind: coco`): it reads either format and returns train / val / test.

The Karpathy file (Karpathy & Fei-Fei 2015, the split every captioning paper reports on) looks like::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "restval" | "val" | "test", "cocoid": 391895,
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...]}, ...]}, ...]}

The image path is ``image_root / filepath / filename`` (``filepath`` may be missing, as in the
Flickr8k/30k files of the same format). ``restval`` (the 30k COCO val images outside the 5k
val/test) is merged into ``train`` by default, as in the standard 113k-image training split.

An official caption file looks like::

    {"images": [{"id": 391895, "file_name": "000000391895.jpg", "width": 640, ...}, ...],
     "annotations": [{"image_id": 391895, "id": 1, "caption": "A man with a red helmet ..."}, ...]}

It has no Karpathy split: the images of a file whose name contains "train" are train, the images
of the other files (val2017; COCO 2017 has no captioned test set) are divided between val and test
by `rlrefine.data.split.hash_split` of the file name (``test_fraction`` of them test). The image of
``captions_<name>.json`` is ``image_root/<name>/file_name`` when that folder exists, else
``image_root/file_name``. Empty captions and images without any are kept here and dropped (and
counted) by `rlrefine.data.datasets.sanitize_split`, the data policy of `load_splits`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rlrefine.data.split import CaptionSplit, hash_split

__all__ = ["load_coco", "load_karpathy_split", "load_official_captions", "detect_format", "KARPATHY_SPLITS"]

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
    are dropped; an image left without captions keeps an empty list, which `sanitize_split` drops
    and counts (the data policy).
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
        # an image left without captions is kept (empty list): sanitize_split drops and counts it
        refs = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
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


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected COCO captions (Karpathy dataset_coco.json "
                         "or an official captions_*.json)") from None


def detect_format(data: Any, path: str | os.PathLike = "annotations") -> str:
    """"karpathy" or "official" from a parsed annotation file; ValueError naming the file otherwise.

    Karpathy: ``images`` entries with ``filename`` and ``sentences``. Official: top-level
    ``annotations`` (``image_id`` + ``caption``) and ``images`` entries with ``id`` + ``file_name``.
    """
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        if isinstance(data.get("annotations"), list):
            return "official"
        first = data["images"][0] if data["images"] else {}
        if not data["images"] or ("filename" in first and "sentences" in first):
            return "karpathy"
    raise ValueError(f"{path} is neither a Karpathy dataset_coco.json ({{'images': [{{'filename', 'sentences', 'split'}}]}}) "
                     "nor an official COCO caption file ({'images': [...], 'annotations': [{'image_id', 'caption'}]})")


def _official_files(annotations: Path) -> list[Path]:
    """The caption files: ``annotations`` itself, or the ``captions_*.json`` in that folder."""
    if annotations.is_dir():
        files = sorted(annotations.glob("captions_*.json"))
        if not files:
            raise FileNotFoundError(f"no captions_*.json in {annotations} (the official COCO annotations/ folder "
                                    "holds captions_train2017.json and captions_val2017.json)")
        return files
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {annotations}")
    return [annotations]


def load_official_captions(path: str | os.PathLike, image_root: str | os.PathLike, data: Any = None) -> CaptionSplit:
    """Every image of one official COCO caption file with its captions (stripped; empty ones kept
    as "" for `sanitize_split` to count), in the file's image order; image ids are COCO ids."""
    path, root = Path(path), Path(image_root)
    data = _read_json(path) if data is None else data
    if detect_format(data, path) != "official":
        raise ValueError(f"{path} is not an official COCO caption file")
    name = path.stem.removeprefix("captions_")
    folder = root / name if (root / name).is_dir() else root
    ids, paths = [], []
    for entry in data["images"]:
        if "id" not in entry or "file_name" not in entry:
            raise ValueError(f"{path}: an 'images' entry lacks 'id' or 'file_name': {entry}")
        ids.append(entry["id"])
        paths.append(str(folder / entry["file_name"]))
    row = {image_id: i for i, image_id in enumerate(ids)}
    captions: list[list[str]] = [[] for _ in ids]
    for ann in data["annotations"]:
        image_id = ann.get("image_id")
        if image_id not in row:
            raise ValueError(f"{path}: annotation {ann.get('id')} refers to image_id {image_id!r}, which is not in 'images'")
        text = ann.get("caption")
        captions[row[image_id]].append(text.strip() if isinstance(text, str) else "")
    return CaptionSplit(images=paths, captions=captions, scenes=None, image_ids=ids,
                        is_label=np.zeros(len(ids), dtype=bool))


def load_coco(annotations: str | os.PathLike, image_root: str | os.PathLike, merge_restval: bool = True,
              test_fraction: float = 0.5, split_seed: int = 0) -> dict[str, CaptionSplit]:
    """``{"train", "val", "test"}`` from a Karpathy ``dataset_coco.json``, one official
    ``captions_*.json`` or a folder of them (format detected from the content; see the module
    docstring for how official images get their split)."""
    ann, root = Path(annotations), Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO image root not found: {root}")
    if ann.is_file():
        data = _read_json(ann)
        if detect_format(data, ann) == "karpathy":
            return {split: load_karpathy_split(ann, root, split, merge_restval) for split in KARPATHY_SPLITS}
        parts = [(ann, load_official_captions(ann, root, data))]
    else:
        parts = [(f, load_official_captions(f, root)) for f in _official_files(ann)]
    rows: dict[str, list[tuple[CaptionSplit, int]]] = {s: [] for s in KARPATHY_SPLITS}
    for file, split in parts:
        for i, image in enumerate(split.images):
            if "train" in file.stem:
                rows["train"].append((split, i))
            else:  # held-out official images: val or test by a seeded hash of the file name
                rows[hash_split(Path(image).name, split_seed, 1.0 - test_fraction, test_fraction)].append((split, i))
    return {name: _gather(items) for name, items in rows.items()}


def _gather(items: list[tuple[CaptionSplit, int]]) -> CaptionSplit:
    return CaptionSplit(images=[s.images[i] for s, i in items], captions=[s.captions[i] for s, i in items], scenes=None,
                        image_ids=[s.image_ids[i] for s, i in items], is_label=np.zeros(len(items), dtype=bool))
