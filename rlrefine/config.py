"""Typed recipe configuration: the one schema every `rlrefine` command reads.

A recipe is a YAML file (see `recipes/`). It is validated in full when loaded, before any model is
built: unknown keys, wrong types, out-of-range values and missing user-given files are reported
together, each naming the dotted key and, for unknown keys, the keys that are allowed there.
Command-line overrides use dotted keys, `pretrain.steps=100 model.num_refine_layers=6`, and their
values are parsed as YAML scalars (so `true`, `3`, `1e-4`, `[1, 2]` mean what they look like). Recipe
files and overrides are read with YAML 1.2 booleans: only `true` / `false` are booleans, so
`pretrain.mixed_precision=no` is the string "no" (YAML 1.1 would read `no`, `yes`, `on`, `off` as
booleans); boolean fields still accept `yes` / `no` / `on` / `off`, which pydantic converts.

Outside paths are given once, in the top-level `paths:` section (`paths.annotations`,
`paths.images`, `paths.encoder_checkpoint`, `paths.reward_checkpoint`), and the rest of the recipe
refers to them as `${paths.KEY}` inside any string value, e.g. `checkpoint: ${paths.reward_checkpoint}`
or `image_root: ${paths.images}/train2017`. References are resolved after the overrides are merged
and before validation, so `paths.images=/data/coco` on the command line reaches every key that
refers to it. A reference to a path that is not set (null) or to a key `paths:` does not have is an
error naming the key that refers to it and the path to give.

Where the values come from: the shapes defaults are the embedded default (docs/design.md); the DiCO
defaults follow the DiCO paper (Moratelli et al. 2024: β = 0.2, 5 beams, lr 1e-6 at COCO scale).

Two parts of the schema come from registries, so that adding a reward or a fine-tuning method is one
module: the reward kinds (`rewards.registry.REWARDS`: `RewardSection.kind` and which keys each kind
reads) and the fine-tuning methods (`rlrefine.methods.METHODS`: `FinetuneSection.method` and one section
``finetune.<method>`` per method, defined beside the method). The data kinds come from
`rlrefine.data.sources.DATA_KINDS`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from rewards.distill import DistillConfig, StudentHeadConfig
from rewards.evaluator import EvaluatorConfig
from rewards.matching import MatchingHeadConfig
from rewards.registry import OPTIONAL_FIELDS, REWARDS, RewardContext, validate_section
from rewards.text_student import TextStudentConfig
from rlrefine.data.sources import DATA_KINDS
from rlrefine.methods import METHODS

# The rewards package's own config dataclasses are recipe sections too (one schema, one name);
# unknown keys in them are errors like everywhere else.
EvaluatorConfig.__pydantic_config__ = ConfigDict(extra="forbid")
DistillConfig.__pydantic_config__ = ConfigDict(extra="forbid")
MatchingHeadConfig.__pydantic_config__ = ConfigDict(extra="forbid")
StudentHeadConfig.__pydantic_config__ = ConfigDict(extra="forbid")
TextStudentConfig.__pydantic_config__ = ConfigDict(extra="forbid")

LayerWeighting = Literal["linear", "log", "uniform", "final"]
ScheduleKind = Literal["linear", "geometric"]


class RecipeError(ValueError):
    """A recipe (or an override) is invalid. The message lists every problem and how to fix it."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _existing_path(value: str | None, what: str) -> str | None:
    if value is not None and not Path(value.removeprefix("local-dir:")).expanduser().exists():
        raise ValueError(f"{what} '{value}' does not exist; give a local path (nothing is downloaded)")
    return value


# ----------------------------------------------------------------------------------------- data
class ShapesSection(Section):
    """The procedural shapes dataset (rlrefine.data.shapes), generated from `seed`."""

    image_size: int = Field(64, ge=16, le=512, description="square image side in pixels")
    num_train: int = Field(20000, ge=1, description="training images")
    num_val: int = Field(500, ge=1, description="validation images")
    num_test: int = Field(1000, ge=1, description="test images")
    num_test_novel: int = Field(1000, ge=1, description="images with held-out colour-shape combinations")
    max_objects: int = Field(3, ge=1, le=3, description="objects per image are 1..max_objects")
    label_fraction: float = Field(0.1, ge=0.0, le=1.0, description="extra label-only examples, as a fraction of num_train")
    references: Literal["salient", "complete"] = Field(
        "salient", description="salient: references name the most salient object and leave others out with a probability "
                               "that grows with their rank, as people do; complete: every reference names every object. The "
                               "teacher evaluator always learns from complete descriptions (rlrefine.data.shapes)")
    seed: int = Field(0, description="seed of the generated dataset")


class PathsSection(Section):
    """Every outside path of a recipe, given once; the rest of the recipe refers to them as
    `${paths.KEY}` (see the module docstring). A key left null is fine as long as nothing refers to it."""

    annotations: str | None = Field(None, description="caption annotations: Karpathy dataset_coco.json, an official COCO "
                                     "captions_*.json or the annotations/ folder holding them, or an image,caption CSV file")
    images: str | None = Field(None, description="image root folder (COCO: the folder holding train2017/, val2017/ or train2014/, val2014/)")
    encoder_checkpoint: str | None = Field(None, description="open_clip checkpoint of the captioner's image encoder")
    reward_checkpoint: str | None = Field(None, description="CLIP / PAC-S checkpoint of the reward and the evaluation scores")


