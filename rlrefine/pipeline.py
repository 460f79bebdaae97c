"""The stages of a recipe and the order `rlrefine run` runs them in.

    train-evaluator -> pretrain -> distill-reward (and distill-reward[<name>] for each named student)
                    -> finetune (each `compare` variant and seed) -> report

Where it sits: above every stage (`rlrefine.trainers.*`, `rlrefine.report`), below the CLI and the dry
run. Each stage writes into the recipe's run_dir and has a marker file; `run_pipeline` skips a stage whose
marker exists (unless forced). train-evaluator and the distill-reward stages are in the list only when the
run reads their output (`needs_evaluator`; `RecipeConfig.distillations`: the students some reward reads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from rlrefine.config import RecipeConfig

log = logging.getLogger(__name__)

__all__ = ["Stage", "distill_stage_name", "needs_distilled", "needs_evaluator", "run_finetune_variants", "run_pipeline",
           "stages"]


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


def needs_evaluator(cfg: RecipeConfig) -> bool:
    """True when the run reads its own learned evaluator (the encoder, a reward, a distill teacher or the image
    tower a text student keeps)."""
    sections = list(cfg.reward_sections())
    for d in cfg.distillations().values():
        sections += [d.teacher] + ([d.image_tower] if d.image_tower is not None else [])
    return cfg.model.encoder.kind == "evaluator" or any(s.kind == "learned" and s.path is None for s in sections)


def needs_distilled(cfg: RecipeConfig) -> bool:
    """True when a reward of the run is one of the run's own distilled students (`distilled` without a path)."""
    return bool(cfg.distillations())


def distill_stage_name(name: str | None) -> str:
    """`distill-reward` for the run's student, `distill-reward[<name>]` for a named one."""
    return "distill-reward" if name is None else f"distill-reward[{name}]"


def stages(cfg: RecipeConfig) -> list[Stage]:
    """The recipe's stages in order. train-evaluator and distill-reward are there only when the run
    reads their output (one distill-reward stage per student a reward reads)."""
    from rlrefine.report import report_stage
    from rlrefine.trainers.distill import distill_stage
    from rlrefine.trainers.evaluator import train_evaluator_stage
    from rlrefine.trainers.pretrain import pretrain

    out = []
    if needs_evaluator(cfg):
        out.append(Stage("train-evaluator", "evaluator/report.json", lambda c, r, f: train_evaluator_stage(c, resume=r)))
    out.append(Stage("pretrain", "pretrain/model/config.json", lambda c, r, f: pretrain(c, resume=r)))
    for name in cfg.distillations():
        marker = str(cfg.distill_dir(name).relative_to(cfg.run_path) / "report.json")
        out.append(Stage(distill_stage_name(name), marker, lambda c, r, f, n=name: distill_stage(c, resume=r, name=n)))
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
