"""The stages of a recipe and the order `rlrefine run` runs them in.

    train-evaluator -> pretrain -> distill-reward -> finetune (each `compare` variant and seed) -> report

Where it sits: above every stage (`rlrefine.trainers.*`, `rlrefine.report`), below the CLI and the dry
run. Each stage writes into the recipe's run_dir and has a marker file; `run_pipeline` skips a stage whose
marker exists (unless forced). train-evaluator and distill-reward are in the list only when the run reads
their output (`needs_evaluator`, `needs_distilled`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from rlrefine.config import RecipeConfig, RewardSection

log = logging.getLogger(__name__)

__all__ = ["Stage", "needs_distilled", "needs_evaluator", "run_finetune_variants", "run_pipeline", "stages"]


@dataclass
class Stage:
    name: str
    marker: str  # relative to run_dir; the stage is done when it exists ("": the stage decides)
    run: Callable[[RecipeConfig, bool, bool], object]  # (cfg, resume, force)


def run_finetune_variants(cfg: RecipeConfig, resume: bool, force: bool = False) -> None:
    """Every fine-tuning variant of the recipe, each seed; a variant whose model exists is skipped."""
    from rlrefine.trainers.finetune import finetune

    for name, sections in cfg.finetune_runs().items():
        for s, section in enumerate(sections):
            label = name + (f" seed {cfg.seed + s}" if len(sections) > 1 else "")
            if (cfg.run_path / section.output / "model" / "config.json").exists() and not force:
                log.info("finetune variant %s: output exists, skipped", label)
                continue
            log.info("finetune variant %s (%s) ...", label, section.method)
            finetune(cfg.model_copy(update={"finetune": section, "seed": cfg.seed + s}), resume=resume)


def _reward_sections(cfg: RecipeConfig) -> list[RewardSection]:
    """Every reward section a run reads: each fine-tuning variant's reward and the evaluation scores,
    with the terms of `sum` rewards."""
    todo = [*(v.reward for v in cfg.finetune_variants().values()), cfg.evaluate.evaluator, *cfg.evaluate.extra_rewards.values()]
    out = []
    while todo:
        section = todo.pop()
        out.append(section)
        todo.extend(term.reward for term in section.terms)
    return out


def needs_evaluator(cfg: RecipeConfig) -> bool:
    """True when the run reads its own learned evaluator (the encoder, a reward, or the distill teacher)."""
    sections = _reward_sections(cfg) + ([cfg.distill.teacher] if needs_distilled(cfg) else [])
    return cfg.model.encoder.kind == "evaluator" or any(s.kind == "learned" and s.path is None for s in sections)


def needs_distilled(cfg: RecipeConfig) -> bool:
    """True when a reward of the run is the run's own distilled student (`distilled` without a path)."""
    return any(s.kind == "distilled" and s.path is None for s in _reward_sections(cfg))


def stages(cfg: RecipeConfig) -> list[Stage]:
    """The recipe's stages in order. train-evaluator and distill-reward are there only when the run
    reads their output (e.g. the COCO recipe trains on PAC-S directly: neither runs)."""
    from rlrefine.report import report_stage
    from rlrefine.trainers.distill import distill_stage
    from rlrefine.trainers.evaluator import train_evaluator_stage
    from rlrefine.trainers.pretrain import pretrain

    out = []
    if needs_evaluator(cfg):
        out.append(Stage("train-evaluator", "evaluator/report.json", lambda c, r, f: train_evaluator_stage(c, resume=r)))
    out.append(Stage("pretrain", "pretrain/model/config.json", lambda c, r, f: pretrain(c, resume=r)))
    if needs_distilled(cfg):
        out.append(Stage("distill-reward", "distill/report.json", lambda c, r, f: distill_stage(c, resume=r)))
    out.append(Stage("finetune", "", run_finetune_variants))  # each variant is skipped on its own
    out.append(Stage("report", "", report_stage))
    return out


def run_pipeline(cfg: RecipeConfig, force: bool = False, resume: bool = False) -> None:
    """All stages in order, with a progress line per stage; done stages are skipped unless forced."""
    todo = stages(cfg)
    t_start = time.time()
    for i, stage in enumerate(todo, 1):
        if stage.marker and (cfg.run_path / stage.marker).exists() and not force:
            log.info("[%d/%d] %s: %s exists, skipped (--force redoes it)", i, len(todo), stage.name, cfg.run_path / stage.marker)
            continue
        log.info("[%d/%d] %s ...", i, len(todo), stage.name)
        t0 = time.time()
        stage.run(cfg, resume, force)
        log.info("[%d/%d] %s done in %.0f s (total %.0f s)", i, len(todo), stage.name, time.time() - t0, time.time() - t_start)
