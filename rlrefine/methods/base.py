"""What a fine-tuning method is: its config section, its candidates, its loss and the scalars it logs.

Where it sits: `rlrefine.methods`, between the losses (`rlrefine.losses`, the math) and the fine-tuning
loop (`rlrefine.trainers.finetune`), which names no method. A method is a `Method` subclass registered
with `register_method`; the loop asks it for

* ``generate(policy, pixels, seeds, layers, generator)``: the n candidates per image and layer (no grad);
* ``greedy_layers(layers)``: layers whose greedy caption's reward the loss needs (a baseline), beyond the
  layer-0 and layer-K anchors every method gets for the graduality shaping;
* ``layer_loss(inputs)``: the loss of one refinement layer from a `LayerInputs`, and the scalars to log
  (under ``layer_<k>/``);

and reads ``token_level`` (the loss needs per-token log-probs, a mask and the entropy, not only sequence
sums) and ``updates_per_rollout`` (optimizer steps taken on one generation, with the log-probs at
generation time as ``old_token_logps``). Its `MethodConfig` is the recipe section ``finetune.<name>``.

Adding a method: one module in `rlrefine/methods/` with its config and its `Method`, decorated with
`register_method`, and its import line in `rlrefine/methods/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = ["METHODS", "LayerInputs", "Method", "MethodConfig", "SamplingConfig", "register_method"]


class MethodConfig(BaseModel):
    """Base of a method's recipe section ``finetune.<name>``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SamplingConfig(MethodConfig):
    """Sampling settings of a method that samples its candidates."""

    temperature: float = Field(1.0, gt=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")


@dataclass
class LayerInputs:
    """What a method's loss sees for one refinement layer: B images, n candidates each, T target tokens."""

    logps: Tensor  # [B, n] summed log-probs of the candidates under the policy (with grad)
    ref_logps: Tensor  # [B, n] under the frozen reference (the XE model; no grad)
    rewards: Tensor  # [B, n] raw rewards
    shaped: Tensor  # [B, n] rewards after the graduality and length shaping
    lengths: Tensor  # [B, n] generated tokens per candidate (eos included)
    greedy_rewards: Tensor | None = None  # [B] raw reward of the layer's greedy caption (when asked for)
    token_logps: Tensor | None = None  # [B, n, T] per-token policy log-probs (token_level methods; with grad)
    ref_token_logps: Tensor | None = None  # [B, n, T] per-token reference log-probs
    old_token_logps: Tensor | None = None  # [B, n, T] policy log-probs at generation (updates_per_rollout > 1)
    mask: Tensor | None = None  # [B, n, T] bool, the tokens that count
    entropy: Tensor | None = None  # [B, n, T] the policy's entropy per position (no grad)


class Method:
    """A fine-tuning method (module docstring). ``config``: its section; ``finetune``: the shared section
    (``num_candidates``, ``max_len``); ``tokenizer``: the captioner's (`CaptionTokenizer`), for a method whose
    config names words."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    description: ClassVar[str] = ""  # one line for `rlrefine config` and the docs
    token_level: ClassVar[bool] = False
    moved_keys: ClassVar[dict[str, str]] = {}  # old `finetune.<key>` -> this method's field that replaced it

    def __init__(self, config: MethodConfig, finetune: Any, tokenizer: Any = None):
        self.config, self.finetune, self.tokenizer = config, finetune, tokenizer

    @property
    def updates_per_rollout(self) -> int:
        return 1

    def generate(self, policy, pixels: Tensor, seeds: Tensor, layers: list[int], generator: torch.Generator | None):
        """Candidates [B, L, n, T] at ``layers`` (`rlrefine.models.generation.GenerationOutput`), no grad."""
        raise NotImplementedError

    def greedy_layers(self, layers: list[int]) -> list[int]:
        return []

    def layer_loss(self, x: LayerInputs) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``finetune.method: <cls.name>``."""
    if cls.name in METHODS:
        raise ValueError(f"fine-tuning method {cls.name!r} is already registered ({METHODS[cls.name].__module__})")
    METHODS[cls.name] = cls
    return cls