class CocoSection(Section):
    """COCO captions, in the Karpathy split format or the official COCO caption format, detected from
    the file (rlrefine.data.coco): Karpathy `dataset_coco.json` ({"images": [{"split", "filename",
    "sentences"}]}), or official `captions_<name>.json` files ({"images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]}), one file or the folder that holds them.

    Official files carry no Karpathy split: images of a file named `*train*` are train; the images of
    the other files (val2017) are divided by a seeded hash of the file name, `test_fraction` of them
    test and the rest val (COCO 2017 has no captioned test set; the Karpathy val/test also come from
    COCO val). Official images are looked for in `image_root/<name>/` (e.g. train2017/) when that
    folder exists, else in `image_root` itself.
    """

    annotations: str = Field(description="dataset_coco.json, a captions_*.json file, or a folder of captions_*.json")
    image_root: str = Field(description="folder that holds the COCO image folders (train2014/, val2014/ or train2017/, val2017/)")
    use_restval: bool = Field(True, description="Karpathy: count the 'restval' images as train (the standard 113k-image split)")
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="official format: share of the non-train images (val2017) "
                                 "that become the test split, by a seeded hash of the file name; the rest are val")
    split_seed: int = Field(0, description="seed of the file-name hash that assigns splits where the format has none")

    @model_validator(mode="after")
    def _paths_exist(self) -> "CocoSection":
        _existing_path(self.annotations, "data.coco.annotations")
        _existing_path(self.image_root, "data.coco.image_root")
        return self


class CsvSection(Section):
    """Captions in a CSV file with the header `image,caption`: one row per caption, several rows per
    image (rlrefine.data.captions_csv). `image` is a path relative to `image_root` (or absolute).
    The file carries no split: each image goes to test, val or train by a seeded hash of its name,
    `test_fraction` and `val_fraction` of the images, the rest train."""

    path: str = Field(description="the CSV file (header: image,caption)")
    image_root: str = Field(description="folder the `image` column is relative to")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of the images that become the val split")
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of the images that become the test split")
    split_seed: int = Field(0, description="seed of the file-name hash that assigns the splits")

    @model_validator(mode="after")
    def _paths_exist(self) -> "CsvSection":
        _existing_path(self.path, "data.csv.path")
        _existing_path(self.image_root, "data.csv.image_root")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction ({self.val_fraction} + {self.test_fraction}) must be < 1: "
                             "some images must be left for train")
        return self


class WebDatasetSection(Section):
    """Tar shards in the DiCO / webdataset layout: `<key>.jpg` (or .png/.jpeg/.webp) with `<key>.txt`
    (one caption per line) or `<key>.json` ({"captions": [...]} or {"caption": "..."})."""

    urls: str = Field(description="local shard path pattern, brace-expandable, e.g. /data/coco/train-{000000..000099}.tar")
    val_urls: str | None = Field(None, description="shards of the val split (default: the last num_val samples of `urls`)")
    test_urls: str | None = Field(None, description="shards of the test split (default: val)")
    num_val: int = Field(500, ge=1, description="samples held out from `urls` for val when val_urls is not given")
    max_samples: int | None = Field(None, ge=1, description="read at most this many training samples (the split is materialised in memory)")

    @model_validator(mode="after")
    def _shards_exist(self) -> "WebDatasetSection":
        import braceexpand

        for key in ("urls", "val_urls", "test_urls"):
            pattern = getattr(self, key)
            if pattern is None:
                continue
            missing = [u for u in braceexpand.braceexpand(pattern) if not Path(u).expanduser().is_file()]
            if missing:
                raise ValueError(f"data.webdataset.{key}: {len(missing)} shard(s) not found, e.g. '{missing[0]}' (local paths only)")
        return self


class DataSection(Section):
    """Which data a run trains on, and the policy for bad inputs.

    Bad-input policy (counted in `rlrefine.data.split.DataIssues`, logged at the end of every training stage and
    written to its report.json):
    empty or whitespace-only captions are dropped when a dataset is loaded, and an image left without
    any caption is dropped with them (every layout: shapes, COCO in both formats, CSV, webdataset);
    a caption longer than `max_caption_len` tokens is truncated (eos kept); an image that cannot be
    decoded or is missing follows `bad_image`; greyscale, CMYK and palette images are converted to
    RGB when decoded (not errors). Encoding an empty caption directly with
    `CaptionTokenizer.encode` is a ValueError that names it.
    """

    kind: Literal[tuple(DATA_KINDS)] = Field("shapes", description="which dataset: shapes (embedded, generated), coco (Karpathy or official json), csv (image,caption rows), webdataset (tar shards)")
    shapes: ShapesSection = ShapesSection()
    coco: CocoSection | None = None
    csv: CsvSection | None = None
    webdataset: WebDatasetSection | None = None
    max_images: int | None = Field(None, ge=1, description="keep only the first N images of every split (quick checks; "
                                   "the dry run sets it)")
    label_weight: float = Field(0.05, ge=0.0, le=1.0, description="sampling weight of label-only examples (kept low so the model does not learn to answer in single words)")
    image_size: int = Field(64, ge=16, le=1024, description="size images are loaded at (disk datasets)")
    max_caption_len: int = Field(24, ge=4, le=256, description="tokens incl. bos/eos; longer captions are truncated (eos kept) and counted as captions_truncated")
    bad_image: Literal["error", "skip"] = Field("error", description="a corrupt or unreadable image: 'error' stops the run with a BadImageError naming the file; 'skip' drops it from its batch with a warning, counts it (bad_images) and keeps every other example")
    num_workers: int = Field(0, ge=0, description="threads that decode the image files of a training batch in parallel "
                             "(disk datasets; 0: in the main thread). The batch is the same either way")

    @model_validator(mode="after")
    def _kind_has_section(self) -> "DataSection":
        if self.kind == "coco" and self.coco is None:
            raise ValueError("data.kind is 'coco' but data.coco is missing: give data.coco.annotations and data.coco.image_root")
        if self.kind == "csv" and self.csv is None:
            raise ValueError("data.kind is 'csv' but data.csv is missing: give data.csv.path and data.csv.image_root")
        if self.kind == "webdataset" and self.webdataset is None:
            raise ValueError("data.kind is 'webdataset' but data.webdataset is missing: give data.webdataset.urls (local tar shards)")
        return self


