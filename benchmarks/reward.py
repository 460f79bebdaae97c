"""Reward throughput: the distilled student vs its teacher (the learned evaluator) on the same pairs,
and what deduplicating repeated captions buys.

    python benchmarks/reward.py --quick --threads 1

Pairs are laid out like one DiCO rollout: B shapes images, each with L·n candidate captions (n beams
at each of L layers). Beams repeat across layers (late layers agree): layer k's n captions are a
copy of layer k−1's with probability `--repeat`, else n distinct captions (beams are distinct):
some of the image's own references and the rest attribute-swapped variants of them (mistakes). The reward is called once per rollout, as
`rlrefine.trainers.finetune.rollout` does (`image_index` maps captions to images, each image encoded
once, `batch_size` 512 as in the finetune recipe section).

* `student_pairs_per_s`, `teacher_pairs_per_s`: pairs per second of each, the protocol's call as
  shipped (with deduplication); `student_speedup` their ratio. Teacher and student have the
  embedded default's architectures (rewards.EvaluatorConfig / rewards.DistillConfig) with random
  weights, unless `--teacher` / `--student` name trained folders (cost does not depend on the weights).
* `dedup_speedup_student`, `dedup_speedup_teacher`: the same call with vs without deduplication
  (without: every caption's text embedding computed, as a reward that did not deduplicate would);
  the scores are checked equal. `unique_fraction` = distinct captions / pairs in these rollouts.
"""
from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6, help="L, layers per rollout (K=6: layers 1..6)")
    p.add_argument("--n", type=int, default=5, help="beam candidates per image and layer")
    p.add_argument("--batch", type=int, default=None, help="images per rollout (default 16 = finetune.batch_size; --quick 8)")
    p.add_argument("--rollouts", type=int, default=None, help="rollouts per timed repeat (default 4, --quick 2)")
    p.add_argument("--repeat", type=float, default=0.5, help="probability that a layer's beams repeat the previous layer's")
    p.add_argument("--teacher", default="teacher", help="'teacher' (random learned-evaluator architecture) or an evaluator folder")
    p.add_argument("--student", default="student", help="'student' (random distilled architecture) or a distill folder")
    p.add_argument("--batch-size", type=int, default=512, help="reward batch size (finetune.reward.batch_size)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 16)
    args.rollouts = args.rollouts or (2 if args.quick else 4)
    args.repeats = args.repeats or (3 if args.quick else 7)
    return args


def rollout_captions(refs: list[list[str]], L: int, n: int, repeat: float, rng: random.Random) -> list[str]:
    """B·L·n captions, row-major over (image, layer, beam), with beams repeating across layers.

    A fresh layer's n beams are distinct (as beam search's are): some of the image's own references
    and, for the rest, those references with attributes swapped (the mistakes a captioner makes),
    so wrong captions are specific to their image as they are in a real rollout."""
    from rewards.evaluator import shapes_attribute_groups, swap_attribute

    groups = shapes_attribute_groups()
    out = []
    for own in refs:
        own = list(dict.fromkeys(own))
        beams = None
        for _ in range(L):
            if beams is None or rng.random() >= repeat:
                beams = rng.sample(own, min(len(own), rng.randint(1, n)))
                for _ in range(100 * n):
                    if len(beams) == n:
                        break
                    swapped = swap_attribute(rng.choice(beams), groups, rng)
                    if swapped is not None and swapped[0] not in beams:
                        beams.append(swapped[0])
                beams += [f"{beams[0]} {i}" for i in range(n - len(beams))]  # never reached on shapes captions
            out.extend(beams)
    return out


def without_dedup(score):
    """A copy of `score` whose text embeddings are computed for every caption, duplicates included."""
    plain = copy.copy(score)

    @torch.no_grad()
    def embed_texts(texts, add_prefix=True):
        full = [(plain.text_prefix if add_prefix else "") + t for t in texts]
        chunks = [plain.model.encode_text(plain.tokenizer(full[i:i + plain.batch_size]).to(plain.device))
                  for i in range(0, len(full), plain.batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    plain.embed_texts = embed_texts
    return plain


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.setup(args)
    mem = C.PeakMemory(device)
    B, L, n = args.batch, args.layers, args.n
    images, refs, _ = C.shapes_data(B * args.rollouts, seed=args.seed)
    rng = random.Random(args.seed)
    rollouts = []
    for r in range(args.rollouts):
        rows = slice(r * B, (r + 1) * B)
        caps = rollout_captions(refs[rows], L, n, args.repeat, rng)
        rollouts.append((images[rows], caps, torch.arange(B).repeat_interleave(L * n)))
    pairs = sum(len(c) for _, c, _ in rollouts)
    unique = sum(len(set(c)) for _, c, _ in rollouts)

    teacher = C.random_score(args.teacher, device, args.seed)
    student = C.random_score(args.student, device, args.seed + 1)
    for s in (teacher, student):
        s.batch_size = args.batch_size

    def run_all(score):
        return [score(im, caps, image_index=idx) for im, caps, idx in rollouts]

    results, checks = {}, {}
    for name, score in (("student", student), ("teacher", teacher)):
        plain = without_dedup(score)
        a, b = run_all(score), run_all(plain)
        checks[name] = all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
        assert checks[name], f"{name}: scores with and without deduplication differ"
        results[name], _ = C.median_time(lambda: run_all(score), device, args.repeats, args.warmup)
        results[name + "_no_dedup"], _ = C.median_time(lambda: run_all(plain), device, args.repeats, args.warmup)

    result = {
        "benchmark": "reward",
        "student_pairs_per_s": round(pairs / results["student"], 1),
        "teacher_pairs_per_s": round(pairs / results["teacher"], 1),
        "student_speedup": round(results["teacher"] / results["student"], 2),
        "dedup_speedup_student": round(results["student_no_dedup"] / results["student"], 2),
        "dedup_speedup_teacher": round(results["teacher_no_dedup"] / results["teacher"], 2),
        "student_pairs_per_s_no_dedup": round(pairs / results["student_no_dedup"], 1),
        "teacher_pairs_per_s_no_dedup": round(pairs / results["teacher_no_dedup"], 1),
        "dedup_scores_equal": bool(all(checks.values())),
        "unique_fraction": round(unique / pairs, 3),
        "pairs": pairs, "images": B * args.rollouts, "rollouts": args.rollouts, "layers": L, "n": n,
        "repeat": args.repeat, "batch_size": args.batch_size,
        "teacher": teacher.name, "student": student.name,
        "peak_memory_mb": mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
