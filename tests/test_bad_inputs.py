"""Bad inputs, one test per case: each gives a clear message or a counted skip, and nothing else is
lost (the policy is documented on `rlrefine.config.DataSection`).

Cases: a corrupt image file (COCO-style path dataset, `data.bad_image: error|skip`), an empty or
whitespace-only caption, an image with no caption, a caption longer than `data.max_caption_len`,
a non-finite loss in pretraining, and the official COCO and CSV layouts on broken copies of real
COCO images (corrupt, missing, greyscale and CMYK JPEGs, empty captions).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from rlrefine.config import load_recipe
from rlrefine.data.batches import batch_stream, drop_unreadable, mixing_weights
from rlrefine.data.images import BadImageError, load_image
from rlrefine.data.sources import load_splits
from rlrefine.data.split import CaptionSplit, DataIssues, sanitize_split
from rlrefine.data.tokenizer import CaptionTokenizer
from rlrefine.trainers import pretrain as pretrain_mod
from rlrefine.trainers.loop import NonFiniteLossError

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (230, 230, 20),
           "white": (250, 250, 250), "black": (5, 5, 5), "purple": (150, 20, 150), "orange": (250, 140, 0)}

TINY_MODEL = [
    "device=cpu", "seed=1", "data.image_size=32", "data.max_caption_len=12",
    "model.encoder.image_size=32", "model.encoder.patch_size=8", "model.encoder.width=16", "model.encoder.depth=1",
    "model.encoder.heads=2", "model.d_model=16", "model.n_heads=2", "model.num_slots=2", "model.readout_layers=1",
    "model.num_refine_layers=2", "pretrain.batch_size=8", "pretrain.warmup_steps=1", "pretrain.log_every=1",
    "pretrain.eval_every=1000", "pretrain.checkpoint_every=1000", "pretrain.num_eval_images=2", "pretrain.num_log_images=0",
]
SHAPES = ["data.shapes.num_train=60", "data.shapes.num_val=4", "data.shapes.num_test=4", "data.shapes.num_test_novel=4",
          "data.shapes.image_size=32"]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def coco_dataset(tmp_path, bad: set[tuple[str, int]] = frozenset()):
    """A Karpathy-format dataset_coco.json over PNG files; (split, i) in `bad` is not an image."""
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    entries, names = [], list(COLOURS)
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for i in range(n):
            colour = names[(i + 3 * len(entries)) % len(names)]
            fname = f"{split}_{i}.png"
            data = b"\x89PNG\r\n\x1a\n truncated garbage" if (split, i) in bad else _png(COLOURS[colour])
            (root / "train2014" / fname).write_bytes(data)
            entries.append({"filepath": "train2014", "filename": fname, "split": split, "cocoid": len(entries),
                            "sentences": [{"raw": f"a {colour} picture"}, {"raw": f"an image that is {colour}"}]})
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": entries}))
    return ["data.kind=coco", f"data.coco.annotations={ann}", f"data.coco.image_root={root}"]


def _raw_draws(n: int, probs, seed: int, step: int, batch: int) -> list[int]:
    """The global batch of `step` before any skipping (batch_stream's documented draw)."""
    return np.random.default_rng([seed, step]).choice(n, size=batch, p=probs).tolist()


# ------------------------------------------------------------------------------- corrupt images
def test_corrupt_image_error_stops_with_the_file_named(tmp_path):
    data = coco_dataset(tmp_path, bad={("train", 2)})
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", *data, *TINY_MODEL, "pretrain.steps=3", "data.bad_image=error"])
    with pytest.raises(BadImageError, match=r"train_2\.png.*data\.bad_image=skip"):
        pretrain_mod.pretrain(cfg)
    assert not (tmp_path / "run" / "pretrain" / "model").exists()


def test_locate_loss_without_scenes_is_a_recipe_error(tmp_path):
    """The locate loss needs each image's objects, which only the shapes world records."""
    from rlrefine.config import RecipeError

    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", *coco_dataset(tmp_path), *TINY_MODEL, "pretrain.steps=3",
                             "pretrain.locate_weight=1.0"])
    with pytest.raises(RecipeError, match=r"pretrain\.locate_weight.*data\.kind: shapes.*locate_weight=0"):
        pretrain_mod.pretrain(cfg)


