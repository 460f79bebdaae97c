"""Tests for the disk loaders (COCO Karpathy json, official layout, CSV, image folders) and the training batch
stream (rlrefine.data.batches) on tiny fixtures written to tmp_path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlrefine.data.captions_csv import load_caption_csv
from rlrefine.data.coco import detect_format, load_coco, load_karpathy_split
from rlrefine.data.batches import batch_stream, load_images, mixing_weights
from rlrefine.data.imagefolder import load_image_folder
from rlrefine.data.shapes import ShapesConfig, generate_shapes
from rlrefine.data.split import CaptionSplit, hash_split, hash_unit
from rlrefine.data.tokenizer import CaptionTokenizer


def _write_image(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco"
    entries = []
    for i, (split, folder) in enumerate(
        [
            ("train", "train2014"),
            ("restval", "val2014"),
            ("val", "val2014"),
            ("test", "val2014"),
            ("train", "train2014"),
        ]
    ):
        name = f"COCO_{folder}_{i:012d}.jpg"
        _write_image(root / folder / name, size=(40 + i, 30), colour=(10 * i, 100, 200))
        entries.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "cocoid": 1000 + i,
                "sentences": [{"raw": f" A photo number {i}. "}, {"raw": f"Image {i} of a thing"}, {"raw": "  "}],
            }
        )
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return ann, root


def test_karpathy_splits(coco):
    ann, root = coco
    train = load_karpathy_split(ann, root, "train")
    assert train.image_ids == [1000, 1001, 1004]  # restval merged into train
    assert train.images[1] == str(root / "val2014" / "COCO_val2014_000000000001.jpg")
    assert train.captions[0] == ["A photo number 0.", "Image 0 of a thing"]  # stripped, empty dropped
    assert train.scenes is None and not train.is_label.any()
    assert load_karpathy_split(ann, root, "train", merge_restval=False).image_ids == [1000, 1004]
    assert load_karpathy_split(ann, root, "val").image_ids == [1002]
    assert load_karpathy_split(ann, root, "test").image_ids == [1003]
    assert len(load_karpathy_split(ann, root, "train", max_images=2)) == 2


def test_karpathy_errors(coco, tmp_path):
    ann, root = coco
    with pytest.raises(ValueError, match="restval"):
        load_karpathy_split(ann, root, "restval")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_karpathy_split(tmp_path / "missing.json", root)
    (root / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000002.jpg"):
        load_karpathy_split(ann, root, "val", check_files=True)


def test_image_folder(tmp_path):
    _write_image(tmp_path / "golden_retriever" / "b.png")
    _write_image(tmp_path / "golden_retriever" / "a.JPG")
    _write_image(tmp_path / "tabby-cat" / "c.jpeg")
    (tmp_path / "tabby-cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    split = load_image_folder(tmp_path)
    assert split.image_ids == ["golden_retriever/a.JPG", "golden_retriever/b.png", "tabby-cat/c.jpeg"]
    assert split.captions == [["golden retriever"], ["golden retriever"], ["tabby cat"]]
    assert split.is_label.all()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty_class")
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "absent")


def test_batch_images_load_and_resize_from_paths(coco):
    ann, root = coco
    split = load_karpathy_split(ann, root, "train")
    images = load_images(split, np.array([1]), 16)
    assert images.dtype == torch.uint8 and images.shape == (1, 16, 16, 3)
    # The fixture image is a flat colour (10, 100, 200): JPEG + bicubic keep it within a few levels.
    assert (images[0].float().mean((0, 1)) - torch.tensor([10.0, 100.0, 200.0])).abs().max() < 6


def test_batches_are_a_pure_function_of_seed_and_step():
    split = CaptionSplit(
        images=np.zeros((50, 8, 8, 3), np.uint8), captions=[[f"cap {i} {j}" for j in range(5)] for i in range(50)]
    )
    tok = CaptionTokenizer.train(split.all_captions())
    a = [next(batch_stream(split, tok, 16, seed=1, start_step=s, max_len=8, label_weight=0.0, image_size=8)) for s in range(4)]
    b = batch_stream(split, tok, 16, seed=1, start_step=0, max_len=8, label_weight=0.0, image_size=8)
    for batch in a:  # a stream started at step s gives the batch a stream from step 0 gives at step s
        other = next(b)
        assert batch.captions == other.captions and torch.equal(batch.z0_seeds, other.z0_seeds)
    c = next(batch_stream(split, tok, 16, seed=2, start_step=0, max_len=8, label_weight=0.0, image_size=8))
    assert a[0].captions != c.captions
    for batch in a:  # every caption is one of its image's references
        assert all(cap in split.captions[int(i)] for cap, i in zip(batch.captions, batch.index))


def test_mixing_weights_hand_computed():
    split = CaptionSplit(images=np.zeros((4, 2, 2, 3), np.uint8), captions=[["a"], ["b"], ["c"], ["label"]],
                         is_label=np.array([False, False, False, True]))
    assert np.allclose(mixing_weights(split, 0.25), [0.25, 0.25, 0.25, 0.25])  # 0.75 over 3 captioned, 0.25 on the label
    assert np.allclose(mixing_weights(split, 0.05), [0.95 / 3] * 3 + [0.05])
    no_labels = CaptionSplit(images=np.zeros((4, 2, 2, 3), np.uint8), captions=[["a"]] * 4)
    assert np.allclose(mixing_weights(no_labels, 0.05), [0.25] * 4)  # no label data: its share goes to the rest


def test_label_data_is_drawn_at_its_weight_not_its_share():
    flags = np.zeros(1000, dtype=bool)
    flags[900:] = True  # 10 % of the examples are label-only
    split = CaptionSplit(images=np.zeros((1000, 2, 2, 3), np.uint8), captions=[[f"c{i}"] for i in range(1000)], is_label=flags)
    tok = CaptionTokenizer.train(split.all_captions())
    stream = batch_stream(split, tok, 500, seed=0, start_step=0, max_len=4, label_weight=0.05, image_size=2)
    drawn = np.concatenate([next(stream).index.numpy() for _ in range(40)])
    assert abs(flags[drawn].mean() - 0.05) < 0.01  # drawn at the 5 % weight, not at 10 %


def test_shapes_batches_end_to_end():
    splits = generate_shapes(ShapesConfig(num_train=40, num_val=4, num_test=4, num_test_novel=4))
    tok = CaptionTokenizer.train(splits["train"].all_captions())
    b = next(batch_stream(splits["train"], tok, 8, seed=0, start_step=0, max_len=10, label_weight=0.05, image_size=64))
    assert b.images.shape == (8, 64, 64, 3) and b.images.dtype == torch.uint8
    assert b.tokens.shape[0] == 8 and b.tokens.shape[1] <= 10 and (b.tokens[:, 0] == tok.bos_id).all()
    for row, cap, i in zip(b.tokens, b.captions, b.index):
        assert cap in splits["train"].captions[int(i)]
        assert tok.eos_id in row.tolist()
        assert tok.decode(row) == " ".join(cap.split()[:8])  # max_len 10 = bos + 8 words + eos


# ------------------------------------------------------------------ real layouts on real COCO images
TINY_COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny_coco"


@pytest.fixture
def tiny_coco():
    if not (TINY_COCO / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"the real-image fixture is not there: {TINY_COCO} (CI clones the repository with shared/ beside it)")
    return TINY_COCO


def test_official_coco_layout_on_tiny_coco(tiny_coco):
    splits = load_coco(tiny_coco / "annotations", tiny_coco)
    assert {k: len(v) for k, v in splits.items()}["train"] == 50
    assert len(splits["val"]) + len(splits["test"]) == 50 and len(splits["val"]) > 0 and len(splits["test"]) > 0
    assert all(len(refs) == 5 for s in splits.values() for refs in s.captions)
    assert all(Path(p).is_file() for s in splits.values() for p in s.images)
    assert all("/train2017/" in p for p in splits["train"].images) and all("/val2017/" in p for p in splits["test"].images)
    ids = [set(s.image_ids) for s in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # the held-out split is a pure function of (seed, file name): same again, another with another seed
    again = load_coco(tiny_coco / "annotations", tiny_coco)
    assert again["test"].image_ids == splits["test"].image_ids
    other = load_coco(tiny_coco / "annotations", tiny_coco, split_seed=1)
    assert other["test"].image_ids != splits["test"].image_ids
    # one official file alone is read the same way
    val_only = load_coco(tiny_coco / "annotations" / "captions_val2017.json", tiny_coco)
    assert len(val_only["train"]) == 0 and val_only["test"].image_ids == splits["test"].image_ids
    with pytest.raises(ValueError, match="neither a Karpathy"):
        detect_format({"foo": []}, "x.json")


def _tiny_coco_rows(root: Path) -> list[tuple[str, str]]:
    rows = []
    for name in ("train2017", "val2017"):
        data = json.loads((root / "annotations" / f"captions_{name}.json").read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        rows += [(f"{name}/{files[a['image_id']]}", a["caption"]) for a in data["annotations"]]
    return rows


def test_csv_layout_on_tiny_coco(tiny_coco, tmp_path):
    rows = _tiny_coco_rows(tiny_coco)
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "source"])  # extra columns are ignored
        writer.writerows((image, caption, "coco") for image, caption in rows)
    splits = load_caption_csv(path, tiny_coco, val_fraction=0.2, test_fraction=0.2)
    assert sum(len(s) for s in splits.values()) == 100 and all(len(s) > 0 for s in splits.values())
    assert all(len(refs) == 5 for s in splits.values() for refs in s.captions)
    first = rows[0][0]
    where = next(name for name, s in splits.items() if first in s.image_ids)
    s = splits[where]
    assert s.images[s.image_ids.index(first)] == str(tiny_coco / first)
    assert hash_split(first, 0, 0.2, 0.2) == where
    # a file without the image,caption header is refused with the columns it has
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na.jpg,a cat\n")
    with pytest.raises(ValueError, match=r"must name the columns \['image', 'caption'\].*\['file', 'text'\]"):
        load_caption_csv(bad, tiny_coco)


def test_hash_split_fractions():
    names = [f"{i:012d}.jpg" for i in range(4000)]
    got = [hash_split(n, 0, 0.1, 0.2) for n in names]
    assert abs(got.count("test") / 4000 - 0.2) < 0.03 and abs(got.count("val") / 4000 - 0.1) < 0.03
    assert hash_unit("a.jpg", 0) == hash_unit("a.jpg", 0) != hash_unit("a.jpg", 1)
