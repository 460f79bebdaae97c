"""Image encoders: pixels -> a sequence of image tokens V [B, N, d_enc].

Where this sits: `rlrefine.data` gives uint8 images; an encoder turns them into normalised pixels
(`preprocess`) and then into the token sequence V (`encode`) that the refinement blocks of
`RefinementCaptioner` cross-attend to. V is a *sequence*, never a pooled vector: the refinement
blocks need spatial detail.

Three backends behind one small interface (`ImageEncoder`), chosen by `EncoderConfig.kind`:

* ``tiny_vit``  - a small ViT trained from scratch (the embedded default).
* ``open_clip`` - the visual tower of an open_clip model, built by `open_clip.create_model` from a
  model name plus a *local* checkpoint file, or from a ``local-dir:/folder`` (open_clip's own
  schema). Nothing is ever downloaded: a pretrained *tag* such as "openai" is refused.
* ``hf``        - a transformers vision model (CLIPVisionModel, ViTModel, the vision half of a
  CLIPModel, any model whose output has ``last_hidden_state``) from a local directory, with its
  AutoImageProcessor's size / mean / std when the directory has one.

Preprocessing is done with torch ops on whole batches (resize with antialiasing, centre crop,
normalise), so it runs on the accelerator; results match the backends' own PIL pipelines up to
resampling differences when a resize is needed, and exactly when the images already have the
target size.

`frozen=True` puts the backbone in eval mode for good (`.train()` does not undo it), turns off its
gradients, and `encode` runs it under `torch.no_grad()`.

Rebuilding without the original checkpoint: `save_architecture(dir)` writes the backbone's
architecture description (open_clip: ``open_clip_config.json``; hf: ``config.json`` + the
processor config) and `build_encoder(cfg, architecture_dir=dir)` builds the same architecture from
it with random weights. `RefinementCaptioner.save_pretrained` uses this so that a saved captioner
carries everything it needs (weights in its safetensors, architecture in ``encoder/``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"


@dataclass
class EncoderConfig:
    """Which image encoder to build.

    kind: "tiny_vit" (built-in, from scratch), "open_clip" (visual tower of an open_clip model) or
        "hf" (a transformers vision model from a local directory).
    image_size, patch_size, width, depth, heads: the tiny ViT's dimensions (tiny_vit only).
    stem_channels: tiny_vit only. 0: the plain ViT patch embedding (one linear map per patch);
        c > 0: a convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
        better"): log2(patch_size) 3x3 stride-2 convs with c, 2c, ... channels, the last to `width`,
        so the token grid is the same. It learns colours and shapes from scratch much faster.
    model_name: open_clip architecture name, e.g. "ViT-B-32" (open_clip only; ignored when
        `checkpoint` is a "local-dir:" folder, which carries its own config).
    checkpoint: local weights. open_clip: a checkpoint file (.pt / .bin / .safetensors) or
        "local-dir:/folder" with open_clip_config.json + weights. hf: a model directory
        (config.json + weights, optionally preprocessor_config.json). Never a hub name or tag.
    frozen: keep the backbone fixed (eval mode, no gradients).
    allow_gelu_for_openai_weights: open_clip only; load an OpenAI archive or a {"state_dict": ...}
        (PAC-S layout) checkpoint into a GELU architecture anyway (refused by default, see
        `rlrefine.models.clip_checkpoint`).
    grid_stage: open_clip ModifiedResNet towers only. None: the tokens are the pooled vector and the
        last stage's dense tokens (`resnet_tokens`). 0..4: the cells of that stage (0 stem .. 4 last,
        each cell with every later stage's cell above it appended, `resnet_grid`) follow them as more
        tokens, so a captioner sees a finer grid than the last stage's (shapes at 64 px: 2x2 cells
        at stage 4, 4x4 at stage 3).
    """

    kind: str = "tiny_vit"
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 2
    heads: int = 4
    stem_channels: int = 0
    model_name: str | None = None
    checkpoint: str | None = None
    frozen: bool = False
    allow_gelu_for_openai_weights: bool = False
    grid_stage: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------- preprocessing
def _as_float_images(images) -> list[torch.Tensor] | torch.Tensor:
    """uint8 [B,H,W,3] tensor/array -> float [B,3,H,W] in [0,1]; list of PIL -> list of [1,3,H,W]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got dtype {images.dtype}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float().div_(255.0))
        return out
    raise TypeError(f"images must be a uint8 tensor [B,H,W,3] or a list of PIL images, got {type(images).__name__}")


