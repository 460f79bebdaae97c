"""Caption rewards for rlrefine: CLIP-S, RefCLIP-S, PAC-S, RefPAC-S, learned and distilled evaluators,
BLIP image-text matching, CIDEr-D, and rewards users bring (a python target, weighted sums, the shapes grammar).

Where it sits: ``rlrefine.data -> rlrefine.models -> rewards -> rlrefine.losses -> trainers``.
This package imports nothing from ``rlrefine`` above the data layer.

The reward protocol
-------------------
Every reward is a callable::

    reward(images, captions, references=None, image_index=None) -> torch.Tensor  # [len(captions)]

* ``images``: a list of PIL images, a uint8 tensor/ndarray ``[B, H, W, 3]`` of raw pixels
  (preprocessed by the reward itself with batched torch ops: resize shortest side, centre crop,
  normalise), or a float tensor ``[B, 3, h, w]`` already preprocessed for *that* reward.
* ``captions``: ``N`` strings. ``image_index`` (LongTensor ``[N]``) maps caption ``i`` to image row
  ``image_index[i]``, so ``n`` candidates per image are scored with each image encoded once;
  default: row-aligned (``N == B``).
* ``references``: per image row, a list of reference captions (needed by the ``Ref*`` rewards,
  ignored by the others).
* Returns float32 scores, higher is better, on the reward model's device, computed under
  ``torch.no_grad()``. Work is batched internally (``batch_size``), and the text embedding of a
  caption that occurs several times in one call (duplicate candidates, references) is computed
  once.

Every reward also exposes ``embed_images(images) -> [B, D]`` and ``embed_texts(texts) -> [N, D]``
(L2-normalised), used e.g. for hard-pair mining and the text-embedding progress curve.

Public API
----------
* :mod:`rewards.registry`: ``REWARDS`` (every kind a recipe can name), ``register_reward``,
  ``build_reward(section, context)``. Each module below registers its kinds when it is imported.
* :mod:`rewards.clip_score`: ``clip_s``, ``CLIPScore``, ``RefCLIPScore``, ``PACScore``,
  ``RefPACScore``, ``LearnedScore`` (``.from_pretrained(model_name, checkpoint, device)``,
  ``LearnedScore.from_dir(dir)``); kinds ``clip``, ``refclip``, ``pac``, ``refpac``, ``learned``.
* :mod:`rewards.loading`: ``load_open_clip(model_name, checkpoint, device)``,
  ``register_model_config(name, cfg)``, ``BatchedPreprocess``.
* :mod:`rewards.evaluator`: ``EvaluatorConfig``, the learned evaluator's model and held-out metrics
  (trained by ``rlrefine.trainers.evaluator``).
* :mod:`rewards.distill`: ``DistillConfig``, ``DistilledScore`` (kind ``distilled``; trained by
  ``rlrefine.trainers.distill``).
* :mod:`rewards.fidelity`: how faithfully a student imitates its teacher (rank correlations, argmax
  agreement, decision agreement, which tower limits it).
* :mod:`rewards.text_student`: ``TextStudentConfig``, ``build_text_student``, ``TextStudentScore`` (a student
  for CLIP-sized teachers: an open_clip image tower kept, a small text tower; trained by
  ``rlrefine.trainers.distill_text``, loaded as kind ``distilled``).
* :mod:`rewards.itm`: ``ITMScore`` (kind ``itm``: BLIP's image-text matching probability from a local
  transformers ``BlipForImageTextRetrieval`` folder), ``load_blip_itm``.
* :mod:`rewards.shaping`: ``schedule``, ``length_budget``, ``shape_rewards`` (the graduality shaping).
* :mod:`rewards.cider`: ``CiderD`` (the one CIDEr-D implementation, also behind the metric),
  ``CiderReward`` (kind ``cider``: document frequencies from the training captions).
* :mod:`rewards.custom`: ``python_reward(target, kwargs)`` (kind ``python``), ``check_reward`` (the
  probe call every python reward passes before training).
* :mod:`rewards.weighted`: ``WeightedSum`` (kind ``sum``; ``term_scores`` for per-term logging).
* :mod:`rewards.grammar`: ``GrammarReward`` (kind ``grammar``, the shapes caption grammar).
* :mod:`rewards.scene`: ``SceneReward``, ``scene_score`` (kind ``scene``: the shapes world's ground truth).

A reward of your own needs only ``__call__`` with the signature above; ``embed_images`` /
``embed_texts`` are optional (used for hard-pair mining and the text-embedding progress curve when
the reward is the evaluator). To make it a recipe kind, register it (:mod:`rewards.registry`).
"""
from .registry import REWARDS, RewardContext, build_reward, register_reward
from .cider import CiderD, CiderReward
from .clip_score import (
    CLIPScore,
    LearnedScore,
    OpenCLIPReward,
    PACScore,
    RefCLIPScore,
    RefPACScore,
    clip_s,
    harmonic_mean,
    ref_text_similarity,
)
from .custom import RewardTargetError, check_reward, python_reward
from .distill import DistillConfig, DistilledScore
from .evaluator import EvaluatorConfig, swap_attribute
from .fidelity import kendall_tau, spearman
from .loading import BatchedPreprocess, load_open_clip, read_state_dict, register_model_config
from .grammar import GrammarReward
from .scene import SceneReward, scene_score
from .shaping import length_budget, schedule, shape_rewards
from .itm import ITMScore, load_blip_itm
from .text_student import TextStudentConfig, TextStudentScore, build_text_student
from .weighted import WeightedSum

__all__ = [
    "REWARDS",
    "BatchedPreprocess",
    "CLIPScore",
    "CiderD",
    "CiderReward",
    "DistillConfig",
    "DistilledScore",
    "EvaluatorConfig",
    "GrammarReward",
    "SceneReward",
    "ITMScore",
    "LearnedScore",
    "OpenCLIPReward",
    "PACScore",
    "RefCLIPScore",
    "RefPACScore",
    "RewardContext",
    "RewardTargetError",
    "TextStudentConfig",
    "TextStudentScore",
    "WeightedSum",
    "build_reward",
    "build_text_student",
    "check_reward",
    "clip_s",
    "harmonic_mean",
    "kendall_tau",
    "length_budget",
    "load_blip_itm",
    "python_reward",
    "load_open_clip",
    "read_state_dict",
    "ref_text_similarity",
    "register_model_config",
    "register_reward",
    "scene_score",
    "schedule",
    "shape_rewards",
    "spearman",
    "swap_attribute",
]
