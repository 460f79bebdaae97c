"""Train a learned caption evaluator: a small CLIP dual encoder built from open_clip's own classes.

The ``train-evaluator`` stage. In the embedded default it is the teacher reward: the shapes data
has no pretrained CLIP, so we train one that is sharp exactly where captioners err (a wrong colour
or shape). Recipe:

* Architecture: an open_clip ``CLIP`` from a config registered with ``open_clip.add_model_config``
  (default ``rlrefine-evaluator-tiny``: 64 px images, 8 px patches, width-64 towers), so the
  result loads through the same path as any open_clip checkpoint.
* Loss: symmetric InfoNCE over the batch (open_clip's ``ClipLoss``) plus a hard-negative term:
  for each image, cross-entropy of its positive caption against
  (a) the same caption with one attribute word swapped for another word of the same group
      (``swap_attribute``: colours for colours, shapes for shapes), and
  (b) captions of its nearest images in the current image-embedding space (re-mined every
      ``neighbour_refresh_every`` steps);
  and, when the data supplies them (``preference_pairs``), a pairwise logistic loss that orders
  captions of the same image (shapes: the complete description above a correct partial one, and that
  above the same plus one misnamed object, so that naming an object wrongly scores below leaving it out).
* Output (``out_dir``): ``evaluator.pt`` (state dict) + ``evaluator.json`` (architecture config,
  w, text prefix, metrics) for ``LearnedScore.from_dir(out_dir)``; ``open_clip_config.json`` and
  ``open_clip_pytorch_model.bin`` (a hard link to the same bytes) for ``local-dir:out_dir``.
* Reported on held-out images: ``swap_acc`` (how often the true caption's cosine beats the same
  caption with one attribute swapped; also per attribute group) and retrieval R@1 both ways.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlrefine.models.clip_checkpoint import mute_random_init_warning

from .clip_score import _register_unique
from .loading import BatchedPreprocess

log = logging.getLogger(__name__)

__all__ = ["EvaluatorConfig", "evaluate_dual_encoder", "preference_rate", "swap_attribute", "train_evaluator"]

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
    # Sizes are set by the CPU budget (DESIGN section 7: 2 cores, minutes): ~3 GFLOP per step.
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
    preference_steps: int = 0  # > 0: the pairs are taught in this many extra steps that train the text tower only (the image tower, which a captioner may reuse as its encoder, stays as contrastive training left it); 0: throughout
    attribute_groups: dict[str, tuple[str, ...]] = field(
        default_factory=shapes_attribute_groups)  # swap words within each group (default: shapes)
    score_w: float = 2.5  # w of the saved LearnedScore (CLIP-S convention)
    text_prefix: str = ""  # the evaluator is trained and scored on bare captions
    eval_every: int = 500  # steps between held-out evaluations (0: only at the end)
    eval_max_images: int = 500  # held-out images used per evaluation
    max_time_s: float | None = None  # stop early after this much training time
    seed: int = 0
    device: str = "cpu"

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


# ---------------------------------------------------------------------------------------------
# data access (CaptionSplit-like objects or dicts)
def _split_fields(split: Any) -> tuple[Any, list[list[str]]]:
    get = split.get if isinstance(split, Mapping) else (lambda k: getattr(split, k))
    images, captions = get("images"), get("captions")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    captions = [[c] if isinstance(c, str) else list(c) for c in captions]
    if len(images) != len(captions):
        raise ValueError(f"split has {len(images)} images but {len(captions)} caption lists")
    return images, captions


def _image_batch(images: Any, idx: Sequence[int]) -> Any:
    """Rows ``idx`` as a uint8 tensor, or PIL images for path-based splits."""
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(list(idx), dtype=torch.long)]
    from PIL import Image

    return [Image.open(images[i]).convert("RGB") for i in idx]


@torch.no_grad()
def _embed_all_images(model, preprocess, images, device, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        idx = range(i, min(i + batch_size, len(images)))
        pix = preprocess(_image_batch(images, idx), device=device)
        out.append(model.encode_image(pix, normalize=True).float())
    return torch.cat(out)


@torch.no_grad()
def _embed_texts(model, tokenizer, texts: Sequence[str], device, batch_size: int = 512) -> torch.Tensor:
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
    images, captions = _split_fields(split)
    n = min(len(captions), max_images)
    img = _embed_all_images(model, preprocess, _image_batch(images, range(n)), device)  # [n, D]
    rng = random.Random(seed)
    true_txt, swap_txt, owner, gname = [], [], [], []
    for i in range(n):
        for ref in captions[i]:
            swapped = swap_attribute(ref, groups, rng)
            if swapped is None or swapped[0] in captions[i]:
                continue
            true_txt.append(text_prefix + ref)
            swap_txt.append(text_prefix + swapped[0])
            owner.append(i)
            gname.append(swapped[1])
    metrics: dict[str, float] = {}
    if owner:
        t = _embed_texts(model, tokenizer, true_txt + swap_txt, device)
        own = torch.tensor(owner, device=img.device)
        cos_true = (img[own] * t[:len(owner)]).sum(-1)
        cos_swap = (img[own] * t[len(owner):]).sum(-1)
        wins = (cos_true > cos_swap).float()
        metrics["swap_acc"] = float(wins.mean())
        kinds = sorted(set(gname) | {g.split(":")[0] for g in gname})
        for name in kinds:
            sel = torch.tensor([g == name or g.split(":")[0] == name for g in gname], device=wins.device)
            metrics[f"swap_acc/{name}"] = float(wins[sel].mean())
        metrics["swap_pairs"] = float(len(owner))
    first = [text_prefix + caps[0] for caps in captions[:n]]
    t = _embed_texts(model, tokenizer, first, device)  # [n, D]
    sims = img @ t.T  # [n images, n texts]
    ref_sets = [set(text_prefix + c for c in caps) for caps in captions[:n]]
    top_t = sims.argmax(dim=1).tolist()
    metrics["r1_i2t"] = float(np.mean([first[j] in ref_sets[i] for i, j in enumerate(top_t)]))
    top_i = sims.argmax(dim=0).tolist()
    metrics["r1_t2i"] = float(np.mean([first[j] in ref_sets[i] for j, i in enumerate(top_i)]))
    model.train(was_training)
    return metrics


@torch.no_grad()
def preference_rate(reward: Any, images: Any, preferred: Sequence[str], others: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often ``reward`` scores ``preferred[i]`` strictly above every caption of ``others[i]`` for
    image i (images with no other caption are left out): ``rate`` and the ``images`` counted.

    With the complete description as ``preferred`` and the references that leave objects out as
    ``others`` it measures whether an evaluator knows more than the references (the gap reward
    fine-tuning can exploit)."""
    rows = [i for i, o in enumerate(others) if o]
    if not rows:
        return {"rate": float("nan"), "images": 0.0}
    owner = [i for i in rows for _ in range(1 + len(others[i]))]
    texts = [c for i in rows for c in (preferred[i], *others[i])]
    scores = reward(images[torch.as_tensor(owner)], texts).float().cpu()
    wins, at = 0, 0
    for i in rows:
        block = scores[at:at + 1 + len(others[i])]
        wins += int(bool(block[0] > block[1:].max()))
        at += len(block)
    return {"rate": wins / len(rows), "images": float(len(rows))}


