"""rlrefine/data/webdataset.py: DiCO-layout tar shards (`<key>.jpg` + `<key>.txt` | `<key>.json`)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rlrefine.data.images import BadImageError
from rlrefine.data.split import DataIssues
from rlrefine.data.webdataset import expand_urls, iter_webdataset, load_webdataset_split


def _jpeg(colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(colour, size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(tmp_path):
    """Two shards written with webdataset.TarWriter: .txt captions in one, .json in the other."""
    with wds.TarWriter(str(tmp_path / "train-000.tar")) as w:
        w.write({"__key__": "a0", "jpg": _jpeg((255, 0, 0)), "txt": "a red square\na square that is red\n"})
        w.write({"__key__": "a1", "jpg": _jpeg((0, 0, 255)), "txt": "a blue square"})
    with wds.TarWriter(str(tmp_path / "train-001.tar")) as w:
        w.write({"__key__": "b0", "png": _png((0, 255, 0)), "json": json.dumps({"captions": ["a green square", "green"]})})
        w.write({"__key__": "b1", "jpg": _jpeg((255, 255, 0)), "json": json.dumps({"caption": "a yellow square"})})
    return str(tmp_path / "train-{000..001}.tar")


def test_iter_streams_images_and_captions_in_shard_order(tmp_path):
    urls = write_shards(tmp_path)
    assert len(expand_urls(urls)) == 2
    samples = list(iter_webdataset(urls, with_keys=True))
    assert [k for k, _, _ in samples] == ["a0", "a1", "b0", "b1"]
    assert samples[0][2] == ["a red square", "a square that is red"]
    assert samples[2][2] == ["a green square", "green"]
    assert samples[3][2] == ["a yellow square"]
    img = samples[0][1]
    assert img.dtype == np.uint8 and img.shape == (30, 40, 3)
    assert img[..., 0].mean() > 240 and img[..., 2].mean() < 15  # red survived the JPEG round trip
    assert samples[2][1].shape == (24, 24, 3) and samples[2][1][..., 1].min() == 255  # PNG is lossless

    # Plain 2-tuples by default; the iterator is lazy (a generator), one sample at a time.
    it = iter_webdataset(urls, image_size=16)
    image, caps = next(it)
    assert image.shape == (16, 16, 3) and caps[0] == "a red square"


def test_load_split_materialises_fixed_size_images(tmp_path):
    urls = write_shards(tmp_path)
    split = load_webdataset_split(urls, image_size=20)
    assert split.images.shape == (4, 20, 20, 3) and split.images.dtype == np.uint8
    assert split.image_ids == ["a0", "a1", "b0", "b1"]
    assert not split.is_label.any()
    assert len(load_webdataset_split(urls, image_size=20, max_samples=3)) == 3


def test_bad_samples_follow_the_policy(tmp_path):
    # Written with tarfile directly, as a broken export could leave them.
    path = tmp_path / "bad-000.tar"
    members = {
        "k0.jpg": _jpeg((10, 200, 10)), "k0.txt": b"a good one\n\n   \n",       # 2 empty lines dropped
        "k1.jpg": b"\xff\xd8 this is not a jpeg", "k1.txt": b"a corrupt image",  # undecodable
        "k2.jpg": _jpeg((0, 0, 0)), "k2.json": b'{"captions": ["", "  "]}',      # no caption left
        "k3.txt": b"a caption without an image",                                 # no image member
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with pytest.raises(BadImageError, match="k1"):
        list(iter_webdataset(str(path)))

    issues = DataIssues()
    got = list(iter_webdataset(str(path), bad_image="skip", issues=issues, with_keys=True))
    assert [(k, caps) for k, _, caps in got] == [("k0", ["a good one"])]
    assert issues.as_dict() == {"bad_images": 1, "empty_captions": 4, "images_without_captions": 2, "captions_truncated": 0}


def test_missing_shard_is_named(tmp_path):
    write_shards(tmp_path)  # train-000.tar and train-001.tar exist, train-002.tar does not
    with pytest.raises(FileNotFoundError, match="1 shard.*train-002.tar"):
        next(iter_webdataset(str(tmp_path / "train-{000..002}.tar")))


def test_recipe_kind_webdataset_loads_splits(tmp_path):
    from rlrefine.config import RecipeError, load_recipe
    from rlrefine.data.sources import load_splits

    urls = write_shards(tmp_path)
    cfg = load_recipe(None, ["data.kind=webdataset", f"data.webdataset.urls={urls}", "data.webdataset.num_val=1",
                             "data.image_size=16"])
    splits = load_splits(cfg.data)
    assert len(splits["train"]) == 3 and len(splits["val"]) == 1 and splits["test"] is splits["val"]
    assert splits["val"].image_ids == ["b1"] and splits["train"].images.shape == (3, 16, 16, 3)

    with pytest.raises(RecipeError, match="data.webdataset.urls"):
        load_recipe(None, ["data.kind=webdataset", f"data.webdataset.urls={tmp_path}/x-{{0..1}}.tar"])
    with pytest.raises(RecipeError, match="data.webdataset is missing"):
        load_recipe(None, ["data.kind=webdataset"])
