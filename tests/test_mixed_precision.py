"""bf16 mixed precision (accelerate's autocast) on CPU: the real recipe's setting, exercised without a GPU.

recipes/coco_vitb32.yaml trains with ``mixed_precision: bf16``. Here, at small sizes on the CPU:

* every registered fine-tuning method's loss and gradient (`finetune.policy_loss`, the trainer's own code)
  on one fixed batch under bf16 agree with fp32 within the tolerances stated in
  `test_policy_loss_under_bf16_agrees_with_fp32`;
* the log-softmax behind every sequence log-prob is float32 under autocast (`selective_log_softmax`);
* the pretrain stage and the fine-tuning stage of every method run end to end under bf16 through the
  one training loop, from the same data and init as an fp32 run, with a first-step loss that agrees.

Before the log-softmax was kept in float32 under autocast, TRL's CPU fallback computed it in bf16 and the
caption log-probs (about -140 here) were summed in bf16, whose spacing there is 1.0: at the agreement test's
sizes the DiCO per-layer loss was off by up to 2.7e-2 (relative), its preference margin h by 23%, the
gradient by 1.6e-2; after, 5.7e-4, 4.2e-3 and 3.9e-3 (docs/performance_realsize.md, "Mixed precision").
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from rlrefine.config import FinetuneSection
from rlrefine.losses import dico_loss, layer_weights
from rlrefine.methods import METHODS
from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner, selective_log_softmax
from rlrefine.trainers import finetune as ft
from rlrefine.trainers.loop import make_accelerator

REPO = Path(__file__).resolve().parents[1]

# The agreement test's sizes: a vocabulary and caption length at which a caption's log-prob is -50 to -145
# (bf16 spacing 0.25 to 1.0 there), so a bf16 sum would show; the real recipe's (49,409 words, 29 tokens:
# about -300, spacing 2.0) only makes it worse. B images, L = K layers, n candidates, T tokens.
VOCAB, T, B, K, N = 512, 24, 4, 2, 4


@pytest.fixture(autouse=True)
def _fresh_precision():
    """Each test makes accelerators of both precisions; leave no bf16 state to the next test module."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=False)


def test_selective_log_softmax_is_float32_under_autocast():
    """With trl imported (as the fine-tuning trainer does), bf16 logits give float32 log-probs equal to the
    float32 computation on the same (upcast) logits; TRL's own CPU fallback would compute them in bf16."""
    import trl.trainer.utils as trl_utils

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, T - 1, VOCAB, generator=g) * 4).bfloat16()
    index = torch.randint(0, VOCAB, (6, T - 1), generator=g)
    exact = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None]).squeeze(-1)
    out = selective_log_softmax(logits, index)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    fallback = trl_utils.selective_log_softmax(logits, index)  # what the trainer used before: bf16 throughout
    assert fallback.dtype == torch.bfloat16
    err_ours = (out.double().sum(-1) - exact.sum(-1)).abs().max()
    err_fallback = (fallback.sum(-1).double() - exact.sum(-1)).abs().max()
    assert err_fallback > 100 * err_ours, (float(err_fallback), float(err_ours))