def _resize(x: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
    return F.interpolate(x, size=size, mode=mode, **kw).clamp_(0.0, 1.0)


def _resize_crop(x: torch.Tensor, size: tuple[int, int], mode: str, interpolation: str) -> torch.Tensor:
    """Resize [B,3,H,W] float images to `size` (h, w).

    mode "shortest": scale the shortest edge to the target, centre-crop (CLIP / open_clip default);
    "longest": scale the longest edge to the target, pad (zeros) to square; "squash": plain resize.
    """
    th, tw = size
    h, w = x.shape[-2:]
    if mode == "squash" or (h, w) == (th, tw):
        return _resize(x, (th, tw), interpolation)
    if mode == "shortest":
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        x = _resize(x, (nh, nw), interpolation)
        top, left = (nh - th) // 2, (nw - tw) // 2
        return x[..., top:top + th, left:left + tw]
    if mode == "longest":
        s = min(th / h, tw / w)
        nh, nw = min(th, round(h * s)), min(tw, round(w * s))
        x = _resize(x, (nh, nw), interpolation)
        top, left = (th - nh) // 2, (tw - nw) // 2
        return F.pad(x, (left, tw - nw - left, top, th - nh - top))
    raise ValueError(f"unknown resize mode {mode!r}; allowed: shortest, longest, squash")


def preprocess_images(images, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                      resize_mode: str = "shortest", interpolation: str = "bicubic",
                      device: torch.device | None = None) -> torch.Tensor:
    """uint8 [B,H,W,3] tensor (batched) or list of PIL -> normalised float [B,3,h,w] (torch ops)."""
    x = _as_float_images(images)
    if isinstance(x, list):
        x = torch.cat([_resize_crop(xi.to(device) if device else xi, size, resize_mode, interpolation) for xi in x])
    else:
        x = _resize_crop(x.to(device) if device else x, size, resize_mode, interpolation)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ----------------------------------------------------------------------------------- base class
class ImageEncoder(nn.Module):
    """Interface: `encode(pixels [B,3,H,W]) -> V [B, N, out_dim]`, `preprocess(images)`, `out_dim`.

    Subclasses implement `_encode` (the backbone call) and set `out_dim`, `image_size`, `mean`, `std`.
    """

    out_dim: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __init__(self, frozen: bool = False):
        super().__init__()
        self.frozen = frozen

    def _freeze(self) -> None:
        """Call at the end of a subclass __init__: applies the frozen flag."""
        if self.frozen:
            for p in self.parameters():
                p.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True) -> "ImageEncoder":
        # a frozen backbone stays in eval mode (dropout off, norm statistics fixed) whatever the caller does
        return super().train(mode and not self.frozen)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def preprocess(self, images) -> torch.Tensor:
        """uint8 tensor [B,H,W,3] (batched torch ops, on the images' device) or list of PIL images
        -> normalised float pixels [B, 3, H', W'] at this encoder's input size."""
        device = images.device if isinstance(images, torch.Tensor) else self._device()
        return preprocess_images(images, self.image_size, self.mean, self.std, self.resize_mode,
                                 self.interpolation, device=device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> image tokens V [B, N, out_dim]."""
        if self.frozen:
            with torch.no_grad():
                return self._encode(pixels)
        return self._encode(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)

    def token_places(self) -> torch.Tensor | None:
        """Where each token of V lies in the image, [N, 2] (x right, y down, in [-1, 1]; a whole-image token at the
        centre), or None where this encoder does not say."""
        return None

    def save_architecture(self, directory: str | os.PathLike) -> None:
        """Write what `build_encoder(cfg, architecture_dir=directory)` needs (nothing for tiny_vit)."""

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def _probe_out_dim(self) -> int:
        """Run one blank image through the backbone to learn the token width (cheap, done once); the token count
        is kept as ``num_tokens``."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 3, *self.image_size, device=self._device(), dtype=next(self.parameters()).dtype)
        with torch.no_grad():
            _, self.num_tokens, d = self._encode(x).shape
        self.train(was_training)
        return int(d)


# ----------------------------------------------------------------------------------- tiny ViT
class _ViTBlock(nn.Module):
    """Pre-norm transformer block (bidirectional self-attention + MLP) for the tiny ViT."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, hd]
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(self.ln_2(x))


def _conv_stem(patch_size: int, channels: int, width: int) -> nn.Sequential:
    """3x3 stride-2 convs (BatchNorm-free: GELU between) that downsample by `patch_size` (a power of 2)."""
    n = int(math.log2(patch_size))
    if 2 ** n != patch_size or n < 1:
        raise ValueError(f"tiny_vit stem_channels needs a power-of-two patch_size >= 2, got {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(n):
        c_out = width if i == n - 1 else channels * 2 ** i
        layers.append(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1))
        if i < n - 1:
            layers.append(nn.GELU())
        c_in = c_out
    return nn.Sequential(*layers)


class TinyViT(ImageEncoder):
    """A small ViT trained from scratch: patch embedding + learned positions + pre-norm blocks.

    Input normalisation: x/255, mean 0.5, std 0.5. Output: one token per patch, width `width`.
    """

    resize_mode = "squash"
    interpolation = "bilinear"

    def __init__(self, image_size: int = 64, patch_size: int = 8, width: int = 128, depth: int = 2,
                 heads: int = 4, frozen: bool = False, stem_channels: int = 0):
        super().__init__(frozen)
        if image_size % patch_size:
            raise ValueError(f"tiny_vit image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"tiny_vit width {width} is not divisible by heads {heads}")
        self.image_size = (image_size, image_size)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.out_dim = width
        n_patches = (image_size // patch_size) ** 2
        if stem_channels:
            self.patch_embed = _conv_stem(patch_size, stem_channels, width)
        else:
            self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches, width))
        self.blocks = nn.ModuleList([_ViTBlock(width, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        # nanoGPT-style init; residual output projections scaled by 1/sqrt(2 * depth)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            for proj in (blk.attn_proj, blk.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))
        if stem_channels:  # variance-preserving init, or the signal shrinks ~0.02·sqrt(fan_in) per conv
            for conv in self.patch_embed:
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        self._freeze()

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, width]
        x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)


def _init_weights(module: nn.Module) -> None:
    """nanoGPT init: N(0, 0.02) for linear / embedding weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------- open_clip
class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def _without_random_init_warnings():
    """Building a saved captioner's open_clip tower from its architecture alone (`load_weights=False`)
    makes open_clip warn "No pretrained weights loaded ... Model initialized randomly" and "Local config
    loaded, but no CLIP weights found" (on the root logger). Both are false here: the tower's weights
    are in the captioner's model.safetensors and are loaded right after. Only these two records of
    this one call are dropped."""
    drop = _DropMessages("No pretrained weights loaded for model", "but no CLIP weights found in")
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class OpenCLIPVisual(ImageEncoder):
    """The visual tower of an open_clip model, as a token sequence.

    Built with `open_clip.create_model`, the same factory open_clip users call:
    `create_model(model_name, pretrained=<local file>)` or `create_model("local-dir:/folder")`.
    The text tower is dropped after loading.

    Tokens: with `visual.output_tokens = True` open_clip's VisionTransformer returns
    `(pooled, tokens)`: pooled = ln_post(x)[:, 0] @ proj (joint embedding space, `embed_dim`),
    tokens = ln_post(x)[:, 1:] (transformer width, not projected). V is `[pooled; tokens @ proj]`,
    i.e. the class token and the patch tokens, all in CLIP's joint embedding space:
    [B, 1 + grid**2, embed_dim]. Towers without a projection give `[pooled; tokens]` at their width.
    Preprocessing follows the model's `preprocess_cfg` (size, mean, std, resize mode).
    """

    def __init__(self, model_name: str | None, checkpoint: str | None, frozen: bool = False,
                 architecture_dir: str | os.PathLike | None = None, allow_gelu_for_openai_weights: bool = False,
                 grid_stage: int | None = None):
        super().__init__(frozen)
        import open_clip

        from rlrefine.models.clip_checkpoint import check_activation, create_bare_model, load_state_checked, read_checkpoint

        if architecture_dir is not None:
            # architecture only (weights come from a saved RefinementCaptioner)
            d = Path(architecture_dir)
            if not (d / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"open_clip architecture file not found: {d / 'open_clip_config.json'}")
            with _without_random_init_warnings():
                model = open_clip.create_model(LOCAL_DIR + str(d), load_weights=False)
            arch = json.loads((d / "open_clip_config.json").read_text())
        elif checkpoint is None:
            raise ValueError("open_clip encoder needs `checkpoint`: a local checkpoint file or 'local-dir:/folder' "
                             "(rlrefine never downloads weights)")
        elif checkpoint.startswith(LOCAL_DIR):
            folder = Path(checkpoint[len(LOCAL_DIR):])
            if not folder.is_dir():
                raise FileNotFoundError(f"open_clip checkpoint folder not found: {folder} (from {checkpoint!r})")
            model = open_clip.create_model(checkpoint, require_pretrained=True)
            arch = {"model_cfg": json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]}
        else:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"open_clip checkpoint file not found: {checkpoint}")
            if not model_name:
                raise ValueError(f"open_clip encoder needs `model_name` (e.g. 'ViT-B-32') for checkpoint {checkpoint}")
            model_cfg = open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model_name {model_name!r}; register a config with "
                                 f"open_clip.add_model_config or use a 'local-dir:' folder")
            # the same reader and QuickGELU guard as every CLIP reward (rlrefine.models.clip_checkpoint)
            ckpt = read_checkpoint(checkpoint)
            check_activation(model_name, model_cfg, ckpt, allow_gelu_for_openai_weights,
                             "model.encoder.allow_gelu_for_openai_weights")
            model = create_bare_model(model_name)
            load_state_checked(model, ckpt.state, ckpt.path, model_name)
            arch = {"model_cfg": model_cfg}

        self.visual = model.visual
        del model  # the text tower is not needed
        pp = dict(self.visual.preprocess_cfg)
        self._arch = {"model_cfg": arch["model_cfg"], "preprocess_cfg": _jsonable(pp)}
        size = pp.get("size", self.visual.image_size)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std = tuple(pp["mean"]), tuple(pp["std"])
        self.resize_mode = pp.get("resize_mode", "shortest")
        self.interpolation = pp.get("interpolation", "bicubic")
        if hasattr(self.visual, "output_tokens"):
            self.visual.output_tokens = True
        self.grid_stage = grid_stage
        if grid_stage is not None and not _is_resnet(self.visual):
            raise ValueError(f"model.encoder.grid_stage {grid_stage} needs an open_clip ModifiedResNet tower, and this "
                             f"one is a {type(self.visual).__name__}; leave grid_stage unset (null)")
        if grid_stage is not None and not 0 <= grid_stage <= 4:
            raise ValueError(f"model.encoder.grid_stage {grid_stage}: a ModifiedResNet has stages 0 (stem) .. 4")
        self.out_dim = self._probe_out_dim()
        self._freeze()

    def token_places(self) -> torch.Tensor | None:
        """ResNet: the pooled token at the centre, then the dense cells, then the ``grid_stage`` cells; ViT: the
        class token at the centre, then the patches (when they form a square grid)."""
        n = self.num_tokens
        if _is_resnet(self.visual):
            dense = self.visual.attnpool.positional_embedding.shape[0] - 1
            sides = [math.isqrt(dense)] + ([math.isqrt(n - 1 - dense)] if self.grid_stage is not None else [])
        else:
            sides = [math.isqrt(n - 1)]
        if 1 + sum(side * side for side in sides) != n:
            return None
        return torch.cat([torch.zeros(1, 2), *(cell_centres(side) for side in sides)])

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if _is_resnet(self.visual):
            return resnet_tokens(self.visual, pixels, self.grid_stage)
        out = self.visual(pixels)
        if not isinstance(out, tuple):  # a tower without token outputs: one pooled token
            return out[:, None]
        pooled, tokens = out[0], out[1]
        proj = getattr(self.visual, "proj", None)
        if tokens.shape[-1] != pooled.shape[-1] and isinstance(proj, torch.Tensor) and proj.shape[0] == tokens.shape[-1]:
            tokens = tokens @ proj
        if tokens.shape[-1] != pooled.shape[-1]:
            return tokens
        return torch.cat([pooled[:, None], tokens], dim=1)  # [B, 1 + N, d]

    def save_architecture(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "open_clip_config.json").write_text(json.dumps(self._arch, indent=2))


