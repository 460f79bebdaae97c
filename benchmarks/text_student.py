"""The text-tower student (rewards.text_student) at the embedded default's size: decision agreement
with the teacher beside today's distilled student, on the same held-out decisions.

    python benchmarks/text_student.py --config recipes/tiny.yaml run_dir=runs/tiny   # after train-evaluator + pretrain

The student keeps the teacher's image tower (the learned evaluator's, so image embeddings are exact)
and distils a small text tower onto the teacher's text embeddings and scores
(`rewards.text_student.distill_text_tower`) on the pairs of `--train-images` training images: their
references and the pretrained captioner's beams at every layer. It is then scored, with the teacher,
on the choices DiCO makes (`rewards.distill.decision_agreement`: the best of one held-out image's
`finetune.num_candidates` beams at one layer), the figure `benchmarks/distill.py` reports as `decisions`.

Held-out images: those of today's student's `heldout_pairs.json` when `--student` (default
`<run_dir>/distill`) holds one (then today's student is scored on the same decisions); otherwise the
last `--heldout-images` images of the split. Training images never overlap them.
Speed (`pairs_per_s`): the text student, the teacher and today's student on the held-out beams.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import time  # noqa: E402

import torch  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--config", default="recipes/tiny.yaml")
    p.add_argument("--student", default=None, help="today's distill folder (default <run_dir>/distill, if present)")
    p.add_argument("--train-images", type=int, default=None, help="images whose pairs train the text tower (default 2000, --quick 200)")
    p.add_argument("--heldout-images", type=int, default=None, help="held-out images when there is no heldout_pairs.json (default 400, --quick 50)")
    p.add_argument("--train-beams", type=int, default=5, help="captioner beams per layer in the training pairs")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 1500, --quick 50)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.train_images = args.train_images or (200 if args.quick else 2000)
    args.heldout_images = args.heldout_images or (50 if args.quick else 400)
    args.steps = args.steps or (50 if args.quick else 1500)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv=None) -> dict:
    from rewards.distill import DistilledScore
    from rewards.fidelity import HELDOUT_FILE, decision_agreement, load_pairs
    from rewards.registry import build_reward
    from rewards.text_student import TextStudentConfig, build_text_student, distill_text_tower
    from rlrefine.config import load_recipe
    from rlrefine.data.sources import load_splits
    from rlrefine.data.split import images_and_captions
    from rlrefine.trainers.distill import captioner_candidates

    args = parse_args(argv)
    device = C.setup(args)
    mem = C.PeakMemory(device)
    cfg = load_recipe(args.config, args.overrides)
    split = load_splits(cfg.data)["train"]
    teacher = build_reward(cfg.distill.teacher, cfg.reward_context("distill.teacher", device, split))
    images, captions = images_and_captions(split)
    today_dir = Path(args.student) if args.student else cfg.run_path / "distill"
    today = DistilledScore.from_dir(today_dir, device=device) if (today_dir / DistilledScore.manifest_name).is_file() else None
    if (today_dir / HELDOUT_FILE).is_file():
        held = sorted(set(load_pairs(today_dir / HELDOUT_FILE).image.tolist()))
    else:
        held = list(range(len(captions) - args.heldout_images, len(captions)))
    held_set = set(held)
    train_idx = [i for i in range(len(captions)) if i not in held_set][: args.train_images]

    # training pairs: references + the captioner's beams at every layer, teacher's image tower shared
    cands = captioner_candidates(cfg, split, train_idx, args.train_beams, sampled=False)
    pair_img = [i for i in train_idx for _ in captions[i]] + [i for i, _, _ in cands]
    pair_cap = [c for i in train_idx for c in captions[i]] + [c for _, _, c in cands]
    local = {i: j for j, i in enumerate(train_idx)}
    scfg = TextStudentConfig(width=args.width, layers=args.layers, heads=args.heads, context_length=args.context,
                             vocab_size=49408, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    student = build_text_student(teacher, scfg)
    t0 = time.perf_counter()
    losses = distill_text_tower(student, teacher, images[train_idx], pair_cap, [local[i] for i in pair_img], scfg)
    train_s = time.perf_counter() - t0

    beams = captioner_candidates(cfg, split, held, cfg.finetune.num_candidates, sampled=False)
    keep = ("decisions", "argmax_agreement", "argmax_regret", "teacher_top2_gap_median")

    def decisions(reward):
        d = decision_agreement(reward, teacher, images, captions, beams)
        return {**{k: round(d[k], 4) for k in keep},
                "by_layer": [{"layer": r["layer"], **{k: round(r[k], 4) for k in keep}} for r in d["by_layer"]]}

    result = {"benchmark": "text_student", "text_student": decisions(student),
              "today_student": decisions(today) if today is not None else None}
    # speed on the held-out beams, one reward call per image batch as a rollout makes
    held_images = images[held]
    where = {i: j for j, i in enumerate(held)}
    caps, idx = [c for _, _, c in beams], torch.tensor([where[i] for i, _, _ in beams])
    speed = {}
    for name, r in (("text_student", student), ("teacher", teacher), ("today_student", today)):
        if r is not None:
            r.batch_size = 512
            t, _ = C.median_time(lambda: r(held_images, caps, image_index=idx), device, args.repeats, args.warmup)
            speed[name] = round(len(caps) / t, 1)
    result.update({
        "agreement_gap": (round(result["today_student"]["argmax_agreement"] - result["text_student"]["argmax_agreement"], 4)
                          if today is not None else None),
        "pairs_per_s": speed, "train_pairs": len(pair_cap), "train_images": len(train_idx), "train_s": round(train_s, 1),
        "final_losses": {k: round(v, 4) for k, v in losses.items()},
        "heldout_images": len(held), "heldout_source": str(today_dir / HELDOUT_FILE) if (today_dir / HELDOUT_FILE).is_file() else "last images",
        "student": student.name, "teacher": repr(teacher), "today": str(today_dir) if today is not None else None,
        "peak_memory_mb": mem.peak_mb(), **C.environment(args, device),
    })
    return C.emit(result)


if __name__ == "__main__":
    main()