def test_corrupt_image_skip_is_counted_and_the_rest_is_used(tmp_path, caplog):
    data = coco_dataset(tmp_path, bad={("train", 2)})
    steps = 3
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", *data, *TINY_MODEL, f"pretrain.steps={steps}", "data.bad_image=skip"])
    seen: dict[int, list[int]] = {}
    with caplog.at_level(logging.INFO):
        report = pretrain_mod.pretrain(cfg, on_step_end=lambda step, batch, **_: seen.__setitem__(step, batch.index.tolist()))

    probs = mixing_weights(load_splits(cfg.data)["train"], cfg.data.label_weight)
    draws = {s: _raw_draws(6, probs, cfg.seed, s, 8) for s in range(steps)}
    assert any(2 in d for d in draws.values()), "the corrupt image must be drawn for the test to mean anything"
    # Every step ran, with exactly the drawn examples minus the unreadable one.
    assert seen == {s: [i for i in d if i != 2] for s, d in draws.items()}
    assert report["data_issues"]["bad_images"] == 1  # counted once, however often it was drawn
    assert sum("skipping bad image" in r.getMessage() and "train_2.png" in r.getMessage() for r in caplog.records) == 1
    assert any("data issues: bad_images=1" in r.getMessage() for r in caplog.records)  # end-of-run summary
    assert (tmp_path / "run" / "pretrain" / "model" / "model.safetensors").is_file()


TINY_FINETUNE = ["finetune.steps=3", "finetune.batch_size=4", "finetune.num_candidates=2", "finetune.max_len=8",
                 "finetune.warmup_steps=1", "finetune.log_every=1", "finetune.eval_every=1000", "finetune.checkpoint_every=1000",
                 "finetune.reward.kind=cider", "finetune.output=finetune_skip"]


def test_finetuning_follows_the_bad_data_policy(tmp_path, caplog):
    """Fine-tuning reads its batches under the same policy as pretraining: with skip a corrupt training image is
    dropped from its batches and counted in the stage's report.json; with error the run stops naming the file."""
    from rlrefine.trainers.finetune import finetune

    data = coco_dataset(tmp_path, bad={("train", 2)})
    base = [f"run_dir={tmp_path / 'run'}", *data, *TINY_MODEL, "pretrain.steps=2", *TINY_FINETUNE]
    pretrain_mod.pretrain(load_recipe(None, [*base, "data.bad_image=skip"]))
    cfg = load_recipe(None, [*base, "data.bad_image=skip"])
    seen: dict[int, int] = {}
    with caplog.at_level(logging.INFO):
        report = finetune(cfg, on_step_end=lambda step, rollout, **_: seen.__setitem__(step, len(rollout.captions)))
    probs = mixing_weights(load_splits(cfg.data)["train"], 0.0)
    draws = {s: _raw_draws(6, probs, cfg.seed + 1, s, 4) for s in range(3)}  # fine-tuning draws with seed + 1
    assert any(2 in d for d in draws.values()), "the corrupt image must be drawn for the test to mean anything"
    # every step ran on the drawn images minus the unreadable one (2 layers x 2 candidates per image)
    assert seen == {s: 4 * len([i for i in d if i != 2]) for s, d in draws.items()}
    assert report["data_issues"]["bad_images"] == 1
    on_disk = json.loads((tmp_path / "run" / "finetune_skip" / "report.json").read_text())
    assert on_disk["data_issues"]["bad_images"] == 1 and (tmp_path / "run" / "finetune_skip" / "model").is_dir()
    with pytest.raises(BadImageError, match=r"train_2\.png.*data\.bad_image=skip"):
        finetune(load_recipe(None, [*base, "data.bad_image=error", "finetune.output=finetune_error"]))


def test_corrupt_eval_image_is_checked_before_training(tmp_path):
    data = coco_dataset(tmp_path, bad={("val", 1)})
    cfg = load_recipe(None, [*data, *TINY_MODEL])
    val = load_splits(cfg.data)["val"]
    with pytest.raises(BadImageError, match=r"val: .*val_1\.png"):
        drop_unreadable(val, 10, 32, "error", DataIssues(), "val")
    issues = DataIssues()
    kept = drop_unreadable(val, 10, 32, "skip", issues, "val")
    assert issues.bad_images == 1 and len(kept) == 1 and kept.captions == val.captions[:1]


# ---------------------------------------------------------------------------------- captions
def _tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer.train(["a red square", "a blue circle left of a green triangle"])