def _log(logger: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send metrics to an accelerate-style tracker (``.log(dict, step=)``) or a callable."""
    if logger is None:
        return
    if hasattr(logger, "log"):
        logger.log(dict(metrics), step=step)
    else:
        logger(dict(metrics), step)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no decay on gains, biases, embeddings, logit scale (open_clip's training recipe)
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_with_warmup(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def build_dual_encoder(model_name: str, model_cfg: dict, device: str | torch.device = "cpu"):
    """Register ``model_cfg`` and build a fresh open_clip model, its tokenizer and preprocess."""
    import open_clip

    name = _register_unique(model_name, model_cfg)
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


def train_evaluator(cfg: EvaluatorConfig, train_split: Any, val_split: Any | None,
                    out_dir: str | Path, logger: Any = None,
                    preference_pairs: Callable[[int, random.Random], Sequence[tuple[str, str]]] | None = None) -> dict[str, float]:
    """Train the learned evaluator and save it to ``out_dir``; returns the final metrics.

    ``train_split`` / ``val_split``: CaptionSplit-like (``images`` uint8 [N,H,W,3] or image paths,
    ``captions`` list of reference lists). ``logger``: an accelerate-style tracker with
    ``.log(metrics, step=)`` or a callable ``(metrics, step)``; metric names ``evaluator/...``.
    ``preference_pairs(i, rng) -> [(better, worse), ...]``: pairs of captions of training image i the
    evaluator must order, drawn ``cfg.preference_pairs`` times per image per step, with the loss
    ``softplus(logit_scale · (cos(img, worse) − cos(img, better)))``.
    """
    if cfg.preference_pairs and preference_pairs is None:
        raise ValueError(f"evaluator.preference_pairs is {cfg.preference_pairs} but this data gives no caption pairs to "
                         "order (the shapes data does); set evaluator.preference_pairs=0")
    out_dir = Path(out_dir)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model_cfg = cfg.model_cfg()
    name, model, tokenizer, preprocess = build_dual_encoder(cfg.model_name, model_cfg, device)
    import open_clip

    images, captions = _split_fields(train_split)
    n_train = len(captions)
    batch = min(cfg.batch_size, n_train)
    groups = dict(cfg.attribute_groups)
    ref_sets = [set(c) for c in captions]
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                            eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    clip_loss = open_clip.ClipLoss()
    neighbours: torch.Tensor | None = None  # [N, k] nearest train images, re-mined periodically
    n_neg = cfg.swap_negatives + cfg.neighbour_negatives
    history: dict[str, float] = {}
    if val_split is not None:
        history = {f"init/{k}": v for k, v in evaluate_dual_encoder(
            model, tokenizer, preprocess, val_split, groups, cfg.eval_max_images, cfg.seed, device,
            cfg.text_prefix).items()}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps + cfg.preference_steps), desc="train-evaluator", dynamic_ncols=True)
    step = 0
    pairs_now = not cfg.preference_steps  # with preference_steps, the pairs join in the text-only phase
    for step in bar:
        if step == cfg.steps:  # text-only phase: freeze the image tower (BatchNorm statistics too)
            model.visual.requires_grad_(False)
            opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, _cosine_with_warmup(max(1, cfg.preference_steps // 10), cfg.preference_steps))
            pairs_now = True
        if (cfg.neighbour_negatives and step > 0 and step % cfg.neighbour_refresh_every == 0
                and n_train > 1):
            model.eval()
            emb = _embed_all_images(model, preprocess, images, device)
            sims = emb @ emb.T
            sims.fill_diagonal_(float("-inf"))
            neighbours = sims.topk(min(cfg.neighbour_k, n_train - 1), dim=1).indices.cpu()
            model.train()
        if step >= cfg.steps:
            model.visual.eval()  # again after every evaluation (which restores train mode)
        idx = rng.sample(range(n_train), batch)
        pos = [cfg.text_prefix + rng.choice(captions[i]) for i in idx]
        negs: list[str] = []
        valid: list[bool] = []
        for i, p in zip(idx, pos):
            for _ in range(cfg.swap_negatives):
                s = swap_attribute(p[len(cfg.text_prefix):], groups, rng)
                ok = s is not None and s[0] not in ref_sets[i]
                negs.append(cfg.text_prefix + (s[0] if ok else p))
                valid.append(ok)
            for _ in range(cfg.neighbour_negatives):
                # before the first mining, a random other image stands in for a neighbour
                j = (int(rng.choice(neighbours[i].tolist())) if neighbours is not None
                     else rng.randrange(n_train))
                c = rng.choice(captions[j])
                negs.append(cfg.text_prefix + c)
                valid.append(c not in ref_sets[i])
        better, worse, pair_owner = [], [], []
        for row, i in enumerate(idx):
            for _ in range(cfg.preference_pairs if pairs_now else 0):
                for b, w in preference_pairs(i, rng):
                    better.append(cfg.text_prefix + b)
                    worse.append(cfg.text_prefix + w)
                    pair_owner.append(row)
        pix = preprocess(_image_batch(images, idx), device=device)
        tokens = tokenizer(pos + negs + better + worse).to(device)
        img_f = model.encode_image(pix, normalize=True)  # [B, D]
        txt_f = model.encode_text(tokens, normalize=True)  # [B + B*H + 2*B*P, D]
        n_txt = batch * (1 + n_neg)
        pos_f, neg_f = txt_f[:batch], txt_f[batch:n_txt].view(batch, n_neg, -1)
        scale = model.logit_scale.exp()
        loss_clip = clip_loss(img_f, pos_f, scale)
        loss = loss_clip
        if n_neg:
            hard = torch.cat([(img_f * pos_f).sum(-1, keepdim=True),
                              torch.einsum("bd,bhd->bh", img_f, neg_f)], dim=1) * scale  # [B, 1+H]
            mask = torch.tensor(valid, device=device).view(batch, n_neg)
            hard[:, 1:] = hard[:, 1:].masked_fill(~mask, float("-inf"))
            loss_hard = F.cross_entropy(hard, torch.zeros(batch, dtype=torch.long, device=device))
            loss = loss + cfg.hard_negative_weight * loss_hard
        if better:
            pair_img = img_f[torch.tensor(pair_owner, device=device)]  # [pairs, D]
            b_f, w_f = txt_f[n_txt:n_txt + len(better)], txt_f[n_txt + len(better):]
            loss_pref = F.softplus(scale * ((pair_img * w_f).sum(-1) - (pair_img * b_f).sum(-1))).mean()
            loss = loss + cfg.preference_weight * loss_pref
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 20 == 0:
            logs = {"evaluator/loss": loss.item(), "evaluator/loss_clip": loss_clip.item(),
                    "evaluator/lr": sched.get_last_lr()[0], "evaluator/logit_scale": scale.item()}
            if n_neg:
                logs["evaluator/loss_hard"] = loss_hard.item()
            if better:
                logs["evaluator/loss_preference"] = loss_pref.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            _log(logger, logs, step)
        if (val_split is not None and cfg.eval_every and step > 0 and step % cfg.eval_every == 0):
            m = evaluate_dual_encoder(model, tokenizer, preprocess, val_split, groups,
                                      cfg.eval_max_images, cfg.seed, device, cfg.text_prefix)
            _log(logger, {f"evaluator/val_{k}": v for k, v in m.items()}, step)
            bar.set_postfix(loss=f"{loss.item():.3f}", swap=f"{m.get('swap_acc', 0):.3f}")
        if cfg.max_time_s is not None and time.perf_counter() - start > cfg.max_time_s:
            log.info("train-evaluator: time limit %.0fs reached at step %d", cfg.max_time_s, step)
            break
    bar.close()
    train_time = time.perf_counter() - start
    model.eval()
    metrics: dict[str, float] = {"train_time_s": train_time, "steps": float(step + 1),
                                 "final_loss": loss.item(), **history}
    if val_split is not None:
        metrics.update(evaluate_dual_encoder(model, tokenizer, preprocess, val_split, groups,
                                             cfg.eval_max_images, cfg.seed, device, cfg.text_prefix))
        _log(logger, {f"evaluator/val_{k}": v for k, v in metrics.items()}, step)
    save_dual_encoder(model, out_dir, "evaluator", name, model_cfg,
                      {"w": cfg.score_w, "text_prefix": cfg.text_prefix, "clamp": True,
                       "metrics": metrics, "config": dataclasses.asdict(cfg)})
    log.debug("train-evaluator: saved to %s (%s)", out_dir, metrics)
    return metrics
