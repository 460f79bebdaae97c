"""Image–caption tar shards in the webdataset layout used by the DiCO reference code.

Where it sits: `rlrefine.data`, beside `coco` and `shapes`. A shard is a tar file whose members
are grouped by key (the file name up to the first dot)::

    000000001.jpg   000000001.txt      # one caption per line
    000000002.png   000000002.json     # {"captions": ["...", ...]} or {"caption": "..."}

`iter_webdataset` streams ``(image uint8 [H, W, 3], captions)`` through the `webdataset` library,
one shard after another, so a dataset far larger than memory can be read; `load_webdataset_split`
materialises the first N samples as an in-memory `CaptionSplit` (what the trainers' step-indexed
batch stream consumes; fine for small shards and debug runs).

The bad-input policy is the one of `rlrefine.config.DataSection`: empty or whitespace-only
captions are dropped, a sample left without captions is skipped, an image that cannot be decoded
raises `BadImageError` (naming shard and key) or, with ``bad_image="skip"``, is skipped; every
skip is counted in a `DataIssues`. Shard paths are local (brace patterns such as
``train-{000..099}.tar`` are expanded); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Iterator, Literal

import numpy as np

from rlrefine.data.images import BadImageError, fit_square
from rlrefine.data.split import CaptionSplit, DataIssues

__all__ = ["IMAGE_KEYS", "expand_urls", "parse_captions", "iter_webdataset", "load_webdataset_split"]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
"""Member extensions read as the image of a sample (the first one present wins)."""


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard paths of a brace pattern (``a-{000..002}.tar``) or a list of patterns."""
    import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    out = [u for p in patterns for u in braceexpand.braceexpand(p)]
    if not out:
        raise ValueError(f"no shard paths in {urls!r}")
    return out


def parse_captions(sample: dict) -> list[str]:
    """All captions of a raw sample (`.txt`: one per line; `.json`: "captions" list or "caption"),
    unfiltered (empty ones included; the caller applies the policy)."""
    if "txt" in sample:
        return sample["txt"].decode("utf-8").splitlines()
    if "json" in sample:
        meta = json.loads(sample["json"].decode("utf-8"))
        if isinstance(meta, dict):
            caps = meta.get("captions", meta.get("caption", []))
        else:
            caps = meta
        caps = [caps] if isinstance(caps, str) else list(caps)
        return [c for c in caps if isinstance(c, str)]
    return []


def _decode_image(data: bytes, where: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")  # forces the decode, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot read image {where}: {type(e).__name__}: {e}") from e
    if image_size is not None:
        im = fit_square(im, image_size)
    return np.asarray(im, dtype=np.uint8)


def iter_webdataset(
    urls: str | list[str],
    image_size: int | None = None,
    bad_image: Literal["error", "skip"] = "error",
    issues: DataIssues | None = None,
    with_keys: bool = False,
) -> Iterator[tuple]:
    """Stream ``(image, captions)`` (or ``(key, image, captions)`` with ``with_keys``) from the
    shards, in shard order, one sample in memory at a time.

    ``image``: uint8 [H, W, 3] (resized on the shorter side and centre-cropped to ``image_size``
    when given); ``captions``: the non-empty captions, stripped. Samples without an image member,
    or left without captions, are skipped and counted in ``issues``.
    """
    import webdataset as wds

    if bad_image not in ("error", "skip"):
        raise ValueError(f"bad_image must be 'error' or 'skip', got {bad_image!r}")
    issues = issues if issues is not None else DataIssues()
    shards = expand_urls(urls)
    missing = [u for u in shards if not _is_file(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]} (local paths only)")
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    for sample in dataset:
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}:{key}"
        raw = parse_captions(sample)
        captions = [c.strip() for c in raw if c.strip()]
        issues.empty_captions += len(raw) - len(captions)
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if not captions or image_key is None:
            issues.images_without_captions += 1
            logger.warning("skipping sample %s: %s", where, "no caption" if image_key else "no image member")
            continue
        try:
            image = _decode_image(sample[image_key], where, image_size)
        except BadImageError as e:
            if bad_image == "error":
                raise
            issues.bad_images += 1
            logger.warning("skipping bad image (%d so far): %s", issues.bad_images, e)
            continue
        yield (key, image, captions) if with_keys else (image, captions)


def _is_file(path: str) -> bool:
    from pathlib import Path

    return Path(path.removeprefix("file:")).expanduser().is_file()


def load_webdataset_split(
    urls: str | list[str],
    image_size: int,
    max_samples: int | None = None,
    bad_image: Literal["error", "skip"] = "error",
    issues: DataIssues | None = None,
) -> CaptionSplit:
    """The first ``max_samples`` (default: all) usable samples of the shards as an in-memory
    `CaptionSplit` (images uint8 [N, image_size, image_size, 3], image ids = sample keys)."""
    images, captions, keys = [], [], []
    for key, image, caps in iter_webdataset(urls, image_size, bad_image, issues, with_keys=True):
        images.append(image)
        captions.append(caps)
        keys.append(key)
        if max_samples is not None and len(images) >= max_samples:
            break
    if not images:
        raise ValueError(f"no usable image-caption sample in the shards {urls!r}")
    return CaptionSplit(images=np.stack(images), captions=captions, scenes=None, image_ids=keys,
                        is_label=np.zeros(len(images), dtype=bool))
