"""CLIP-family caption rewards: CLIP-S, RefCLIP-S, PAC-S, RefPAC-S and learned evaluators.

All share one form (Hessel et al. 2021, "CLIPScore"; Sarto et al. 2023, "PAC-S"):

    CLIP-S(c, v)   = w * max(cos(E_img(v), E_txt(prefix + c)), 0)                 w = 2.5
    PAC-S(c, v)    = the same with PAC-S fine-tuned CLIP weights                   w = 2.0
    Ref-*(c, v, R) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(E_txt(c), E_txt(r)), 0))
    H-Mean(a, b)   = 2ab / (a + b)   (0 when a + b = 0)

The text prefix ``"A photo depicts "`` is applied to candidates *and* references, as in both
reference implementations. Each class implements the reward protocol of :mod:`rewards`
(``reward(images, captions, references=None, image_index=None) -> Tensor[len(captions)]``).
"""
from __future__ import annotations

import json
import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .loading import load_open_clip, model_config_of, register_model_config
from .protocol import caption_image_index
from .matching import gated_score, image_features, load_matching_head, text_features
from .registry import register_reward

__all__ = [
    "CLIPScore",
    "LearnedScore",
    "OpenCLIPReward",
    "PACScore",
    "RefCLIPScore",
    "RefPACScore",
    "clip_s",
    "register_unique",
    "harmonic_mean",
    "ref_text_similarity",
]


def clip_s(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = 2.5) -> torch.Tensor:
    """CLIP-S on row-aligned embeddings: ``w * max(cos(image_emb[i], text_emb[i]), 0)``.

    Args:
        image_emb: ``[B, D]`` (need not be normalised; normalised here).
        text_emb: ``[B, D]``.
        w: rescaling weight (2.5 for CLIP-S, 2.0 for PAC-S).
    Returns:
        ``[B]`` scores.
    """
    cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)
    return w * cos.clamp(min=0.0)


