"""A DiCO step at the real recipe's sizes: its breakdown, its FLOP floor, decode against transformers'
`generate`, a student sized for PAC-S, and memory per image. Random weights, nothing downloaded.

    python benchmarks/realsize.py --quick --threads 1

Sizes (CLI defaults, read from recipes/coco_vitb32.yaml; flags so a renamed recipe breaks nothing):
captioner = open_clip ViT-B-32-quickgelu image tower at 224 px (frozen; the recipe names ViT-B-32, the
OpenAI / PAC-S weights need its quickgelu variant, same cost), d_model 512, 16 slots, K 6
refinement blocks, 8 heads, a 3-block readout, open_clip's BPE (vocab 49409 with pad); DiCO with 5
beams at every layer 1..6, captions of max_len 30 tokens (bos included; eos suppressed so every
candidate runs to 29 generated tokens); reward PAC-S ViT-B/32 (`rewards.PACScore` over a random
`ViT-B-32-quickgelu`: 12-layer width-512 text tower, 77 positions) scoring the K·n + 2 captions of
every image in one call, as `rlrefine.trainers.finetune.rollout` does.

What it reports (one JSON line):

* `dico_step_s`, `xe_step_s`, `ratio`: one DiCO step (`finetune.compute_loss` + backward + AdamW step,
  exactly the trainer's code, as benchmarks/step.py) vs one teacher-forced step (forward at layers
  1..K + `xe_loss` + backward + AdamW) on the same `--batch` images; `breakdown_s` / `breakdown_share`:
  generation, policy_forward, policy_backward, reference_forward, reward, optimizer, other; `reward_share`.
* `floor`: the DiCO/XE ratio predicted by FLOPs (torch.utils.flop_counter.FlopCounterMode, counted on
  the warm-up step): all FLOPs of the DiCO step (generation incl. the image tower, policy forward and
  backward, reference forward, reward) over the XE step's (forward incl. the image tower, backward).
  `dico_over_floor` = `ratio` / `floor`: how much worse the DiCO step uses its FLOPs than the XE step
  (1.0 = equally well). `floor_captioner` / `dico_over_floor_captioner`: the same without the reward.
* `decode_vs_generate`: generated tokens/s of the readout's batched all-layer beam search
  (`model.generate`, latents precomputed) over transformers' `GPT2LMHeadModel.generate(num_beams=n,
  num_return_sequences=n)` on a GPT-2 decoder with cross-attention (width d_model, readout_layers
  layers, n_heads heads, the same vocabulary, random weights) cross-attending to the image tokens,
  at the same number of (image, layer) groups, beams and tokens (`min_new_tokens` = `max_new_tokens`).
  `decode_vs_generate_with_encoder` (not under --quick): the readout's figure including its image
  tower and refinement; `decode_gflop`: both decoders' FLOPs.
* `student_speedup`: the teacher's reward time per DiCO step over the student's
  (`rewards.text_student`: the teacher's image tower, once per image, + a small text tower), both on
  the captions of the last DiCO rollout; `student_reward_share`: the reward's share of the step with it.
* memory (unless `--no-memory`; under `--quick` only with `--memory`): the peak of one DiCO step at `--memory-batches` images (same process,
  same baseline, see _common.PeakMemory), `memory_per_image_mb` (slope), and `max_batch_141gb`: the
  largest batch whose weights + grads + AdamW state + measured activations fit 141 GB (fp32 CPU
  measure; bf16 autocast on a GPU would hold less).
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

GPU_BYTES = 141e9  # one H200
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(threads=1)
    p.add_argument("--K", type=int, default=6, help="refinement layers (DiCO at all of 1..K)")
    p.add_argument("--n", type=int, default=5, help="beams per image and layer")
    p.add_argument("--max-len", type=int, default=30, help="caption tokens incl. bos (finetune.max_len)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--slots", type=int, default=16, help="M, text slots")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--readout-layers", type=int, default=3)
    p.add_argument("--encoder", default="ViT-B-32-quickgelu", help="open_clip architecture of the image tower, or tiny_vit")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--reward-model", default="ViT-B-32-quickgelu", help="open_clip architecture of PAC-S, or tiny")
    p.add_argument("--batch", type=int, default=None, help="images per timed step (default 2, --quick 1)")
    p.add_argument("--decode-batch", type=int, default=None, help="images of the decode comparison (default --batch)")
    p.add_argument("--student-width", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--student-heads", type=int, default=4)
    p.add_argument("--student-context", type=int, default=32)
    p.add_argument("--memory-batches", default="1,2", help="two batch sizes for the memory slope")
    p.add_argument("--memory", action="store_true", help="measure memory under --quick too (two extra DiCO steps)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement (the default under --quick)")
    p.add_argument("--no-decode", action="store_true", help="skip the transformers comparison")
    p.add_argument("--no-step", action="store_true", help="skip the DiCO / XE step timing and the student (e.g. a decode-only run)")
    args = p.parse_args(argv)
    args.batch = args.batch or (1 if args.quick else 2)
    args.decode_batch = args.decode_batch or args.batch
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.no_memory = args.no_memory or (args.quick and not args.memory)
    args.memory_batches = [int(b) for b in args.memory_batches.split(",")]
    if len(args.memory_batches) != 2 or args.memory_batches[0] >= args.memory_batches[1]:
        raise SystemExit("--memory-batches takes two increasing sizes, e.g. 1,2")
    return args


# ------------------------------------------------------------------------------------------ models
def build_captioner(args, tokenizer):
    """The real recipe's captioner, random init; the open_clip tower is built from its architecture
    alone (the `from_pretrained` path: an architecture folder, no weights file)."""
    import open_clip

    from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner

    arch_dir = None
    if args.encoder == "tiny_vit":
        enc = EncoderConfig(**{**C.TINY_ENCODER, "image_size": args.image_size})
    else:
        model_cfg = open_clip.get_model_config(args.encoder)
        if model_cfg is None:
            raise SystemExit(f"--encoder {args.encoder!r} is not an open_clip architecture")
        model_cfg = copy.deepcopy(model_cfg)
        model_cfg["vision_cfg"]["image_size"] = args.image_size
        arch_dir = tempfile.mkdtemp(prefix="realsize_encoder_")
        (Path(arch_dir) / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        enc = EncoderConfig(kind="open_clip", model_name=args.encoder, image_size=args.image_size, frozen=True)
    torch.manual_seed(args.seed)
    cfg = CaptionerConfig(encoder=enc, d_model=args.d_model, num_slots=args.slots, num_refine_layers=args.K,
                          n_heads=args.heads, readout_layers=args.readout_layers, vocab_size=tokenizer.vocab_size,
                          max_len=args.max_len, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id,
                          eos_id=tokenizer.vocab_size)  # eos suppressed: every caption runs to max_len
    return RefinementCaptioner(cfg, encoder_architecture_dir=arch_dir)


def build_pacs(args, device):
    """PAC-S through the project's reward class, over a random open_clip model of `--reward-model`."""
    import open_clip

    from rewards import PACScore
    from rewards.loading import BatchedPreprocess, register_model_config
    from rlrefine.models.clip_checkpoint import mute_random_init_warning

    name = args.reward_model
    if name == "tiny":
        name = register_model_config("realsize-tiny-clip", TINY_CLIP)
    torch.manual_seed(args.seed + 1)
    with mute_random_init_warning():  # random init is the point here
        model = open_clip.create_model(name, pretrained=None, device=device).eval().requires_grad_(False)
    pcfg = open_clip.get_model_preprocess_cfg(model)
    preprocess = BatchedPreprocess(pcfg.get("size", 224), pcfg["mean"], pcfg["std"], pcfg.get("interpolation", "bicubic"))
    return PACScore(model, preprocess, open_clip.get_tokenizer(name), batch_size=512,
                    name=f"PACScore[{name}, random init]")


