"""The matching head: a small cross-attention reader of a caption's tokens and an image's grid, on top of a dual encoder.

Where it sits: ``rewards``, beside the dual encoders it reads (`rewards.evaluator`, `rewards.distill`); the
``train-evaluator`` stage trains it (`rlrefine.trainers.matching`) and `OpenCLIPReward` scores with it when a
saved evaluator or student carries one.

A CLIP-style dual encoder compares one pooled image vector with one pooled caption vector. Pooling keeps *what* is
in the image and mostly forgets *where*: the shapes teacher scored "a red circle above a blue square" and "... below
..." alike (relation-swap accuracy 0.54, chance 0.5) although relation swaps were among its hard negatives. The
head reads both sides before pooling, as the image-text matching heads of ALBEF / BLIP do:

    T = P_t · text_tower_tokens(c)                           [L, d]   the text tower's per-token outputs (after ln_final)
    V = LN(P_v · image_grid(v)), with cell centres (x, y)    [G, d]   an image-tower stage's grid cells
    x = [cls; T] → `layers` pre-norm blocks: self-attention over x; cross-attention x → V that returns what it
        found and where (the attention-weighted mean of the cells' coordinates); MLP
    ℓ(c, v) = u · LN(mean_t x_t)                             the match logit

and the reward adds it to the dual encoder's score as a gate that only takes away:

    score(c, v) = w · cos(E_img(v), E_txt(c)) + b + λ · (σ(ℓ(c, v)) − 1)    (clamped at 0 as before)

A caption the head finds true keeps the dual encoder's score (σ ≈ 1), so the orders that score already has between
true captions (the complete description above a correct partial one) stay; a false one (a swapped relation, colour or
shape, a misnamed object) loses up to λ. The head reads frozen towers, so the image tower (the captioner's encoder)
and the embeddings (`embed_images` / `embed_texts`, used for hard-pair mining and graduality) are unchanged.

* `MatchingHeadConfig`: the head's size and its training recipe (the recipe's ``evaluator.matching_head``; steps 0 is
  off) and the student's (``distill.student.matching_head``);
* `MatchingHead`: the module; `image_features` / `text_features`: one pass of each tower giving the pooled embedding
  (exactly ``encode_image`` / ``encode_text``) and the grid or tokens the head reads;
* `gated_score`: the formula above; `save_matching_head` / `load_matching_head`: the saved form
  (``matching_head.pt`` and a ``matching_head`` entry in the dual encoder's manifest, which
  ``LearnedScore.from_dir`` / ``DistilledScore.from_dir`` read).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlrefine.models.encoders import cell_centres, resnet_grid, resnet_stages

__all__ = ["MatchingHead", "MatchingHeadConfig", "build_matching_head", "gated_score", "image_features",
           "load_matching_head", "save_matching_head", "text_features"]

HEAD_FILE = "matching_head.pt"


@dataclass
class MatchingHeadConfig:
    """A matching head over a dual encoder's frozen towers (rewards.matching); steps 0 is no head."""

    steps: int = 0  # training steps of the head on the frozen towers, after the dual encoder's own (0: no head, the plain dual encoder; shapes: 600)
    width: int = 64  # width d of the caption side
    layers: int = 2  # blocks: self-attention over [cls; caption tokens], cross-attention to the image cells, SwiGLU MLP
    heads: int = 8  # attention heads per block; half look back along the caption, half ahead (8 learnt relations in half the steps 4 needed)
    mlp_ratio: int = 2  # SwiGLU hidden width = mlp_ratio * width
    cross_first: bool = False  # each block attends to the image before the caption: one block can then find two objects and compare them (a cheaper student)
    image_stage: int = 3  # the image-tower stage whose grid the head reads, later stages' features appended to each cell (ModifiedResNet: 0 stem .. 4 last; 3 is 4x4 cells at 64 px)
    score_weight: float = 0.15  # lambda: a caption the head calls false loses up to this much score (w * cos spans ~2.5); shapes: at 0.25 complete descriptions kept their lead over partial ones on 0.94 of images, at 0.15 on 0.95
    batch_size: int = 64  # images per step; each brings its true captions, their false variants and its objects' places
    lr: float = 3.0e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    relation_fraction: float = 0.7  # share of each step's first true caption that states where things are (shapes: relations, regions); the rest name every object
    pairwise_weight: float = 3.0  # weight of softplus(l_false - l_true) within each true caption's group, beside the match cross-entropy (1: relations learnt in ~1.5x the steps)
    axis_negatives: bool = False  # shapes: each stated relation is also shown moved to the other axis, as false ("above" where the objects lie mostly side by side; rlrefine.data.shapes.wrong_axis_statement); off keeps earlier heads' draws
    locate_weight: float = 1.0  # weight of the grounding loss: from a phrase naming one object, the head predicts where it is (MSE, coordinates in [-1, 1]); it teaches the cross-attention to find things

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"matching_head.steps must be >= 0, got {self.steps}")
        if self.width % self.heads:
            raise ValueError(f"matching_head.width ({self.width}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.relation_fraction <= 1.0:
            raise ValueError(f"matching_head.relation_fraction must be in [0, 1], got {self.relation_fraction}")


# ---------------------------------------------------------------------------------------------
# the two towers, read before pooling
def image_features(visual: nn.Module, pixels: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D], grid [B, G, C]) of an open_clip image tower in one pass: ``pooled`` is exactly
    ``visual(pixels)``, ``grid`` the cells of stage ``stage`` (ModifiedResNet: 0 stem .. 4, each cell with the
    features of every later stage's cell above it appended, what a coarse stage recognises beside where a fine
    stage sees it; ViT: the tokens after block ``stage``)."""
    if hasattr(visual, "attnpool"):  # ModifiedResNet (its forward_intermediates stops at the last index it returns)
        if not 0 <= stage <= 4:
            raise ValueError(f"matching_head.image_stage {stage}: a ModifiedResNet has stages 0 (stem) .. 4")
        stages = resnet_stages(visual, pixels)
        grid = resnet_grid(stages[stage:])  # this stage and every later one, the coarser grids repeated onto its cells
        pooled = visual.attnpool(stages[-1])
    elif hasattr(visual, "forward_intermediates"):  # ViT: the output of block ``stage``
        out = visual.forward_intermediates(pixels, indices=[stage], output_fmt="NCHW")
        pooled, grid = out["image_features"], out["image_intermediates"][0]
    else:
        raise ValueError(f"a matching head needs an open_clip image tower (ModifiedResNet or ViT); got {type(visual).__name__}")
    return pooled, grid.flatten(2).transpose(1, 2)  # [B, D], [B, h*w, C]


def text_features(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embedding [N, D], token outputs [N, L, W], mask [N, L]) of an open_clip ``CLIP`` text tower in one pass.

    ``embedding`` is exactly ``model.encode_text(tokens)``; the token outputs are the tower's per-position outputs
    after ``ln_final``, cut to the longest caption; ``mask`` is True up to and including the pooled (eot / eos)
    position of each caption."""
    from open_clip.transformer import text_global_pool

    pool_type, eos = model.text_pool_type, getattr(model, "text_eos_id", None)
    if pool_type == "argmax":
        last = tokens.argmax(dim=-1)
    elif pool_type == "eos":
        last = (tokens == eos).int().argmax(dim=-1)
    else:
        last = torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
    length = int(last.max()) + 1 if tokens.shape[0] else 1
    causal = model.attn_mask is not None and bool(torch.isinf(model.attn_mask[0, 1:]).all())
    if causal:  # no position sees a later one, so the padding after the longest caption changes nothing: cut it
        tokens = tokens[:, :length]
    cast, n = model.transformer.get_cast_dtype(), tokens.shape[1]
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    mask = model.attn_mask if model.attn_mask is None else model.attn_mask[:n, :n]
    x = model.ln_final(model.transformer(x, attn_mask=mask))  # [N, n, W]
    pooled = text_global_pool(x, tokens, pool_type, eos_token_id=eos)
    if model.text_projection is not None:
        pooled = model.text_projection(pooled) if isinstance(model.text_projection, nn.Linear) else pooled @ model.text_projection
    keep = torch.arange(length, device=tokens.device)[None, :] <= last[:, None]  # [N, L]
    return pooled, x[:, :length], keep