def ref_text_similarity(cand_emb: torch.Tensor, ref_emb: torch.Tensor, ref_owner: torch.Tensor,
                        cand_owner: torch.Tensor) -> torch.Tensor:
    """``max(max_{r of the candidate's image} cos(c, r), 0)``: the text side of RefCLIP-S.

    Args:
        cand_emb: ``[N, D]`` candidate text embeddings.
        ref_emb: ``[R, D]`` reference text embeddings (all images' references, flattened).
        ref_owner: ``[R]`` image row each reference belongs to.
        cand_owner: ``[N]`` image row each candidate belongs to.
    Returns:
        ``[N]``; an image without references is an error.
    """
    sims = F.normalize(cand_emb.float(), dim=-1) @ F.normalize(ref_emb.float(), dim=-1).T  # [N, R]
    own = cand_owner[:, None] == ref_owner[None, :]
    if not bool(own.any(dim=1).all()):
        bad = cand_owner[~own.any(dim=1)].unique().tolist()
        raise ValueError(f"no references for image rows {bad[:10]}")
    return sims.masked_fill(~own, float("-inf")).amax(dim=1).clamp(min=0.0)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2ab / (a + b)``, defined as 0 where ``a + b == 0`` (both scores clamped at 0)."""
    s = a + b
    return torch.where(s > 0, 2 * a * b / s.clamp(min=1e-12), torch.zeros_like(s))


class OpenCLIPReward:
    """An open_clip dual encoder used as a caption reward (base of every reward in this module).

    ``score = max(w * cos(E_img, E_txt(text_prefix + caption)) + bias, 0)`` (``clamp=True``;
    ``bias`` is 0 for CLIP-S/PAC-S, a learned offset for the distilled student), optionally
    harmonically mixed with the reference similarity (``uses_references``). With a ``matching_head``
    (`rewards.matching`, a learned evaluator or student that has one) the score inside the clamp is
    ``w * cos + bias + head_weight * (sigmoid(l) - 1)``, l the head's match logit.

    Batched: images and texts are encoded ``batch_size`` at a time; within one call every distinct
    text (candidate or reference) is encoded once and image rows are encoded once however many
    candidates point at them through ``image_index``.
    """

    default_w: float = 2.5
    default_prefix: str = ""
    uses_references: bool = False

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, *, w: float | None = None,
                 text_prefix: str | None = None, batch_size: int = 128, clamp: bool = True,
                 bias: float = 0.0, name: str | None = None, architecture: dict | None = None,
                 matching_head: torch.nn.Module | None = None, head_weight: float = 0.0, head_stage: int = 3):
        self.model = model.eval()
        # the open_clip config of ``model`` (set by `from_pretrained`): what a student that keeps this
        # reward's image tower saves to rebuild it (`rewards.text_student`)
        self.architecture = architecture
        # a cross-attention head over both towers (rewards.matching): score = w·cos + b + λ·(σ(ℓ) − 1)
        self.matching_head = None if matching_head is None else matching_head.eval()
        self.head_weight, self.head_stage = float(head_weight), int(head_stage)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.w = float(self.default_w if w is None else w)
        prefix = self.default_prefix if text_prefix is None else text_prefix
        if prefix and not prefix.endswith(" "):
            prefix += " "  # both reference implementations add the missing space
        self.text_prefix = prefix
        self.batch_size = int(batch_size)
        self.clamp = clamp
        self.bias = float(bias)
        self.name = name or type(self).__name__

    @classmethod
    def from_pretrained(cls, model_name: str, checkpoint: str | Path | None = None,
                        device: str | torch.device = "cpu", **kwargs: Any) -> "OpenCLIPReward":
        """Load ``model_name`` (open_clip name or ``local-dir:``) with local ``checkpoint`` weights.

        ``allow_gelu_for_openai_weights`` / ``option`` go to :func:`load_open_clip` (the QuickGELU
        guard); the other keyword arguments (``w``, ``text_prefix``, ``clamp``, ...) to the reward."""
        loader_keys = ("allow_gelu_for_openai_weights", "option")
        loader = {k: kwargs.pop(k) for k in loader_keys if k in kwargs}
        model, preprocess, tokenizer = load_open_clip(model_name, checkpoint, device, **loader)
        return cls(model, preprocess, tokenizer, architecture=model_config_of(model_name), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"{self.name}(w={self.w}, prefix={self.text_prefix!r}, refs={self.uses_references}, "
                f"device={self.device})")

    # -- embeddings -------------------------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (PIL list, uint8 [B,H,W,3] or preprocessed)."""
        pixels = self.preprocess(images, device=self.device)  # [B, 3, S, S]
        out = [self.model.encode_image(pixels[i:i + self.batch_size])
               for i in range(0, pixels.shape[0], self.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], add_prefix: bool = True) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]``; duplicate texts are encoded once."""
        full = [(self.text_prefix if add_prefix else "") + t for t in texts]
        unique = list(dict.fromkeys(full))
        where = {t: i for i, t in enumerate(unique)}
        chunks = []
        for i in range(0, len(unique), self.batch_size):
            tokens = self.tokenizer(unique[i:i + self.batch_size]).to(self.device)
            chunks.append(self.model.encode_text(tokens))
        emb = F.normalize(torch.cat(chunks).float(), dim=-1)  # [U, D]
        return emb[torch.tensor([where[t] for t in full], device=emb.device, dtype=torch.long)]

    # -- scoring ----------------------------------------------------------------------------
    def score_embeddings(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Row-aligned image/text embeddings -> scores ``[B]`` (the reward's own w, bias, clamp; the dual encoder
        alone: a matching head, when there is one, needs the towers' grids and tokens, see `match_logits`)."""
        cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(-1)
        score = self.w * cos + self.bias
        return score.clamp(min=0.0) if self.clamp else score

    @torch.no_grad()
    def __call__(self, images: Any, captions: Sequence[str],
                 references: Sequence[Sequence[str]] | None = None,
                 image_index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Score ``captions`` against their images; see the protocol in :mod:`rewards`.

        ``references`` (when given) are per *image row*: ``references[j]`` lists the reference
        captions of ``images[j]``.
        """
        captions = list(captions)
        n_images = len(images)
        image_index = caption_image_index(n_images, len(captions), image_index)
        if not captions:
            return torch.zeros(0, device=self.device)
        if self.matching_head is not None:
            if self.uses_references:
                raise ValueError(f"{self.name}: a matching head scores without references")
            cos, logit = self.match_logits(images, captions, image_index)
            score = gated_score(cos, logit, self.w, self.bias, self.head_weight)
            return (score.clamp(min=0.0) if self.clamp else score).float()
        texts = list(captions)
        ref_owner: list[int] = []
        if self.uses_references:
            if references is None:
                raise ValueError(f"{self.name} needs references (one list of strings per image row)")
            if len(references) != n_images:
                raise ValueError(f"{len(references)} reference lists for {n_images} images")
            for j, refs in enumerate(references):
                refs = [refs] if isinstance(refs, str) else list(refs)
                texts.extend(refs)
                ref_owner.extend([j] * len(refs))
        image_index = image_index.to(self.device)
        image_emb = self.embed_images(images)  # [n_images, D], once per row
        text_emb = self.embed_texts(texts)  # dedup inside
        cand_emb = text_emb[:len(captions)]
        scores = self.score_embeddings(image_emb[image_index], cand_emb)
        if self.uses_references:
            ref_sim = ref_text_similarity(cand_emb, text_emb[len(captions):],
                                          torch.tensor(ref_owner, device=self.device), image_index)
            scores = harmonic_mean(scores, ref_sim)
        return scores.float()


    @torch.no_grad()
    def match_logits(self, images: Any, captions: Sequence[str],
                     image_index: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos [N], matching-head logit ℓ [N]) of each caption with its image row, each image and each distinct
        caption through its tower once (the pooled embedding and the grid / tokens the head reads come from the
        same pass)."""
        head, device = self.matching_head, self.device
        if head is None:
            raise ValueError(f"{self.name} has no matching head")
        image_index = torch.as_tensor(image_index, dtype=torch.long).flatten().to(device)
        pixels = self.preprocess(images, device=device)  # [B, 3, S, S]
        img_emb, img_tok = [], []
        for i in range(0, pixels.shape[0], self.batch_size):
            pooled, grid = image_features(self.model.visual, pixels[i:i + self.batch_size], self.head_stage)
            img_emb.append(pooled)
            img_tok.append(head.embed_image(grid))
        img_emb, img_tok = F.normalize(torch.cat(img_emb).float(), dim=-1), torch.cat(img_tok)  # [B, D], [B, G, d]
        full = [self.text_prefix + t for t in captions]
        unique = list(dict.fromkeys(full))
        position = {t: i for i, t in enumerate(unique)}
        where = torch.tensor([position[t] for t in full], device=device)  # [N] caption -> its unique row
        txt_emb, txt_tok, txt_mask = [], [], []
        for i in range(0, len(unique), self.batch_size):
            pooled, tokens, mask = text_features(self.model, self.tokenizer(unique[i:i + self.batch_size]).to(device))
            txt_emb.append(pooled)
            txt_tok.append(head.embed_text(tokens))
            txt_mask.append(mask)
        length = max(t.shape[1] for t in txt_tok)  # chunks are cut to their own longest caption
        txt_tok = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in txt_tok])  # [U, L, d]
        txt_mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in txt_mask])  # [U, L]
        txt_emb = F.normalize(torch.cat(txt_emb).float(), dim=-1)
        cos = (img_emb[image_index] * txt_emb[where]).sum(-1)
        logits = [head.match(txt_tok[where[i:i + 1024]], txt_mask[where[i:i + 1024]], img_tok, image_index[i:i + 1024])
                  for i in range(0, len(full), 1024)]
        return cos, torch.cat(logits).float()


