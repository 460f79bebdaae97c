"""Teacher-forced (XE) pretraining of the refinement captioner (DESIGN.md §2).

    L = Σ_k w_k · CE(Readout(z_k), y) / Σ_k w_k  +  λ_grad · mean_k (d_k − s(k))²

Every layer k = 1..K is trained to caption the image from its own text encoding z_k; the layer
weights w_k give the early layers less say, and the latent graduality term asks each block to do its
scheduled share of the way from z_0 to z_K. AdamW with linear warm-up then cosine decay, gradient
clipping, accelerate for devices / mixed precision / multi-process, TensorBoard under
`<run_dir>/pretrain/`, atomic checkpoints, and a final report on the test splits in
`<run_dir>/pretrain/report.json`. The trained captioner is `<run_dir>/pretrain/model`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rlrefine.config import RecipeConfig, dump_recipe
from rlrefine.data.datasets import DataIssues
from rlrefine.losses import coarse_to_fine_targets, latent_graduality_loss, layer_weights, schedule, xe_loss
from rlrefine.models import RefinementCaptioner
from rlrefine.trainers.checkpoint import CheckpointManager
from rlrefine.trainers.model_card import render_model_card
from rlrefine.trainers.common import (
    NonFiniteGuard, NonFiniteLossError, batch_stream, build_tokenizer, captioner_config, drop_unreadable,
    eval_z0_seeds, load_images, load_splits, make_accelerator, tensorboard_writer,
)

log = logging.getLogger(__name__)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up 0→1 over `warmup` steps, then cosine 1→min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def per_layer_ce(model: RefinementCaptioner, split, tokenizer, index: np.ndarray, max_len: int, image_size: int,
                 batch_size: int = 128) -> torch.Tensor:
    """Token-mean cross-entropy of the first reference at every layer 1..K -> Tensor[K]."""
    K = model.config.num_refine_layers
    total, count = torch.zeros(K), torch.zeros(K)
    layers = list(range(1, K + 1))
    device = next(model.parameters()).device
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        tokens = tokenizer.encode_batch([split.captions[i][0] for i in idx], max_len).to(device)
        pixels = model.encoder.preprocess(load_images(split, idx, image_size).to(device))
        out = model(pixels, tokens, eval_z0_seeds(idx).to(device), layers=layers)
        targets = tokens[:, 1:]
        mask = targets != tokenizer.pad_id
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, K, T-1, V]
        nll = -logp.gather(-1, targets[:, None, :, None].expand(-1, K, -1, 1)).squeeze(-1)
        total += (nll * mask[:, None]).sum(dim=(0, 2)).cpu()
        count += mask.sum().cpu().float()
    return total / count


@torch.no_grad()
def greedy_captions(model: RefinementCaptioner, split, tokenizer, index: np.ndarray, layers: list[int],
                    image_size: int, max_len: int, batch_size: int = 128) -> list[list[str]]:
    """Greedy caption of each example at each layer -> [len(index)][len(layers)] strings."""
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        pixels = model.encoder.preprocess(load_images(split, idx, image_size).to(device))
        gen = model.generate(pixels, eval_z0_seeds(idx).to(device), layers, method="greedy", num_candidates=1, max_len=max_len)
        texts = tokenizer.decode_batch(gen.tokens[:, :, 0].cpu())  # [B][L]
        out.extend(texts)
    return out


def evaluate_split(model, split, tokenizer, cfg: RecipeConfig, n: int) -> dict:
    """Per-layer CE, and on shapes data the final-layer grounded accuracy, on the first n examples."""
    from rlrefine.metrics.grounding import grounding_scores

    index = np.arange(min(n, len(split.captions)))
    index = index[~np.asarray(split.is_label, dtype=bool)[index]]
    K = model.config.num_refine_layers
    ce = per_layer_ce(model, split, tokenizer, index, cfg.data.max_caption_len, cfg.data.image_size)
    report = {"ce_per_layer": [round(float(x), 4) for x in ce]}
    if split.scenes is not None:
        caps = greedy_captions(model, split, tokenizer, index, list(range(K + 1)), cfg.data.image_size, cfg.data.max_caption_len)
        scenes = [split.scenes[i] for i in index]
        per_layer = [grounding_scores([c[k] for c in caps], scenes) for k in range(K + 1)]
        report["object_accuracy_per_layer"] = [round(g["object_accuracy"], 4) for g in per_layer]
        report["grounding_final"] = per_layer[-1]
        report["examples"] = [{"refs": split.captions[i][:2], "layers": c} for i, c in zip(index[:3], caps[:3])]
    return report


def pretrain(cfg: RecipeConfig, resume: bool = False, on_step_end: Callable[..., None] | None = None) -> dict:
    """Run XE pretraining as configured; returns the final report (also written to report.json).

    ``on_step_end(step=, model=, batch=, loss=, accelerator=)``, if given, is called on every process
    after each optimizer step (``model`` is the unwrapped captioner, ``loss`` this process's loss):
    a hook for tests and debugging, e.g. to compare parameters across processes.

    Non-finite losses or gradients: the step is skipped on every process (no update, logged as
    ``train/nonfinite_steps``); after ``pretrain.max_nonfinite_steps`` in a row a checkpoint is
    written and `NonFiniteLossError` says what to change. Data problems (`DataIssues`) are logged
    at the end and written to report.json under ``data_issues``.
    """
    p = cfg.pretrain
    stage_dir = cfg.run_path / "pretrain"
    acc = make_accelerator(cfg, "pretrain", p.mixed_precision)
    issues = DataIssues()
    splits = load_splits(cfg, issues)
    for name in ("val", "test", "test_novel"):
        if name in splits:
            n = max(p.num_eval_images, 256 if name == "val" else 0)
            splits[name] = drop_unreadable(splits[name], n, cfg.data.image_size, cfg.data.bad_image, issues, name)
    tokenizer = build_tokenizer(cfg, splits["train"], save_dir=stage_dir / "tokenizer" if acc.is_main_process else None)
    model = RefinementCaptioner(captioner_config(cfg, tokenizer))
    K = model.config.num_refine_layers
    n_params = sum(t.numel() for t in model.parameters() if t.requires_grad)
    log.debug("captioner: %.2fM trainable parameters, K=%d", n_params / 1e6, K)

    encoder_params = [t for t in model.encoder.parameters() if t.requires_grad]
    encoder_ids = {id(t) for t in encoder_params}
    rest = [t for t in model.parameters() if t.requires_grad and id(t) not in encoder_ids]
    optimizer = torch.optim.AdamW([{"params": rest}, {"params": encoder_params, "lr": p.lr * p.encoder_lr_mult}],
                                  lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, p.warmup_steps, p.steps, p.min_lr_ratio))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    core = acc.unwrap_model(model)

    ckpt = CheckpointManager(stage_dir / "checkpoints", acc)
    start_step, state = 0, {"nonfinite_total": 0}
    if resume and ckpt.latest() is not None:
        state = ckpt.load()
        start_step = state["step"]
    if acc.is_main_process:
        dump_recipe(cfg, stage_dir / "recipe.yaml")
    acc.init_trackers("tb", config={k: v for k, v in p.model_dump().items() if isinstance(v, (int, float, str, bool))})
    writer = tensorboard_writer(acc)

    weights = layer_weights(p.layer_weights, K).to(acc.device)
    sched = schedule(p.schedule, K, p.schedule_eps).to(acc.device)
    layers = list(range(1, K + 1))
    log_index = np.arange(min(p.num_log_images, len(splits["val"].captions)))

    stream_issues = DataIssues()  # counted while reading batches (this process's slice)
    stream = batch_stream(splits["train"], tokenizer, p.batch_size, cfg.seed, start_step, cfg.data.max_caption_len,
                          cfg.data.label_weight, cfg.data.image_size, acc.process_index, acc.num_processes,
                          bad_image=cfg.data.bad_image, issues=stream_issues)
    guard = NonFiniteGuard(acc, optimizer, ckpt, state, p.max_nonfinite_steps, "pretrain",
                           f"Lower pretrain.lr (now {p.lr}) or pretrain.grad_clip (now {p.grad_clip}), or use "
                           f"pretrain.mixed_precision=no (now {p.mixed_precision})")
    t0 = time.time()
    bar = tqdm(range(start_step, p.steps), desc="pretrain", initial=start_step, total=p.steps, disable=not acc.is_local_main_process)
    for step in bar:
        model.train()
        batch = next(stream)
        tokens = batch.tokens.to(acc.device)
        pixels = core.encoder.preprocess(batch.images.to(acc.device))
        seeds = batch.z0_seeds.to(acc.device)
        with acc.autocast():
            out = model(pixels, tokens, seeds, layers=layers)
            targets = tokens[:, 1:]
            if p.coarse_to_fine:
                targets = coarse_to_fine_targets(targets, 1 - sched[1:], tokenizer.eos_id, tokenizer.pad_id)
            loss_xe, ce_layers = xe_loss(out.logits.float(), targets, weights, tokenizer.pad_id)
            loss_grad, d_mean = latent_graduality_loss(out.latents.float(), sched)
            loss = loss_xe + p.lambda_grad * loss_grad
        grad_norm = guard.backward(step, loss, model.parameters(), p.grad_clip)
        if grad_norm is None:
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step_end is not None:
            on_step_end(step=step, model=core, batch=batch, loss=loss.detach(), accelerator=acc)

        if step % p.log_every == 0 or step == p.steps - 1:
            # Every process computed its own slice's loss: log the mean over processes.
            mean_loss, mean_xe, mean_grad = acc.reduce(torch.stack([loss, loss_xe, loss_grad]).detach(), "mean").tolist()
            ce_layers = acc.reduce(ce_layers.detach().to(acc.device), "mean")
            scalars = {"train/loss": mean_loss, "train/xe": mean_xe, "train/latent_graduality": mean_grad,
                       "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                       "train/steps_per_s": (step + 1 - start_step) / (time.time() - t0)}
            scalars.update({f"train/ce_layer_{k}": float(ce_layers[k - 1]) for k in layers})
            scalars.update({f"train/latent_distance_layer_{k}": float(d_mean[k]) for k in range(K + 1)})
            acc.log(scalars, step=step)
            bar.set_postfix(loss=f"{mean_loss:.3f}", ce_K=f"{float(ce_layers[-1]):.3f}")
        if (step + 1) % p.eval_every == 0 or step == p.steps - 1:
            if acc.is_main_process:
                _log_validation(core, splits["val"], tokenizer, cfg, log_index, step, acc, writer)
        if (step + 1) % p.checkpoint_every == 0 and step + 1 < p.steps:
            ckpt.save(step + 1, state)
    bar.close()
    train_time = time.time() - t0
    # Load-time counts are the same on every process; those found while reading batches are per
    # process (each reads its own slice), so they are summed.
    counts = torch.tensor(list(stream_issues.as_dict().values()), device=acc.device)
    issues.add(dict(zip(stream_issues.as_dict(), (int(x) for x in acc.reduce(counts, "sum").tolist()))))
    log.info("data issues: %s; non-finite steps skipped: %d", issues.summary(), state.get("nonfinite_total", 0))

    report = {}
    if acc.is_main_process:
        core.eval()
        card = render_model_card(f"Refinement captioner (XE pretrained, K = {K})",
                                 f"Teacher-forced (XE) pretraining, {p.steps} steps (`rlrefine pretrain`).", cfg)
        core.save_pretrained(stage_dir / "model", tokenizer=tokenizer, model_card=card)
        report = {"steps": p.steps, "train_seconds": round(train_time, 1), "trainable_params": n_params,
                  "data_issues": issues.as_dict(), "nonfinite_steps": state.get("nonfinite_total", 0)}
        for name in ("val", "test", "test_novel"):
            if name in splits:
                report[name] = evaluate_split(core, splits[name], tokenizer, cfg, p.num_eval_images)
        (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
        log.debug("pretrain report: %s", json.dumps({k: v for k, v in report.items() if k != "val"}))
    acc.wait_for_everyone()
    acc.end_training()
    return report


def _log_validation(core, val_split, tokenizer, cfg, log_index, step, acc, writer) -> None:
    core.eval()
    K = core.config.num_refine_layers
    ce = per_layer_ce(core, val_split, tokenizer, np.arange(min(256, len(val_split.captions))), cfg.data.max_caption_len, cfg.data.image_size)
    acc.log({f"val/ce_layer_{k + 1}": float(v) for k, v in enumerate(ce)}, step=step)
    if writer is not None and len(log_index):
        caps = greedy_captions(core, val_split, tokenizer, log_index, list(range(K + 1)), cfg.data.image_size, cfg.data.max_caption_len)
        for k in range(K + 1):
            lines = [f"**image {i}**: {c[k]}  \n(ref: {val_split.captions[i][0]})" for i, c in zip(log_index, caps)]
            writer.add_text(f"captions/layer_{k}", "\n\n".join(lines), global_step=step)
