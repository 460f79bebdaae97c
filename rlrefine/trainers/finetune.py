"""DiCO (and SCST) fine-tuning with a reward applied at every refinement layer (DESIGN.md §4).

One step, for a batch of B images and the L configured layers:

1. candidates: n captions per image and layer from the current policy (beam search by default, as
   DiCO), plus the greedy captions of layer 0 (z_0) and layer K, all with the same z_0 seeds; no grad.
2. rewards of all B·(L·n + 2) captions in one batched call; shaped rewards
   r̃_k = r − λ_grad·|p_k − (1 − s(k))|·[k<K] − λ_len·excess length over the layer's budget.
3. policy log-probs (with grad) and frozen-reference log-probs (no grad) of every candidate, each in
   one forward over the generated tokens with the same z_0; per-layer DiCO loss (or SCST loss).
4. L = Σ_k w_k L_k / Σ_k w_k.

Logged per layer (TensorBoard, TRL-style names): `layer_k/reward`, `layer_k/shaped_reward`,
`layer_k/rewards/chosen|rejected|margins|accuracies`, `layer_k/kl_ref`, `layer_k/progress` vs
`layer_k/progress_target`; for a `sum` reward every term, unweighted, as `reward_terms/<name>` (all
layers) and `layer_k/reward_terms/<name>`; sample captions of fixed val images at every layer.
Outputs: `<run_dir>/<output>/model` (the fine-tuned captioner), `report.json`, checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm
from trl.trainer.utils import disable_dropout_in_model

from rlrefine.config import FinetuneSection, RecipeConfig, dump_recipe
from rlrefine.losses import dico_loss, embedding_progress, kl_to_reference, layer_weights, schedule, scst_loss, shape_rewards
from rlrefine.models import RefinementCaptioner
from rlrefine.trainers.checkpoint import CheckpointManager
from rlrefine.trainers.model_card import render_model_card
from rlrefine.trainers.common import (
    NonFiniteGuard, batch_stream, eval_z0_seeds, load_images, load_splits, make_accelerator, step_z0_seeds,
    tensorboard_writer,
)
from rlrefine.trainers.pretrain import greedy_captions, warmup_cosine
from rlrefine.trainers.reward_factory import build_reward, training_corpus

log = logging.getLogger(__name__)


class SequenceScorer(torch.nn.Module):
    """`forward` = the captioner's `sequence_logprobs`, so the gradient pass goes through the
    accelerate-prepared (DDP / FSDP) wrapper and gradients are synchronised across processes."""

    def __init__(self, captioner: RefinementCaptioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, pixels, z0_seed, layers, tokens):
        return self.captioner.sequence_logprobs(pixels, z0_seed, layers, tokens)


def word_lengths(captions: list[str]) -> torch.Tensor:
    return torch.tensor([len(c.split()) for c in captions], dtype=torch.float32)


@dataclass
class Rollout:
    """Everything step 1–2 produce for one batch. Shapes: B images, L layers, n candidates, T tokens."""

    tokens: torch.Tensor  # [B, L, n, T]
    captions: list[str]  # B·L·n, row-major over (B, L, n)
    rewards: torch.Tensor  # [B, L, n] raw
    shaped: torch.Tensor  # [B, L, n]
    progress: torch.Tensor  # [B, L, n]
    greedy_rewards: torch.Tensor | None  # [B, L] (SCST greedy baseline)
    terms: dict[str, torch.Tensor] | None = None  # name -> [B, L, n] unweighted term scores (a `sum` reward)


def check_shaping_reward(f: FinetuneSection, reward) -> None:
    """Fail before training when the shaping cannot measure progress with this reward."""
    if f.shaping_progress == "embedding" and f.lambda_grad > 0 and not hasattr(reward, "embed_texts"):
        raise ValueError(f"{f.output}.shaping_progress: embedding needs a reward with text embeddings (embed_texts), and "
                         f"reward kind {f.reward.kind!r} has none; set {f.output}.shaping_progress=reward")


@torch.no_grad()
def rollout(policy: RefinementCaptioner, reward, images: torch.Tensor, pixels: torch.Tensor, seeds: torch.Tensor,
            layers: list[int], f: FinetuneSection, tokenizer, sched: torch.Tensor,
            generator: torch.Generator | None = None, references: list[list[str]] | None = None) -> Rollout:
    """Generate candidates at every configured layer, score them in one call, and shape the rewards.

    ``references``: the B images' reference captions (for rewards that use them: cider, refclip, ...).
    A `sum` reward's terms are kept, unweighted, in ``Rollout.terms`` for logging."""
    K = policy.config.num_refine_layers
    B, L, n = pixels.shape[0], len(layers), f.num_candidates
    was_training = policy.training
    policy.eval()
    if f.method == "dico" and f.generation == "beam":
        gen = policy.generate(pixels, seeds, layers, method="beam", num_candidates=n, max_len=f.max_len)
    else:
        gen = policy.generate(pixels, seeds, layers, method="sample", num_candidates=n, max_len=f.max_len,
                              temperature=f.temperature, top_p=f.top_p, generator=generator)
    # greedy anchors: layer 0 (r_0) and layer K (r_K) for progress; every layer for the SCST greedy baseline
    anchor_layers = sorted(set([0, K] + (layers if f.method == "scst" and f.scst_baseline == "greedy" else [])))
    greedy = policy.generate(pixels, seeds, anchor_layers, method="greedy", num_candidates=1, max_len=f.max_len)
    policy.train(was_training)

    cand_text = [c for per_img in tokenizer.decode_batch(gen.tokens.cpu()) for per_layer in per_img for c in per_layer]
    anchor_text = [row[0] for per_img in tokenizer.decode_batch(greedy.tokens.cpu()) for row in per_img]
    texts = cand_text + anchor_text
    image_index = torch.cat([torch.arange(B).repeat_interleave(L * n), torch.arange(B).repeat_interleave(len(anchor_layers))])
    terms = None
    if hasattr(reward, "term_scores"):  # rewards.weighted.WeightedSum: score once, keep every term
        term_scores = reward.term_scores(images, texts, references=references, image_index=image_index)
        scores = reward.combine(term_scores)
        terms = {k: v.float().cpu()[: B * L * n].view(B, L, n) for k, v in term_scores.items()}
    else:
        scores = reward(images, texts, references=references, image_index=image_index)
    scores = torch.as_tensor(scores).float().cpu()
    r = scores[: B * L * n].view(B, L, n)
    anchors = scores[B * L * n:].view(B, len(anchor_layers))
    r0, rK = anchors[:, anchor_layers.index(0)], anchors[:, anchor_layers.index(K)]
    lengths = word_lengths(cand_text).view(B, L, n)
    emb_progress = None
    if f.shaping_progress == "embedding" and f.lambda_grad > 0:  # the text-embedding progress G measures, on the reward's own text tower
        emb = reward.embed_texts(texts).float().cpu()
        a = emb[B * L * n:].view(B, len(anchor_layers), -1)
        emb_progress = embedding_progress(emb[: B * L * n].view(B, L, n, -1), a[:, anchor_layers.index(0)],
                                          a[:, anchor_layers.index(K)])
    shaped, progress = shape_rewards(r, torch.tensor(layers), K, r0, rK, sched.cpu(), f.lambda_grad, f.lambda_len,
                                     lengths, f.len_min, f.len_max, progress_values=emb_progress)
    greedy_r = None
    if f.method == "scst" and f.scst_baseline == "greedy":
        greedy_r = anchors[:, [anchor_layers.index(k) for k in layers]]
    return Rollout(gen.tokens, cand_text, r, shaped, progress, greedy_r, terms)