class CLIPScore(OpenCLIPReward):
    """CLIP-S (Hessel et al. 2021): ``2.5 * max(cos(E_img, E_txt("A photo depicts " + c)), 0)``."""

    default_w = 2.5
    default_prefix = "A photo depicts "


class RefCLIPScore(CLIPScore):
    """RefCLIP-S: ``H-Mean(CLIP-S, max(max_r cos(E_txt(c), E_txt(r)), 0))`` (CLIP-S includes w)."""

    uses_references = True


class PACScore(OpenCLIPReward):
    """PAC-S (Sarto et al. 2023): CLIP-S form with w = 2.0 and PAC-S fine-tuned CLIP weights.

    The PAC-S release stores ``{"state_dict": <fine-tuned CLIP state dict>}``; load it with
    ``PACScore.from_pretrained("ViT-B-32-quickgelu", "clip_ViT-B-32.pth")`` (OpenAI-architecture
    ViT-B/32 uses QuickGELU) — any open_clip architecture + local checkpoint works the same way.
    """

    default_w = 2.0
    default_prefix = "A photo depicts "


class RefPACScore(PACScore):
    """RefPAC-S: ``H-Mean(PAC-S, max(max_r cos(E_txt(c), E_txt(r)), 0))``."""

    uses_references = True