def cell_centres(side: int) -> torch.Tensor:
    """The centres of a side x side grid's cells in row-major order, [side * side, 2]: (x right, y down) in [-1, 1]."""
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def _is_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4")


def resnet_grid(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """The cells of ``stages[0]`` [B, C0, h, w] with the features of every later (coarser) stage's cell above each
    appended: [B, C0 + C1 + ..., h, w]. What a coarse stage recognises, beside where a fine stage sees it."""
    size = stages[0].shape[-2:]
    return torch.cat([stages[0], *(F.interpolate(x, size=size, mode="nearest") for x in stages[1:])], dim=1)


def resnet_stages(visual: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of an open_clip ``ModifiedResNet``'s stem and its four stages, [B, C_i, h_i, w_i] each."""
    x, out = pixels, []
    for block in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = block(x)
        out.append(x)
    return out


def resnet_tokens(visual: nn.Module, pixels: torch.Tensor, grid_stage: int | None = None) -> torch.Tensor:
    """Token sequence of an open_clip ``ModifiedResNet`` tower: [pooled; dense] in the joint space.

    The tower itself returns only the attention-pooled vector, which squeezes a whole scene into
    one token. The dense tokens are the attention pool's value path applied at every grid cell
    (``c_proj(v_proj(x + pos))``, MaskCLIP's dense CLIP features), so they live in the same space
    as the pooled token: [B, 1 + H*W, embed_dim], pooled first exactly as ``visual(pixels)``.

    ``grid_stage`` s (0 stem .. 4): the cells of stage s follow as more tokens (`resnet_grid`: each with
    every later stage's cell above it appended). The two kinds have different widths, so each token
    is zero outside its own block of features, [joint | grid]: [B, 1 + H*W + h_s*w_s, embed_dim + C_s + ... + C_4].
    A linear map over them (the captioner's image projection) is then one projection per kind.
    """
    stages = resnet_stages(visual, pixels)
    x = stages[-1]
    pool = visual.attnpool
    pooled = pool(x)
    grid = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    pos = pool.positional_embedding[1:].to(grid.dtype)
    if pos.shape[0] != grid.shape[1]:
        raise ValueError(f"ResNet tower grid {grid.shape[1]} cells but {pos.shape[0]} positional embeddings: "
                         f"images must have the tower's image_size")
    dense = pool.c_proj(pool.v_proj(grid + pos))
    joint = torch.cat([pooled[:, None], dense], dim=1)
    if grid_stage is None:
        return joint
    cells = resnet_grid(stages[grid_stage:]).flatten(2).transpose(1, 2)  # [B, h*w, C_s + ... + C_4]
    return torch.cat([F.pad(joint, (0, cells.shape[-1])), F.pad(cells, (joint.shape[-1], 0))], dim=1)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ----------------------------------------------------------------------------------- transformers
class HFVision(ImageEncoder):
    """A transformers vision model from a local directory: V = `last_hidden_state` [B, N, hidden].

    `AutoModel.from_pretrained(dir, local_files_only=True)`; a full CLIPModel (or any model with a
    `vision_model`) is reduced to its vision half. Preprocessing uses the directory's
    AutoImageProcessor (size / crop / mean / std) when present, else the config's image_size with
    mean = std = 0.5 (a warning is logged).
    """

    def __init__(self, checkpoint: str | None, frozen: bool = False,
                 architecture_dir: str | os.PathLike | None = None):
        super().__init__(frozen)
        from transformers import AutoConfig, AutoModel

        if architecture_dir is not None:
            src = Path(architecture_dir)
            if not (src / "config.json").is_file():
                raise FileNotFoundError(f"hf encoder architecture file not found: {src / 'config.json'}")
            model = AutoModel.from_config(AutoConfig.from_pretrained(src, local_files_only=True))
        else:
            if checkpoint is None:
                raise ValueError("hf encoder needs `checkpoint`: a local model directory (rlrefine never downloads)")
            src = Path(checkpoint)
            if not src.is_dir():
                raise FileNotFoundError(f"hf encoder directory not found: {checkpoint}")
            model = AutoModel.from_pretrained(src, local_files_only=True)
        self._config = model.config
        if getattr(model, "vision_model", None) is not None and hasattr(model.config, "vision_config"):
            self._vision_config = model.config.vision_config
            model = model.vision_model
        else:
            self._vision_config = model.config
        self.model = model
        self.processor = self._load_processor(src)
        self._set_preprocessing()
        self.out_dim = self._probe_out_dim()
        self._freeze()

    @staticmethod
    def _load_processor(src: Path):
        if not (src / "preprocessor_config.json").is_file():
            return None
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(src, local_files_only=True)

    def _set_preprocessing(self) -> None:
        p = self.processor
        if p is None:
            s = getattr(self._vision_config, "image_size", 224)
            self.image_size = (s, s) if isinstance(s, int) else tuple(s)
            self.mean, self.std, self.resize_mode = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash"
            log.warning("hf encoder: no preprocessor_config.json; using image_size %s, mean=std=0.5", self.image_size)
            return
        size = _hf_size(p.size)
        crop = _hf_size(getattr(p, "crop_size", None)) if getattr(p, "do_center_crop", False) else None
        if isinstance(size, int):  # shortest edge, then centre crop
            self.image_size = crop or (size, size)
            self.resize_mode = "shortest"
        else:
            self.image_size = crop or size
            self.resize_mode = "squash"
        self.mean, self.std = tuple(p.image_mean), tuple(p.image_std)
        resample = getattr(p, "resample", None)
        self.interpolation = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(int(resample) if resample is not None else 3, "bicubic")

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state

    def save_architecture(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._config.save_pretrained(d)
        if self.processor is not None:
            self.processor.save_pretrained(d)


def _hf_size(size) -> int | tuple[int, int] | None:
    """HF processor size -> int (shortest edge) or (h, w)."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = dict(size) if not isinstance(size, dict) else size
    if size.get("shortest_edge"):
        return int(size["shortest_edge"])
    return (int(size["height"]), int(size["width"]))


# ----------------------------------------------------------------------------------- factory
def build_encoder(cfg: EncoderConfig, architecture_dir: str | os.PathLike | None = None) -> ImageEncoder:
    """The one constructor path for image encoders.

    With `architecture_dir` the backbone's architecture is read from that folder (written by
    `save_architecture`) and its weights are left random, to be filled from a captioner checkpoint;
    otherwise weights come from `cfg.checkpoint` (open_clip / hf) or are initialised (tiny_vit).
    """
    if cfg.kind == "tiny_vit":
        return TinyViT(cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads, frozen=cfg.frozen,
                       stem_channels=cfg.stem_channels)
    if cfg.kind == "open_clip":
        return OpenCLIPVisual(cfg.model_name, cfg.checkpoint, frozen=cfg.frozen, architecture_dir=architecture_dir,
                              allow_gelu_for_openai_weights=cfg.allow_gelu_for_openai_weights,
                              grid_stage=cfg.grid_stage)
    if cfg.kind == "hf":
        return HFVision(cfg.checkpoint, frozen=cfg.frozen, architecture_dir=architecture_dir)
    raise ValueError(f"unknown encoder kind {cfg.kind!r}; allowed: tiny_vit, open_clip, hf")