def layer_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ro: Rollout, f: FinetuneSection,
                 lengths: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Per-layer DiCO or SCST losses ([B, L, n] inputs) -> (losses [L], metrics [L])."""
    losses, metrics = [], []
    device = policy_logps.device
    for l in range(policy_logps.shape[1]):
        shaped = ro.shaped[:, l].to(device)
        if f.method == "dico":
            loss, m = dico_loss(policy_logps[:, l], ref_logps[:, l], shaped, f.beta, f.tau)
        else:
            base = None if ro.greedy_rewards is None else ro.greedy_rewards[:, l].to(device)
            loss, m = scst_loss(policy_logps[:, l], shaped, baseline=f.scst_baseline, greedy_rewards=base, lengths=lengths[:, l].to(device))
        m = {k: float(v) for k, v in m.items() if isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1)}
        m["kl_ref"] = float(kl_to_reference(policy_logps[:, l].detach(), ref_logps[:, l]))
        losses.append(loss)
        metrics.append(m)
    return losses, metrics


def compute_loss(core: RefinementCaptioner, policy, reference: RefinementCaptioner, reward, images: torch.Tensor,
                 pixels: torch.Tensor, seeds: torch.Tensor, layers: list[int], f: FinetuneSection, tokenizer,
                 sched: torch.Tensor, weights: torch.Tensor, acc,
                 generator: torch.Generator | None = None,
                 references: list[list[str]] | None = None) -> tuple[torch.Tensor, Rollout, list[dict]]:
    """One fine-tuning step's loss: rollout (no grad), then policy / reference log-probs and Σ_k w_k L_k / Σ_k w_k.

    `core` is the bare policy (for generation), `policy` the accelerate-prepared `SequenceScorer`
    around it (for the gradient pass).
    """
    ro = rollout(core, reward, images, pixels, seeds, layers, f, tokenizer, sched, generator, references)
    tokens = ro.tokens.to(pixels.device)
    lengths = (tokens[..., 1:] != tokenizer.pad_id).sum(-1).float()
    policy.train()
    with acc.autocast():
        pol = policy(pixels, seeds, layers, tokens)  # [B, L, n], with grad
        with torch.no_grad():
            ref = reference.sequence_logprobs(pixels, seeds, layers, tokens)
        losses, metrics = layer_losses(pol.float(), ref.float(), ro, f, lengths)
        w = weights.to(pixels.device)
        loss = (torch.stack(losses) * w).sum() / w.sum()
        if f.kl_coef > 0:
            loss = loss + f.kl_coef * (pol - ref).mean()
    return loss, ro, metrics


def finetune(cfg: RecipeConfig, resume: bool = False, on_step_end: Callable[..., None] | None = None) -> dict:
    """`rlrefine finetune`: DiCO (or SCST) at every configured layer, from `finetune.init` (default: the
    run's XE model), which is also the frozen reference. Returns the report written to report.json.

    ``on_step_end(step=, model=, loss=, rollout=, accelerator=)``, if given, is called on every process
    after each optimizer step (tests use it to compare ranks).
    """
    f = cfg.finetune
    stage_dir = cfg.run_path / f.output
    init = Path(f.init) if f.init else cfg.run_path / "pretrain" / "model"
    acc = make_accelerator(cfg, f.output, f.mixed_precision)
    splits = load_splits(cfg)
    policy = RefinementCaptioner.from_pretrained(init)
    reference = RefinementCaptioner.from_pretrained(init).to(acc.device).eval()
    reference.requires_grad_(False)
    disable_dropout_in_model(policy)
    disable_dropout_in_model(reference)
    tokenizer = policy.tokenizer if getattr(policy, "tokenizer", None) is not None else _load_tokenizer(init)
    reward = build_reward(f.reward, cfg, acc.device, corpus=training_corpus(splits["train"]), name=f"{f.output}.reward")
    check_shaping_reward(f, reward)
    K = policy.config.num_refine_layers
    layers = f.layers or list(range(1, K + 1))
    weights = layer_weights(f.layer_weights, K)[torch.tensor(layers) - 1]
    sched = schedule(f.schedule, K, f.schedule_eps)

    optimizer = torch.optim.AdamW([t for t in policy.parameters() if t.requires_grad], lr=f.lr, weight_decay=f.weight_decay)
    min_ratio = 1.0 if f.lr_schedule == "constant" else 0.1  # a cosine to 1.0 is a constant after warm-up
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, f.warmup_steps, f.steps, min_ratio))
    core = policy
    policy, optimizer, scheduler = acc.prepare(SequenceScorer(core), optimizer, scheduler)
    ckpt = CheckpointManager(stage_dir / "checkpoints", acc)
    start_step, state = 0, {"nonfinite_total": 0}
    if resume and ckpt.latest() is not None:
        state = ckpt.load()
        start_step = state["step"]
    if acc.is_main_process:
        dump_recipe(cfg, stage_dir / "recipe.yaml")
    acc.init_trackers("tb", config={k: v for k, v in f.model_dump().items() if isinstance(v, (int, float, str, bool))})
    writer = tensorboard_writer(acc)

    stream = batch_stream(splits["train"], tokenizer, f.batch_size, cfg.seed + 1, start_step, cfg.data.max_caption_len,
                          0.0, cfg.data.image_size, acc.process_index, acc.num_processes)
    log_index = np.arange(min(4, len(splits["val"].captions)))
    guard = NonFiniteGuard(acc, optimizer, ckpt, state, f.max_nonfinite_steps, "finetune",
                           f"Lower finetune.lr (now {f.lr}) or finetune.beta (now {f.beta})")
    t0 = time.time()
    bar = tqdm(range(start_step, f.steps), desc=f"finetune[{f.method}]", initial=start_step, total=f.steps,
               disable=not acc.is_local_main_process)
    for step in bar:
        batch = next(stream)
        images = batch.images.to(acc.device)
        pixels = core.encoder.preprocess(images)
        seeds = step_z0_seeds(cfg.seed + 1, step, f.batch_size, acc.process_index, acc.num_processes).to(acc.device)
        sampler = torch.Generator(device=acc.device).manual_seed(int(step_z0_seeds(cfg.seed + 2, step, 1)[0]))
        references = [list(splits["train"].captions[int(i)]) for i in batch.index]
        loss, ro, metrics = compute_loss(core, policy, reference, reward, images, pixels, seeds, layers, f, tokenizer,
                                         sched, weights, acc, generator=sampler, references=references)
        grad_norm = guard.backward(step, loss, policy.parameters(), f.grad_clip)
        if grad_norm is None:
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step_end is not None:
            on_step_end(step=step, model=core, loss=loss.detach(), rollout=ro, accelerator=acc)

        if step % f.log_every == 0 or step == f.steps - 1:
            scalars = {"train/loss": loss.detach()}
            lengths = word_lengths(ro.captions).view(ro.rewards.shape)
            for l, k in enumerate(layers):
                scalars[f"layer_{k}/reward"] = ro.rewards[:, l].mean()
                scalars[f"layer_{k}/reward_best"] = ro.rewards[:, l].max(-1).values.mean()
                scalars[f"layer_{k}/shaped_reward"] = ro.shaped[:, l].mean()
                scalars[f"layer_{k}/progress"] = ro.progress[:, l].mean()
                scalars[f"layer_{k}/length"] = lengths[:, l].mean()
                scalars.update({f"layer_{k}/{name}": torch.tensor(v) for name, v in metrics[l].items()})
                for name, t in (ro.terms or {}).items():
                    scalars[f"layer_{k}/reward_terms/{name}"] = t[:, l].mean()
            for name, t in (ro.terms or {}).items():
                scalars[f"reward_terms/{name}"] = t.mean()
            # every process's batch counts: the logged numbers are means over processes
            means = acc.reduce(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in scalars.values()])
                               .to(acc.device), "mean").tolist()
            scalars = dict(zip(scalars, means))
            scalars.update({"train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0]})
            scalars.update({f"layer_{k}/progress_target": float(1 - sched[k]) for k in layers})
            acc.log(scalars, step=step)
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", r_K=f"{scalars[f'layer_{layers[-1]}/reward']:.3f}")
        if writer is not None and ((step + 1) % f.eval_every == 0 or step == f.steps - 1):
            core.eval()
            caps = greedy_captions(core, splits["val"], tokenizer, log_index, list(range(K + 1)), cfg.data.image_size, f.max_len)
            for k in range(K + 1):
                writer.add_text(f"captions/layer_{k}", "\n\n".join(f"**image {i}**: {c[k]}" for i, c in zip(log_index, caps)), step)
        if (step + 1) % f.checkpoint_every == 0 and step + 1 < f.steps:
            ckpt.save(step + 1, state)
    bar.close()

    report = {}
    if acc.is_main_process:
        core.eval()
        card = render_model_card(f"Refinement captioner ({f.method.upper()} fine-tuned, K = {K})",
                                 f"{f.method.upper()} fine-tuning at layers {layers} against the `{f.reward.kind}` reward, "
                                 f"{f.steps} steps from `{init}` (`rlrefine finetune`, output `{f.output}`).", cfg)
        core.save_pretrained(stage_dir / "model", tokenizer=tokenizer, model_card=card)
        report = {"method": f.method, "steps": f.steps, "train_seconds": round(time.time() - t0, 1), "layers": layers}
        (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return report


def _load_tokenizer(model_dir: Path):
    from rlrefine.data.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_dir(model_dir)