class TokenizerSection(Section):
    """The caption tokenizer of the captioner (saved with every model as tokenizer.json)."""

    kind: Literal["word", "hf", "open_clip"] = Field("word", description="word: trained on the corpus; hf: a local HF tokenizer dir; open_clip: the bundled BPE")
    path: str | None = Field(None, description="local tokenizer directory (kind=hf)")
    min_freq: int = Field(1, ge=1, description="word tokenizer: words seen fewer times become <unk>")

    @model_validator(mode="after")
    def _hf_needs_path(self) -> "TokenizerSection":
        if self.kind == "hf":
            if self.path is None:
                raise ValueError("tokenizer.kind is 'hf' but tokenizer.path is not set")
            _existing_path(self.path, "tokenizer.path")
        return self


# ---------------------------------------------------------------------------------------- model
class EncoderSection(Section):
    """The captioner's image encoder. `evaluator` = the visual tower of this run's learned evaluator
    (written by train-evaluator to <run_dir>/evaluator), loaded through the open_clip backend: on small
    data it is a far better start than a from-scratch encoder, as a CLIP tower is at scale."""

    kind: Literal["tiny_vit", "open_clip", "hf", "evaluator"] = Field("tiny_vit", description="tiny_vit (built in, from scratch), open_clip (a visual tower from a local checkpoint), hf (a transformers vision model dir), evaluator (this run's learned evaluator's tower)")
    image_size: int = Field(64, ge=8, description="tiny_vit: input resolution")
    patch_size: int = Field(8, ge=1, description="tiny_vit: patch side in pixels")
    width: int = Field(128, ge=8, description="tiny_vit: transformer width")
    depth: int = Field(2, ge=1, description="tiny_vit: transformer blocks")
    heads: int = Field(4, ge=1, description="tiny_vit: attention heads")
    stem_channels: int = Field(32, ge=0, description="tiny_vit: channels of a 3x3 conv stem before the patch embedding (0 = plain ViT); learns colours/shapes much faster from scratch")
    model_name: str | None = Field(None, description="open_clip architecture name, e.g. ViT-B-32-quickgelu (OpenAI-derived "
                                   "weights) or ViT-B-32 (open_clip-trained GELU weights)")
    checkpoint: str | None = Field(None, description="local open_clip checkpoint file or local-dir: folder, or HF model dir")
    frozen: bool = Field(False, description="keep the encoder's weights fixed (as a CLIP tower usually is)")
    allow_gelu_for_openai_weights: bool = Field(False, description="load an OpenAI archive or a {'state_dict': ...} (PAC-S "
                                                "layout) checkpoint into a GELU architecture anyway (refused by default: "
                                                "those weights need the -quickgelu architecture)")
    grid_stage: int | None = Field(None, ge=0, le=4, description="open_clip ResNet towers (and evaluator): the cells of this "
                                   "stage (0 stem .. 4 last; each with the later stages' features appended) become more image "
                                   "tokens after [pooled; last-stage dense]. null: none. Shapes: 3 gives a 4x4 grid beside the 2x2")

    @model_validator(mode="after")
    def _backend_fields(self) -> "EncoderSection":
        if self.kind == "open_clip" and (self.checkpoint is None or (self.model_name is None and not self.checkpoint.startswith("local-dir:"))):
            raise ValueError("model.encoder.kind 'open_clip' needs model.encoder.checkpoint (a local file, with model_name, "
                             "or a 'local-dir:' folder that carries its own config)")
        if self.kind == "hf" and self.checkpoint is None:
            raise ValueError("model.encoder.kind 'hf' needs model.encoder.checkpoint (a local model directory)")
        if self.grid_stage is not None and self.kind not in ("open_clip", "evaluator"):
            raise ValueError(f"model.encoder.grid_stage is for open_clip ResNet towers (kind open_clip or evaluator), "
                             f"not kind {self.kind!r}; remove it or set it to null")
        _existing_path(self.checkpoint, "model.encoder.checkpoint")
        return self


class ModelSection(Section):
    """The refinement captioner (docs/design.md): image encoder, K refinement blocks over M slots, a shared readout.
    Its fields are those of `rlrefine.models.CaptionerConfig` (`CaptionerConfig.from_section` reads them by name)."""

    encoder: EncoderSection = EncoderSection()
    d_model: int = Field(128, ge=8, description="width of the text encoding slots and the readout")
    num_slots: int = Field(8, ge=1, description="M, the number of text-encoding slots refined by every block")
    num_refine_layers: int = Field(4, ge=1, le=64, description="K, the number of refinement blocks")
    n_heads: int = Field(4, ge=1, description="attention heads of the refinement blocks and readout")
    readout_layers: int = Field(2, ge=1, description="transformer layers of the shared readout (decoder)")
    mlp_ratio: int = Field(4, ge=1, description="MLP hidden size as a multiple of d_model")
    z0_std: float = Field(1.0, gt=0.0, description="σ of the start noise z_0 ~ N(0, σ²I)")
    image_token_pos: bool = Field(False, description="add a learned embedding per image-token position to the tokens the "
                                  "refinement blocks attend to, so that slots can find grid cells by where they are "
                                  "(shapes: needed for captions that say where things are, docs/shapes_world.md)")
    where_attention: bool = Field(False, description="each refinement cross-attention head also returns where it looked "
                                  "(the attention-weighted mean of the image tokens' places), as the learned evaluator's "
                                  "matching head reads relations; needs an open_clip / evaluator encoder")
    slot_competition: bool = Field(False, description="the refinement blocks' cross-attention is normalised over the "
                                   "slots, as in Slot Attention: slots compete for the image tokens, so slots that start "
                                   "as noise still share out every object instead of all reading the most salient one")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in the refinement blocks and readout")


