"""A reward student for a CLIP-sized teacher: the teacher's own image tower, a small text tower.

In a DiCO rollout every one of an image's K·n candidates (plus its two greedy anchors) is scored
against the same image, and :class:`~rewards.clip_score.OpenCLIPReward` already encodes each image
row once. With PAC-S ViT-B/32 the text side is then most of the reward's time: a 12-layer,
width-512 transformer run over 77 positions for every distinct caption, against one image tower
pass per image. So this student keeps the teacher's image tower and embedding space unchanged
(the image embedding is the teacher's, computed once per image and shared by all candidates) and
replaces only the text tower by a small one that writes into the same space:

    s(I, c) = max(w · cos(E_img^teacher(I), E_txt^student(c)) + b, 0)

* ``E_txt^student``: an open_clip ``TextTransformer`` (width, depth, heads of
  :class:`TextStudentConfig`) over open_clip's BPE with a short context (captions of the real
  recipe are at most 30 tokens), projected to the teacher's ``embed_dim``.
* It is distilled onto the teacher's text embeddings (:func:`distill_text_tower`: 1 − cos to the
  teacher's embedding of the same caption, plus a regression of the score on the teacher's) — the
  image side needs no distillation, it *is* the teacher's.
* Cost per DiCO step: B image-tower passes (the same as the teacher's) + B·(K·n + 2) small text
  passes instead of B·(K·n + 2) teacher text passes; ``benchmarks/realsize.py`` times both.

Compare :mod:`rewards.distill`, whose student replaces both towers (right for the embedded
default's tiny teacher, where the image tower is a large share of the cost).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip_score import OpenCLIPReward

log = logging.getLogger(__name__)

__all__ = ["SharedImageDualEncoder", "TextStudentConfig", "TextStudentScore", "build_text_student", "distill_text_tower"]


@dataclass
class TextStudentConfig:
    """The small text tower (defaults: sized for PAC-S ViT-B/32 on the real recipe's captions)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    context_length: int = 32  # bos + up to 30 caption tokens + eos (the real recipe's max_len is 30)
    vocab_size: int = 49408  # open_clip's BPE, as the teacher's
    text_prefix: str = ""  # the student reads bare captions (the teacher applies its own prefix)
    # distillation (distill_text_tower)
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    score_weight: float = 1.0  # weight of (s - t)^2 beside 1 - cos(student text emb, teacher text emb)
    seed: int = 0


class _ContextTokens:
    """open_clip's tokenizer at a fixed (shorter) context length."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.context_length = tokenizer, int(context_length)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)


class SharedImageDualEncoder(nn.Module):
    """``encode_image``: the teacher's (frozen, shared); ``encode_text``: the student's text tower."""

    def __init__(self, teacher_model: nn.Module, text: nn.Module):
        super().__init__()
        self.teacher = teacher_model.eval().requires_grad_(False)
        self.text = text

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.teacher.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


class TextStudentScore(OpenCLIPReward):
    """The reward protocol over :class:`SharedImageDualEncoder` (image rows encoded once per call, as
    every :class:`OpenCLIPReward`). Build with :func:`build_text_student`."""

    default_w = 2.0
    default_prefix = ""


def build_text_student(teacher: OpenCLIPReward, cfg: TextStudentConfig | None = None) -> TextStudentScore:
    """A fresh (untrained) student of ``teacher``: its image tower and w, a new text tower of ``cfg``'s
    size in its embedding space. The teacher's ``preprocess`` and tokenizer (at ``cfg.context_length``)
    are reused."""
    from open_clip.transformer import TextTransformer

    cfg = cfg or TextStudentConfig()
    embed_dim = _embed_dim(teacher.model)
    torch.manual_seed(cfg.seed)
    text = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                           heads=cfg.heads, layers=cfg.layers, output_dim=embed_dim).to(teacher.device)
    model = SharedImageDualEncoder(teacher.model, text).eval()
    return TextStudentScore(model, teacher.preprocess, _ContextTokens(teacher.tokenizer, cfg.context_length),
                            w=teacher.w, text_prefix=cfg.text_prefix, batch_size=teacher.batch_size,
                            clamp=teacher.clamp, name=f"TextStudentScore[{cfg.layers}x{cfg.width}, ctx {cfg.context_length}]")


def _embed_dim(model: nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return proj.shape[1]
    if isinstance(proj, nn.Linear):
        return proj.out_features
    with torch.no_grad():
        return model.encode_text(torch.zeros(1, 77, dtype=torch.long, device=next(model.parameters()).device)).shape[-1]


def distill_text_tower(student: TextStudentScore, teacher: OpenCLIPReward, images: Any,
                       captions: Sequence[str], image_index: Sequence[int] | torch.Tensor,
                       cfg: TextStudentConfig | None = None) -> dict[str, float]:
    """Fit the student's text tower to the teacher on (image, caption) pairs.

    loss = mean(1 − cos(E_txt^student(c), E_txt^teacher(c))) + score_weight · mean((s − t)²)
    with t the teacher's score and s = w · cos(E_img^teacher, E_txt^student) + b (b learned, w the
    teacher's). The teacher's image and text embeddings are computed once up front.
    Returns the final losses.
    """
    cfg = cfg or TextStudentConfig()
    device = student.device
    image_index = torch.as_tensor(image_index, dtype=torch.long)
    img = teacher.embed_images(images)  # [I, D]
    t_txt = teacher.embed_texts(list(captions))  # [P, D]
    t_score = teacher.score_embeddings(img[image_index.to(img.device)], t_txt)
    tokens = student.tokenizer(list(captions)).to(device)
    text = student.model.text
    bias = nn.Parameter(torch.zeros((), device=device))
    params = [p for p in text.parameters() if p.requires_grad] + [bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
                                              * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    rng = random.Random(cfg.seed)
    P = len(captions)
    text.train()
    last = {}
    for _ in range(cfg.steps):
        rows = torch.tensor(rng.sample(range(P), min(cfg.batch_size, P)))
        emb = F.normalize(text(tokens[rows]).float(), dim=-1)
        cos_t = (emb * t_txt[rows].to(device)).sum(-1)
        s = student.w * (emb * img[image_index[rows]].to(device)).sum(-1) + bias
        loss_emb = (1 - cos_t).mean()
        loss_score = F.mse_loss(s, t_score[rows].to(device))
        loss = loss_emb + cfg.score_weight * loss_score
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = {"loss": loss.item(), "embedding_loss": loss_emb.item(), "score_loss": loss_score.item()}
    text.eval()
    student.bias = float(bias.detach())
    log.debug("text student distilled: %s", last)
    return last
