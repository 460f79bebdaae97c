"""Decode throughput: the batched, KV-cached `model.generate` vs the naive reference loop.

    python benchmarks/decode.py --quick --threads 1

Both decode the same images with the same z_0 seeds at every refinement layer 1..K with beam search
(n beams, all returned, as DiCO's rollout does): `generate` in one batch over images x layers x beams
with a KV cache; `naive_generate` one (image, layer) at a time, recomputing the whole readout at
every step. The script asserts that both return the same tokens (and lengths), then reports
generated tokens per second of each (tokens = the number of tokens after bos, counted from the
returned lengths; eos is suppressed so each caption is exactly `--length` tokens) and the speed-up.

Model: the embedded default's architecture (recipes/tiny.yaml: d 128, 8 slots, 2-block readout,
tiny ViT) with K = --K, vocab 45 (the shapes word tokenizer), random weights drawn large
(N(0, 0.3^2)) so next-token choices are decisive rather than float-rounding ties.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--K", type=int, default=6, help="refinement layers (all of 1..K are decoded)")
    p.add_argument("--n", type=int, default=5, help="beams per (image, layer)")
    p.add_argument("--length", type=int, default=20, help="generated tokens per caption (eos suppressed)")
    p.add_argument("--batch", type=int, default=None, help="images (default 16, --quick 8)")
    p.add_argument("--vocab", type=int, default=45, help="vocabulary size (45: the shapes word tokenizer)")
    p.add_argument("--naive-repeats", type=int, default=None, help="timed repeats of the naive loop (default 3, --quick 1)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.quick else 16)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.naive_repeats = args.naive_repeats or (1 if args.quick else 3)
    return args


def main(argv=None) -> dict:
    from rlrefine.models import naive_generate

    args = parse_args(argv)
    device = C.setup(args)
    mem = C.PeakMemory(device)
    model = C.benchmark_captioner(args.vocab, args.K, max_len=args.length + 1, weight_std=0.3, seed=args.seed).to(device).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    pixels = torch.randn(args.batch, 3, 64, 64, generator=g).to(device)
    seeds = torch.arange(args.batch) + 1000 * args.seed
    layers = list(range(1, args.K + 1))
    kw = dict(method="beam", num_candidates=args.n, max_len=args.length + 1)

    fast = model.generate(pixels, seeds, layers, **kw)
    slow = naive_generate(model, pixels, seeds, layers, **kw)
    same_tokens = torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.lengths, slow.lengths)
    mismatched = int((fast.tokens != slow.tokens).any(-1).sum()) if fast.tokens.shape == slow.tokens.shape else -1
    assert same_tokens, f"cached decode and naive decode disagree on {mismatched} of {fast.tokens[..., 0].numel()} captions"
    tokens = int(fast.lengths.sum())  # generated tokens (after bos), every image x layer x beam
    assert tokens == args.batch * len(layers) * args.n * args.length, "a caption stopped before --length tokens"

    t_fast, all_fast = C.median_time(lambda: model.generate(pixels, seeds, layers, **kw), device, args.repeats, args.warmup)
    t_slow, all_slow = C.median_time(lambda: naive_generate(model, pixels, seeds, layers, **kw), device,
                                     args.naive_repeats, warmup=0)  # the equality check above was its warm-up
    result = {
        "benchmark": "decode",
        "tokens_per_s": round(tokens / t_fast, 1),
        "naive_tokens_per_s": round(tokens / t_slow, 1),
        "speedup": round(t_slow / t_fast, 2),
        "same_tokens": bool(same_tokens),
        "seconds": round(t_fast, 4), "naive_seconds": round(t_slow, 4),
        "seconds_all": [round(t, 4) for t in all_fast], "naive_seconds_all": [round(t, 4) for t in all_slow],
        "tokens": tokens, "images": args.batch, "K": args.K, "layers": len(layers), "n": args.n,
        "length": args.length, "method": "beam", "vocab": args.vocab,
        "peak_memory_mb": mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
