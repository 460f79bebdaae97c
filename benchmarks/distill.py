"""Distilled reward vs its teacher on the held-out pairs of a distillation run: rank agreement and speed.

    python benchmarks/distill.py --config recipes/tiny.yaml          # after `rlrefine distill-reward`

`rlrefine distill-reward` writes `<run_dir>/distill/heldout_pairs.json`: the pairs of the images it held
out (their references, the captioner's candidates from every layer, mined hard pairs). This script
loads the trained student and the teacher, scores those pairs with both through the reward protocol
(best of `--repeats` timed calls each, same pairs, same threads) and prints one JSON line:

* `spearman`, `kendall`: rank correlation of student and teacher scores over all held-out pairs;
  `spearman_per_image`: the mean within each image's pairs.
* `argmax_agreement`: share of images whose best pair under the student is (one of) the teacher's best;
  `argmax_regret`: mean teacher score lost per image by taking the student's best pair instead;
  `teacher_top2_gap_median`: the median gap between the teacher's two best pairs of an image.
* `student_pairs_per_s`, `teacher_pairs_per_s`, `speedup`.
* `targets`: the issue's targets (Spearman >= 0.9, argmax agreement >= 0.75, speedup >= 3) and `met`.
* `fidelity`: which tower limits the ranking (`rewards.distill.tower_fidelity`): the mean cosine of student
  and teacher image / text embeddings, and Spearman / argmax agreement with one tower made exact
  (`image_side_*`: the student's images with the teacher's texts; `text_side_*`: the other way round).
* `sensitivity`: the teacher's own ranking with one tower's embeddings moved at random to a cosine
  (`rewards.distill.noise_sensitivity`): the fidelity an argmax target needs if a student's errors were no
  worse than random. The rows at the student's own cosines say how much worse than random its errors are.
* `decisions`: the same argmax figures on the choices DiCO makes with the reward: the best of one held-out
  image's `finetune.num_candidates` beams from the pretrained captioner at one layer
  (`rewards.distill.decision_agreement`), over all (image, layer) decisions and `by_layer`. Null when the run
  has no pretrained captioner.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

TARGETS = {"spearman": 0.9, "argmax_agreement": 0.75, "speedup": 3.0}
COSINES = (0.9995, 0.999, 0.998, 0.995, 0.99)  # fidelities of the sensitivity table


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="recipes/tiny.yaml", help="the recipe whose run to measure")
    p.add_argument("--student", default=None, help="distill folder (default <run_dir>/distill)")
    p.add_argument("--teacher", default=None, help="teacher evaluator folder (default: the recipe's distill.teacher)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. run_dir=runs/x")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv=None) -> dict:
    from rewards.distill import DistilledScore
    from rewards.fidelity import HELDOUT_FILE, compare_to_teacher, decision_agreement, load_pairs, noise_sensitivity
    from rewards.registry import build_reward
    from rlrefine.config import RewardSection, load_recipe
    from rlrefine.data.sources import load_splits
    from rlrefine.data.split import images_and_captions

    args = parse_args(argv)
    device = C.setup(args)
    mem = C.PeakMemory(device)
    cfg = load_recipe(args.config, args.overrides)
    student_dir = Path(args.student) if args.student else cfg.run_path / "distill"
    pairs = load_pairs(student_dir / HELDOUT_FILE)
    teacher_section = cfg.distill.teacher if args.teacher is None else RewardSection(kind="learned", path=args.teacher)
    split = load_splits(cfg.data)["train"]
    teacher = build_reward(teacher_section, cfg.reward_context("distill.teacher", device, split))
    student = DistilledScore.from_dir(student_dir, device=device)
    student.batch_size = teacher.batch_size = max(teacher.batch_size, 512)
    images, captions = images_and_captions(split)
    m = compare_to_teacher(student, teacher, images, captions, pairs, repeats=args.repeats)
    fidelity = {k.split("/", 1)[1]: round(v, 4) for k, v in m.items() if k.startswith("fidelity/")}
    own = (round(fidelity[k], 4) for k in ("image_cos", "text_cos") if k in fidelity)
    cosines = sorted({*COSINES, *(c for c in own if 0.0 < c <= 1.0)}, reverse=True)  # an untrained student can sit below 0
    sensitivity = [{k: round(v, 4) for k, v in row.items()}
                   for row in noise_sensitivity(teacher, images, pairs, cosines, seed=args.seed)]
    decisions = None
    if (cfg.run_path / "pretrain" / "model").is_dir():
        from rlrefine.trainers.distill_stage import captioner_candidates

        held = sorted(set(pairs.image.tolist()))
        beams = captioner_candidates(cfg, split, held, cfg.finetune.num_candidates, sampled=False)
        d = decision_agreement(student, teacher, images, captions, beams)
        keep = ("decisions", "argmax_agreement", "argmax_regret", "teacher_top2_gap_median")
        decisions = {"candidates_per_decision": cfg.finetune.num_candidates, **{k: round(d[k], 4) for k in keep},
                     "by_layer": [{"layer": row["layer"], **{k: round(row[k], 4) for k in keep}} for row in d["by_layer"]]}
    result = {
        "benchmark": "distill",
        "spearman": round(m["spearman"], 4), "kendall": round(m["kendall"], 4),
        "spearman_per_image": round(m["spearman_per_image"], 4),
        "argmax_agreement": round(m["argmax_agreement"], 4), "argmax_regret": round(m["argmax_regret"], 4),
        "teacher_top2_gap_median": round(m["teacher_top2_gap_median"], 4),
        "student_pairs_per_s": round(m["pairs_per_s_student"], 1),
        "teacher_pairs_per_s": round(m["pairs_per_s_teacher"], 1),
        "speedup": round(m["speedup"], 2),
        "pairs": len(pairs.caption), "images": len(set(pairs.image.tolist())),
        "targets": TARGETS, "met": {k: bool(m[k] >= v) for k, v in TARGETS.items()},
        "fidelity": fidelity, "sensitivity": sensitivity, "decisions": decisions,
        "student": str(student_dir), "teacher": repr(teacher),
        "peak_memory_mb": mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
