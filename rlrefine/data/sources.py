"""Which data a recipe trains on: one loader per `data.kind`, and the splits every stage reads.

Where it sits: `rlrefine.data`, the one place the data kinds are dispatched. `DATA_KINDS` maps each
kind to its loader, ``loader(data_section, issues) -> {split_name: CaptionSplit}``; the recipe's
`data.kind` choices are this table's keys. Adding a data kind: a loader module in `rlrefine.data`
that returns `CaptionSplit`s, one entry here, and its section in `rlrefine.config.DataSection`.

`load_splits` applies what every kind shares: ``data.max_images`` (the first N images of every split),
the empty-split check, and `sanitize_split` (empty captions and captionless images dropped, counted).
The data section is read by attribute (duck-typed), so this layer imports nothing from the config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from rlrefine.data.split import CaptionSplit, DataIssues, sanitize_split

__all__ = ["DATA_KINDS", "load_splits"]


def _shapes(data: Any, issues: DataIssues) -> dict[str, CaptionSplit]:
    s = data.shapes
    return dict(_rendered_shapes(s.image_size, s.num_train, s.num_val, s.num_test, s.num_test_novel, s.max_objects, s.seed,
                                 s.label_fraction, s.references))


@functools.lru_cache(maxsize=1)
def _rendered_shapes(image_size: int, num_train: int, num_val: int, num_test: int, num_test_novel: int,
                     max_objects: int, seed: int, label_fraction: float, references: str) -> dict[str, CaptionSplit]:
    """`generate_shapes`, rendered once per process and world: `rlrefine run` reads the same splits in every stage
    (≈ 5 s each at the default size). Every stage shares these arrays: none writes into them."""
    from rlrefine.data.shapes import ShapesConfig, generate_shapes

    return generate_shapes(ShapesConfig(
        image_size=image_size, num_train=num_train, num_val=num_val, num_test=num_test, num_test_novel=num_test_novel,
        max_objects=max_objects, seed=seed, label_fraction=label_fraction, references=references,
    ))


def _coco(data: Any, issues: DataIssues) -> dict[str, CaptionSplit]:
    """Karpathy or official COCO captions, detected from the file."""
    from rlrefine.data.coco import load_coco

    c = data.coco
    return load_coco(c.annotations, c.image_root, c.use_restval, c.test_fraction, c.split_seed)


def _csv(data: Any, issues: DataIssues) -> dict[str, CaptionSplit]:
    from rlrefine.data.captions_csv import load_caption_csv

    c = data.csv
    return load_caption_csv(c.path, c.image_root, c.val_fraction, c.test_fraction, c.split_seed)


def _webdataset(data: Any, issues: DataIssues) -> dict[str, CaptionSplit]:
    """Tar shards, materialised in memory (the step-indexed batch stream needs random access)."""
    from rlrefine.data.webdataset import load_webdataset_split

    w = data.webdataset
    train = load_webdataset_split(w.urls, data.image_size, w.max_samples, data.bad_image, issues)
    if w.val_urls is None:
        if len(train) <= w.num_val:
            raise ValueError(f"data.webdataset: {len(train)} samples cannot spare num_val={w.num_val} for val; give val_urls or lower num_val")
        train, val = train.subset(range(len(train) - w.num_val)), train.subset(range(len(train) - w.num_val, len(train)))
    else:
        val = load_webdataset_split(w.val_urls, data.image_size, None, data.bad_image, issues)
    test = val if w.test_urls is None else load_webdataset_split(w.test_urls, data.image_size, None, data.bad_image, issues)
    return {"train": train, "val": val, "test": test}


DATA_KINDS: dict[str, Callable[[Any, DataIssues], dict[str, CaptionSplit]]] = {
    "shapes": _shapes,
    "coco": _coco,
    "csv": _csv,
    "webdataset": _webdataset,
}


def load_splits(data: Any, issues: DataIssues | None = None) -> dict[str, CaptionSplit]:
    """The recipe's data (its `data` section) as `{split_name: CaptionSplit}`: train, val, test, and
    test_novel for shapes.

    ``data.max_images`` keeps the first N images of each split (before the policy below).
    Every split goes through `sanitize_split` (empty captions and captionless images dropped);
    what was dropped is added to ``issues``.
    """
    issues = issues if issues is not None else DataIssues()
    if data.kind not in DATA_KINDS:
        raise ValueError(f"unknown data.kind {data.kind!r}; choose one of {', '.join(DATA_KINDS)}")
    splits = DATA_KINDS[data.kind](data, issues)
    if data.max_images is not None:
        splits = {name: split.subset(range(min(data.max_images, len(split)))) for name, split in splits.items()}
    empty = [name for name in ("train", "val", "test") if name in splits and len(splits[name]) == 0]
    if empty:
        raise ValueError(f"data ({data.kind}): the {', '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty; "
                         "check the annotations (COCO: the official layout needs a captions_*train*.json for train and "
                         "another file for val/test) or the split fractions")
    return {name: sanitize_split(split, issues, name) for name, split in splits.items()}