def gpt2_decoder(args, vocab_size: int, bos: int, eos: int, pad: int):
    """The DiCO reference captioner's decoder shape: GPT-2 with cross-attention, from transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=max(64, args.max_len), n_embd=args.d_model,
                     n_layer=args.readout_layers, n_head=args.heads, add_cross_attention=True,
                     bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(args.seed + 2)
    return GPT2LMHeadModel(cfg).eval()


class RecordingReward:
    """Calls the reward and keeps the last call's arguments (to re-score the same captions)."""

    def __init__(self, reward):
        self.reward, self.last = reward, None

    def __call__(self, images, captions, references=None, image_index=None):
        self.last = (images, list(captions), image_index)
        return self.reward(images, captions, references=references, image_index=image_index)


def param_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    from accelerate import Accelerator

    from rlrefine.config import FinetuneSection
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.losses import layer_weights, schedule, xe_loss
    from rlrefine.methods import METHODS
    from rlrefine.trainers.finetune import SequenceScorer, compute_loss
    from rewards.text_student import TextStudentConfig, build_text_student
    from step import Phases, flops_of

    args = parse_args(argv)
    device = C.setup(args)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    total_mem = C.PeakMemory(device)
    K, n, T = args.K, args.n, args.max_len
    B = max([args.batch] + ([] if args.no_memory else args.memory_batches))

    tokenizer = CaptionTokenizer.from_open_clip()
    core = build_captioner(args, tokenizer).to(device)
    # the frozen image tower is shared by policy and reference here (it is the same tensor data; this
    # keeps the benchmark's own footprint down); memory figures count it twice, as the trainer loads it twice
    reference = copy.deepcopy(core, memo={id(p): p for p in core.encoder.parameters()}).eval().requires_grad_(False)
    pacs = build_pacs(args, device)
    reward = RecordingReward(pacs)
    acc = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(args.seed)
    images_all = torch.randint(0, 256, (B, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=g).to(device)
    pixels_all = core.encoder.preprocess(images_all)
    seeds_all = torch.arange(B) + 1000 * args.seed
    sched = schedule("linear", K)
    tf_all = torch.randint(3, 40000, (B, T), generator=g)  # ordinary BPE ids (no specials, no pad)
    tf_all[:, 0] = tokenizer.bos_id
    tf_all = tf_all.to(device)
    all_layers = list(range(1, K + 1))
    xe_weights = layer_weights("linear", K)

    phases = Phases(device)
    core.generate = phases.wrap("generation", core.generate)
    reference.sequence_logprobs = phases.wrap("reference_forward", reference.sequence_logprobs)
    scorer = SequenceScorer(core)
    scorer.forward = phases.wrap("policy_forward", scorer.forward)
    timed_reward = phases.wrap("reward", reward)

    def dico_step(b, layers=all_layers):
        f = FinetuneSection(num_candidates=n, max_len=T)  # DiCO, beam search
        weights = layer_weights(f.layer_weights, K)[torch.tensor(layers) - 1]
        method = METHODS[f.method](f.method_config, f)
        loss, _, _ = compute_loss(core, scorer, reference, method, timed_reward, images_all[:b], pixels_all[:b],
                                  seeds_all[:b], layers, f, tokenizer, sched, weights, acc)
        phases.wrap("policy_backward", loss.backward)()
        phases.wrap("optimizer", optimizer.step)()
        optimizer.zero_grad(set_to_none=True)

    def xe_forward_backward(b):
        out = core(pixels_all[:b], tf_all[:b], seeds_all[:b], layers=all_layers)
        loss, _ = xe_loss(out.logits.float(), tf_all[:b, 1:], xe_weights, tokenizer.pad_id)
        loss.backward()

    def xe_step(b):
        core.train()
        xe_forward_backward(b)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- memory: one DiCO step at two batch sizes, same baseline (the first peaks above all before it)
    memory = {}
    if not args.no_memory:
        dico_step(1, all_layers[:1])  # one-off allocations (AdamW state, thread pools) out of the way
        b1, b2 = args.memory_batches
        C.release_memory()
        mem = C.PeakMemory(device)
        dico_step(b1)
        p1 = mem.peak_mb()
        exact1 = mem.exact
        C.release_memory()
        dico_step(b2)
        p2 = mem.peak_mb()
        per_image = (p2 - p1) / (b2 - b1)
        trainable = [p for p in core.parameters() if p.requires_grad]
        weights_mb = sum(param_bytes(m) for m in (core, reference, pacs.model)) / 2 ** 20
        train_state_mb = 3 * sum(p.numel() * p.element_size() for p in trainable) / 2 ** 20  # grads + AdamW m, v
        fixed_act = p1 - per_image * b1
        budget = GPU_BYTES / 2 ** 20 - weights_mb - train_state_mb - max(0.0, fixed_act)
        memory = {"memory_batches": [b1, b2], "peak_memory_mb_by_batch": [p1, p2],
                  "memory_per_image_mb": round(per_image, 1), "memory_fixed_activations_mb": round(fixed_act, 1),
                  "weights_mb": round(weights_mb, 1), "train_state_mb": round(train_state_mb, 1),
                  "max_batch_141gb": int(budget // per_image) if per_image > 0 else None,
                  "memory_exact": bool(exact1 and mem.exact)}
        phases.timer.next_iteration(keep=False)

    step = {}
    if not args.no_step:
        # -- warm-up (FLOPs counted here: FlopCounterMode slows what it counts, so never on a timed step)
        b = args.batch
        xe_flops = flops_of(lambda: xe_forward_backward(b))
        core.zero_grad(set_to_none=True)
        phases.count_flops = True
        dico_step(b)
        phases.count_flops = False
        fl = phases.flops
        for _ in range(max(0, args.warmup - 1)):
            xe_step(b)
            dico_step(b)
        phases.timer.next_iteration(keep=False)

        t_xe, t_dico = [], []
        for _ in range(args.repeats):
            t_xe.append(C.timeit(lambda: xe_step(b), device))
            t_dico.append(C.timeit(lambda: dico_step(b), device))
            phases.timer.add("total", t_dico[-1])
            phases.timer.next_iteration()
        med = phases.timer.medians()
        total = med.pop("total")
        breakdown = {k: round(v, 4) for k, v in med.items()}
        breakdown["other"] = round(total - sum(med.values()), 4)
        m_xe, m_dico = sorted(t_xe)[len(t_xe) // 2], sorted(t_dico)[len(t_dico) // 2]
        ratio = m_dico / m_xe
        cap_flops = sum(fl.get(k, 0) for k in ("generation", "policy_forward", "policy_backward", "reference_forward"))
        floor = (cap_flops + fl.get("reward", 0)) / xe_flops
        floor_cap = cap_flops / xe_flops

        # -- the student for PAC-S, on the captions of the last rollout --------------------------------
        scfg = TextStudentConfig(width=args.student_width, layers=args.student_layers, heads=args.student_heads,
                                 context_length=args.student_context, seed=args.seed)
        student = build_text_student(pacs, scfg)
        im, caps, idx = reward.last
        student(im, caps, image_index=idx)  # warm-up (the teacher is warm from the DiCO steps)
        t_teacher, t_student, t_img = [], [], []
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            t_teacher.append(C.timeit(lambda: pacs(im, caps, image_index=idx), device))
            t_student.append(C.timeit(lambda: student(im, caps, image_index=idx), device))
            t_img.append(C.timeit(lambda: pacs.embed_images(im), device))
        t_teacher, t_student, t_img = (sorted(t)[len(t) // 2] for t in (t_teacher, t_student, t_img))
        reward_s = breakdown.get("reward", 0.0)
        student_step = total - reward_s + t_student

        step = {
            "ratio": round(ratio, 2), "floor": round(floor, 2), "dico_over_floor": round(ratio / floor, 3),
            "floor_captioner": round(floor_cap, 2), "dico_over_floor_captioner": round(ratio / floor_cap, 3),
            "dico_step_s": round(m_dico, 4), "xe_step_s": round(m_xe, 4),
            "dico_step_s_all": [round(t, 4) for t in t_dico], "xe_step_s_all": [round(t, 4) for t in t_xe],
            "breakdown_s": breakdown, "breakdown_share": {k: round(v / total, 3) for k, v in breakdown.items()},
            "reward_share": round(reward_s / total, 3),
            "xe_gflop": round(xe_flops / 1e9, 3), "dico_gflop": {k: round(v / 1e9, 3) for k, v in sorted(fl.items())},
            "student_speedup": round(t_teacher / t_student, 2),
            "teacher_reward_s": round(t_teacher, 4), "student_reward_s": round(t_student, 4),
            "teacher_image_tower_s": round(t_img, 4),
            "student_reward_share": round(t_student / student_step, 3),
            "dico_step_s_with_student": round(student_step, 4),
            "reward_pairs": len(caps), "reward_unique_captions": len(set(caps)), "student": student.name,
        }

    # -- decode: the readout's batched all-layer beam search vs transformers' generate -------------
    decode = {}
    if not args.no_decode:
        db = args.decode_batch
        gd = torch.Generator().manual_seed(args.seed + 3)
        dimages = torch.randint(0, 256, (db, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=gd).to(device)
        dpix = core.encoder.preprocess(dimages)
        dseeds = torch.arange(db) + 7
        gen = type(core).generate.__get__(core)  # not the phase-timed wrapper
        core.eval()
        with torch.no_grad():
            Z = core.latents(dpix, dseeds)
            V = core.encode_image(dpix)  # [db, N, d] image tokens for GPT-2's cross-attention
        kw = dict(method="beam", num_candidates=n, max_len=T)
        tokens = db * K * n * (T - 1)

        def readout_decode():
            core.latents = lambda p, s: Z  # decode only: image tower and refinement already done
            try:
                out = gen(dpix, dseeds, all_layers, **kw)
            finally:
                del core.latents
            return out

        out = readout_decode()
        assert int(out.lengths.sum()) == tokens, "a readout caption stopped before max_len"
        gpt2 = gpt2_decoder(args, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id).to(device)
        groups = db * K
        enc = V.repeat_interleave(K, dim=0)  # one group per (image, layer), as the readout's prefixes
        ids = torch.full((groups, 1), tokenizer.bos_id, dtype=torch.long, device=device)

        def hf_generate():
            with torch.no_grad():
                return gpt2.generate(ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=enc,
                                     num_beams=n, num_return_sequences=n, do_sample=False, max_new_tokens=T - 1,
                                     min_new_tokens=T - 1, length_penalty=0.0, early_stopping=False)

        hf_out = hf_generate()  # checked, and the warm-up of both (readout_decode ran above)
        assert hf_out.shape == (groups * n, T), f"generate returned {tuple(hf_out.shape)}"
        t_readout, t_hf, t_enc = [], [], []
        for _ in range(args.repeats):  # interleaved, so machine load hits all alike
            t_readout.append(C.timeit(readout_decode, device))
            t_hf.append(C.timeit(hf_generate, device))
            if not args.quick:  # the readout with its image tower and refinement
                t_enc.append(C.timeit(lambda: gen(dpix, dseeds, all_layers, **kw), device))
        decode_all = {"readout_s_all": [round(t, 3) for t in t_readout], "generate_s_all": [round(t, 3) for t in t_hf]}
        t_readout, t_hf = sorted(t_readout)[len(t_readout) // 2], sorted(t_hf)[len(t_hf) // 2]
        decode = {"decode_vs_generate": round(t_hf / t_readout, 3),
                  "readout_tokens_per_s": round(tokens / t_readout, 1),
                  "generate_tokens_per_s": round(tokens / t_hf, 1), **decode_all}
        if not args.quick:  # the readout with its image tower and refinement, and both decoders' FLOPs
            t_readout_enc = sorted(t_enc)[len(t_enc) // 2]
            decode.update(decode_vs_generate_with_encoder=round(t_hf / t_readout_enc, 3),
                          readout_tokens_per_s_with_encoder=round(tokens / t_readout_enc, 1),
                          decode_gflop={"readout": round(flops_of(readout_decode) / 1e9, 3),
                                        "gpt2": round(flops_of(hf_generate) / 1e9, 3)})
        decode.update({"decode_images": db, "decode_groups": groups, "decode_tokens": tokens,
                  "gpt2": f"GPT2LMHeadModel(n_embd={args.d_model}, n_layer={args.readout_layers}, n_head={args.heads}, "
                          f"add_cross_attention=True, vocab={tokenizer.vocab_size}), cross-attending to {V.shape[1]} image tokens"})

    result = {
        "benchmark": "realsize",
        **step, **decode, **memory,
        "reward": pacs.name,
        "images": args.batch, "K": K, "n": n, "max_len": T, "d_model": args.d_model, "slots": args.slots,
        "readout_layers": args.readout_layers, "encoder": args.encoder, "image_size": args.image_size,
        "vocab": tokenizer.vocab_size,
        "peak_memory_mb": total_mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
