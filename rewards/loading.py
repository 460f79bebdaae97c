"""Loading open_clip models for rewards, strictly from local files.

Sits under every reward in ``rewards/``: CLIP-S, PAC-S, the learned evaluator and the distilled
student all come through :func:`load_open_clip`, the same path a test uses to load a tiny random
checkpoint and a user uses to load ViT-B/32 or a PAC-S checkpoint.

* ``model_name`` is an open_clip architecture name (built in, or registered with
  :func:`register_model_config`, which wraps ``open_clip.add_model_config``), or
  ``local-dir:/path`` (open_clip's own folder format: ``open_clip_config.json`` + weights).
* ``checkpoint`` is a local file: an open_clip / OpenAI-CLIP state dict, a PAC-S style
  ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper, optionally with a DDP ``module.`` prefix,
  a ``.safetensors`` file or an OpenAI TorchScript archive. Nothing is ever downloaded: a
  pretrained *tag* such as ``"openai"`` is refused with an error naming it.
* Errors name the path: a missing file is a ``FileNotFoundError``; weights that do not fit the
  architecture are a ``ValueError`` listing the architecture and a few mismatched keys.

The preprocess returned is :class:`BatchedPreprocess`, which works on whole uint8 batches with
torch ops (resize shortest side, centre crop, normalise) instead of one PIL image at a time.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rlrefine.models.clip_checkpoint import check_activation, create_bare_model, load_state_checked, read_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "BatchedPreprocess",
    "load_open_clip",
    "model_config_of",
    "read_state_dict",
    "register_model_config",
]

# open_clip keeps its architecture registry as module state; we add our configs to it by writing
# each into one temporary folder per process (that is what `open_clip.add_model_config` reads).
_CONFIG_DIR: Path | None = None
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# open_clip's preference order for weights inside a `local-dir:` folder, then our own names.
_PREFERRED_WEIGHTS = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
    "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)


def register_model_config(name: str, model_cfg: dict) -> str:
    """Register an open_clip architecture config under ``name`` (idempotent) and return the name.

    ``model_cfg`` has open_clip's JSON layout (``embed_dim``, ``vision_cfg``, ``text_cfg``).
    Registering the same name twice with a different config is an error rather than a silent
    override, so two parts of a run cannot disagree about what an architecture is.
    """
    import open_clip

    global _CONFIG_DIR
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"model config for {name!r} lacks keys {missing}")
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if _canon(existing) != _canon(model_cfg):
            raise ValueError(
                f"open_clip architecture {name!r} is already registered with a different config; "
                f"pick another name. registered={existing} new={model_cfg}")
        return name
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="rlrefine_open_clip_cfgs_"))
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(model_cfg, indent=2))
    open_clip.add_model_config(path)
    return name


def _canon(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


class BatchedPreprocess:
    """CLIP evaluation preprocessing on whole batches with torch ops.

    Accepts a list of PIL images, a uint8 tensor / ndarray ``[B, H, W, 3]`` or a float tensor
    ``[B, 3, S, S]`` that is already preprocessed (returned as is after a shape check).
    Steps (open_clip's eval transform): resize the shortest side to ``S`` (bicubic, antialiased),
    centre crop ``S x S``, scale to [0, 1], normalise with ``mean`` / ``std``.
    """

    def __init__(self, image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic"):
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (f"BatchedPreprocess(size={self.size}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}, interpolation={self.interpolation!r})")

    def __call__(self, images: Any, device: torch.device | str | None = None) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            if images.is_floating_point():
                if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != self.size:
                    raise ValueError(
                        f"a float image tensor must be already preprocessed as [B, 3, {self.size[0]}, "
                        f"{self.size[1]}]; got {tuple(images.shape)}")
                return images.to(device=device, dtype=torch.float32)
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"raw images must be uint8 [B, H, W, 3]; got {images.dtype} "
                                 f"{tuple(images.shape)}")
            x = images.to(device).permute(0, 3, 1, 2).contiguous().float()  # [B, 3, H, W], 0..255
            if tuple(x.shape[-2:]) == self.size:  # no resize: uint8 needs no clamp; scale and normalise in one pass
                std = self.std.to(x.device)
                return torch.addcmul(-self.mean.to(x.device) / std, x, 1.0 / (255.0 * std))
            return self._normalise(self._resize_crop(x / 255.0))
        # a list of PIL images (any sizes): each is resized on its own, then stacked
        out = []
        for im in images:
            arr = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
            x = arr.to(device).permute(2, 0, 1)[None].float() / 255.0
            out.append(self._resize_crop(x))
        if not out:
            raise ValueError("no images given")
        return self._normalise(torch.cat(out))

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        th, tw = self.size
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)  # shortest side to target
            nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False,
                                  antialias=self.interpolation in ("bilinear", "bicubic"))
            top, left = (nh - th) // 2, (nw - tw) // 2
            x = x[..., top:top + th, left:left + tw]
        return x.clamp_(0.0, 1.0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict (on CPU).

    Unwraps ``{"state_dict": ...}`` (PAC-S, Lightning) and ``{"model": ...}`` wrappers, strips a
    DDP ``module.`` prefix, and reads ``.safetensors`` files and OpenAI TorchScript archives
    (`rlrefine.models.clip_checkpoint.read_checkpoint`, which also reports the layout).
    """
    return read_checkpoint(path).state


def _find_weights(folder: Path) -> Path:
    for name in _PREFERRED_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not found:
        raise FileNotFoundError(f"no weights file ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return found[0]


def load_open_clip(model_name: str, checkpoint: str | Path | None = None,
                   device: str | torch.device = "cpu", allow_gelu_for_openai_weights: bool = False,
                   option: str = "allow_gelu_for_openai_weights"):
    """Build an open_clip model and load local weights; returns ``(model, preprocess, tokenizer)``.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-32-quickgelu"``, or one registered
            with :func:`register_model_config`), or ``"local-dir:/path/to/folder"`` holding
            ``open_clip_config.json`` and a weights file (then ``checkpoint`` may be omitted).
        checkpoint: local weights file (see :func:`read_state_dict` for accepted layouts).
        device: where the model lives.
        allow_gelu_for_openai_weights: load an OpenAI archive or a PAC-S ``{"state_dict": ...}``
            file into a GELU architecture anyway; refused by default with a message naming the
            ``-quickgelu`` architecture (`rlrefine.models.clip_checkpoint.check_activation`).
        option: the recipe key of that override, named in the message.

    Returns:
        ``model`` (eval mode, fp32, no grad needed by callers), ``preprocess``
        (:class:`BatchedPreprocess` from the model's own preprocess config) and ``tokenizer``
        (open_clip's, context length from the config; the BPE file ships with open_clip).
    """
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"local-dir folder not found: {folder}")
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"local-dir folder has no open_clip_config.json: {folder}")
        weights = Path(checkpoint) if checkpoint is not None else _find_weights(folder)
        arch = model_name
    elif model_name.startswith("hf-hub:"):
        raise ValueError(f"{model_name!r}: rlrefine never downloads from a hub; download the folder "
                         "yourself and pass 'local-dir:/path' instead")
    else:
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(f"unknown open_clip architecture {model_name!r}; register it with "
                             f"rewards.loading.register_model_config or use 'local-dir:'. "
                             f"Known: {open_clip.list_models()[:10]}...")
        if checkpoint is None:
            raise ValueError(f"a local checkpoint file is required for {model_name!r} "
                             "(rlrefine never downloads weights)")
        weights = Path(checkpoint).expanduser()
        arch = model_name
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint not found: {weights} (rlrefine loads weights only from "
                                f"local files; pretrained tags are not downloaded)")
    ckpt = read_checkpoint(weights)
    if model_name.startswith("local-dir:"):
        model_cfg = json.loads((folder / "open_clip_config.json").read_text()).get("model_cfg", {})
    else:
        model_cfg = open_clip.get_model_config(model_name)
    check_activation(model_name, model_cfg, ckpt, allow_gelu_for_openai_weights, option)
    state = ckpt.state
    # load_weights=False / pretrained_*=False: open_clip builds the bare architecture only; its
    # "initialized randomly" warning is wrong here (the weights are loaded right after), so muted.
    model = create_bare_model(model_name)
    load_state_checked(model, state, weights, arch)
    model = model.to(device).eval()
    model.requires_grad_(False)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = BatchedPreprocess(pcfg.get("size", 224), pcfg["mean"], pcfg["std"],
                                   pcfg.get("interpolation", "bicubic"))
    tokenizer = open_clip.get_tokenizer(model_name)
    log.debug("loaded open_clip %s from %s", arch, weights)
    return model, preprocess, tokenizer


def model_config_of(model_name: str) -> dict:
    """A copy of the open_clip architecture config ``model_name`` names: a registered architecture, or the
    ``model_cfg`` of a ``local-dir:`` folder's ``open_clip_config.json`` (saved beside a student that keeps
    that architecture's image tower, `rewards.text_student`)."""
    import open_clip

    if model_name.startswith("local-dir:"):
        path = Path(model_name[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"local-dir folder has no open_clip_config.json: {path.parent}")
        return json.loads(path.read_text())["model_cfg"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {model_name!r}")
    return copy.deepcopy(cfg)
