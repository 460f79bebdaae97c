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


class StepBench:
    """One DiCO step and one XE step of the same captioner on the same images, with the phases of the DiCO step
    timed and FLOP-counted (`Phases`)."""

    def __init__(self, args, device: torch.device):
        from accelerate import Accelerator

        from rlrefine.losses import layer_weights, schedule

        self.args, self.device = args, device
        K, n, B, T = args.K, args.n, args.batch, args.length + 1  # T counts bos
        self.K, self.n, self.T = K, n, T
        images, _, tokenizer = C.shapes_data(B, seed=args.seed)
        self.images, self.tokenizer = images.to(device), tokenizer
        self.core = C.benchmark_captioner(tokenizer.vocab_size, K, max_len=T, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                                          eos_id=tokenizer.eos_id, suppress_eos=True, seed=args.seed).to(device)
        self.reference = copy.deepcopy(self.core).eval().requires_grad_(False)
        self.reward = FreeReward() if args.reward == "free" else C.random_score(args.reward, device, args.seed)
        self.acc = Accelerator(cpu=device.type == "cpu")
        self.optimizer = torch.optim.AdamW(self.core.parameters(), lr=1e-5)
        self.pixels = self.core.encoder.preprocess(self.images)
        self.seeds = torch.arange(B) + 1000 * args.seed
        self.sched = schedule("linear", K)
        g = torch.Generator().manual_seed(args.seed)
        first_word = max(tokenizer.special_ids) + 1 if tokenizer.special_ids else 3
        tf_tokens = torch.randint(first_word, tokenizer.vocab_size, (B, T), generator=g)
        tf_tokens[:, 0] = tokenizer.bos_id
        self.tf_tokens = tf_tokens.to(device)
        self.all_layers = list(range(1, K + 1))
        self.xe_weights = layer_weights("linear", K)
        self.phases = phases = Phases(device)
        self.core.generate = phases.wrap("generation", self.core.generate)  # rollout calls policy.generate twice
        self.reference.sequence_logprobs = phases.wrap("reference_forward", self.reference.sequence_logprobs)
        from rlrefine.trainers.finetune import SequenceScorer

        self.scorer = SequenceScorer(self.core)
        self.scorer.forward = phases.wrap("policy_forward", self.scorer.forward)
        self.timed_reward = phases.wrap("reward", self.reward)

    def dico_step(self, layers: list[int]) -> None:
        from rlrefine.config import FinetuneSection
        from rlrefine.losses import layer_weights
        from rlrefine.methods import METHODS
        from rlrefine.trainers.finetune import compute_loss

        f = FinetuneSection(num_candidates=self.n, max_len=self.T)  # DiCO, beam, defaults of the embedded recipe
        weights = layer_weights(f.layer_weights, self.K)[torch.tensor(layers) - 1]
        method = METHODS[f.method](f.method_config, f)
        loss, _, _ = compute_loss(self.core, self.scorer, self.reference, method, self.timed_reward, self.images, self.pixels,
                                  self.seeds, layers, f, self.tokenizer, self.sched, weights, self.acc)
        self.phases.wrap("policy_backward", loss.backward)()
        self.phases.wrap("optimizer", self.optimizer.step)()
        self.optimizer.zero_grad(set_to_none=True)

    def xe_forward_backward(self) -> None:
        from rlrefine.losses import xe_loss

        out = self.core(self.pixels, self.tf_tokens, self.seeds, layers=self.all_layers)
        loss, _ = xe_loss(out.logits.float(), self.tf_tokens[:, 1:], self.xe_weights, self.tokenizer.pad_id)
        loss.backward()

    def xe_step(self) -> None:
        self.core.train()
        self.xe_forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def memory(self) -> dict:
        """Peak memory of one DiCO step at two sizes (first: nothing before it peaked higher)."""
        layers = self.all_layers
        self.dico_step(layers[:1])  # one-off allocations (optimizer state, thread pools) out of the way
        small = layers[: max(1, self.K // 2)]
        C.release_memory()
        mem = C.PeakMemory(self.device)
        self.dico_step(small)
        out = {"peak_memory_mb_small": mem.peak_mb(), "kn_small": len(small) * self.n}
        exact_small = mem.exact
        C.release_memory()  # same baseline: freed memory is reused, so the high-water mark is the larger peak
        self.dico_step(layers)
        out.update(peak_memory_mb_large=mem.peak_mb(), kn_large=self.K * self.n, memory_exact=bool(exact_small and mem.exact))
        self.phases.timer.next_iteration(keep=False)
        return out

    def timing(self) -> tuple[list[float], list[float], dict[str, float], float]:
        """XE and DiCO step times, interleaved repeats after warm-up; the DiCO step's phases (medians)."""
        timer = self.phases.timer
        for _ in range(self.args.warmup):
            self.xe_step()
            self.dico_step(self.all_layers)
            timer.next_iteration(keep=False)
        t_xe, t_dico = [], []
        for _ in range(self.args.repeats):
            t_xe.append(C.timeit(self.xe_step, self.device))
            t_dico.append(C.timeit(lambda: self.dico_step(self.all_layers), self.device))
            timer.add("total", t_dico[-1])
            timer.next_iteration()
        med = timer.medians()
        total = med.pop("total")
        breakdown = {k: round(v, 4) for k, v in med.items()}
        breakdown["other"] = round(total - sum(med.values()), 4)  # decode to text, shaping, loss, wrappers
        return t_xe, t_dico, breakdown, total

    def flops(self) -> tuple[int, dict[str, int]]:
        """FLOPs of one XE forward + backward, and of each phase of one DiCO step."""
        xe_flops = flops_of(self.xe_forward_backward)
        self.core.zero_grad(set_to_none=True)
        self.phases.count_flops = True
        self.dico_step(self.all_layers)
        self.phases.count_flops = False
        return xe_flops, self.phases.flops


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.setup(args)
    total_mem = C.PeakMemory(device)
    bench = StepBench(args, device)
    memory = {} if args.no_memory else bench.memory()
    t_xe, t_dico, breakdown, total = bench.timing()
    m_xe, m_dico = sorted(t_xe)[len(t_xe) // 2], sorted(t_dico)[len(t_dico) // 2]
    xe_flops, fl = bench.flops()
    captioner_flops = sum(fl.get(k, 0) for k in ("generation", "policy_forward", "policy_backward", "reference_forward"))
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
        "reward": "free stand-in" if args.reward == "free" else getattr(bench.reward, "name", args.reward),
        "images": args.batch, "K": args.K, "layers": args.K, "n": args.n, "length": args.length,
        "peak_memory_mb": total_mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