# ------------------------------------------------------------------------------------- training
class PretrainSection(Section):
    """Teacher-forced (XE) pretraining (docs/design.md, "The math")."""

    steps: int = Field(3000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="images per step (global, over all processes)")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate")
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0, description="cosine decay floor as a fraction of lr")
    encoder_lr_mult: float = Field(1.0, gt=0.0, description="learning-rate multiplier of the image encoder (a from-scratch encoder learns shapes too slowly at the captioner's lr: its signal arrives through the refinement blocks)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps, then cosine decay")
    grad_clip: float = Field(1.0, gt=0.0, description="max gradient norm")
    layer_weights: LayerWeighting = Field("linear", description="w_k of the layer-weighted cross-entropy: linear (w_k = k), log, uniform, final (only K)")
    schedule: ScheduleKind = Field("linear", description="s(k) of the latent graduality regulariser: linear or geometric")
    schedule_eps: float = Field(0.01, gt=0.0, lt=1.0, description="ε of the geometric schedule")
    lambda_grad: float = Field(0.1, ge=0.0, description="weight of the latent graduality regulariser")
    coarse_to_fine: bool = Field(False, description="layer k learns the first 1 − s(k) of each caption's tokens (then eos), "
                                 "layer K the whole caption (optional coarse-to-fine targets, docs/design.md)")
    emphasis_words: list[str] = Field(default_factory=list, description="words whose final-layer cross entropy is "
                                      "weighted up (`rlrefine.losses.word_emphasis_loss`), e.g. the position words "
                                      "[top, bottom, left, right, middle, above, below, over, under]; each must be "
                                      "one token of the caption vocabulary")
    emphasis_weight: float = Field(0.0, ge=0.0, description="weight of the extra cross entropy on emphasis_words themselves")
    emphasis_caption_weight: float = Field(0.0, ge=0.0, description="weight of the extra cross entropy on every token "
                                           "of the captions that hold one of emphasis_words")
    locate_weight: float = Field(0.0, ge=0.0, description="weight of the locate loss (`rlrefine.losses.locate_loss`): at "
                                 "layer K, from the readout's state at each word that names an object, a linear head "
                                 "(the captioner's `locate_head`) says where that object is; 0 = off. Shapes data only "
                                 "(it needs each image's objects)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision: no, bf16 or fp16")
    log_every: int = Field(50, ge=1, description="steps between TensorBoard scalars")
    eval_every: int = Field(500, ge=1, description="steps between val evaluations (and per-layer captions in TensorBoard)")
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable checkpoints")
    num_log_images: int = Field(4, ge=0, description="fixed val images whose per-layer captions go to TensorBoard")
    num_eval_images: int = Field(500, ge=1, description="images used for the test-split report at the end")
    max_nonfinite_steps: int = Field(10, ge=1, description="stop after this many non-finite losses in a row")

    @model_validator(mode="after")
    def _emphasis_has_words(self) -> "PretrainSection":
        if (self.emphasis_weight or self.emphasis_caption_weight) and not self.emphasis_words:
            raise ValueError("pretrain.emphasis_weight / emphasis_caption_weight weigh up pretrain.emphasis_words, which "
                             "is empty: list the words (e.g. [above, below, left, right]) or set the weights to 0")
        return self


class RewardSection(Section):
    """Which reward scores captions (the `rewards` package protocol, rewards/__init__.py). The kinds are the
    reward registry's (`rewards.registry.REWARDS`, each registered by the module that defines it); a kind
    reads only some of the keys below, and setting one it does not read is an error.

    learned / distilled: a directory written by `train-evaluator` / `distill-reward` (default: the
    run's own); clip / refclip / pac / refpac: an open_clip architecture + a local checkpoint file.

    For clip / refclip / pac / refpac the score is `max(scale · cos(E_img, E_txt(prefix + c)), 0)`
    (`clamp`); left unset, `scale`, `prefix` and `clamp` give the official scores: CLIP-S w = 2.5
    (Hessel et al. 2021), PAC-S w = 2.0 (Sarto et al. 2023), prefix "A photo depicts ", clamp at 0.
    The DiCO reference code (aimagelab/DiCO) trains on PAC-S as `2.0 · cos` with no prefix and no
    clamp: `scale: 2.0, prefix: "", clamp: false`.
    """

    kind: Literal[tuple(REWARDS)] = Field(
        "distilled", description="; ".join(f"{k.name}: {k.describe}" for k in REWARDS.values()))
    path: str | None = Field(None, description="a reward directory: the evaluator / student (default: <run_dir>/evaluator or "
                                               "<run_dir>/distill), or a local checkpoint directory (itm: a transformers "
                                               "BlipForImageTextRetrieval folder)")
    student: str | None = Field(None, description="distilled: one of the run's named students (a key of "
                                "distill.extra_students, trained into <run_dir>/distill_<name>); default: <run_dir>/distill")
    model_name: str | None = Field(None, description="open_clip architecture for clip/pac, e.g. ViT-B-32-quickgelu for OpenAI / PAC-S weights")
    checkpoint: str | None = Field(None, description="local open_clip / PAC-S checkpoint for clip/pac")
    batch_size: int = Field(512, ge=1, description="captions scored per forward pass (model rewards)")
    scale: float | None = Field(None, gt=0.0, description="clip/pac: w in w·cos (default: 2.5 for clip, 2.0 for pac)")
    prefix: str | None = Field(None, description="clip/pac: text put before every caption and reference (default: "
                               "'A photo depicts ', as CLIP-S and PAC-S; '' for none)")
    clamp: bool | None = Field(None, description="clip/pac: clamp the score at 0 (default: true, as CLIP-S and PAC-S)")
    allow_gelu_for_openai_weights: bool = Field(False, description="load an OpenAI archive or a {'state_dict': ...} (PAC-S "
                                                "layout) checkpoint into a GELU architecture anyway (refused by default)")
    target: str | None = Field(None, description="python: 'package.module:attribute'; a class is instantiated with kwargs "
                                                 "(and device= if it takes one), any other callable is the reward itself")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="python: keyword arguments for target")
    terms: list["RewardTerm"] = Field(default_factory=list, description="sum: the weighted terms, e.g. "
                                      "[{weight: 1, reward: {kind: distilled}}, {weight: 0.5, reward: {kind: grammar}}]")

    @model_validator(mode="after")
    def _kind_reads_its_keys(self) -> "RewardSection":
        validate_section(self, {f: RewardSection.model_fields[f].get_default(call_default_factory=True) for f in OPTIONAL_FIELDS})
        _existing_path(self.checkpoint, "reward checkpoint")
        return self

    def term_names(self) -> list[str]:
        """Names of a sum's terms: each term's `name`, else its reward kind (kind_2, kind_3 when repeated)."""
        names: list[str] = []
        for t in self.terms:
            base = t.name or t.reward.kind
            name, i = base, 1
            while name in names:
                i += 1
                name = f"{base}_{i}"
            names.append(name)
        return names


