"""`rlrefine distill-reward` as a recipe stage: the teacher a reward section names, the XE captioner's candidates
from every layer (`captioner_candidates`), and the student kind `distill.student_kind` picks: `dual`
(`rlrefine.trainers.distill.DistillLoop`) or `text` (`rlrefine.trainers.distill_text.TextDistillLoop`).
Writes <run_dir>/distill (or <run_dir>/distill_<name> for a named student), its report.json and model card.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np
import torch

from rewards.distill import DistilledScore
from rlrefine.config import RecipeConfig, RecipeError
from rlrefine.data.split import images_and_captions
from rlrefine.trainers.distill import DistillLoop, loop_settings
from rlrefine.trainers.distill_text import TextDistillLoop, text_loop_settings
from rlrefine.trainers.loop import TrainingLoop

log = logging.getLogger(__name__)

__all__ = ["captioner_candidates", "distill_stage"]


def captioner_candidates(cfg: RecipeConfig, split, index, beams: int, sampled: bool = True) -> list[tuple[int, int, str]]:
    """(image index, layer, caption) triples: the pretrained captioner's ``beams`` beam candidates (and,
    with ``sampled``, one sampled caption) at every layer for the images ``index`` of ``split``, each
    distinct non-empty caption of an image and layer once; z_0 from the evaluation seeds."""
    from rlrefine.data.batches import eval_z0_seeds, load_images
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.models import RefinementCaptioner

    model_dir = cfg.run_path / "pretrain" / "model"
    model = RefinementCaptioner.from_pretrained(model_dir).eval()
    tokenizer = CaptionTokenizer.from_dir(model_dir)
    K = model.config.num_refine_layers
    index = np.asarray(index, dtype=np.int64)
    g = torch.Generator().manual_seed(cfg.seed)
    methods = (("beam", beams), ("sample", 1)) if sampled else (("beam", beams),)
    out: list[tuple[int, int, str]] = []
    with torch.no_grad():
        for start in range(0, len(index), 64):
            idx = index[start:start + 64]
            pixels = model.encoder.preprocess(load_images(split, idx, cfg.data.image_size))
            seeds = eval_z0_seeds(idx, seed=cfg.seed)
            for method, n in methods:
                gen = model.generate(pixels, seeds, list(range(K + 1)), method=method, num_candidates=n,
                                     max_len=cfg.data.max_caption_len, generator=g)
                for i, per_img in zip(idx, tokenizer.decode_batch(gen.tokens)):
                    out.extend((int(i), layer, c) for layer, caps in enumerate(per_img)
                               for c in dict.fromkeys(caps) if c.strip())
    return out


def distill_stage(cfg: RecipeConfig, resume: bool = False, name: str | None = None,
                  on_step_end: Callable[..., None] | None = None) -> dict:
    """`rlrefine distill-reward`: a compact student imitating the recipe's teacher reward -> <run_dir>/distill, or the
    named student ``name`` (`distill.extra_students`) -> <run_dir>/distill_<name>. `distill.student_kind` picks the
    student: `dual` (`DistillLoop`) or `text` (`rlrefine.trainers.distill_text.TextDistillLoop`). ``on_step_end``:
    called after every optimizer step (the dry run's clock)."""
    from rewards.registry import build_reward
    from rlrefine.data.sources import load_splits
    from rlrefine.trainers.model_card import scalars_table, write_model_card

    if name is not None and name not in cfg.distill.extra_students:
        raise RecipeError(f"--student {name}: distill.extra_students has no student of that name (it has: "
                          f"{', '.join(cfg.distill.extra_students) or 'none'})")
    d = cfg.distill if name is None else cfg.distill.extra(name)
    section = "distill" if name is None else f"distill.extra_students.{name}"
    splits = load_splits(cfg.data)
    teacher = build_reward(d.teacher, cfg.reward_context(f"{section}.teacher", cfg.torch_device, splits["train"]))
    candidates = None
    if d.candidate_images > 0 and (cfg.run_path / "pretrain" / "model").is_dir():
        split = splits["train"]
        index = np.flatnonzero(~np.asarray(split.is_label, dtype=bool))[:d.candidate_images]  # captioned images
        candidates = captioner_candidates(cfg, split, index, d.candidate_beams)  # (image, layer, caption)
        log.info("distill: %d captioner candidate pairs from every layer", len(candidates))
    shapes = cfg.data.kind == "shapes"
    examples = None
    if shapes and d.student_kind == "dual" and d.student.matching_head.steps:
        from rlrefine.data.shapes import DEFAULT_HELD_OUT, matching_examples

        scenes, size, fraction = splits["train"].scenes, cfg.data.shapes.image_size, d.student.matching_head.relation_fraction
        examples = lambda i, rng: matching_examples(scenes[i], size, rng, fraction, DEFAULT_HELD_OUT,
                                                    d.student.matching_head.axis_negatives)  # noqa: E731
    stage_dir = cfg.distill_dir(name)
    if d.student_kind == "text":
        tower = None if d.image_tower is None else build_reward(
            d.image_tower, cfg.reward_context(f"{section}.image_tower", cfg.torch_device, splits["train"]))
        settings = text_loop_settings(d.text_student, stage_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads,
                                      section=f"{section}.text_student")
        loop: TrainingLoop = TextDistillLoop(d.text_student, teacher, splits["train"], settings, candidates,
                                             image_tower=tower, recipe=cfg, on_step_end=on_step_end)
    else:
        settings = loop_settings(d.student, stage_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads)
        loop = DistillLoop(d.student, teacher, splits["train"], settings, candidates, examples, recipe=cfg,
                           on_step_end=on_step_end)
    report = loop.run(resume)
    if loop.acc.is_main_process and shapes:  # the teacher's swap test (train-evaluator's report), taken by the student
        from rewards.evaluator import swap_accuracy
        from rlrefine.data.shapes import complete_descriptions

        student = DistilledScore.from_dir(stage_dir, device=loop.acc.device)
        for split_name, prefix, seed in (("val", "", cfg.seed + 2), ("test_novel", "test_novel/", cfg.seed + 3)):
            split = splits[split_name]
            captions = complete_descriptions(split, cfg.data.shapes.image_size, seed=seed)
            report.update({f"{prefix}{k}": v for k, v in swap_accuracy(
                student, images_and_captions(split)[0], captions, cfg.evaluator.attribute_groups,
                cfg.evaluator.eval_max_images, cfg.seed).items()})
    if loop.acc.is_main_process:
        (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
        what = "text student (the image tower kept, a small text tower)" if d.student_kind == "text" else "student"
        write_model_card(stage_dir, f"Distilled reward ({what} of the {d.teacher.kind} teacher)",
                         "A compact student that imitates the teacher reward (`rlrefine distill-reward`); load it with "
                         "`rewards.DistilledScore.from_dir` or as `{kind: distilled}`. Held-out fidelity to the teacher "
                         "below.", cfg, scalars_table(report))
        log.info("distilled reward (%s): spearman %.3f, argmax agreement %.3f, decision agreement %.3f, %.1fx the teacher's "
                 "speed", stage_dir.name, *(report.get(k, float("nan")) for k in ("spearman", "argmax_agreement",
                                                                                   "decision_agreement", "speedup")))
        if "swap_acc/relation" in report:
            log.info("distilled reward (%s): swap accuracy colour %.3f, shape %.3f, relation %.3f", stage_dir.name,
                     *(report[k] for k in ("swap_acc/colour", "swap_acc/shape", "swap_acc/relation")))
    return report
