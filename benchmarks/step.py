"""Cost of one DiCO step at every layer vs one teacher-forced (XE) step, on the same images.

    python benchmarks/step.py --quick --threads 1

* DiCO step: `rlrefine.trainers.finetune.compute_loss` (rollout: beam search with n beams at every
  layer 1..K + the greedy anchors of layers 0 and K, one reward call, shaping; then the policy's
  sequence log-probs with grad and the frozen reference's without, DiCO loss per layer) + backward
  + AdamW step. Exactly the trainer's code; its pieces are timed by wrapping `generate`, the reward,
  the policy scorer and the reference's `sequence_logprobs` (breakdown in `breakdown_s`).
* XE step: forward at every layer 1..K (`model(pixels, tokens, seeds, layers)`) + `xe_loss` +
  backward + the same AdamW step.

`ratio` = median DiCO step / median XE step, the two interleaved so machine load hits both alike.
`floor` = the same ratio predicted from FLOPs (torch.utils.flop_counter.FlopCounterMode): (cached
generation + policy forward/backward over the L·n candidates + reference forward) / (XE forward +
backward); `floor_with_reward` adds the reward model's FLOPs. Both steps use captions of `--length`
tokens: eos is suppressed in the DiCO rollout so every candidate has that length, and the XE batch is
random token ids of that length (no pad), so the ratio compares like with like.

Reward: `--reward student` (default) is the distilled student's architecture (rewards.DistillConfig,
random weights; a trained one is a folder with student.json); `teacher` the learned evaluator's;
`free` a stand-in that costs nothing (to isolate the captioner's share).

Memory: the peak of one DiCO step at K·n = `kn_small` (the first K/2 layers) and `kn_large` (all
K layers), same images, measured before any timing (see _common.PeakMemory).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=6, help="refinement layers (DiCO at all of 1..K)")
    p.add_argument("--n", type=int, default=5, help="beam candidates per image and layer")
    p.add_argument("--length", type=int, default=20, help="caption tokens after bos (DiCO candidates and XE targets)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 16 = finetune.batch_size; --quick 8)")
    p.add_argument("--reward", default="student", help="student | teacher | free | a reward folder")
    p.add_argument("--no-memory", action="store_true", help="skip the two-size memory measurement")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 16)
    args.repeats = args.repeats or (3 if args.quick else 7)
    return args


class FreeReward:
    """A reward stand-in that costs (almost) nothing: the caption's length mod 7."""

    def __call__(self, images, captions, references=None, image_index=None):
        return torch.tensor([float(len(c) % 7) for c in captions])


class Phases:
    """Wraps callables so that each call is timed (PhaseTimer) or FLOP-counted, under a phase name."""

    def __init__(self, device):
        self.timer = C.PhaseTimer(device)
        self.count_flops = False
        self.flops: dict[str, int] = {}

    def wrap(self, name, fn):
        timed = self.timer.wrap(name, fn)

        def call(*a, **kw):
            if not self.count_flops:
                return timed(*a, **kw)
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                out = fn(*a, **kw)
            self.flops[name] = self.flops.get(name, 0) + fc.get_total_flops()
            return out
        return call