class RewardTerm(Section):
    """One term of a `sum` reward: weight · reward."""

    weight: float = Field(1.0, description="the term's weight w_t in r = Σ_t w_t · r_t")
    name: str | None = Field(None, description="name in TensorBoard (reward_terms/<name>); default: the reward's kind")
    reward: RewardSection = Field(description="any reward section (a sum may nest)")


RewardSection.model_rebuild()


class FinetuneBase(Section):
    """Fine-tuning at every refinement layer (docs/design.md): candidates per image and layer from the policy,
    rewards shaped for graduality and length, and the method's loss, anchored to the frozen XE model.
    The method (`method`) and its own keys (`finetune.<method>`) come from `rlrefine.methods`."""

    method: Literal[tuple(METHODS)] = Field("dico", description="; ".join(f"{n}: {m.description}" for n, m in METHODS.items()))
    init: str | None = Field(None, description="captioner to start from and to anchor to (default: <run_dir>/pretrain/model)")
    output: str = Field("finetune", description="sub-directory of run_dir for this run's outputs")
    reward: RewardSection = RewardSection()
    layers: list[int] | None = Field(None, description="refinement layers to optimise (default: all 1..K)")
    steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="images per step")
    num_candidates: int = Field(5, ge=2, description="n candidates per image and layer (the group size of group-based methods)")
    max_len: int = Field(24, ge=4, description="tokens generated per candidate")
    kl_coef: float = Field(0.0, ge=0.0, description="optional explicit penalty mean(log π − log π_ref) to the reference")
    layer_weights: LayerWeighting = Field("linear", description="w_k of L = Σ_k w_k L_k / Σ_k w_k: linear (w_k = k), log, uniform, final (only K)")
    schedule: ScheduleKind = Field("linear", description="s(k), the share of the distance still to go after layer k: linear or geometric")
    schedule_eps: float = Field(0.01, gt=0.0, lt=1.0, description="ε of the geometric schedule")
    lambda_grad: float = Field(0.5, ge=0.0, description="weight of the progress-vs-schedule shaping term (0 = off)")
    shaping_progress: Literal["reward", "embedding"] = Field(
        "reward", description="how the shaping measures a candidate's progress p_k: reward, (r − r_0)/(r_K − r_0) "
                              "(docs/design.md), or embedding, 1 − D(e, e_K)/D(e_0, e_K) on the reward's text embeddings "
                              "(cosine distance; what the graduality score G measures; needs a reward with embed_texts)")
    lambda_len: float = Field(0.5, ge=0.0, description="weight of the per-layer length-budget penalty (0 = off)")
    len_min: int = Field(3, ge=1, description="allowed caption length (words) at layer 0")
    len_max: int = Field(16, ge=1, description="allowed caption length (words) at layer K")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up: cosine decay to 0.1·lr, or "
                                                       "constant (the DiCO reference code)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps, then lr_schedule")
    grad_clip: float = Field(1.0, gt=0.0, description="max gradient norm")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision: no, bf16 or fp16")
    log_every: int = Field(10, ge=1, description="steps between TensorBoard scalars")
    eval_every: int = Field(100, ge=1, description="steps between sample captions of fixed val images in TensorBoard")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    num_eval_images: int = Field(500, ge=1, description="images of the end-of-run evaluation")
    max_nonfinite_steps: int = Field(10, ge=1, description="stop after this many non-finite losses in a row")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """A key that moved into a method's section is an error naming where it went."""
        if not isinstance(data, dict):
            return data
        problems = []
        for key in data:
            if key in cls.model_fields:
                continue
            homes = [f"finetune.{name}.{m.moved_keys[key]}" for name, m in METHODS.items() if key in m.moved_keys]
            if homes:
                problems.append(f"finetune.{key} moved to the method's own section: {' or '.join(homes)}")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _lengths(self) -> "FinetuneBase":
        if self.len_max < self.len_min:
            raise ValueError(f"len_max ({self.len_max}) must be >= len_min ({self.len_min})")
        return self

    @property
    def method_config(self) -> Any:
        """The section of the method this run uses (`finetune.<method>`)."""
        return getattr(self, self.method)


FinetuneSection = create_model(
    "FinetuneSection", __base__=FinetuneBase, __doc__=FinetuneBase.__doc__,
    **{name: (m.Config, Field(default_factory=m.Config, description=" ".join((m.Config.__doc__ or "").split())))
       for name, m in METHODS.items()})


