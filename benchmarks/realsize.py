"""A DiCO step at the real recipe's sizes: its breakdown, its FLOP floor, decode against transformers'
`generate`, the reward's cost per caption (PAC-S, its text student, BLIP ITM), and memory per image. Random
weights, nothing downloaded.

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
* `cost_per_caption_ms`: one reward call on the last rollout's captions over the number of captions, for
  `pacs`, `text_student` and (unless `--no-itm`) `blip_itm`: BLIP's image-text matching head
  (`rewards.itm.ITMScore` over a random `BlipForImageTextRetrieval(BlipConfig())`, the base size: ViT-B/16
  at 384 px, a 12-layer BERT cross-attending to its 577 tokens for every distinct (image, caption) pair);
  `itm_over_pacs`, `student_speedup_over_itm`: the ratios of those times.
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
from typing import Any, NamedTuple

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
    p.add_argument("--itm-size", choices=("base", "tiny"), default="base",
                   help="BLIP ITM reward timed beside PAC-S: a default BlipConfig (base) or a toy one (tests)")
    p.add_argument("--no-itm", action="store_true", help="skip the BLIP ITM reward")
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
                    name=f"PACScore[{name}, random init]", architecture=open_clip.get_model_config(name))


def build_itm(args, device, captions):
    """BLIP's ITM head through the project's reward class (`rewards.itm.ITMScore`), random weights: a default
    `BlipConfig` (ViT-B/16 at 384 px: 577 image tokens; a 12-layer width-768 BERT with cross-attention to them), or a
    tiny one (`--itm-size tiny`). The tokenizer is a BERT WordPiece over the benchmark's caption words (built
    here; nothing downloaded): every word one token, as BERT reads common words."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    from rewards.itm import ITMScore, SquashPreprocess

    from tokenizers.pre_tokenizers import BertPreTokenizer

    split = BertPreTokenizer()  # BERT's split into words and punctuation (its tokenizer lowercases first)
    words = sorted({w for c in captions for w, _ in split.pre_tokenize_str(c.lower())})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    if args.itm_size == "tiny":
        cfg = BlipConfig(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                            image_size=32, patch_size=16),
                         text_config=dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, encoder_hidden_size=32),
                         projection_dim=16, image_text_hidden_size=16)
    else:
        cfg = BlipConfig()  # the sizes of Salesforce/blip-itm-base-coco
    torch.manual_seed(args.seed + 4)
    model = BlipForImageTextRetrieval(cfg).to(device).eval().requires_grad_(False)
    size = cfg.vision_config.image_size
    preprocess = SquashPreprocess(size, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    return ITMScore(model, preprocess, BertTokenizer(vocab=vocab), batch_size=512,
                    name=f"ITMScore[BlipConfig {args.itm_size}, {size} px, random init]")


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


# ------------------------------------------------------------------------------------------ bench
class Bench(NamedTuple):
    """The real-size captioner, its frozen reference, PAC-S and what a step needs (built once by `build_bench`).
    A NamedTuple, not a dataclass: tests load this script with importlib, outside sys.modules."""

    args: Any
    device: torch.device
    tokenizer: Any  # the open_clip BPE CaptionTokenizer
    core: Any  # the policy (RefinementCaptioner), its phases timed
    reference: Any  # the frozen XE model
    pacs: Any  # PACScore over a random ViT-B-32-quickgelu
    reward: RecordingReward  # pacs, keeping the last call's captions
    acc: Any
    optimizer: torch.optim.Optimizer
    images: torch.Tensor  # [B, S, S, 3] uint8
    pixels: torch.Tensor  # [B, 3, S, S]
    seeds: torch.Tensor  # [B] z_0 seeds
    teacher_forced: torch.Tensor  # [B, T] BPE ids for the XE step
    phases: Any  # step.Phases: per-phase timer and FLOP counter
    scorer: Any  # SequenceScorer of the policy
    timed_reward: Any


def build_bench(args, device: torch.device) -> Bench:
    from accelerate import Accelerator

    from rlrefine.data.tokenizer import CaptionTokenizer
    from rlrefine.trainers.finetune import SequenceScorer
    from step import Phases

    B = max([args.batch] + ([] if args.no_memory else args.memory_batches))
    tokenizer = CaptionTokenizer.from_open_clip()
    core = build_captioner(args, tokenizer).to(device)
    # the frozen image tower is shared by policy and reference here (it is the same tensor data; this
    # keeps the benchmark's own footprint down); memory figures count it twice, as the trainer loads it twice
    reference = copy.deepcopy(core, memo={id(p): p for p in core.encoder.parameters()}).eval().requires_grad_(False)
    pacs = build_pacs(args, device)
    reward = RecordingReward(pacs)
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (B, args.image_size, args.image_size, 3), dtype=torch.uint8, generator=g).to(device)
    tf = torch.randint(3, 40000, (B, args.max_len), generator=g)  # ordinary BPE ids (no specials, no pad)
    tf[:, 0] = tokenizer.bos_id
    phases = Phases(device)
    core.generate = phases.wrap("generation", core.generate)
    reference.sequence_logprobs = phases.wrap("reference_forward", reference.sequence_logprobs)
    scorer = SequenceScorer(core)
    scorer.forward = phases.wrap("policy_forward", scorer.forward)
    return Bench(args, device, tokenizer, core, reference, pacs, reward, Accelerator(cpu=device.type == "cpu"), optimizer,
                 images, core.encoder.preprocess(images), torch.arange(B) + 1000 * args.seed, tf.to(device), phases, scorer,
                 phases.wrap("reward", reward))