def test_empty_caption_encode_is_a_clear_value_error():
    tok = _tokenizer()
    for text in ("", "   ", "\t\n "):
        with pytest.raises(ValueError, match="empty or whitespace-only"):
            tok.encode(text)
    with pytest.raises(ValueError, match="caption 1 of the batch"):
        tok.encode_batch(["a red square", "  "])
    assert tok.encode_batch(["a red square"]).shape == (1, 5)  # the good one still encodes


def _split(captions: list[list[str]]) -> CaptionSplit:
    images = np.stack([np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(len(captions))])
    return CaptionSplit(images=images, captions=captions, image_ids=[f"img{i}" for i in range(len(captions))])


def test_empty_captions_are_dropped_and_counted_when_loading(tmp_path, caplog):
    issues = DataIssues()
    split = _split([["a red square", "", "   "], ["a blue circle"], ["\n", "a green triangle"]])
    with caplog.at_level(logging.WARNING):
        clean = sanitize_split(split, issues, "train")
    assert clean.captions == [["a red square"], ["a blue circle"], ["a green triangle"]]
    assert np.array_equal(clean.images, split.images) and clean.image_ids == split.image_ids  # no image lost
    assert issues.empty_captions == 3 and issues.images_without_captions == 0
    assert "dropped 3 empty or whitespace-only captions" in caplog.text
    assert sanitize_split(clean, issues) is clean  # clean data passes untouched

    # The same through a recipe (webdataset shards): load_splits applies the policy.
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as w:
        for i, txt in enumerate(["a red square\n\n  \n", "a blue circle", "a green triangle", "a red circle"]):
            w.write({"__key__": f"k{i}", "png": _png(COLOURS["red"]), "txt": txt})
    cfg = load_recipe(None, ["data.kind=webdataset", f"data.webdataset.urls={tmp_path}/s-0.tar", "data.webdataset.num_val=1",
                             "data.image_size=16"])
    issues = DataIssues()
    splits = load_splits(cfg.data, issues)
    assert splits["train"].captions == [["a red square"], ["a blue circle"], ["a green triangle"]]
    assert issues.empty_captions == 2


def test_image_without_captions_is_skipped_and_counted(caplog):
    issues = DataIssues()
    split = _split([["a red square"], [], ["  ", ""], ["a blue circle"]])
    with caplog.at_level(logging.WARNING):
        clean = sanitize_split(split, issues, "train")
    assert clean.image_ids == ["img0", "img3"] and clean.captions == [["a red square"], ["a blue circle"]]
    assert np.array_equal(clean.images, split.images[[0, 3]])
    assert issues.images_without_captions == 2 and issues.empty_captions == 2
    assert "2 images left without a caption" in caplog.text
    with pytest.raises(ValueError, match="no image has a non-empty caption"):
        sanitize_split(_split([[""], []]))


def test_long_caption_is_truncated_and_counted():
    tok = _tokenizer()
    long = " ".join(["a red square"] * 20)  # 60 words
    split = _split([[long], ["a blue circle"]])
    split = CaptionSplit(images=split.images, captions=split.captions, is_label=np.array([False, False]))
    issues = DataIssues()
    stream = batch_stream(split, tok, batch_size=6, seed=0, start_step=0, max_len=8, label_weight=0.0, image_size=8,
                          issues=issues)
    batches = [next(stream) for _ in range(3)]
    n_long = sum(int(i) == 0 for b in batches for i in b.index)
    assert n_long > 0
    for b in batches:
        assert b.tokens.shape[1] <= 8 and len(b.captions) == 6  # nothing dropped
        for row, i in zip(b.tokens, b.index):
            if int(i) == 0:
                assert row.tolist() == [tok.bos_id, *tok.tokenize(long)[:6], tok.eos_id]  # cut, eos kept
            else:
                assert tok.decode(row) == "a blue circle"
    assert issues.captions_truncated == 1  # the distinct caption, counted once however often drawn