class DistillSection(Section):
    """`distill-reward`: a compact student imitates `teacher` on references, the pretrained captioner's
    candidates from every layer (`candidate_images` training images, beam + sampled), and mined hard pairs.
    `student_kind` picks the student: `dual` (both towers replaced, `distill.student`) or `text` (an open_clip
    image tower kept, a small text tower, `distill.text_student`); the other kind's section is not read.
    The student is written to <run_dir>/distill; `extra_students` names more, each in <run_dir>/distill_<name>,
    which a reward reads as `{kind: distilled, student: <name>}`."""

    teacher: RewardSection = RewardSection(kind="learned")
    candidate_images: int = Field(1000, ge=0, description="training images whose per-layer candidates join the pairs (0: none)")
    candidate_beams: int = Field(3, ge=1, description="beam candidates per image and layer (plus one sampled)")
    student_kind: Literal["dual", "text"] = Field(
        "dual", description="dual: a compact open_clip dual encoder (distill.student), right where the teacher's image "
                            "tower is a large share of its cost; text: the image tower of the teacher (or of image_tower) "
                            "kept, frozen and exact, and a small text tower (distill.text_student), right for CLIP-sized "
                            "teachers whose text tower dominates (PAC-S ViT-B/32)")
    student: DistillConfig = Field(default_factory=DistillConfig, description="the dual student (student_kind: dual)")
    text_student: TextStudentConfig = Field(default_factory=TextStudentConfig,
                                            description="the text student (student_kind: text; rewards.text_student)")
    image_tower: RewardSection | None = Field(
        None, description="text student: the open_clip reward whose image tower it keeps (clip, pac, learned, ...; its "
                          "w starts the student's); default: the teacher's own. Needed when the teacher has no open_clip "
                          "image tower (itm): then the student learns the teacher's scores in this tower's space")
    extra_students: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="more students distilled by `rlrefine run` when a reward reads them, each a "
                                          "mapping of distill overrides written to <run_dir>/distill_<name>, e.g. text: "
                                          "{student_kind: text}; a reward names one as {kind: distilled, student: text}")

    @model_validator(mode="after")
    def _students(self) -> "DistillSection":
        if self.student_kind == "text":
            if self.teacher.kind == "itm" and self.image_tower is None:
                raise ValueError("a text student of an itm teacher needs distill.image_tower: the open_clip reward whose "
                                 "image tower it keeps (e.g. the recipe's pac or clip section), since BLIP's image tower is "
                                 "not an open_clip one; or use student_kind: dual")
            tower = self.image_tower or self.teacher
            if tower.kind not in OPEN_CLIP_KINDS:
                raise ValueError(f"a text student keeps an open_clip image tower; the {'image_tower' if self.image_tower else 'teacher'} "
                                 f"is kind '{tower.kind}' (open_clip kinds: {', '.join(OPEN_CLIP_KINDS)})")
        for name in self.extra_students:
            self.extra(name)
        return self

    def extra(self, name: str) -> "DistillSection":
        """The distill section of the named student ``name`` (its overrides on top of this one)."""
        overrides = self.extra_students[name]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"distill.extra_students name {name!r}: use letters, digits, '_' and '-' (it names a folder)")
        if not isinstance(overrides, dict):
            raise ValueError(f"distill.extra_students.{name} must be a mapping of distill keys, got {overrides!r}")
        if "extra_students" in overrides:
            raise ValueError(f"distill.extra_students.{name} cannot name students of its own")
        base = self.model_dump(exclude={"extra_students"})
        for key in ("teacher", "image_tower"):  # another kind of reward: none of the base's kind-specific keys apply
            new = overrides.get(key)
            if isinstance(new, dict) and isinstance(base[key], dict) and new.get("kind", base[key]["kind"]) != base[key]["kind"]:
                base[key] = {}
        try:
            return DistillSection.model_validate(_deep_merge(base, overrides))
        except ValidationError as err:
            raise ValueError(format_validation_error(err, DistillSection, f"distill.extra_students.{name}",
                                                     key_prefix=f"distill.extra_students.{name}.")) from None

    @property
    def active(self) -> DistillConfig | TextStudentConfig:
        """The config of the student this section trains (`student` or `text_student`)."""
        return self.text_student if self.student_kind == "text" else self.student


OPEN_CLIP_KINDS = ("clip", "refclip", "pac", "refpac", "learned")  # rewards with an open_clip image tower a text student keeps


class EvaluateSection(Section):
    """Per-layer evaluation and the graduality score (docs/design.md)."""

    split: Literal["val", "test", "test_novel"] = Field("test", description="split to evaluate: val, test or test_novel (shapes: held-out colour-shape pairs)")
    extra_splits: list[Literal["val", "test", "test_novel"]] = Field(
        default_factory=list, description="more splits the report evaluates every model on (report/compare_<split>.*), "
                                          "e.g. [test_novel]: colour-shape pairs never seen in training")
    num_images: int = Field(500, ge=1, description="captioning examples of the split to evaluate")
    evaluator: RewardSection = RewardSection(kind="learned")
    extra_rewards: dict[str, RewardSection] = Field(default_factory=dict, description="more scores per layer, e.g. clip, pac")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="RS = (1 − α)·perf_K + α·G")
    kl_reference: bool = Field(True, description="report the final layer's KL to the pretrained (XE) model")
    candidate_diagnostic: bool = Field(True, description="shapes data: the report also writes what each variant's candidates "
                                       "hold at layer K before and after fine-tuning (report/candidates.json)")
    java_metrics: bool = Field(True, description="METEOR and SPICE where Java and their jars are present (each starts a Java "
                                                 "process per layer and model: seconds each); false skips them (reported n/a)")