# ---------------------------------------------------------------------------------------------
# the head
class _Block(nn.Module):
    """Pre-norm block of the caption side: self-attention over the caption's tokens (``keep`` masks padding),
    cross-attention to the image's cells, MLP (BLIP's image-grounded text encoder, small).

    The cross-attention finds cells by what is in them (its keys carry no position), and each head also returns
    *where* it looked: the attention-weighted mean of the cells' coordinates, ``Σ_c α_c · (x_c, y_c)``, projected
    into the caption's stream. A relation is then a comparison of two such coordinates; with the position mixed
    into keys and values instead, relation swaps stayed at chance (0.50) through 800 steps while colour and shape
    swaps were learnt."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, cross_first: bool = False):
        super().__init__()
        self.heads, self.cross_first = heads, cross_first
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.q, self.kv, self.cross_proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.where = nn.Linear(2 * heads, width)
        self.gate, self.up = nn.Linear(width, mlp_ratio * width), nn.Linear(width, mlp_ratio * width)
        self.down = nn.Linear(mlp_ratio * width, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [P, S, d] -> [P, h, S, d/h]
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def image_keys(self, image: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[I, G, d] image cells and their [G, 2] coordinates -> keys [I, h, G, d/h] and values [I, h, G, d/h + 2]
        (once per image, shared by its captions)."""
        k, v = self.kv(image).chunk(2, dim=-1)
        v = self._split(v)
        return self._split(k), torch.cat([v, coords.expand(*v.shape[:3], 2)], dim=-1)

    def read_caption(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Self-attention over the caption, ``bias`` [P, h, S, S] added to the scores (directions, padding)."""
        P, L, d = x.shape
        q, k, v = (self._split(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        # written out: SDPA with a float mask per pair spent more time checking the mask than attending
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + bias
        a = scores.softmax(dim=-1) @ v  # [P, h, L, d/h]
        return x + self.proj(a.transpose(1, 2).reshape(P, L, d))

    def read_image(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Cross-attention to the image cells: what each head found, and where."""
        P, L, d = x.shape
        a = F.scaled_dot_product_attention(self._split(self.q(self.norm2(x))), keys, values)  # [P, h, L, d/h + 2]
        what, where = a[..., :-2], a[..., -2:]
        return x + self.cross_proj(what.transpose(1, 2).reshape(P, L, d)) + self.where(where.transpose(1, 2).reshape(P, L, -1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.cross_first:  # find, then compare along the caption: one block can check a relation
            x = self.read_caption(self.read_image(x, keys, values), bias)
        else:
            x = self.read_image(self.read_caption(x, bias), keys, values)
        h = self.norm3(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))  # SwiGLU: a product of two views of each token


class MatchingHead(nn.Module):
    """ℓ(c, v): the match logit of a caption's token outputs and an image's grid cells (module docstring).

    The caption's tokens, behind a learned ``cls`` token, go through `layers` blocks that attend to each other and
    to the image's cells (`_Block`); ℓ is read from the mean of the final states. Scoring P pairs of I images and U
    captions projects each image and caption once (`embed_image`, `embed_text`) and runs the blocks on the P
    captions (`match`)."""

    def __init__(self, text_width: int, image_channels: int, grid_cells: int, width: int = 64, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 2, cross_first: bool = False):
        super().__init__()
        self.dims = dict(text_width=text_width, image_channels=image_channels, grid_cells=grid_cells, width=width,
                         layers=layers, heads=heads, mlp_ratio=mlp_ratio, cross_first=cross_first)
        side = math.isqrt(grid_cells)
        if side * side != grid_cells:
            raise ValueError(f"a matching head reads a square grid of cells, got {grid_cells}")
        self.register_buffer("coords", cell_centres(side), persistent=False)  # [G, 2] in [-1, 1], x right, y down
        self.text_in = nn.Linear(text_width, width)
        self.image_in = nn.Sequential(nn.Linear(image_channels, width), nn.LayerNorm(width))
        self.cls = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, cross_first) for _ in range(layers))
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, 1)
        self.where_out = nn.Linear(width, 2)

    def directions(self, length: int) -> torch.Tensor:
        """Self-attention bias [h, S, S] of the caption side: the first half of the heads look back (s ≤ t), the
        other half ahead (s ≥ t), each with an ALiBi recency slope −m·|t − s| (Press et al. 2022).

        A relation word then sees what was found before it and what after it on different heads from the first
        step, so "where is the first object against the second" is a difference its MLP can read. With plain
        bidirectional heads the word's first view is the mean of both positions, which cancels that difference,
        and relation swaps stayed at chance while colour and shape swaps were learnt."""
        heads = self.dims["heads"]
        t = torch.arange(length, device=self.cls.device)
        offset = (t[None, :] - t[:, None]).float()  # s − t
        slopes = 2.0 ** -torch.arange(1, heads // 2 + 1, device=offset.device, dtype=offset.dtype)
        slopes = torch.cat([slopes, slopes, slopes[:heads % 2]])[:heads]
        ahead = (torch.arange(heads, device=offset.device) >= heads // 2)[:, None, None]
        allowed = torch.where(ahead, offset >= 0, offset <= 0)
        return torch.where(allowed, -slopes[:, None, None] * offset.abs(), float("-inf"))

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[U, L, W] text-tower token outputs -> [U, L, d]."""
        return self.text_in(tokens)

    def embed_image(self, grid: torch.Tensor) -> torch.Tensor:
        """[I, G, C] grid cells -> [I, G, d]."""
        return self.image_in(grid)

    def match(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
              image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Captions [P, L, d] (mask [P, L]) and images [I, G, d] -> logits [P]; caption p reads image
        ``image_index[p]`` (default: row-aligned, I = P)."""
        return self.out(self.norm(self.read(text, text_mask, image, image_index))).squeeze(-1)

    def locate(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
               image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Where the object a phrase names is: [P, 2] (x, y) in [-1, 1] (a training signal that makes the
        cross-attention find things, `MatchingHeadConfig.locate_weight`)."""
        return self.where_out(self.read(text, text_mask, image, image_index))

    def read(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
             image_index: torch.Tensor | None = None) -> torch.Tensor:
        """The caption read against the image: the mean of the final states [P, d]."""
        P = text.shape[0]
        x = torch.cat([self.cls.expand(P, 1, -1), text], dim=1)  # [P, 1 + L, d]
        keep = torch.cat([torch.ones(P, 1, dtype=torch.bool, device=x.device), text_mask], dim=1)
        # [P, h, S, S]; padding gets a large finite penalty, not -inf, so a padded position's own row stays finite
        bias = self.directions(x.shape[1]).to(x.dtype)[None] + torch.where(keep, 0.0, -1e4)[:, None, None, :].to(x.dtype)
        for block in self.blocks:
            keys, values = block.image_keys(image, self.coords)
            if image_index is not None:
                keys, values = keys[image_index], values[image_index]
            x = block(x, bias, keys, values)
        return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)  # [P, d] mean over cls and the caption

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, grid: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Text-tower outputs [P, L, W] (mask [P, L]) and grids [I, G, C] -> logits [P] (see `match`)."""
        return self.match(self.embed_text(text), text_mask, self.embed_image(grid), image_index)


def build_matching_head(model: nn.Module, cfg: MatchingHeadConfig, image_size: int) -> MatchingHead:
    """A fresh head for the open_clip ``model``'s towers (their widths and grid size read by one probe pass)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        was = model.training
        model.eval()
        _, grid = image_features(model.visual, torch.zeros(1, 3, image_size, image_size, device=device), cfg.image_stage)
        model.train(was)
    return MatchingHead(model.transformer.width, grid.shape[2], grid.shape[1], cfg.width, cfg.layers, cfg.heads,
                        cfg.mlp_ratio, cfg.cross_first).to(device)


def gated_score(cos: torch.Tensor, logit: torch.Tensor, w: float, bias: float, score_weight: float) -> torch.Tensor:
    """``w · cos + bias + λ · (σ(ℓ) − 1)``: the dual encoder's score, less up to λ where the head calls the caption false."""
    return w * cos + bias + score_weight * (torch.sigmoid(logit) - 1.0)


# ---------------------------------------------------------------------------------------------
# saved form
def save_matching_head(head: MatchingHead, out_dir: Path, score_weight: float, image_stage: int) -> dict[str, Any]:
    """Write ``out_dir/matching_head.pt``; returns the ``matching_head`` entry of the manifest beside it (the
    weights' file name, the dims, λ and the image stage) that `load_matching_head` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{HEAD_FILE}.tmp"
    torch.save({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp)
    os.replace(tmp, out_dir / HEAD_FILE)
    return {"weights": HEAD_FILE, "dims": dict(head.dims), "score_weight": float(score_weight), "image_stage": int(image_stage)}


def load_matching_head(out_dir: str | Path, entry: dict[str, Any], device: str | torch.device = "cpu") -> MatchingHead:
    """The head a manifest's ``matching_head`` entry describes, with its weights from ``out_dir``."""
    path = Path(out_dir) / entry["weights"]
    if not path.is_file():
        raise FileNotFoundError(f"the manifest in {out_dir} names a matching head but {path} is missing")
    head = MatchingHead(**entry["dims"])
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return head.to(device).eval()