def dico_step(b: Bench, n: int, layers: list[int] | None = None) -> None:
    """One DiCO step on the first ``n`` images: `finetune.compute_loss` (the trainer's code) + backward + AdamW."""
    from rlrefine.config import FinetuneSection
    from rlrefine.losses import layer_weights, schedule
    from rlrefine.methods import METHODS
    from rlrefine.trainers.finetune import compute_loss

    K = b.args.K
    layers = layers or list(range(1, K + 1))
    f = FinetuneSection(num_candidates=b.args.n, max_len=b.args.max_len)  # DiCO, beam search
    weights = layer_weights(f.layer_weights, K)[torch.tensor(layers) - 1]
    method = METHODS[f.method](f.method_config, f)
    loss, _, _ = compute_loss(b.core, b.scorer, b.reference, method, b.timed_reward, b.images[:n], b.pixels[:n],
                              b.seeds[:n], layers, f, b.tokenizer, schedule("linear", K), weights, b.acc)
    b.phases.wrap("policy_backward", loss.backward)()
    b.phases.wrap("optimizer", b.optimizer.step)()
    b.optimizer.zero_grad(set_to_none=True)


def xe_forward_backward(b: Bench, n: int) -> None:
    from rlrefine.losses import layer_weights, xe_loss

    K = b.args.K
    out = b.core(b.pixels[:n], b.teacher_forced[:n], b.seeds[:n], layers=list(range(1, K + 1)))
    loss, _ = xe_loss(out.logits.float(), b.teacher_forced[:n, 1:], layer_weights("linear", K), b.tokenizer.pad_id)
    loss.backward()


def xe_step(b: Bench, n: int) -> None:
    b.core.train()
    xe_forward_backward(b, n)
    b.optimizer.step()
    b.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ figures
