"""The reward registry: every reward kind a recipe can name, registered once by the module that defines it.

Where it sits: the bottom of the `rewards` package (it imports nothing heavy). Each reward module calls
`register_reward` for its kinds at import time (`rewards/__init__.py` imports them all); the recipe's
list of kinds (`rlrefine.config.RewardSection.kind`), its validation of the keys each kind reads, the
reference docs and `build_reward` all come from `REWARDS`. Adding a reward: one module that defines the
scorer (the protocol in `rewards/__init__.py`) and calls `register_reward`, plus its import line in
`rewards/__init__.py`.

A builder gets the recipe's reward section (read by attribute: ``section.kind``, ``section.path``, ...)
and a `RewardContext` with what a reward may need from the run, never the whole recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["OPTIONAL_FIELDS", "REWARDS", "RewardContext", "RewardKind", "build_reward", "register_reward"]

OPTIONAL_FIELDS = ("path", "student", "model_name", "checkpoint", "scale", "prefix", "clamp",
                   "allow_gelu_for_openai_weights", "target", "kwargs", "terms")
"""Fields of a reward section that only some kinds read; a kind lists the ones it reads in `RewardKind.uses`,
and setting another is an error (it would be ignored silently)."""


@dataclass
class RewardContext:
    """What a reward builder may need from the run (`build_reward`)."""

    run_dir: Path  # the run's folder (default places of the learned evaluator and the distilled student)
    device: Any = "cpu"
    corpus: Callable[[], list[list[str]]] | None = None  # the training captions per image (loaded on first call)
    data_kind: str | None = None  # the recipe's data.kind
    scenes: Callable[[], dict[str, Any]] | None = None  # shapes data: {image digest: scene} of every split (on first call)
    name: str = "reward"  # the recipe key of the section, named in messages (e.g. "finetune.reward")


@dataclass(frozen=True)
class RewardKind:
    """One registered kind: how to build it, which optional section fields it reads, which it needs."""

    name: str
    build: Callable[[Any, RewardContext], Any]  # (section, context) -> a reward following the protocol
    describe: str  # one line for the recipe reference
    uses: tuple[str, ...] = ()  # optional fields it reads (OPTIONAL_FIELDS)
    needs: tuple[str, ...] = ()  # fields that must be set
    check: Callable[[Any], None] | None = None  # extra validation when the recipe loads (raise ValueError)
    needs_corpus: bool = field(default=False)  # reads the training captions (CIDEr-D document frequencies)


REWARDS: dict[str, RewardKind] = {}


def register_reward(name: str, build: Callable[[Any, RewardContext], Any], describe: str, *, uses: tuple[str, ...] = (),
                    needs: tuple[str, ...] = (), check: Callable[[Any], None] | None = None,
                    needs_corpus: bool = False) -> RewardKind:
    """Register reward kind ``name`` (once; registering a name twice is an error)."""
    if name in REWARDS:
        raise ValueError(f"reward kind {name!r} is already registered (by {REWARDS[name].build.__module__})")
    unknown = sorted(set(uses) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"reward kind {name!r} uses unknown section fields {unknown}; known: {list(OPTIONAL_FIELDS)}")
    kind = RewardKind(name, build, describe, tuple(uses), tuple(needs), check, needs_corpus)
    REWARDS[name] = kind
    return kind


def validate_section(section: Any, defaults: dict[str, Any]) -> None:
    """Raise ValueError when ``section`` (a reward section) names an unknown kind, lacks a field its kind needs,
    or sets an optional field its kind does not read (``defaults``: each field's unset value)."""
    kind = REWARDS.get(section.kind)
    if kind is None:
        raise ValueError(f"unknown reward kind {section.kind!r}; choose one of {', '.join(REWARDS)}")
    missing = [f for f in kind.needs if getattr(section, f) in (None, "", [], {})]
    if missing:
        raise ValueError(f"reward kind '{section.kind}' needs {' and '.join(missing)}")
    stray = [f for f in OPTIONAL_FIELDS if f not in kind.uses and getattr(section, f) != defaults[f]]
    if stray:
        readers = [k.name for k in REWARDS.values() if set(stray) <= set(k.uses)]
        where = f"reward kind{'s' * (len(readers) > 1)} {', '.join(readers)} only" if readers else "other reward kinds"
        raise ValueError(f"{', '.join(stray)} apply to {where}; kind '{section.kind}' does not read them")
    if kind.check is not None:
        kind.check(section)


def build_reward(section: Any, ctx: RewardContext) -> Any:
    """The reward ``section`` names, on ``ctx.device`` (the protocol in `rewards/__init__.py`); its
    ``batch_size`` is applied where the reward batches its work."""
    if section.kind not in REWARDS:
        raise ValueError(f"{ctx.name}: unknown reward kind {section.kind!r}; choose one of {', '.join(REWARDS)}")
    score = REWARDS[section.kind].build(section, ctx)
    if hasattr(score, "batch_size"):
        score.batch_size = section.batch_size
    return score
