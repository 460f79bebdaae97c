"""BLIP image–text matching as a caption reward (kind ``itm``): the match probability of a local transformers
``BlipForImageTextRetrieval`` checkpoint (Li et al. 2022, "BLIP"; e.g. a downloaded ``Salesforce/blip-itm-base-coco``).

    ITM(I, c) = softmax(itm_head(T(c | V(I))[CLS]))[1]        the probability that caption c matches image I

* ``V``: BLIP's ViT (``vision_model``), run once per image row of a call; its tokens ``[B, N, d]`` are indexed
  by ``image_index``, so the n candidates of an image share one vision pass.
* ``T``: the BERT text encoder with cross-attention to V (``text_encoder``): unlike a dual encoder it must run
  once per distinct (image, caption) pair, which is what makes ITM the expensive reward (docs/performance_realsize.md).
* The tokenizer and the image processor come from the same directory (``AutoProcessor``); images are
  preprocessed by batched torch ops with its size, mean and std (BLIP resizes to size × size, no crop).
* ``embed_images`` / ``embed_texts``: BLIP's image–text contrastive embeddings (``vision_proj`` / ``text_proj``
  of the [CLS] tokens), used for hard-pair mining when it is a distillation teacher and for the
  embedding progress curve. ITM is not their cosine, so a text student of an ``itm`` teacher learns the
  scores in another open_clip tower's space (`rewards.text_student`, ``distill.image_tower``).

Only local files: a folder that is not a transformers checkpoint, not BLIP (a CLIP folder) or a BLIP
checkpoint of another head (``BlipForConditionalGeneration``, the captioner) is an error that says what it found.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .loading import BatchedPreprocess
from .registry import register_reward

log = logging.getLogger(__name__)

__all__ = ["ITMScore", "SquashPreprocess", "load_blip_itm"]

ITM_ARCHITECTURE = "BlipForImageTextRetrieval"


class SquashPreprocess(BatchedPreprocess):
    """BLIP's image processing: resize to exactly ``size`` (aspect not kept, no crop), scale, normalise."""

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False,
                              antialias=self.interpolation in ("bilinear", "bicubic"))
        return x.clamp_(0.0, 1.0)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers draws a "Loading weights" progress bar per load; one line per stage is ours to print."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_blip_itm(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, SquashPreprocess, Any]:
    """``(model, preprocess, tokenizer)`` of the BLIP ITM checkpoint folder ``path`` (local files only)."""
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"itm checkpoint folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: reward kind 'itm' reads a transformers "
                                f"{ITM_ARCHITECTURE} folder (save_pretrained)")
    config = json.loads(config_file.read_text())
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type != "blip":
        raise ValueError(f"{path} holds a '{model_type}' checkpoint ({', '.join(architectures) or 'no architectures'}), "
                         f"not BLIP: reward kind 'itm' needs a {ITM_ARCHITECTURE} folder (e.g. Salesforce/blip-itm-base-coco); "
                         "a CLIP checkpoint is read by kinds clip / pac")
    if architectures and ITM_ARCHITECTURE not in architectures:
        raise ValueError(f"{path} is a BLIP checkpoint of another head ({', '.join(architectures)}), without the image-text "
                         f"matching head: reward kind 'itm' needs a {ITM_ARCHITECTURE} folder (e.g. Salesforce/blip-itm-base-coco)")
    with _quiet_loading():
        model, info = BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ValueError(f"{path}: the weights lack {len(missing)} tensors of {ITM_ARCHITECTURE} (e.g. {', '.join(missing[:3])}): "
                         "not an image-text matching checkpoint")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: no BLIP processor (tokenizer + image processor) beside the weights ({err}); save "
                                "the BlipProcessor into the same folder") from None
    ip = processor.image_processor
    size = ip.size  # a dict or transformers' SizeDict of height / width (BLIP resizes to exactly that)
    size = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    resample = {2: "bilinear", 3: "bicubic"}.get(int(getattr(ip, "resample", 3)), "bicubic")
    preprocess = SquashPreprocess(size, ip.image_mean, ip.image_std, resample)
    model = model.to(device).eval().requires_grad_(False)
    return model, preprocess, processor.tokenizer


