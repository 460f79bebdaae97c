"""The learned caption evaluator: a small CLIP dual encoder built from open_clip's own classes.

What the ``train-evaluator`` stage trains (its training loop is `rlrefine.trainers.evaluator`). In the
embedded default it is the teacher reward: the shapes data has no pretrained CLIP, so we train one that
is sharp exactly where captioners err (a wrong colour or shape). Here:

* `EvaluatorConfig`: the architecture (an open_clip ``CLIP`` from a config registered with
  ``open_clip.add_model_config``, default ``rlrefine-evaluator-tiny``: 64 px images, 8 px patches,
  width-64 towers, so the result loads through the same path as any open_clip checkpoint) and the
  training recipe (the `evaluator` section of a recipe);
* `swap_attribute`: the hard negatives, a caption with one attribute word swapped within its group
  (colours for colours, shapes for shapes, "above" for "below");
* `build_dual_encoder` / `save_dual_encoder`: a fresh model, and the saved form: ``evaluator.pt`` (state
  dict) + ``evaluator.json`` (architecture config, w, text prefix, metrics) for
  ``LearnedScore.from_dir(out_dir)``; ``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` (a
  hard link to the same bytes) for ``local-dir:out_dir``;
* `evaluate_dual_encoder`: held-out ``swap_acc`` (how often the true caption's cosine beats the same
  caption with one attribute swapped; also per attribute group) and retrieval R@1 both ways.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from rlrefine.models.clip_checkpoint import mute_random_init_warning

from rlrefine.data.split import image_rows, images_and_captions

from .clip_score import register_unique
from .loading import BatchedPreprocess
from .matching import MatchingHeadConfig

log = logging.getLogger(__name__)

__all__ = ["EvaluatorConfig", "build_dual_encoder", "embed_all_images", "embed_texts", "evaluate_dual_encoder",
           "save_dual_encoder", "shapes_attribute_groups", "swap_accuracy", "swap_attribute", "swap_pairs"]

def shapes_attribute_groups() -> dict[str, tuple[str, ...]]:
    """Attribute vocabulary of the shapes data; swaps stay in a group. Colours and shapes, and
    relations ("above" <-> "below", "over" <-> "under", "left" <-> "right"): a group named
    ``kind:variant`` is also reported under ``kind`` (``swap_acc/relation``)."""
    from rlrefine.data.shapes import COLOURS, SHAPES

    return {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "relation": ("above", "below"),
            "relation:alt": ("over", "under"), "relation:side": ("left", "right")}


@dataclass
class EvaluatorConfig:
    """Config of ``train_evaluator`` (defaults: the embedded shapes recipe on 2 CPU cores)."""

    model_name: str = "rlrefine-evaluator-tiny"  # name the architecture is registered under
    # Sizes are set by the CPU budget of the embedded default (2 cores, minutes): ~3 GFLOP per step.
    embed_dim: int = 64  # joint embedding size
    image_size: int = 64  # input resolution (shapes images are 64 x 64)
    patch_size: int = 8  # ViT patch size -> 8 x 8 = 64 patches
    vision_width: int = 64
    vision_layers: int | tuple[int, ...] = 2  # an int: ViT depth; a tuple: open_clip ModifiedResNet stage depths
    vision_head_width: int = 32  # -> 2 heads
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2
    context_length: int = 24  # open_clip BPE tokens (bundled tokenizer, vocab 49408)
    steps: int = 1500
    batch_size: int = 64  # images per step (one reference caption each)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    swap_negatives: int = 2  # attribute-swapped captions per image per step
    neighbour_negatives: int = 1  # captions of nearest images per image per step
    neighbour_k: int = 5  # nearest images to draw those captions from
    neighbour_refresh_every: int = 200  # steps between nearest-neighbour re-mining
    hard_negative_weight: float = 1.0  # weight of the hard-negative cross-entropy
    preference_pairs: int = 0  # draws per image per step of caption pairs (better, worse) to order (shapes: complete > correct partial > the partial plus one misnamed object)
    preference_weight: float = 1.0  # weight of the pairwise logistic loss on those pairs
    preference_relations: bool = False  # shapes: the pairs also put two objects' true relation above the same two joined by "and", so that stating where things are pays (the matching head punishes a false relation); docs/shapes_world.md
    preference_steps: int = 0  # > 0: the pairs are taught in this many extra steps that train the text tower only (the image tower, which a captioner may reuse as its encoder, stays as contrastive training left it); 0: throughout
    attribute_groups: dict[str, tuple[str, ...]] = field(
        default_factory=shapes_attribute_groups)  # swap words within each group (default: shapes)
    matching_head: MatchingHeadConfig = field(default_factory=MatchingHeadConfig)  # a cross-attention head over the frozen towers, trained last (steps 0: none), that reads what pooling loses: relations, positions (rewards.matching)
    score_w: float = 2.5  # w of the saved LearnedScore (CLIP-S convention)
    text_prefix: str = ""  # the evaluator is trained and scored on bare captions
    eval_every: int = 500  # steps between held-out evaluations (0: only at the end)
    eval_max_images: int = 500  # held-out images used per evaluation
    log_every: int = 20  # steps between TensorBoard scalars
    checkpoint_every: int = 200  # steps between resumable checkpoints (--resume)
    seed: int = 0  # model initialisation and the draws of batches and negatives

    def model_cfg(self) -> dict:
        """open_clip architecture config (the JSON saved beside the weights)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                           "width": self.vision_width, "head_width": self.vision_head_width,
                           "patch_size": self.patch_size},
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                         "width": self.text_width, "heads": self.text_heads,
                         "layers": self.text_layers},
        }


