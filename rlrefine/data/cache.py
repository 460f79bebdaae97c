"""The on-disk cache of splits: a generated dataset written once and reloaded bit-identically.

Where it sits: `rlrefine.data`, above `split` (the container) and `shapes` (whose scenes it stores).
`save_split` / `load_split` write and read ``<dir>/<name>.npz`` (images, is_label) plus
``<dir>/<name>.json`` (captions, scenes, ids, paths); `load_or_generate_shapes` keeps a generated shapes
dataset in a folder and regenerates it only when its config changed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rlrefine.data.shapes import SPLITS, Scene, ShapesConfig, generate_shapes
from rlrefine.data.split import CaptionSplit

__all__ = ["load_or_generate_shapes", "load_split", "save_split"]


def _paths(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"{name}.npz", d / f"{name}.json"


def save_split(split: CaptionSplit, directory: str | os.PathLike, name: str) -> None:
    """Write ``split`` to ``directory/name.npz`` + ``directory/name.json``.

    Each file is written to a temporary name and renamed, so a killed run never leaves a
    half-written cache that `load_split` would accept.
    """
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


def _config_json(cfg: ShapesConfig) -> dict:
    d = asdict(cfg)
    d["held_out"] = [list(p) for p in cfg.held_out]
    return d


def load_or_generate_shapes(cfg: ShapesConfig, cache_dir: str | os.PathLike) -> dict[str, CaptionSplit]:
    """The shapes splits, loaded from ``cache_dir`` when it holds a dataset generated from the same
    config, else generated and written there (``<split>.npz`` + ``<split>.json`` +
    ``shapes_config.json``, the config written last so an interrupted write is regenerated)."""
    d = Path(cache_dir)
    marker = d / "shapes_config.json"
    if marker.is_file():
        with open(marker) as f:
            if json.load(f) == _config_json(cfg):
                return {name: load_split(d, name) for name in SPLITS}
    splits = generate_shapes(cfg)
    for name in SPLITS:
        save_split(splits[name], d, name)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".shapes_config.json.tmp"
    with open(tmp, "w") as f:
        json.dump(_config_json(cfg), f, indent=1)
    os.replace(tmp, marker)
    return splits
