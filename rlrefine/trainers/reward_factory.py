"""Build the reward a recipe section names (`RewardSection`), ready for inference on a device.

Where it sits: ``trainers`` (it reads the recipe and the run directory; the rewards themselves live
in the top-level `rewards` package). Used by finetune, distill-reward (the teacher) and evaluation.
"""

from __future__ import annotations

import logging

from rlrefine.config import RecipeConfig, RewardSection

log = logging.getLogger(__name__)


def training_corpus(split) -> list[list[str]]:
    """The reference lists of the captioned (not label-only) images of a split: CIDEr-D's corpus."""
    labels = split.is_label if split.is_label is not None else [False] * len(split.captions)
    return [list(refs) for refs, is_label in zip(split.captions, labels) if not is_label]


def build_reward(section: RewardSection, cfg: RecipeConfig, device, corpus: list[list[str]] | None = None,
                 name: str = "reward"):
    """The reward `section` names, on `device` (rewards protocol).

    ``corpus``: the training captions per image, for `cider`'s document frequencies (default: the
    recipe's training split, loaded here). `python` rewards are called once on a probe batch here
    (`rewards.custom.check_reward`), so a reward that does not return one float per caption is an
    error naming ``name`` and its target before any training step.
    """
    import rewards

    kind = section.kind
    if kind == "learned":
        score = rewards.LearnedScore.from_dir(section.path or cfg.run_path / "evaluator", device=device)
    elif kind == "distilled":
        score = rewards.DistilledScore.from_dir(section.path or cfg.run_path / "distill", device=device)
    elif kind in ("clip", "refclip", "pac", "refpac"):
        cls = {"clip": rewards.CLIPScore, "refclip": rewards.RefCLIPScore, "pac": rewards.PACScore, "refpac": rewards.RefPACScore}[kind]
        # scale / prefix / clamp left unset give the official scores (w 2.5 CLIP-S / 2.0 PAC-S, "A photo depicts ", clamp at 0)
        options = {"w": section.scale, "text_prefix": section.prefix, "clamp": True if section.clamp is None else section.clamp}
        score = cls.from_pretrained(section.model_name, section.checkpoint, device=device,
                                    allow_gelu_for_openai_weights=section.allow_gelu_for_openai_weights,
                                    option=f"{name}.allow_gelu_for_openai_weights", **options)
    elif kind == "cider":
        from rewards.cider import CiderReward

        if corpus is None:
            from rlrefine.trainers.common import load_splits

            corpus = training_corpus(load_splits(cfg)["train"])
        score = CiderReward(corpus, device=device)
        log.debug("cider reward: document frequencies from %d training images", score.cider.num_sets)
    elif kind == "grammar":
        from rewards.grammar import GrammarReward

        if cfg.data.kind != "shapes":
            raise ValueError(f"{name}: reward kind 'grammar' recognises the shapes caption grammar; data.kind is "
                             f"'{cfg.data.kind}' (use a python reward for your own fluency term)")
        score = GrammarReward(device=device)
    elif kind == "python":
        from rewards.custom import check_reward, python_reward

        score = python_reward(section.target, section.kwargs, device=device)
        check_reward(score, f"{name} (python target '{section.target}')")
    else:  # sum
        from rewards.weighted import WeightedSum

        names = section.term_names()
        score = WeightedSum([(n, t.weight, build_reward(t.reward, cfg, device, corpus, f"{name}.terms[{n}]"))
                             for n, t in zip(names, section.terms)])
    if hasattr(score, "batch_size"):
        score.batch_size = section.batch_size
    return score