class LearnedScore(OpenCLIPReward):
    """A learned evaluator (``rewards.evaluator.train_evaluator``) used as a CLIP-S-style reward.

    No text prefix by default (it was trained on bare captions); ``w`` and the prefix are read from
    the run folder's JSON by :meth:`from_dir`.
    """

    default_w = 2.5
    default_prefix = ""
    manifest_name = "evaluator.json"

    @classmethod
    def from_dir(cls, out_dir: str | Path, device: str | torch.device = "cpu",
                 **overrides: Any) -> "OpenCLIPReward":
        """Load from a folder written by the trainer (``<manifest>.json`` + weights beside it)."""
        out_dir = Path(out_dir)
        manifest = out_dir / cls.manifest_name
        if not manifest.is_file():
            raise FileNotFoundError(f"no {cls.manifest_name} in {out_dir}")
        meta = json.loads(manifest.read_text())
        name = register_unique(meta["model_name"], meta["model_cfg"])
        kwargs = dict(w=meta.get("w"), text_prefix=meta.get("text_prefix", ""),
                      clamp=meta.get("clamp", True), bias=meta.get("bias", 0.0))
        if "matching_head" in meta:  # the evaluator's or student's cross-attention head (rewards.matching)
            entry = meta["matching_head"]
            kwargs.update(matching_head=load_matching_head(out_dir, entry, device), head_weight=entry["score_weight"],
                          head_stage=entry["image_stage"])
        kwargs.update(overrides)
        return cls.from_pretrained(name, out_dir / meta["weights"], device=device, **kwargs)


def register_unique(name: str, model_cfg: dict) -> str:
    """Register ``model_cfg`` as ``name``, or as ``name-<hash>`` if ``name`` means another config."""
    try:
        return register_model_config(name, model_cfg)
    except ValueError:
        digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
        return register_model_config(f"{name}-{digest}", model_cfg)


# ------------------------------------------------------------------------------- registrations
_CLIP_FIELDS = ("model_name", "checkpoint", "scale", "prefix", "clamp", "allow_gelu_for_openai_weights")


def _clip_family(cls: type[OpenCLIPReward]):
    def build(section, ctx):
        # scale / prefix / clamp left unset give the official scores (w 2.5 CLIP-S / 2.0 PAC-S, "A photo depicts ", clamp at 0)
        return cls.from_pretrained(section.model_name, section.checkpoint, device=ctx.device, w=section.scale,
                                   text_prefix=section.prefix, clamp=True if section.clamp is None else section.clamp,
                                   allow_gelu_for_openai_weights=section.allow_gelu_for_openai_weights,
                                   option=f"{ctx.name}.allow_gelu_for_openai_weights")
    return build


for _kind, _cls, _what in (("clip", CLIPScore, "CLIP-S: w·max(cos, 0) of an open_clip model_name + local checkpoint (w 2.5)"),
                           ("refclip", RefCLIPScore, "RefCLIP-S: harmonic mean of CLIP-S and the best reference similarity"),
                           ("pac", PACScore, "PAC-S: the CLIP-S form with PAC-S weights (w 2.0)"),
                           ("refpac", RefPACScore, "RefPAC-S: harmonic mean of PAC-S and the best reference similarity")):
    register_reward(_kind, _clip_family(_cls), _what, uses=_CLIP_FIELDS, needs=("model_name", "checkpoint"))

register_reward("learned", lambda section, ctx: LearnedScore.from_dir(section.path or ctx.run_dir / "evaluator", device=ctx.device),
                "this run's learned evaluator (train-evaluator), or `path:` to another", uses=("path",))