class ITMScore:
    """The ITM match probability as a reward (module docstring); the protocol of :mod:`rewards`.

    Batched: images are encoded ``image_batch_size`` rows at a time and each row once per call; the pairs of
    those rows go through the text encoder ``batch_size`` at a time, each distinct (image, caption) pair once.
    """

    uses_references = False

    def __init__(self, model: Any, preprocess: BatchedPreprocess, tokenizer: Any, *, batch_size: int = 128,
                 image_batch_size: int = 32, max_length: int = 35, name: str | None = None):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.batch_size, self.image_batch_size = int(batch_size), int(image_batch_size)
        # BLIP's ITM reads captions of at most 35 tokens (its reference code), within the text encoder's positions
        self.max_length = min(int(max_length), int(model.config.text_config.max_position_embeddings))
        self.name = name or "ITMScore"

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> "ITMScore":
        model, preprocess, tokenizer = load_blip_itm(path, device)
        return cls(model, preprocess, tokenizer, name=kwargs.pop("name", f"ITMScore[{Path(path).name}]"), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"{self.name}(device={self.device})"

    # -- encoders ---------------------------------------------------------------------------------
    def _vision_tokens(self, images: Any) -> torch.Tensor:
        """``[B, N, d]`` BLIP ViT tokens of the image rows ``images``."""
        pixels = self.preprocess(images, device=self.device)
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def embed_images(self, images: Any) -> torch.Tensor:
        """L2-normalised ITC image embeddings ``[B, D]`` (``vision_proj`` of the [CLS] token)."""
        out = [self.model.vision_proj(self._vision_tokens(_rows(images, i, i + self.image_batch_size))[:, 0])
               for i in range(0, len(images), self.image_batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised ITC text embeddings ``[N, D]`` (``text_proj`` of the unimodal text encoder's [CLS])."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self._tokens(texts[i:i + self.batch_size])
            hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            out.append(self.model.text_proj(hidden[:, 0]))
        return F.normalize(torch.cat(out).float(), dim=-1)

    # -- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: Any, captions: Sequence[str], references: Sequence[Sequence[str]] | None = None,
                 image_index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Match probabilities ``[len(captions)]`` (references are not read)."""
        captions = list(captions)
        n_images = len(images)
        if image_index is None:
            if n_images != len(captions):
                raise ValueError(f"{len(captions)} captions for {n_images} images: pass image_index "
                                 "to score several captions per image")
            image_index = torch.arange(n_images)
        image_index = torch.as_tensor(image_index, dtype=torch.long).flatten().cpu()
        if image_index.numel() != len(captions):
            raise ValueError(f"image_index has {image_index.numel()} entries for {len(captions)} captions")
        if not captions:
            return torch.zeros(0, device=self.device)
        if int(image_index.min()) < 0 or int(image_index.max()) >= n_images:
            raise ValueError(f"image_index out of range for {n_images} images")
        pairs = list(dict.fromkeys(zip(image_index.tolist(), captions)))  # each distinct (image row, caption) once
        where = {p: k for k, p in enumerate(pairs)}
        scores = torch.empty(len(pairs), device=self.device)
        for r0 in range(0, n_images, self.image_batch_size):
            mine = [k for k, (row, _) in enumerate(pairs) if r0 <= row < r0 + self.image_batch_size]
            if not mine:
                continue
            tokens = self._vision_tokens(_rows(images, r0, r0 + self.image_batch_size))  # [b, N, d], once per row
            for i in range(0, len(mine), self.batch_size):
                chunk = mine[i:i + self.batch_size]
                ids, mask = self._tokens([pairs[k][1] for k in chunk])
                v = tokens[torch.tensor([pairs[k][0] - r0 for k in chunk], device=tokens.device)]  # [c, N, d]
                hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=v,
                                                 encoder_attention_mask=torch.ones(v.shape[:2], dtype=torch.long,
                                                                                   device=v.device)).last_hidden_state
                logits = self.model.itm_head(hidden[:, 0])  # [c, 2]: no match, match
                scores[torch.tensor(chunk, device=self.device)] = logits.float().softmax(-1)[:, 1]
        return scores[torch.tensor([where[p] for p in zip(image_index.tolist(), captions)], device=self.device)].float()


def _rows(images: Any, start: int, stop: int) -> Any:
    """Image rows ``start:stop`` of a list, an array or a tensor."""
    return images[start:stop]


def _check(section: Any) -> None:
    if section.path and not Path(section.path).expanduser().is_dir():
        raise ValueError(f"itm path '{section.path}' is not a folder; give a local {ITM_ARCHITECTURE} checkpoint folder "
                         "(nothing is downloaded)")


register_reward("itm", lambda section, ctx: ITMScore.from_dir(section.path, device=ctx.device),
                f"BLIP image-text matching: the match probability of a local transformers {ITM_ARCHITECTURE} folder "
                "(`path:`; its tokenizer and image processor beside it)", uses=("path",), needs=("path",), check=_check)