# ---------------------------------------------------------------------------------------------
# attribute swaps
_WORD = re.compile(r"[A-Za-z]+")


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s"


def swap_attribute(caption: str, groups: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
                   rng: random.Random, group: str | None = None) -> tuple[str, str] | None:
    """Replace one attribute word of ``caption`` by another word of the same group.

    ``groups`` maps a group name to its words (or is a list of word lists, named by index).
    A plural ("circles", "crosses") counts and is swapped to the plural of the replacement. Case of the
    first letter is kept. Returns ``(new_caption, group_name)``, or ``None`` when the caption has
    no attribute word (of ``group``, when given).
    """
    if not isinstance(groups, Mapping):
        groups = {str(i): tuple(g) for i, g in enumerate(groups)}
    lookup: dict[str, tuple[str, str]] = {}  # word -> (group, plural suffix)
    for name, words in groups.items():
        if group is not None and name != group:
            continue
        for w in words:
            lookup[w.lower()] = (name, "")
            lookup.setdefault(_plural(w.lower()), (name, "plural"))
    spots = [(m, *lookup[m.group().lower()]) for m in _WORD.finditer(caption)
             if m.group().lower() in lookup]
    if not spots:
        return None
    m, name, number = rng.choice(spots)
    word = m.group().lower()
    choices = [w for w in groups[name] if w.lower() != word and _plural(w.lower()) != word]
    if not choices:
        return None
    new = rng.choice(choices)
    new = _plural(new) if number == "plural" else new
    if m.group()[0].isupper():
        new = new[0].upper() + new[1:]
    return caption[:m.start()] + new + caption[m.end():], name


@torch.no_grad()
def embed_all_images(model, preprocess, images, device, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        idx = range(i, min(i + batch_size, len(images)))
        pix = preprocess(image_rows(images, idx), device=device)
        out.append(model.encode_image(pix, normalize=True).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], device, batch_size: int = 512) -> torch.Tensor:
    unique = list(dict.fromkeys(texts))
    pos = {t: i for i, t in enumerate(unique)}
    out = [model.encode_text(tokenizer(unique[i:i + batch_size]).to(device), normalize=True).float()
           for i in range(0, len(unique), batch_size)]
    emb = torch.cat(out)
    return emb[torch.tensor([pos[t] for t in texts], device=emb.device)]


@torch.no_grad()
def evaluate_dual_encoder(model, tokenizer, preprocess, split: Any,
                          groups: Mapping[str, Sequence[str]], max_images: int = 500,
                          seed: int = 0, device: str | torch.device = "cpu",
                          text_prefix: str = "") -> dict[str, float]:
    """Held-out metrics of an open_clip dual encoder on a caption split.

    * ``swap_acc``: fraction of (image, reference) pairs where cos(image, reference) is strictly
      above cos(image, reference with one attribute swapped); ``swap_acc/<group>`` per group (and
      per kind, the part of a ``kind:variant`` group name before the colon).
    * ``r1_i2t``: image -> text R@1 over the first reference of each image (a hit when the top
      caption is one of the image's references); ``r1_t2i``: the reverse.
    """
    was_training = model.training
    model.eval()
    images, captions = images_and_captions(split)
    n = min(len(captions), max_images)
    img = embed_all_images(model, preprocess, image_rows(images, range(n)), device)  # [n, D]
    owner, true_txt, swap_txt, gname = swap_pairs(captions[:n], groups, seed)
    metrics: dict[str, float] = {}
    if owner:
        t = embed_texts(model, tokenizer, [text_prefix + x for x in true_txt + swap_txt], device)
        own = torch.tensor(owner, device=img.device)
        cos_true = (img[own] * t[:len(owner)]).sum(-1)
        cos_swap = (img[own] * t[len(owner):]).sum(-1)
        metrics.update(_swap_report(cos_true > cos_swap, gname))
    first = [text_prefix + caps[0] for caps in captions[:n]]
    t = embed_texts(model, tokenizer, first, device)  # [n, D]
    sims = img @ t.T  # [n images, n texts]
    ref_sets = [set(text_prefix + c for c in caps) for caps in captions[:n]]
    top_t = sims.argmax(dim=1).tolist()
    metrics["r1_i2t"] = float(np.mean([first[j] in ref_sets[i] for i, j in enumerate(top_t)]))
    top_i = sims.argmax(dim=0).tolist()
    metrics["r1_t2i"] = float(np.mean([first[j] in ref_sets[i] for j, i in enumerate(top_i)]))
    model.train(was_training)
    return metrics


