"""A reward student for a CLIP-sized teacher: a frozen open_clip image tower kept as it is, a small text tower.

In a DiCO rollout every one of an image's K·n candidates (plus its two greedy anchors) is scored
against the same image, and :class:`~rewards.clip_score.OpenCLIPReward` already encodes each image
row once. With PAC-S ViT-B/32 the text side is then most of the reward's time: a 12-layer,
width-512 transformer run over 77 positions for every distinct caption, against one image tower
pass per image. So this student keeps an image tower and its embedding space unchanged (computed
once per image and shared by all candidates) and replaces only the text tower by a small one that
writes into that space:

    s(I, c) = max(w · cos(E_img^tower(I), E_txt^student(c)) + b, 0)

* ``E_img^tower``: the image tower of the teacher (a ``clip`` / ``pac`` / ``learned`` teacher), or, for a
  teacher without an open_clip image tower (the BLIP ``itm`` head), of the open_clip reward the recipe's
  ``distill.image_tower`` names; frozen, its embedding of an image is exact.
* ``E_txt^student``: an open_clip ``TextTransformer`` (width, depth, heads of :class:`TextStudentConfig`)
  over a short context, projected to the image tower's ``embed_dim``; it reads open_clip's BPE
  (``tokenizer="open_clip"``, open vocabulary) or a word vocabulary trained on the distillation
  captions (``"word"``: no Python BPE, far cheaper per caption; unknown words become ``<unk>``).
* Trained by the ``distill-reward`` stage with ``distill.student_kind: text``
  (`rlrefine.trainers.distill_text`): onto the teacher's text embeddings where the teacher has them in
  the image tower's space (1 − cos) and onto its scores (regression and the per-image listwise KL).
* Saved as ``text_student.json`` (the manifest: text tower config, the image tower's open_clip
  architecture, w, b, tokenizer) + ``text_student.pt`` (text tower) + ``image_tower.pt`` (the frozen image
  tower, so the folder loads on its own) [+ ``tokenizer.json``]; ``TextStudentScore.from_dir(dir)`` and
  ``DistilledScore.from_dir(dir)`` (reward kind ``distilled``) load it.
* Cost per DiCO step: B image-tower passes (the same as the teacher's) + B·(K·n + 2) small text
  passes instead of B·(K·n + 2) teacher text passes; ``benchmarks/realsize.py`` times both.

Compare :mod:`rewards.distill`, whose student replaces both towers (right for the embedded
default's tiny teacher, where the image tower is a large share of the cost).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn as nn

from rlrefine.data.tokenizer import CaptionTokenizer, WordTokens

from .clip_score import OpenCLIPReward, register_unique
from .loading import BatchedPreprocess

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "SharedImageDualEncoder", "TextStudentConfig", "TextStudentScore", "build_text_student",
           "text_tower_config"]

MANIFEST = "text_student.json"  # a folder holding it is a text student (DistilledScore.from_dir dispatches on it)
TEXT_WEIGHTS, IMAGE_WEIGHTS = "text_student.pt", "image_tower.pt"
TOWER_ARCHITECTURE = "rlrefine-text-student-image-tower"  # the open_clip name the saved tower's config is registered under


@dataclass
class TextStudentConfig:
    """The text student and its distillation (`distill.text_student`; defaults sized for PAC-S ViT-B/32 on
    the real recipe's captions)."""

    width: int = 256  # text tower width
    layers: int = 4  # text tower transformer blocks
    heads: int = 4  # text tower attention heads
    context_length: int = 32  # tokens incl. bos/eos (the real recipe's captions are at most 30 BPE tokens)
    tokenizer: Literal["open_clip", "word"] = "open_clip"  # open_clip: the image tower's BPE (open vocabulary); word: a
                                                           # word vocabulary of the distillation captions, saved beside
                                                           # the student (no Python BPE; unseen words become <unk>)
    text_prefix: str = ""  # the student reads bare captions (the teacher applies its own prefix)
    clamp: bool = True  # the saved reward scores max(w·cos + b, 0), like CLIP-S
    max_images: int | None = 4000  # images of the split whose pairs are used (teacher scoring cost); None: all
    holdout_fraction: float = 0.2  # images whose pairs are held out for the report
    hard_neighbours: int = 3  # nearest images (in the image tower's space) whose captions give hard pairs
    hard_captions_per_neighbour: int = 1  # captions drawn from each of those images
    teacher_batch_size: int | None = None  # override the teacher's internal batch size
    steps: int = 300  # optimizer steps (only the text tower and w, b learn; image embeddings are computed once)
    images_per_step: int = 64  # images per step; each brings up to max_pairs_per_image pairs
    max_pairs_per_image: int = 16  # pairs of one image in a step (its listwise group)
    lr: float = 1e-3  # AdamW learning rate (warm-up, then cosine to 0)
    weight_decay: float = 0.01  # AdamW weight decay (not on gains, biases and embeddings)
    warmup_steps: int = 20  # linear warm-up steps
    embedding_weight: float = 1.0  # weight of 1 − cos(student, teacher text embedding); used where the teacher is the
                                   # image tower's reward (its text embeddings share the space), not for itm
    mse_weight: float = 1.0  # weight of the score regression (s − t)²
    listwise_weight: float = 1.0  # weight of KL(softmax(t/T) ‖ softmax(s/T)) over each image's pairs (its ranking)
    listwise_temperature: float = 0.1  # T of that softmax, in score units
    log_every: int = 20  # steps between TensorBoard scalars
    checkpoint_every: int = 500  # steps between resumable checkpoints (--resume)
    timing_repeats: int = 3  # held-out speed: best of this many student / teacher scorings
    seed: int = 0  # text tower initialisation, the held-out images and the draws of pairs

    def __post_init__(self) -> None:
        if self.tokenizer not in ("open_clip", "word"):
            raise ValueError(f"text_student tokenizer must be 'open_clip' or 'word', got {self.tokenizer!r}")
        if self.context_length < 3:
            raise ValueError(f"text_student context_length must be >= 3 (bos, a word, eos), got {self.context_length}")
        if self.width % self.heads:
            raise ValueError(f"text_student width ({self.width}) must be a multiple of heads ({self.heads})")


class _ContextTokens:
    """open_clip's tokenizer at a fixed (shorter) context length."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.context_length = tokenizer, int(context_length)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)


class SharedImageDualEncoder(nn.Module):
    """``encode_image``: a frozen open_clip image tower (always in eval mode); ``encode_text``: the student's
    text tower."""

    def __init__(self, visual: nn.Module, text: nn.Module):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.text = text

    def train(self, mode: bool = True) -> "SharedImageDualEncoder":
        super().train(mode)
        self.visual.eval()  # frozen: a BatchNorm tower must not update its statistics
        return self

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(pixels)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(tokens)
        return nn.functional.normalize(x, dim=-1) if normalize else x


def text_tower_config(cfg: TextStudentConfig, embed_dim: int, vocab_size: int,
                      vocab: CaptionTokenizer | None = None) -> dict[str, Any]:
    """Keyword arguments of open_clip's ``TextTransformer`` for the student (saved in the manifest). A word
    vocabulary pools at its eos token; open_clip's BPE at the highest id (its end-of-text token)."""
    out = {"context_length": cfg.context_length, "vocab_size": vocab_size, "width": cfg.width, "heads": cfg.heads,
           "layers": cfg.layers, "output_dim": embed_dim}
    if vocab is not None:
        out.update(vocab_size=vocab.vocab_size, pad_id=vocab.pad_id, eos_id=vocab.eos_id, pool_type="eos")
    return out


class TextStudentScore(OpenCLIPReward):
    """The reward protocol over :class:`SharedImageDualEncoder` (image rows encoded once per call, as every
    :class:`OpenCLIPReward`). Build a fresh one with :func:`build_text_student`, load a trained one with
    :meth:`from_dir`."""

    default_w = 2.0
    default_prefix = ""
    manifest_name = MANIFEST

    def __init__(self, model: SharedImageDualEncoder, preprocess: BatchedPreprocess, tokenizer: Any, *,
                 text_config: Mapping[str, Any], image_tower_source: str, **kwargs: Any):
        super().__init__(model, preprocess, tokenizer, **kwargs)
        # text_config: the TextTransformer's arguments; image_tower_source: the reward whose tower it keeps (for people)
        self.text_config, self.image_tower_source = dict(text_config), image_tower_source

    @property
    def word_vocab(self) -> CaptionTokenizer | None:
        return self.tokenizer.vocab if isinstance(self.tokenizer, WordTokens) else None

    def save(self, out_dir: str | Path, extra: Mapping[str, Any] | None = None, weights: bool = True) -> None:
        """Write the student to ``out_dir`` (module docstring); ``weights=False`` rewrites only the manifest."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if weights:
            for name, module in ((TEXT_WEIGHTS, self.model.text), (IMAGE_WEIGHTS, self.model.visual)):
                tmp = out_dir / f".{name}.tmp"
                torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp)
                os.replace(tmp, out_dir / name)
            if self.word_vocab is not None:
                self.word_vocab.save(out_dir)
        p = self.preprocess
        meta = {"student_kind": "text", "text_tower": self.text_config, "weights": TEXT_WEIGHTS,
                "image_tower": {"source": self.image_tower_source, "model_cfg": self.architecture, "weights": IMAGE_WEIGHTS},
                "preprocess": {"image_size": list(p.size), "mean": p.mean.flatten().tolist(), "std": p.std.flatten().tolist(),
                               "interpolation": p.interpolation},
                "tokenizer": "word" if self.word_vocab is not None else "open_clip",
                "w": self.w, "bias": self.bias, "clamp": self.clamp, "text_prefix": self.text_prefix, **(extra or {})}
        tmp = out_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, out_dir / MANIFEST)

    @classmethod
    def from_dir(cls, out_dir: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> "TextStudentScore":
        """Load a student written by :meth:`save` (the ``distill-reward`` stage with ``student_kind: text``)."""
        import open_clip
        from open_clip.transformer import TextTransformer

        from rlrefine.models.clip_checkpoint import create_bare_model

        out_dir = Path(out_dir)
        if not (out_dir / MANIFEST).is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {out_dir} (not a text student)")
        meta = json.loads((out_dir / MANIFEST).read_text())
        tower = meta["image_tower"]
        name = register_unique(TOWER_ARCHITECTURE, tower["model_cfg"])
        visual = create_bare_model(name).visual
        visual.load_state_dict(_load_weights(out_dir / tower["weights"]))
        text = TextTransformer(**meta["text_tower"])
        text.load_state_dict(_load_weights(out_dir / meta["weights"]))
        ctx = meta["text_tower"]["context_length"]
        if meta["tokenizer"] == "word":
            tokenizer = WordTokens(CaptionTokenizer.from_dir(out_dir), ctx)
        else:
            tokenizer = _ContextTokens(open_clip.get_tokenizer(name), ctx)
        p = meta["preprocess"]
        kwargs = dict(w=meta["w"], bias=meta["bias"], clamp=meta["clamp"], text_prefix=meta["text_prefix"])
        kwargs.update(overrides)
        model = SharedImageDualEncoder(visual, text).to(device).eval()
        return cls(model, BatchedPreprocess(p["image_size"], p["mean"], p["std"], p["interpolation"]), tokenizer,
                   text_config=meta["text_tower"], image_tower_source=tower["source"], architecture=tower["model_cfg"],
                   name=_name(meta["text_tower"], tower["source"]), **kwargs)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"text student weights not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _name(text_config: Mapping[str, Any], tower: str) -> str:
    return (f"TextStudentScore[{text_config['layers']}x{text_config['width']}, ctx {text_config['context_length']}, "
            f"{'word' if text_config.get('pool_type') == 'eos' else 'bpe'}; image tower {tower}]")


def build_text_student(image_tower: OpenCLIPReward, cfg: TextStudentConfig | None = None,
                       vocab: CaptionTokenizer | None = None) -> TextStudentScore:
    """A fresh (untrained) student over ``image_tower``'s image tower (an open_clip reward: its ``model.visual``,
    preprocess, w and, for the BPE, tokenizer), with a new text tower of ``cfg``'s size in its embedding space.
    ``vocab``: the word vocabulary of a ``tokenizer="word"`` student."""
    from open_clip.transformer import TextTransformer

    cfg = cfg or TextStudentConfig()
    if (cfg.tokenizer == "word") != (vocab is not None):
        raise ValueError(f"text student tokenizer={cfg.tokenizer!r}: pass a word vocabulary exactly when it is 'word'")
    visual = getattr(getattr(image_tower, "model", None), "visual", None)
    if visual is None or not isinstance(image_tower, OpenCLIPReward):
        raise ValueError(f"a text student keeps an open_clip image tower (a reward with .model.visual, e.g. clip, pac, "
                         f"learned); {type(image_tower).__name__} has none")
    if image_tower.architecture is None:
        raise ValueError(f"{image_tower.name}: the text student saves its image tower with the tower's open_clip "
                         "architecture; build the reward with from_pretrained / from_dir (which record it) or pass "
                         "architecture=<its model config>")
    embed_dim = _embed_dim(image_tower)
    vocab_size = int(image_tower.architecture.get("text_cfg", {}).get("vocab_size", 49408))
    text_config = text_tower_config(cfg, embed_dim, vocab_size, vocab)
    torch.manual_seed(cfg.seed)
    text = TextTransformer(**text_config).to(image_tower.device)
    tokenizer = (WordTokens(vocab, cfg.context_length) if vocab is not None
                 else _ContextTokens(image_tower.tokenizer, cfg.context_length))
    name = image_tower.name
    return TextStudentScore(SharedImageDualEncoder(visual, text).eval(), image_tower.preprocess, tokenizer,
                            text_config=text_config, image_tower_source=name, architecture=image_tower.architecture,
                            w=image_tower.w, text_prefix=cfg.text_prefix, batch_size=image_tower.batch_size,
                            clamp=cfg.clamp, name=_name(text_config, name))


def _embed_dim(reward: OpenCLIPReward) -> int:
    arch = reward.architecture or {}
    if "embed_dim" in arch:
        return int(arch["embed_dim"])
    with torch.no_grad():
        size = reward.preprocess.size
        return reward.model.encode_image(torch.zeros(1, 3, *size, device=reward.device)).shape[-1]

