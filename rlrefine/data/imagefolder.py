"""Image-folder classification data as label-only captions ("ImageNet style").

Where it sits: `rlrefine.data`, beside `shapes` and `coco`. ``root/<class_name>/*.jpg`` becomes a
`CaptionSplit` of file paths whose one "caption" is the class name as text (underscores to
spaces: ``golden_retriever`` -> "golden retriever"), flagged ``is_label=True`` so the sampler can
weight it low (`data.label_weight`: the model should not learn to answer in single words).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rlrefine.data.split import CaptionSplit

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS", "label_text"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def label_text(class_name: str) -> str:
    """Folder name -> label text: underscores and hyphens to spaces, whitespace collapsed."""
    return " ".join(class_name.replace("_", " ").replace("-", " ").split())


def load_image_folder(
    root: str | os.PathLike,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    max_per_class: int | None = None,
) -> CaptionSplit:
    """Every image under ``root/<class_name>/`` (sorted, one level deep) with its label text.

    Image ids are the paths relative to ``root``. Raises FileNotFoundError for a missing root and
    ValueError when no class folder holds an image.
    """
    r = Path(root)
    if not r.is_dir():
        raise FileNotFoundError(f"image folder root not found: {r}")
    exts = tuple(e.lower() for e in extensions)
    paths: list[str] = []
    captions: list[list[str]] = []
    ids: list[str] = []
    for class_dir in sorted(p for p in r.iterdir() if p.is_dir()):
        text = label_text(class_dir.name)
        if not text:
            continue
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in exts)
        for p in files[:max_per_class]:
            paths.append(str(p))
            captions.append([text])
            ids.append(str(p.relative_to(r)))
    if not paths:
        raise ValueError(f"no images with extensions {list(exts)} in class folders under {r}")
    return CaptionSplit(
        images=paths, captions=captions, scenes=None, image_ids=ids, is_label=np.ones(len(paths), dtype=bool)
    )
