"""Rewards users bring: a `python` target, resolved from a recipe, and the probe that checks any reward.

Where it sits: ``rewards`` (imports nothing above ``rlrefine.data``). A recipe names a reward by
``target: "package.module:attribute"`` (+ ``kwargs``):

* a class is instantiated with ``kwargs`` (and ``device=`` when its ``__init__`` takes one);
* any other callable *is* the reward, with ``kwargs`` bound as keyword arguments.

Either way the result must follow the reward protocol of :mod:`rewards`:
``reward(images, captions, references=None, image_index=None) -> Tensor[len(captions)]``.
:func:`check_reward` calls it once on a tiny probe batch, so a reward that cannot be called that
way, or does not return one finite float per caption, is an error before training starts.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import torch

from .registry import register_reward

PROTOCOL = ("reward(images, captions, references=None, image_index=None) -> one float per caption "
            "(Tensor[len(captions)]); see rewards/__init__.py")


class RewardTargetError(ValueError):
    """A `python` reward target cannot be imported, built, or does not follow the reward protocol."""


def resolve_target(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (``attribute`` may be dotted)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise RewardTargetError(f"reward target '{target}' is not of the form 'package.module:callable' "
                                f"(e.g. 'my_rewards:LengthReward')")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported with the target's name
        raise RewardTargetError(f"reward target '{target}': cannot import module '{module_name}' "
                                f"({type(exc).__name__}: {exc}); is it on PYTHONPATH or installed?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardTargetError(f"reward target '{target}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardTargetError(f"reward target '{target}' is a {type(obj).__name__}, not a class or callable")
    return obj


def python_reward(target: str, kwargs: dict | None = None, device: str | torch.device = "cpu"):
    """Build the reward a ``target`` names (see the module docstring)."""
    obj = resolve_target(target)
    kwargs = dict(kwargs or {})
    if inspect.isclass(obj):
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = {}
        if "device" in params and "device" not in kwargs:
            kwargs["device"] = device
        try:
            return obj(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise RewardTargetError(f"reward target '{target}': {obj.__name__}(**{kwargs}) failed: "
                                    f"{type(exc).__name__}: {exc}") from None
    return functools.partial(obj, **kwargs) if kwargs else obj


def check_reward(reward, name: str) -> None:
    """Call ``reward`` once on a probe batch (2 black 32×32 images, 3 captions mapped by image_index,
    references) and check it returns 3 finite floats. Raises RewardTargetError naming ``name``."""
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    captions = ["a red circle", "a small blue square", "a green triangle"]
    references = [["a red circle"], ["a blue square", "a small blue square"]]
    try:
        out = reward(images, captions, references=references, image_index=torch.tensor([0, 1, 1]))
    except Exception as exc:  # noqa: BLE001
        raise RewardTargetError(f"reward {name} failed on a probe batch of 3 captions: {type(exc).__name__}: {exc}. "
                                f"A reward is called as {PROTOCOL}") from None
    try:
        scores = torch.as_tensor(out, dtype=torch.float32)
    except Exception:  # noqa: BLE001
        raise RewardTargetError(f"reward {name} returned {type(out).__name__}, not numbers; {PROTOCOL}") from None
    if scores.shape != (len(captions),):
        raise RewardTargetError(f"reward {name} returned shape {tuple(scores.shape)} for {len(captions)} captions; "
                                f"it must return one float per caption: {PROTOCOL}")
    if not torch.isfinite(scores).all():
        raise RewardTargetError(f"reward {name} returned non-finite scores {scores.tolist()} on a probe batch")


def _build(section, ctx):
    score = python_reward(section.target, section.kwargs, device=ctx.device)
    check_reward(score, f"{ctx.name} (python target '{section.target}')")
    return score


register_reward("python", _build, "your own reward: `target: \"package.module:callable\"` (+ `kwargs`), called once on a "
                "probe batch before training", uses=("target", "kwargs"), needs=("target",),
                check=lambda section: resolve_target(section.target))
