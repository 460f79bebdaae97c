"""Reading CLIP-family checkpoint files, and the QuickGELU guard.

Where it sits: `rlrefine.models`, under both places that load open_clip weights: the captioner's
image encoder (`rlrefine.models.encoders.OpenCLIPVisual`) and every CLIP-style reward
(`rewards.loading.load_open_clip`). One reader, one guard, so a test's tiny checkpoint and a
user's ViT-B/32 or PAC-S file go through the same code.

Layouts read (`read_checkpoint`):

* ``"plain"``: a state dict (``torch.save(model.state_dict())``, open_clip's released
  ``open_clip_pytorch_model.bin``) or a ``.safetensors`` file;
* ``"openai_archive"``: OpenAI's TorchScript release (``ViT-B-32.pt``);
* ``"state_dict_wrapper"``: ``{"state_dict": ...}`` with OpenAI CLIP key names, the layout of the
  PAC-S release (``clip_ViT-B-32.pth``), optionally with a DDP ``module.`` prefix;
* ``"training_checkpoint"``: open_clip's own training checkpoint, ``{"state_dict", "optimizer",
  "epoch", ...}``;
* ``"model_wrapper"``: ``{"model": ...}``.

**QuickGELU.** OpenAI CLIP was trained with QuickGELU (x·σ(1.702x)); open_clip names those
architectures ``*-quickgelu`` (``ViT-B-32-quickgelu``). Its ``ViT-B-32`` uses exact GELU and loads
the same keys without complaint, then computes different embeddings. The first two OpenAI-derived
layouts above (an OpenAI archive, a PAC-S ``{"state_dict": ...}`` file) loaded into a GELU
architecture are therefore refused by `check_activation`, with a message that names the
``-quickgelu`` architecture, unless the caller allows it explicitly. A plain state dict cannot be
told apart (open_clip's GELU models are released that way), so it is loaded as given.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ClipCheckpoint", "OPENAI_LAYOUTS", "read_checkpoint", "check_activation", "load_state_checked",
           "create_bare_model", "mute_random_init_warning", "QuickGeluMismatchError"]

OPENAI_LAYOUTS = ("openai_archive", "state_dict_wrapper")
"""Layouts whose weights come from OpenAI CLIP (trained with QuickGELU)."""


class QuickGeluMismatchError(ValueError):
    """OpenAI-derived weights were about to be loaded into a GELU architecture."""


@dataclass
class ClipCheckpoint:
    state: dict[str, torch.Tensor]  # flat state dict on CPU, wrappers and `module.` prefixes removed
    layout: str  # one of the layouts of the module docstring
    path: Path


def read_checkpoint(path: str | Path) -> ClipCheckpoint:
    """Read a checkpoint file into a flat state dict (on CPU) and say which layout it had."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    layout = "plain"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        obj: Any = load_file(str(path), device="cpu")
    else:
        try:
            with warnings.catch_warnings():  # torch's "looks like a TorchScript archive" notice: handled below
                warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as err:  # TorchScript archives (OpenAI's ViT-B-32.pt) land here
            try:
                with warnings.catch_warnings():  # deprecation notice; OpenAI's release is only shipped this way
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    obj = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception:
                raise ValueError(f"cannot read checkpoint {path}: {err}") from err
            layout = "openai_archive"
            for key in ("input_resolution", "context_length", "vocab_size"):
                obj.pop(key, None)
        except Exception as err:
            raise ValueError(f"cannot read checkpoint {path} as a state dict: {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        layout = "training_checkpoint" if "optimizer" in obj else "state_dict_wrapper"
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        layout, obj = "model_wrapper", obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path} holds no state dict (got {type(obj).__name__})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path} has non-tensor entries, e.g. {bad[:5]}")
    return ClipCheckpoint(state=state, layout=layout, path=path)


def _quickgelu_name(model_name: str) -> str:
    """The QuickGELU twin open_clip registers for a GELU architecture name, when it has one."""
    import open_clip

    candidate = f"{model_name}-quickgelu"
    return candidate if open_clip.get_model_config(candidate) is not None else ""


def check_activation(model_name: str, model_cfg: dict | None, ckpt: ClipCheckpoint, allow: bool,
                     option: str) -> None:
    """Refuse OpenAI-derived weights (`OPENAI_LAYOUTS`) in an architecture without QuickGELU.

    ``model_cfg``: the architecture's open_clip config (its ``quick_gelu`` flag is read);
    ``allow``: the caller's explicit override, named by ``option`` (the recipe key) in the message.
    """
    if ckpt.layout not in OPENAI_LAYOUTS or allow or (model_cfg or {}).get("quick_gelu", False):
        return
    what = {"openai_archive": "an OpenAI CLIP TorchScript archive",
            "state_dict_wrapper": "a {'state_dict': ...} file of OpenAI CLIP keys (the PAC-S release layout)"}[ckpt.layout]
    twin = _quickgelu_name(model_name)
    fix = f"use the architecture '{twin}'" if twin else "use an architecture with \"quick_gelu\": true (e.g. 'ViT-B-32-quickgelu')"
    raise QuickGeluMismatchError(
        f"checkpoint {ckpt.path} is {what}, trained with QuickGELU, but the open_clip architecture '{model_name}' uses "
        f"GELU: it would load the same keys and compute different embeddings. {fix[0].upper() + fix[1:]}, or set "
        f"{option}=true if these weights really were trained with GELU.")


def _adapt_state_dict(model: torch.nn.Module, state: dict) -> dict:
    """open_clip's own light conversions (old text-tower layout, scalar vs 1-d logit_scale)."""
    from open_clip.model import convert_to_custom_text_state_dict

    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in own and state[key].ndim != own[key].ndim:
            state[key] = state[key].reshape(own[key].shape)
    if "logit_bias" in own and "logit_bias" not in state:
        state["logit_bias"] = torch.zeros_like(own["logit_bias"])
    if "logit_bias" in state and "logit_bias" not in own:
        state.pop("logit_bias")
    return state


def load_state_checked(model: torch.nn.Module, state: dict, path: Path, arch: str) -> None:
    """Load ``state`` into an open_clip ``model`` strictly; a ValueError lists the architecture and a
    few missing, unexpected or mis-shaped keys."""
    state = _adapt_state_dict(model, state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches, e.g. {wrong_shape[:3]}")
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        raise ValueError(f"checkpoint {path} does not fit the open_clip architecture {arch!r}: "
                         + "; ".join(parts))
    model.load_state_dict(state, strict=True)


class mute_random_init_warning(logging.Filter):
    """Drop open_clip's "no weights" root-logger warnings for one block (where the weights are loaded
    right after, they are false)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "No pretrained weights loaded" not in message and "no CLIP weights found" not in message

    def __enter__(self):
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def create_bare_model(model_name: str) -> torch.nn.Module:
    """The open_clip architecture ``model_name`` on CPU without weights (they are loaded right after:
    open_clip's "initialized randomly" warning would be wrong, so it is muted)."""
    import open_clip

    with mute_random_init_warning():
        return open_clip.create_model(model_name, pretrained=None, load_weights=False, device="cpu",
                                      pretrained_image=False, pretrained_text=False)