def measure_memory(b: Bench) -> dict:
    """Peak of one DiCO step at the two `--memory-batches` sizes (same baseline), the slope per image, and the
    largest batch that fits one 141 GB GPU."""
    dico_step(b, 1, [1])  # one-off allocations (AdamW state, thread pools) out of the way
    b1, b2 = b.args.memory_batches
    C.release_memory()
    mem = C.PeakMemory(b.device)
    dico_step(b, b1)
    p1 = mem.peak_mb()
    exact1 = mem.exact
    C.release_memory()
    dico_step(b, b2)
    p2 = mem.peak_mb()
    per_image = (p2 - p1) / (b2 - b1)
    trainable = [p for p in b.core.parameters() if p.requires_grad]
    weights_mb = sum(param_bytes(m) for m in (b.core, b.reference, b.pacs.model)) / 2 ** 20
    train_state_mb = 3 * sum(p.numel() * p.element_size() for p in trainable) / 2 ** 20  # grads + AdamW m, v
    fixed_act = p1 - per_image * b1
    budget = GPU_BYTES / 2 ** 20 - weights_mb - train_state_mb - max(0.0, fixed_act)
    b.phases.timer.next_iteration(keep=False)
    return {"memory_batches": [b1, b2], "peak_memory_mb_by_batch": [p1, p2],
            "memory_per_image_mb": round(per_image, 1), "memory_fixed_activations_mb": round(fixed_act, 1),
            "weights_mb": round(weights_mb, 1), "train_state_mb": round(train_state_mb, 1),
            "max_batch_141gb": int(budget // per_image) if per_image > 0 else None,
            "memory_exact": bool(exact1 and mem.exact)}


def measure_step(b: Bench) -> dict:
    """DiCO step vs XE step (interleaved medians), the DiCO step's breakdown and FLOP floor; then the rewards on the
    last rollout's captions (`measure_rewards`)."""
    from step import flops_of

    n, args, phases = b.args.batch, b.args, b.phases
    # warm-up (FLOPs counted here: FlopCounterMode slows what it counts, so never on a timed step)
    xe_flops = flops_of(lambda: xe_forward_backward(b, n))
    b.core.zero_grad(set_to_none=True)
    phases.count_flops = True
    dico_step(b, n)
    phases.count_flops = False
    fl = phases.flops
    for _ in range(max(0, args.warmup - 1)):
        xe_step(b, n)
        dico_step(b, n)
    phases.timer.next_iteration(keep=False)
    t_xe, t_dico = [], []
    for _ in range(args.repeats):
        t_xe.append(C.timeit(lambda: xe_step(b, n), b.device))
        t_dico.append(C.timeit(lambda: dico_step(b, n), b.device))
        phases.timer.add("total", t_dico[-1])
        phases.timer.next_iteration()
    med = phases.timer.medians()
    total = med.pop("total")
    breakdown = {k: round(v, 4) for k, v in med.items()}
    breakdown["other"] = round(total - sum(med.values()), 4)
    m_xe, m_dico = _median(t_xe), _median(t_dico)
    ratio = m_dico / m_xe
    cap_flops = sum(fl.get(k, 0) for k in ("generation", "policy_forward", "policy_backward", "reference_forward"))
    floor = (cap_flops + fl.get("reward", 0)) / xe_flops
    floor_cap = cap_flops / xe_flops
    rewards = measure_rewards(b)
    reward_s = breakdown.get("reward", 0.0)
    student_step = total - reward_s + rewards["student_reward_s"]
    return {
        "ratio": round(ratio, 2), "floor": round(floor, 2), "dico_over_floor": round(ratio / floor, 3),
        "floor_captioner": round(floor_cap, 2), "dico_over_floor_captioner": round(ratio / floor_cap, 3),
        "dico_step_s": round(m_dico, 4), "xe_step_s": round(m_xe, 4),
        "dico_step_s_all": [round(t, 4) for t in t_dico], "xe_step_s_all": [round(t, 4) for t in t_xe],
        "breakdown_s": breakdown, "breakdown_share": {k: round(v / total, 3) for k, v in breakdown.items()},
        "reward_share": round(reward_s / total, 3),
        "xe_gflop": round(xe_flops / 1e9, 3), "dico_gflop": {k: round(v / 1e9, 3) for k, v in sorted(fl.items())},
        **rewards,
        "student_reward_share": round(rewards["student_reward_s"] / student_step, 3),
        "dico_step_s_with_student": round(student_step, 4),
    }


def measure_rewards(b: Bench) -> dict:
    """PAC-S, its text student (`rewards.text_student`: PAC-S's image tower once per image + a small text tower) and,
    unless `--no-itm`, BLIP's ITM head, each on the captions of the last DiCO rollout (the same call a step makes),
    interleaved; medians of `--repeats`. ``cost_per_caption_ms``: a call's time over the captions it scored."""
    from rewards.text_student import TextStudentConfig, build_text_student

    args = b.args
    scfg = TextStudentConfig(width=args.student_width, layers=args.student_layers, heads=args.student_heads,
                             context_length=args.student_context, seed=args.seed)
    student = build_text_student(b.pacs, scfg)
    im, caps, idx = b.reward.last
    scorers = {"pacs": b.pacs, "text_student": student}
    if not args.no_itm:
        scorers["blip_itm"] = build_itm(args, b.device, caps)
    for r in scorers.values():
        r(im, caps, image_index=idx)  # warm-up (PAC-S is warm from the DiCO steps; one more call is harmless)
    times: dict[str, list[float]] = {k: [] for k in (*scorers, "pacs_image_tower")}
    for _ in range(args.repeats):  # interleaved, so machine load hits all alike
        for name, r in scorers.items():
            times[name].append(C.timeit(lambda r=r: r(im, caps, image_index=idx), b.device))
        times["pacs_image_tower"].append(C.timeit(lambda: b.pacs.embed_images(im), b.device))
    t = {k: _median(v) for k, v in times.items()}
    out = {"student_speedup": round(t["pacs"] / t["text_student"], 2),
           "teacher_reward_s": round(t["pacs"], 4), "student_reward_s": round(t["text_student"], 4),
           "teacher_image_tower_s": round(t["pacs_image_tower"], 4),
           "reward_pairs": len(caps), "reward_unique_captions": len(set(caps)), "student": student.name,
           "cost_per_caption_ms": {k: round(1000 * t[k] / len(caps), 3) for k in scorers}}
    if "blip_itm" in t:
        out.update(itm_reward_s=round(t["blip_itm"], 4), itm_over_pacs=round(t["blip_itm"] / t["pacs"], 2),
                   student_speedup_over_itm=round(t["blip_itm"] / t["text_student"], 2), itm=scorers["blip_itm"].name)
    return out


def measure_decode(b: Bench) -> dict:
    """The readout's batched all-layer beam search vs transformers' `generate` on a GPT-2 decoder of its shape."""
    from step import flops_of

    args, core, device, tokenizer = b.args, b.core, b.device, b.tokenizer
    K, n, T, db = args.K, args.n, args.max_len, args.decode_batch
    all_layers = list(range(1, K + 1))
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
    decode = {"readout_s_all": [round(t, 3) for t in t_readout], "generate_s_all": [round(t, 3) for t in t_hf]}
    m_readout, m_hf = _median(t_readout), _median(t_hf)
    decode.update({"decode_vs_generate": round(m_hf / m_readout, 3), "readout_tokens_per_s": round(tokens / m_readout, 1),
                   "generate_tokens_per_s": round(tokens / m_hf, 1)})
    if not args.quick:  # the readout with its image tower and refinement, and both decoders' FLOPs
        m_enc = _median(t_enc)
        decode.update(decode_vs_generate_with_encoder=round(m_hf / m_enc, 3),
                      readout_tokens_per_s_with_encoder=round(tokens / m_enc, 1),
                      decode_gflop={"readout": round(flops_of(readout_decode) / 1e9, 3),
                                    "gpt2": round(flops_of(hf_generate) / 1e9, 3)})
    decode.update({"decode_images": db, "decode_groups": groups, "decode_tokens": tokens,
                   "gpt2": f"GPT2LMHeadModel(n_embd={args.d_model}, n_layer={args.readout_layers}, n_head={args.heads}, "
                           f"add_cross_attention=True, vocab={tokenizer.vocab_size}), cross-attending to {V.shape[1]} image tokens"})
    return decode


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = C.setup(args)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    total_mem = C.PeakMemory(device)
    b = build_bench(args, device)
    memory = {} if args.no_memory else measure_memory(b)
    step = {} if args.no_step else measure_step(b)
    decode = {} if args.no_decode else measure_decode(b)
    result = {
        "benchmark": "realsize",
        **step, **decode, **memory,
        "reward": b.pacs.name,
        "images": args.batch, "K": args.K, "n": args.n, "max_len": args.max_len, "d_model": args.d_model,
        "slots": args.slots, "readout_layers": args.readout_layers, "encoder": args.encoder, "image_size": args.image_size,
        "vocab": b.tokenizer.vocab_size,
        "peak_memory_mb": total_mem.peak_mb(),
        **C.environment(args, device),
    }
    return C.emit(result)


if __name__ == "__main__":
    main()