class CompareSection(Section):
    """Fine-tuning variants that `rlrefine run` trains side by side from the same XE model, and how many
    seeds each gets. Every key other than `seeds` names a variant: a mapping of `finetune` overrides,
    e.g. `scst: {method: scst, scst: {baseline: mean}}`; `compare.dico_teacher.reward.kind=learned` adds one
    from the command line. Seed s of a variant fine-tunes with recipe seed + s (batches, z_0 noise,
    sampling) into `finetune_<name>` (s = 0) or `finetune_<name>_seed<s>`; the report gives mean ± std.
    `compare.<name>=null` leaves a recipe's variant out."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())
    seeds: int = Field(1, ge=1, description="fine-tuning runs per variant, seeds recipe seed + 0..seeds-1 (the report shows mean ± std)")

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """name -> finetune overrides, in recipe order; a variant set to null (`compare.scst=null`) is left out."""
        return {k: v for k, v in (self.__pydantic_extra__ or {}).items() if v is not None}


class RecipeConfig(Section):
    """A whole recipe: every stage's section. `run_dir` holds all outputs of the run."""

    paths: PathsSection = Field(default_factory=PathsSection, description="outside paths, given once; referred to as ${paths.KEY}")
    run_dir: str = Field("runs/default", description="folder for every output of the run (stages write sub-folders)")
    seed: int = Field(0, description="seed of data order, z_0 noise and initialisation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto (CUDA when available), cpu or cuda")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice, all cores)")
    data: DataSection = DataSection()
    tokenizer: TokenizerSection = TokenizerSection()
    model: ModelSection = ModelSection()
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig, description="train-evaluator (rewards.evaluator)")
    pretrain: PretrainSection = PretrainSection()
    distill: DistillSection = DistillSection()
    finetune: FinetuneSection = FinetuneSection()
    evaluate: EvaluateSection = EvaluateSection()
    compare: CompareSection = Field(
        default_factory=CompareSection,
        description="named fine-tuning variants run by `rlrefine run` side by side (name -> finetune overrides, "
                    "e.g. scst: {method: scst, scst: {baseline: mean}}) and `seeds`, the runs per variant")

    @model_validator(mode="after")
    def _layers_in_range(self) -> "RecipeConfig":
        K = self.model.num_refine_layers
        bad = [k for k in (self.finetune.layers or []) if not 1 <= k <= K]
        if bad:
            raise ValueError(f"finetune.layers {bad} out of range: layers are 1..K = 1..{K}")
        for name in self.compare.variants:
            self.variant(name)
        named = [s.student for s in self.reward_sections() if s.kind == "distilled" and s.student is not None]
        unknown = sorted(set(named) - set(self.distill.extra_students))
        if unknown:
            raise ValueError(f"a distilled reward names student(s) {', '.join(unknown)}, which distill.extra_students does not "
                             f"define (it has: {', '.join(self.distill.extra_students) or 'none'}); add e.g. "
                             f"distill.extra_students.{unknown[0]}={{student_kind: text}}")
        return self

    def reward_sections(self) -> list[RewardSection]:
        """Every reward section a run reads: each fine-tuning variant's reward and the evaluation scores, with the
        terms of `sum` rewards (not the distillation teachers)."""
        todo = [*(v.reward for v in self.finetune_variants().values()), self.evaluate.evaluator,
                *self.evaluate.extra_rewards.values()]
        out = []
        while todo:
            section = todo.pop()
            out.append(section)
            todo.extend(term.reward for term in section.terms)
        return out

    def distillations(self) -> dict[str | None, DistillSection]:
        """The students the run reads, in order: None -> `distill` (<run_dir>/distill) when a `distilled` reward without
        path or student reads it, then each named student a reward reads (<run_dir>/distill_<name>)."""
        wanted = {s.student for s in self.reward_sections() if s.kind == "distilled" and not s.path}
        out: dict[str | None, DistillSection] = {}
        if None in wanted:
            out[None] = self.distill
        for name in self.distill.extra_students:
            if name in wanted:
                out[name] = self.distill.extra(name)
        return out

    def distill_dir(self, name: str | None = None) -> Path:
        """The folder of the run's student ``name`` (None: the main one)."""
        return self.run_path / ("distill" if name is None else f"distill_{name}")

    def variant(self, name: str, seed: int = 0) -> FinetuneSection:
        """The finetune section of a named comparison variant (its overrides on top of `finetune`); seed
        s > 0 of it writes to `finetune_<name>_seed<s>`."""
        overrides = self.compare.variants[name]
        if not isinstance(overrides, dict):
            raise ValueError(f"compare.{name} must be a mapping of finetune keys, or null to leave it out (compare.seeds: an integer), got {overrides!r}")
        base = self.finetune.model_dump()
        new_reward = overrides.get("reward")
        if isinstance(new_reward, dict) and new_reward.get("kind", base["reward"]["kind"]) != base["reward"]["kind"]:
            base["reward"] = {}  # another kind of reward: none of the base reward's kind-specific keys apply
        output = f"finetune_{name}" + (f"_seed{seed}" if seed else "")
        merged = _deep_merge(base, {**overrides, "output": output})
        try:
            return FinetuneSection.model_validate(merged)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, FinetuneSection, f"compare.{name}", key_prefix=f"compare.{name}.")) from None

    def finetune_runs(self) -> dict[str, list[FinetuneSection]]:
        """name -> one finetune section per seed (`compare.seeds`) for every fine-tuning variant of the recipe (the
        `compare` variants, or the `finetune` section alone). Seed s writes to `<output>_seed<s>` (s > 0)."""
        seeds = range(self.compare.seeds)
        if self.compare.variants:
            return {name: [self.variant(name, s) for s in seeds] for name in self.compare.variants}
        f = self.finetune
        return {f.method: [f if s == 0 else f.model_copy(update={"output": f"{f.output}_seed{s}"}) for s in seeds]}

    def finetune_variants(self) -> dict[str, FinetuneSection]:
        """name -> the finetune section of every fine-tuning variant, its first seed (what a variant trains with)."""
        return {name: sections[0] for name, sections in self.finetune_runs().items()}

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def torch_device(self) -> Any:
        """The device `device` names: CUDA for auto when there is a GPU, else the CPU."""
        import torch

        return torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")

    def reward_context(self, name: str, device: Any = "cpu", train_split: Any = None) -> RewardContext:
        """What a reward built for this recipe may need (`rewards.registry.RewardContext`): the run folder, the
        device, the data kind and, on first use, the training captions (CIDEr-D's document frequencies) of
        ``train_split`` or else of the recipe's data, and on shapes data the scene of every image (the `scene`
        reward). ``name``: the recipe key of the reward, for messages."""
        def corpus() -> list[list[str]]:
            from rlrefine.data.sources import load_splits

            return (train_split if train_split is not None else load_splits(self.data)["train"]).captioned_references()

        def scenes() -> dict:
            from rlrefine.data.shapes import scene_index
            from rlrefine.data.sources import load_splits

            return scene_index(load_splits(self.data).values())

        return RewardContext(run_dir=self.run_path, device=device, corpus=corpus, data_kind=self.data.kind, name=name,
                             scenes=scenes if self.data.kind == "shapes" else None)