def test_data_issues_are_reported_at_the_end_of_a_run(tmp_path, caplog):
    with wds.TarWriter(str(tmp_path / "s-0.tar")) as w:
        caps = ["a red square\n  \n", "", "a blue circle left of a green triangle " * 5, "a red circle",
                "a green square", "a blue square", "a red triangle", "a blue triangle"]
        for i, txt in enumerate(caps):
            w.write({"__key__": f"k{i}", "png": _png(list(COLOURS.values())[i]), "txt": txt})
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", "data.kind=webdataset", f"data.webdataset.urls={tmp_path}/s-0.tar",
                             "data.webdataset.num_val=2", *TINY_MODEL, "pretrain.steps=3", "pretrain.batch_size=16"])
    with caplog.at_level(logging.INFO):
        report = pretrain_mod.pretrain(cfg)
    assert report["data_issues"] == {"bad_images": 0, "empty_captions": 1, "images_without_captions": 1, "captions_truncated": 1}
    assert json.loads((tmp_path / "run" / "pretrain" / "report.json").read_text())["data_issues"] == report["data_issues"]
    assert "data issues: bad_images=0 empty_captions=1 images_without_captions=1 captions_truncated=1" in caplog.text


# --------------------------------------------------------------------------- non-finite losses
def test_nonfinite_losses_stop_the_run_with_a_checkpoint(tmp_path, caplog):
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", *SHAPES, *TINY_MODEL, "pretrain.steps=20",
                             "pretrain.lr=1e30", "pretrain.max_nonfinite_steps=3"])
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError) as err:
        pretrain_mod.pretrain(cfg)
    msg = str(err.value)
    assert "3 non-finite" in msg and "Lower pretrain.lr (now 1e+30)" in msg and "--resume" in msg
    ckpts = sorted((tmp_path / "run" / "pretrain" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and not ckpts[0].name.endswith(".tmp") and str(ckpts[0]) in msg
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["nonfinite_total"] == 3 and state["step"] < 20
    assert sum("step skipped, no update" in r.getMessage() for r in caplog.records) == 3
    assert not (tmp_path / "run" / "pretrain" / "model").exists()


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch, caplog):
    real_xe = pretrain_mod.xe_loss
    calls = {"n": 0}

    def flaky_xe(*args, **kwargs):
        loss, per_layer = real_xe(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 2 else loss), per_layer

    monkeypatch.setattr(pretrain_mod, "xe_loss", flaky_xe)
    cfg = load_recipe(None, [f"run_dir={tmp_path / 'run'}", *SHAPES, *TINY_MODEL, "pretrain.steps=4", "pretrain.max_nonfinite_steps=2"])
    updated, params = [], {}

    def on_step_end(step, model, **_):
        updated.append(step)
        params[step] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    with caplog.at_level(logging.WARNING):
        report = pretrain_mod.pretrain(cfg, on_step_end=on_step_end)
    assert updated == [0, 2, 3]  # step 1 made no update
    assert report["nonfinite_steps"] == 1
    assert "step 1: non-finite loss" in caplog.text
    weights = load_file(str(tmp_path / "run" / "pretrain" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not torch.equal(params[0], params[3])


# ----------------------------------------------------------- real layouts: broken copies of real images
TINY_COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny_coco"


def _broken_copy(tmp_path: Path, layout: str) -> tuple[list[str], dict[str, Path]]:
    """Six real train images and four val images of tiny_coco copied to tmp_path in `layout` ("official" or "csv"):
    one corrupt, one missing, one greyscale JPEG, one CMYK JPEG, one with an empty caption, one with only empty ones."""
    if not (TINY_COCO / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"the real-image fixture is not there: {TINY_COCO} (CI clones the repository with shared/ beside it)")
    rows: list[tuple[str, str, int, str]] = []  # (folder, file, id, caption)
    for folder, n in (("train2017", 6), ("val2017", 4)):
        data = json.loads((TINY_COCO / "annotations" / f"captions_{folder}.json").read_text())
        for im in data["images"][:n]:
            caps = [a["caption"] for a in data["annotations"] if a["image_id"] == im["id"]]
            rows += [(folder, im["file_name"], im["id"], c) for c in caps]
    files = list(dict.fromkeys((f, name) for f, name, _, _ in rows))
    role = dict(zip(["corrupt", "missing", "grey", "cmyk", "one_empty", "all_empty"], files[:6]))
    for folder, name in files:
        (tmp_path / folder).mkdir(exist_ok=True)
        src, dst = TINY_COCO / folder / name, tmp_path / folder / name
        if (folder, name) == role["missing"]:
            continue
        if (folder, name) == role["corrupt"]:
            dst.write_bytes(src.read_bytes()[:2000])  # a truncated JPEG
        elif (folder, name) in (role["grey"], role["cmyk"]):
            Image.open(src).convert("L" if (folder, name) == role["grey"] else "CMYK").save(dst, format="JPEG")
        else:
            dst.write_bytes(src.read_bytes())
    first_of = {}
    out = []
    for folder, name, image_id, caption in rows:
        key = (folder, name)
        if key == role["all_empty"] or (key == role["one_empty"] and key not in first_of):
            caption = "  "
        first_of.setdefault(key, True)
        out.append((folder, name, image_id, caption))
    if layout == "official":
        (tmp_path / "annotations").mkdir()
        for folder in ("train2017", "val2017"):
            mine = [r for r in out if r[0] == folder]
            images = list({r[2]: {"id": r[2], "file_name": r[1]} for r in mine}.values())
            anns = [{"id": i, "image_id": r[2], "caption": r[3]} for i, r in enumerate(mine)]
            (tmp_path / "annotations" / f"captions_{folder}.json").write_text(json.dumps({"images": images, "annotations": anns}))
        data = ["data.kind=coco", f"data.coco.annotations={tmp_path / 'annotations'}", f"data.coco.image_root={tmp_path}"]
    else:
        with open(tmp_path / "captions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows((f"{folder}/{name}", caption) for folder, name, _, caption in out)
        data = ["data.kind=csv", f"data.csv.path={tmp_path / 'captions.csv'}", f"data.csv.image_root={tmp_path}",
                "data.csv.val_fraction=0.0", "data.csv.test_fraction=0.0"]  # all train: the policy is what is tested
    return data, {k: tmp_path / v[0] / v[1] for k, v in role.items()}


@pytest.mark.parametrize("layout", ["official", "csv"])
def test_real_layouts_follow_the_bad_data_policy_on_broken_copies(tmp_path, layout):
    data, files = _broken_copy(tmp_path, layout)
    cfg = load_recipe(None, [*data, "data.image_size=32"])
    issues = DataIssues()
    train = load_splits(cfg.data, issues)["train"] if layout == "official" else _train_of_all(cfg, issues)
    # empty captions dropped and counted; the image with only empty ones dropped and counted
    assert issues.empty_captions == 1 + 5 and issues.images_without_captions == 1
    assert str(files["all_empty"]) not in train.images and sum("/train2017/" in p for p in train.images) == 5
    assert len(train.captions[train.images.index(str(files["one_empty"]))]) == 4
    # greyscale and CMYK JPEGs load as RGB
    for kind in ("grey", "cmyk"):
        assert Image.open(files[kind]).mode == ("L" if kind == "grey" else "CMYK")
        assert load_image(str(files[kind]), 32).shape == (32, 32, 3)
    # corrupt and missing images: an error that names the file, or skipped and counted
    with pytest.raises(BadImageError, match=files["corrupt"].name + r".*data.bad_image=skip"):
        drop_unreadable(train, len(train), 32, "error", DataIssues(), "train")
    counted = DataIssues()
    kept = drop_unreadable(train, len(train), 32, "skip", counted, "train")
    assert counted.bad_images == 2 and len(kept) == len(train) - 2
    assert {str(files["corrupt"]), str(files["missing"])}.isdisjoint(kept.images)


def _train_of_all(cfg, issues):
    """CSV with val/test fractions 0 leaves val and test empty, which load_splits refuses: read the train split alone."""
    from rlrefine.data.captions_csv import load_caption_csv

    c = cfg.data.csv
    return sanitize_split(load_caption_csv(c.path, c.image_root, 0.0, 0.0)["train"], issues, "train")


def test_decoding_threads_give_the_same_batches(tmp_path):
    """data.num_workers decodes a batch's files in threads: the batches and the bad-image counts are the same."""
    data = coco_dataset(tmp_path, bad={("train", 2)})
    cfg = load_recipe(None, [*data, *TINY_MODEL, "data.bad_image=skip"])
    train = load_splits(cfg.data)["train"]
    tok = CaptionTokenizer.train(train.all_captions())
    runs = []
    for workers in (0, 3):
        issues = DataIssues()
        stream = batch_stream(train, tok, 8, 0, 0, 12, 0.0, 32, bad_image="skip", issues=issues, num_workers=workers)
        runs.append(([next(stream) for _ in range(4)], issues.bad_images))
    (a, bad_a), (b, bad_b) = runs
    assert bad_a == bad_b == 1
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.captions == y.captions and torch.equal(x.index, y.index)