def swap_pairs(captions: Sequence[Sequence[str]], groups: Mapping[str, Sequence[str]],
               seed: int = 0) -> tuple[list[int], list[str], list[str], list[str]]:
    """The held-out swap test of ``captions`` (one list per image): for every caption with an attribute word, the
    caption with one swapped (`swap_attribute`, drawn from ``random.Random(seed)``) unless that is another caption
    of the image. Returns (image row, true caption, swapped caption, group) lists."""
    rng = random.Random(seed)
    owner, true_txt, swap_txt, gname = [], [], [], []
    for i, caps in enumerate(captions):
        for ref in caps:
            swapped = swap_attribute(ref, groups, rng)
            if swapped is None or swapped[0] in caps:
                continue
            owner.append(i)
            true_txt.append(ref)
            swap_txt.append(swapped[0])
            gname.append(swapped[1])
    return owner, true_txt, swap_txt, gname


def _swap_report(wins: torch.Tensor, gname: Sequence[str]) -> dict[str, float]:
    """``swap_acc`` and ``swap_acc/<group>`` (a ``kind:variant`` group also under ``kind``) of bool ``wins`` [P]."""
    wins = wins.float()
    out = {"swap_acc": float(wins.mean())}
    for name in sorted(set(gname) | {g.split(":")[0] for g in gname}):
        sel = torch.tensor([g == name or g.split(":")[0] == name for g in gname], device=wins.device)
        out[f"swap_acc/{name}"] = float(wins[sel].mean())
    out["swap_pairs"] = float(len(gname))
    return out


@torch.no_grad()
def swap_accuracy(reward: Any, images: Any, captions: Sequence[Sequence[str]], groups: Mapping[str, Sequence[str]],
                  max_images: int = 500, seed: int = 0) -> dict[str, float]:
    """`evaluate_dual_encoder`'s swap test (the same pairs for the same ``seed``) scored by any protocol ``reward``
    (its whole score: a matching head included): how often the true caption scores strictly above its swap."""
    n = min(len(captions), max_images)
    owner, true_txt, swap_txt, gname = swap_pairs(captions[:n], groups, seed)
    if not owner:
        return {}
    scores = reward(image_rows(images, range(n)), true_txt + swap_txt, image_index=torch.tensor(owner + owner)).float().cpu()
    return _swap_report(scores[:len(owner)] > scores[len(owner):], gname)


def build_dual_encoder(model_name: str, model_cfg: dict, device: str | torch.device = "cpu"):
    """Register ``model_cfg`` and build a fresh open_clip model, its tokenizer and preprocess."""
    import open_clip

    name = register_unique(model_name, model_cfg)
    with mute_random_init_warning():
        model = open_clip.create_model(name, pretrained=None, device=device)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = BatchedPreprocess(pcfg["size"], pcfg["mean"], pcfg["std"])
    return name, model, open_clip.get_tokenizer(name), preprocess


def save_dual_encoder(model: torch.nn.Module, out_dir: Path, stem: str, model_name: str,
                      model_cfg: dict, extra: Mapping[str, Any]) -> None:
    """Write ``<stem>.pt`` + ``<stem>.json`` (and open_clip's ``local-dir:`` files) atomically."""
    import open_clip

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.pt"
    tmp = out_dir / f".{stem}.pt.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    meta = {"model_name": model_name, "model_cfg": model_cfg, "weights": weights.name,
            "preprocess_cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()},
            **extra}
    for path, obj in ((out_dir / f"{stem}.json", meta),
                      (out_dir / "open_clip_config.json",
                       {"model_cfg": model_cfg, "preprocess_cfg": meta["preprocess_cfg"]})):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    link = out_dir / "open_clip_pytorch_model.bin"
    if link.exists() or link.is_symlink():
        link.unlink()
    try:
        os.link(weights, link)  # same bytes, no copy; open_clip's local-dir: finds this name
    except OSError:
        import shutil
        shutil.copyfile(weights, link)