# ------------------------------------------------------------------------------ loading, errors
def _field_types(section: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a pydantic section or a (stdlib) dataclass config."""
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {k: f.annotation for k, f in section.model_fields.items()}
    if dataclasses.is_dataclass(section):
        hints = typing.get_type_hints(section)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(section)}
    return None


def _section_at(path: tuple, root: type) -> Any:
    """The section class reached by following `path` (a pydantic error location) from `root`."""
    section: Any = root
    for part in path:
        fields = _field_types(section)
        if fields is None or part not in fields:
            return section if fields is not None else None
        annotation = fields[part]
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        section = next((c for c in candidates if _field_types(c) is not None), None)
        if section is None:
            return None
    return section


def format_validation_error(err: ValidationError, root: type[BaseModel] = RecipeConfig, source: str = "recipe",
                            key_prefix: str = "") -> str:
    """One line per problem: the dotted key (after ``key_prefix``), what is wrong, and what is allowed."""
    lines = [f"{source} is invalid ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int))
        key = key_prefix + ".".join(str(p) for p in loc) if loc else "(top level)"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parent = _field_types(_section_at(loc[:-1], root))
            allowed = ", ".join(sorted(parent)) if parent is not None else "?"
            hint = ""
            if key.startswith("compare.") and any(part[:1].isdigit() for part in key.split(".")[2:]):
                hint = " (a compare variant's name cannot contain '.': the override splits keys at dots)"
            lines.append(f"  - unknown key '{key}'.{hint} Allowed keys here: {allowed}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false (any case style) are booleans.

    YAML 1.1 also reads yes/no/on/off as booleans, which turned `pretrain.mixed_precision=no` (a
    documented choice) into `False` and had it rejected.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str) -> Any:
    """Parse YAML text with YAML 1.2 booleans (see `_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


_REFERENCE = re.compile(r"\$\{([^}]*)\}")


def resolve_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace every `${paths.KEY}` inside string values of `raw` by the value of `paths.KEY`.

    Returns a new tree; raises RecipeError listing every reference that names a key `paths:` does
    not define or a path that is not set (null), with the key that refers to it.
    """
    paths = raw.get("paths") or {}
    if not isinstance(paths, dict):
        raise RecipeError(f"paths must be a mapping of path names to local paths, got {paths!r}")
    allowed = sorted(PathsSection.model_fields)
    problems: list[str] = []

    def substitute(match: re.Match, where: str) -> str:
        ref = match.group(1).strip()
        name = ref.removeprefix("paths.")
        if not ref.startswith("paths.") or name not in allowed:
            problems.append(f"  - {where}: unknown reference '${{{ref}}}'; references name a key of paths: "
                            f"{', '.join('${paths.' + a + '}' for a in allowed)}")
            return match.group(0)
        value = paths.get(name)
        if value is None:
            problems.append(f"  - {where} refers to ${{paths.{name}}}, which is not set: give paths.{name}=/your/path "
                            f"(on the command line or in the recipe's paths: section)")
            return match.group(0)
        if not isinstance(value, (str, int, float)) or (isinstance(value, str) and "${" in value):
            problems.append(f"  - paths.{name} must be a plain path string, got {value!r}")
            return match.group(0)
        return str(value)

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: (v if where == "" and k == "paths" else walk(v, f"{where}.{k}" if where else str(k)))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            return _REFERENCE.sub(lambda m: substitute(m, where), node)
        return node

    out = walk(raw, "")
    if "paths" in out and out["paths"] is None:  # `paths:` with nothing under it
        out["paths"] = {}
    if problems:
        raise RecipeError("recipe has unresolved path references:\n" + "\n".join(problems))
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form dotted.key=value (e.g. pretrain.steps=100)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"override '{item}' has an empty key part")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise RecipeError(f"override '{item}': value is not valid YAML ({exc})") from None
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read, merge overrides into, and validate a recipe. Raises RecipeError with every problem."""
    raw: Any = {}
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = f"recipe {path}"
        if not path.is_file():
            raise RecipeError(f"recipe file '{path}' not found (see recipes/ for examples, e.g. recipes/tiny.yaml)")
        try:
            raw = yaml_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{source} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{source} must be a mapping of sections (data:, model:, pretrain:, ...), got {type(raw).__name__}")
    merged = resolve_paths(_deep_merge(raw, parse_overrides(overrides or [])))
    try:
        return RecipeConfig.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, RecipeConfig, source)) from None


def dump_recipe(cfg: RecipeConfig, path: str | Path) -> None:
    """Write the resolved recipe (defaults filled in) next to a run's outputs, for provenance."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