# ------------------------------------------------------------------------------- one fixed batch
def _fixed_batch():
    """A captioner, a frozen reference a little behind it (as after some fine-tuning; identical weights would
    make DiCO's margin exactly 0 in both precisions), and one rollout of random captions and rewards."""
    torch.manual_seed(0)
    cfg = CaptionerConfig(encoder=EncoderConfig(kind="tiny_vit", image_size=16, patch_size=8, width=32, depth=1, heads=2),
                          d_model=32, num_slots=4, num_refine_layers=K, n_heads=2, readout_layers=1, vocab_size=VOCAB,
                          max_len=T)
    policy = RefinementCaptioner(cfg)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    images = torch.randint(0, 256, (B, 16, 16, 3), dtype=torch.uint8, generator=g)
    tokens = torch.randint(3, VOCAB, (B, K, N, T), generator=g)
    tokens[..., 0] = cfg.bos_id
    ends = torch.randint(T // 2, T, (B, K, N, 1), generator=g)  # eos at a random position, pads after it
    pos = torch.arange(T)
    tokens = torch.where(pos == ends, cfg.eos_id, torch.where(pos > ends, cfg.pad_id, tokens))
    rewards = torch.rand(B, K, N, generator=g)
    ro = ft.Rollout(tokens, [""] * (B * K * N), rewards, rewards, torch.zeros_like(rewards), torch.rand(B, K, generator=g))
    gen = ft.generation_of(ro, policy.encoder.preprocess(images), torch.arange(B), cfg.pad_id)
    return policy, reference, gen


def _step(policy, reference, gen, method, mixed_precision, tmp_path, monkeypatch):
    """`policy_loss` + backward under ``mixed_precision``: (loss, per-layer losses, policy and reference
    sequence log-probs [B, L, n], flat gradient, the dtype of the logits the readout produced)."""
    acc = make_accelerator(tmp_path / mixed_precision, seed=0, device="cpu", mixed_precision=mixed_precision)
    seen, dtypes = {}, set()

    def spy(method, pol, ref, gen, tok=None, ref_tok=None):
        losses, metrics = layer_losses(method, pol, ref, gen, tok, ref_tok)
        seen.update(layers=torch.stack([l.detach() for l in losses]), pol=pol.detach(), ref=ref.detach())
        return losses, metrics

    layer_losses = ft.layer_losses
    monkeypatch.setattr(ft, "layer_losses", spy)
    hook = policy.readout.lm_head.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    policy.zero_grad(set_to_none=True)
    if method.token_level and method.updates_per_rollout > 1:  # as FinetuneLoop._generate: fp32, at generation time
        with torch.no_grad():
            gen.old_token_logps = policy.token_logprobs(gen.pixels, gen.seeds, list(range(1, K + 1)), gen.tokens).logprobs.float()
    loss, _ = ft.policy_loss(ft.SequenceScorer(policy), reference, method, gen, list(range(1, K + 1)),
                             layer_weights("linear", K), 0.0, acc)
    loss.backward()
    hook.remove()
    monkeypatch.setattr(ft, "layer_losses", layer_losses)
    grad = torch.cat([p.grad.reshape(-1) for p in policy.parameters() if p.grad is not None]).double()
    return loss.detach(), seen["layers"], seen["pol"], seen["ref"], grad, dtypes


@pytest.mark.parametrize("name", sorted(METHODS))
def test_policy_loss_under_bf16_agrees_with_fp32(name, tmp_path, monkeypatch, one_thread):
    """One fixed batch, the trainer's `policy_loss` + backward under fp32 and under bf16 autocast.

    Tolerances, from bf16's unit roundoff u = 2^-8 ≈ 3.9e-3 (8 significant bits; the matmuls accumulate in
    fp32, the log-softmax, the sums and the losses run in fp32):

    * sequence log-probs: within 0.05 absolute. Each token's log-prob carries the rounding of its logit
      (≈ u·|logit| ≲ 5e-3 here, of either sign), and a caption sums at most 23 of them; a bf16 *sum* of
      −64 to −145 is off by up to 0.25 to 0.5 (half its spacing), so this separates the two.
    * per-layer loss: relative 2e-3, absolute 5e-4 (the atol is for losses near 0 by construction: SCST's
      leave-one-out advantages sum to zero, so its loss is a small difference of terms of size ≈ 2).
    * DiCO's margin h (the quantity β scales inside the log-sigmoid): relative error of the vector ≤ 3e-2.
    * gradient: relative error ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ ≤ 2e-2 (≈ 5u: a few bf16 matmuls deep) and
      cosine ≥ 0.9998 (= 1 − (2e-2)²/2).

    Measured here (torch 2.14.1, 1 thread), bf16 against fp32: DiCO per-layer loss 5.7e-4 / 3.3e-4 relative,
    margin 4.2e-3, gradient 3.9e-3 (cosine 0.999993), log-probs 0.006; SCST per-layer loss 2.9e-5 absolute,
    gradient 4.1e-3. With the log-softmax in bf16 (before): DiCO loss 2.7e-2 / 4.5e-3, margin 0.23,
    gradient 1.6e-2 (cosine 0.99988), log-probs 0.52; SCST loss 1.2e-3 absolute.
    """
    policy, reference, gen = _fixed_batch()
    f = FinetuneSection(method=name, num_candidates=N, max_len=T)
    method = METHODS[name](f.method_config, f)
    l32, layers32, pol32, ref32, g32, dt32 = _step(policy, reference, gen, method, "no", tmp_path, monkeypatch)
    l16, layers16, pol16, ref16, g16, dt16 = _step(policy, reference, gen, method, "bf16", tmp_path, monkeypatch)

    assert dt32 == {torch.float32} and dt16 == {torch.bfloat16}  # autocast really ran the readout in bf16
    assert torch.isfinite(l16) and l16.dtype == torch.float32
    assert (pol16 - pol32).abs().max() < 0.05 and (ref16 - ref32).abs().max() < 0.05
    assert pol32.min() < -64  # the sums are where bf16's spacing is 0.5 or coarser
    torch.testing.assert_close(layers16, layers32, rtol=2e-3, atol=5e-4)
    if name == "dico":
        c = method.config
        h32 = torch.stack([dico_loss(pol32[:, l], ref32[:, l], gen.ro.shaped[:, l], c.beta, c.tau)[1]["h"] for l in range(K)])
        h16 = torch.stack([dico_loss(pol16[:, l], ref16[:, l], gen.ro.shaped[:, l], c.beta, c.tau)[1]["h"] for l in range(K)])
        assert h32.abs().max() > 0.1  # a margin to compare (the policy is not the reference)
        assert (h16 - h32).norm() / h32.norm() < 3e-2
    rel = float((g16 - g32).norm() / g32.norm())
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    assert rel < 2e-2 and cos > 1 - 2e-4, (rel, cos)


# ------------------------------------------------------------------------------- the stages
STAGE_OVERRIDES = [
    "device=cpu", "seed=2", "threads=1",
    "data.shapes.num_train=64", "data.shapes.num_val=4", "data.shapes.num_test=4", "data.shapes.num_test_novel=4",
    "data.max_caption_len=12",
    "model.encoder.kind=tiny_vit", "model.d_model=16", "model.encoder.width=16", "model.encoder.depth=1",
    "model.num_slots=2", "model.readout_layers=1", "model.num_refine_layers=2", "model.n_heads=2", "model.encoder.heads=2",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.warmup_steps=1", "pretrain.log_every=1",
    "pretrain.eval_every=1000", "pretrain.checkpoint_every=1000", "pretrain.num_eval_images=2", "pretrain.num_log_images=0",
    "finetune.steps=2", "finetune.batch_size=2", "finetune.num_candidates=2", "finetune.max_len=8",
    "finetune.warmup_steps=0", "finetune.log_every=1", "finetune.eval_every=1000", "finetune.checkpoint_every=1000",
    "finetune.reward.kind=cider",
]


class _Record:
    """`on_step_end` hook: each step's loss, the accelerator's precision and the weights' dtypes."""

    def __init__(self):
        self.losses, self.precisions, self.dtypes, self.first = [], set(), set(), None

    def __call__(self, step, model, loss, accelerator, **_):
        self.losses.append(float(loss))
        self.precisions.add(accelerator.mixed_precision)
        self.dtypes |= {p.dtype for p in model.parameters()}
        if self.first is None:
            self.first = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _recipe(run_dir: Path, precision: str, *extra: str):
    from rlrefine.config import load_recipe

    return load_recipe(REPO / "recipes" / "tiny.yaml", [f"run_dir={run_dir}", *STAGE_OVERRIDES,
                                                        f"pretrain.mixed_precision={precision}",
                                                        f"finetune.mixed_precision={precision}", *extra])


def test_stages_run_under_bf16(tmp_path, one_thread):
    """pretrain and every method's fine-tuning, under bf16 through the one training loop (data, z_0 and init
    as the fp32 run's); the first step's loss agrees with fp32 within 1% (measured: pretrain 5e-6 relative,
    DiCO 0 (its first loss is log 2 in both: the policy is the reference), SCST 7e-6 absolute), and the weights
    stay fp32 (autocast keeps fp32 master weights)."""
    from rlrefine.trainers.finetune import finetune
    from rlrefine.trainers.pretrain import pretrain

    runs = {}
    for precision in ("no", "bf16"):  # fp32 first, then bf16 in the same process (make_accelerator resets it)
        rec = _Record()
        cfg = _recipe(tmp_path / precision, precision)
        report = pretrain(cfg, on_step_end=rec)
        assert report["steps"] == 2 and math.isfinite(report["val"]["ce_per_layer"][-1])
        runs[precision] = rec
    fp32, bf16 = runs["no"], runs["bf16"]
    assert bf16.precisions == {"bf16"} and fp32.precisions == {"no"} and bf16.dtypes == {torch.float32}
    assert all(math.isfinite(x) for x in bf16.losses)
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=1e-2)
    assert not torch.equal(bf16.first, fp32.first)  # it did compute in another precision

    init = tmp_path / "bf16" / "pretrain" / "model"
    for name in sorted(METHODS):
        out = {}
        for precision in ("no", "bf16"):
            rec = _Record()
            cfg = _recipe(tmp_path / precision, precision, f"finetune.method={name}", f"finetune.output=finetune_{name}",
                          f"finetune.init={init}")
            report = finetune(cfg, on_step_end=rec)
            assert report["method"] == name and rec.precisions == {precision} and rec.dtypes == {torch.float32}
            assert all(math.isfinite(x) for x in rec.losses) and len(rec.losses) == 2
            out[precision] = rec
        assert out["bf16"].losses[0] == pytest.approx(out["no"].losses[0], rel=1e-2, abs=1e-3), name
        saved = tmp_path / "bf16" / f"finetune_{name}" / "model"
        assert json.loads((tmp_path / "bf16" / f"finetune_{name}" / "report.json").read_text())["steps"] == 2
        from safetensors import safe_open

        with safe_open(str(saved / "model.safetensors"), framework="pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"F32"}
