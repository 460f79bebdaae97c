"""Decoding image files: the one place rlrefine reads an image from disk.

Where it sits: the bottom of the flow (`rlrefine.data`). Every reader of file-backed data (the
batch stream, evaluation, folder captioning, webdataset shards) decodes through `load_image`, so a
corrupt or missing file is always the same `BadImageError`, naming the file; what happens next is
the recipe's `data.bad_image` policy (`error` or `skip`, applied by the caller).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BadImageError", "fit_square", "load_image"]


class BadImageError(RuntimeError):
    """An image file that cannot be opened or decoded; the message names the file."""


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
        im = fit_square(im, image_size)
    return np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def fit_square(im, size: int):
    from PIL import Image

    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))