def flops_of(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main(argv=None) -> dict:
    from accelerate import Accelerator

    from rlrefine.config import FinetuneSection
    from rlrefine.losses import layer_weights, schedule, xe_loss
    from rlrefine.methods import METHODS
    from rlrefine.trainers.finetune import SequenceScorer, compute_loss

    args = parse_args(argv)
    device = C.setup(args)
    total_mem = C.PeakMemory(device)
    K, n, B, T = args.K, args.n, args.batch, args.length + 1  # T counts bos

    images, _, tokenizer = C.shapes_data(B, seed=args.seed)
    images = images.to(device)
    core = C.benchmark_captioner(tokenizer.vocab_size, K, max_len=T, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                                 eos_id=tokenizer.eos_id, suppress_eos=True, seed=args.seed).to(device)
    reference = copy.deepcopy(core).eval().requires_grad_(False)
    reward = FreeReward() if args.reward == "free" else C.random_score(args.reward, device, args.seed)
    acc = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(core.parameters(), lr=1e-5)
    pixels = core.encoder.preprocess(images)
    seeds = torch.arange(B) + 1000 * args.seed
    sched = schedule("linear", K)
    g = torch.Generator().manual_seed(args.seed)
    first_word = max(tokenizer.special_ids) + 1 if tokenizer.special_ids else 3
    tf_tokens = torch.randint(first_word, tokenizer.vocab_size, (B, T), generator=g)
    tf_tokens[:, 0] = tokenizer.bos_id
    tf_tokens = tf_tokens.to(device)

    phases = Phases(device)
    core.generate = phases.wrap("generation", core.generate)  # rollout calls policy.generate twice
    reference.sequence_logprobs = phases.wrap("reference_forward", reference.sequence_logprobs)
    scorer = SequenceScorer(core)
    scorer.forward = phases.wrap("policy_forward", scorer.forward)
    timed_reward = phases.wrap("reward", reward)

    def dico_step(layers):
        f = FinetuneSection(num_candidates=n, max_len=T)  # DiCO, beam, defaults of the embedded recipe
        weights = layer_weights(f.layer_weights, K)[torch.tensor(layers) - 1]
        method = METHODS[f.method](f.method_config, f)
        loss, _, _ = compute_loss(core, scorer, reference, method, timed_reward, images, pixels, seeds, layers, f, tokenizer,
                                  sched, weights, acc)
        phases.wrap("policy_backward", loss.backward)()
        phases.wrap("optimizer", optimizer.step)()
        optimizer.zero_grad(set_to_none=True)

    all_layers = list(range(1, K + 1))
    xe_weights = layer_weights("linear", K)

    def xe_forward_backward():
        out = core(pixels, tf_tokens, seeds, layers=all_layers)
        loss, _ = xe_loss(out.logits.float(), tf_tokens[:, 1:], xe_weights, tokenizer.pad_id)
        loss.backward()

    def xe_step():
        core.train()
        xe_forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- memory of one DiCO step at two sizes (first: nothing before it peaked higher) --------------
    memory = {}
    if not args.no_memory:
        dico_step(all_layers[:1])  # one-off allocations (optimizer state, thread pools) out of the way
        small = all_layers[: max(1, K // 2)]
        C.release_memory()
        mem = C.PeakMemory(device)
        dico_step(small)
        memory.update(peak_memory_mb_small=mem.peak_mb(), kn_small=len(small) * n)
        exact_small = mem.exact
        C.release_memory()  # same baseline: freed memory is reused, so the high-water mark is the larger peak
        dico_step(all_layers)
        memory.update(peak_memory_mb_large=mem.peak_mb(), kn_large=K * n, memory_exact=bool(exact_small and mem.exact))
        phases.timer.next_iteration(keep=False)

    # -- timing: interleaved repeats after warm-up -------------------------------------------------
    for _ in range(args.warmup):
        xe_step()
        dico_step(all_layers)
        phases.timer.next_iteration(keep=False)
    t_xe, t_dico = [], []
    for _ in range(args.repeats):
        t_xe.append(C.timeit(xe_step, device))
        t_dico.append(C.timeit(lambda: dico_step(all_layers), device))
        phases.timer.add("total", t_dico[-1])
        phases.timer.next_iteration()
    med = phases.timer.medians()
    total = med.pop("total")
    breakdown = {k: round(v, 4) for k, v in med.items()}
    breakdown["other"] = round(total - sum(med.values()), 4)  # decode to text, shaping, loss, wrappers
    m_xe, m_dico = sorted(t_xe)[len(t_xe) // 2], sorted(t_dico)[len(t_dico) // 2]

    # -- FLOPs --------------------------------------------------------------------------------------
    xe_flops = flops_of(xe_forward_backward)
    core.zero_grad(set_to_none=True)
    phases.count_flops = True
    dico_step(all_layers)
    phases.count_flops = False
    fl = phases.flops
    captioner_flops = fl.get("generation", 0) + fl.get("policy_forward", 0) + fl.get("policy_backward", 0) + fl.get("reference_forward", 0)

    result = {
        "benchmark": "step",
        "ratio": round(m_dico / m_xe, 2),
        "floor": round(captioner_flops / xe_flops, 2),
        "floor_with_reward": round((captioner_flops + fl.get("reward", 0)) / xe_flops, 2),
        "dico_step_s": round(m_dico, 4), "xe_step_s": round(m_xe, 4),
        "dico_step_s_all": [round(t, 4) for t in t_dico], "xe_step_s_all": [round(t, 4) for t in t_xe],
        "breakdown_s": breakdown,
        "breakdown_share": {k: round(v / total, 3) for k, v in breakdown.items()},
        "xe_gflop": round(xe_flops / 1e9, 3),
        "dico_gflop": {k: round(v / 1e9, 3) for k, v in sorted(fl.items())},
        **memory,
        "reward": "free stand-in" if args.reward == "free" else getattr(reward, "name", args.reward),
        "images": B, "K": K, "layers": K, "n": n, "length": args.length,
        "peak_memory_mb": total_mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
