"""Captioning with a trained captioner: a folder of images, at one layer or every layer (`rlrefine caption`).

Where it sits: beside `rlrefine.report`, above the models and the data. `default_model_dir` is the model a
command uses when none is given: the recipe's first fine-tuned variant (`finetune_<variant>/model` under
run_dir), with an error that names the models the run holds when it is not there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlrefine.config import RecipeConfig
from rlrefine.data.images import BadImageError, load_image

__all__ = ["IMAGE_SUFFIXES", "caption_folder", "default_model_dir"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def default_model_dir(cfg: RecipeConfig) -> Path:
    """The recipe's first fine-tuned variant's captioner; FileNotFoundError naming the models that exist when
    it has not been trained."""
    first = next(iter(cfg.finetune_variants().values()))
    model_dir = cfg.run_path / first.output / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    existing = sorted(str(p.parent) for p in cfg.run_path.glob("*/model/config.json"))
    found = f"captioners in this run: {', '.join(existing)}" if existing else f"no captioner under {cfg.run_path} yet"
    raise FileNotFoundError(f"captioner '{model_dir}' not found ({found}); train it with `rlrefine run` or pass --model DIR")


def caption_folder(model_dir: Path, folder: Path, layers: list[int] | str | None = None, method: str = "greedy",
                   beams: int = 3, image_size: int = 64, max_len: int = 24, bad_image: str = "error",
                   batch_size: int = 32) -> dict[str, dict[str, str]]:
    """Caption every image of a folder: {file name: {"layer_k": caption}}; layers None = the final layer,
    "all" = every layer 0..K.

    Unreadable images raise an error naming the file, or with bad_image="skip" are reported as
    {"error": ...} and the rest are still captioned."""
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.models import RefinementCaptioner

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    model = RefinementCaptioner.from_pretrained(model_dir).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    K = model.config.num_refine_layers
    layers = [K] if layers is None else (list(range(K + 1)) if layers == "all" else layers)
    bad = [k for k in layers if not 0 <= k <= K]
    if bad:
        raise ValueError(f"layers {bad} out of range: this captioner has layers 0..{K}")
    out: dict[str, dict[str, str]] = {}
    images, names = [], []
    for path in files:
        try:
            images.append(torch.from_numpy(load_image(path, image_size)))
            names.append(path.name)
        except BadImageError as exc:
            if bad_image != "skip":
                raise BadImageError(f"{exc} (use data.bad_image=skip to skip it)") from None
            out[path.name] = {"error": str(exc)}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(images[start:start + batch_size])
            pixels = model.encoder.preprocess(batch)
            seeds = torch.arange(start, start + len(batch))  # fixed z_0 per image position
            gen = model.generate(pixels, seeds, layers, method=method, num_candidates=beams if method == "beam" else 1,
                                 max_len=max_len)
            for name, per_layer in zip(names[start:], tokenizer.decode_batch(gen.tokens[:, :, 0])):
                out[name] = {f"layer_{k}": c for k, c in zip(layers, per_layer)}
    return out
