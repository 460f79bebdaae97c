"""Teacher-forced (XE) pretraining of the refinement captioner (docs/design.md, "The math").

    L = Σ_k w_k · CE(Readout(z_k), y) / Σ_k w_k  +  λ_grad · mean_k (d_k − s(k))²

Every layer k = 1..K is trained to caption the image from its own text encoding z_k; the layer
weights w_k give the early layers less say, and the latent graduality term asks each block to do its
scheduled share of the way from z_0 to z_K. Optionally (``pretrain.emphasis_words``) chosen words, and the
captions that hold them, get extra cross entropy at layer K (`rlrefine.losses.word_emphasis_loss`): the shapes
world's position words, which a token mean leaves to the marginal. With ``pretrain.locate_weight`` (shapes data), the
readout's state at layer K also says where each object a reference names is (`rlrefine.losses.locate_loss`, through
the captioner's ``locate_head``), which XE alone does not teach it. AdamW with linear warm-up then cosine decay, on the
shared `TrainingLoop` (accelerate, checkpoints and --resume, the non-finite guard, TensorBoard under
`<run_dir>/pretrain/tb`). Outputs: the captioner `<run_dir>/pretrain/model` and `report.json` (the
loop's fields, per-layer CE and grounded accuracy on val/test, data issues).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from rlrefine.config import RecipeConfig, RecipeError
from rlrefine.data.batches import batch_stream, drop_unreadable, eval_z0_seeds, load_images
from rlrefine.data.sources import load_splits
from rlrefine.data.tokenizer import build_tokenizer
from rlrefine.losses import (coarse_to_fine_targets, latent_graduality_loss, layer_weights, locate_loss, schedule,
                             word_emphasis_loss, xe_loss)
from rlrefine.models import CaptionerConfig, RefinementCaptioner
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine
from rlrefine.trainers.model_card import render_model_card

log = logging.getLogger(__name__)

__all__ = ["PretrainLoop", "evaluate_split", "greedy_captions", "locate_targets", "per_layer_ce", "pretrain"]


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
        out.extend(tokenizer.decode_batch(gen.tokens[:, :, 0].cpu()))  # [B][L]
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
        from rlrefine.data.shapes_probes import position_preferences

        report["position"] = position_preferences(
            lambda idx, captions: layer_logprobs(model, split, tokenizer, idx, captions, K, cfg.data.image_size,
                                                 cfg.data.max_caption_len), split, cfg.data.image_size, n, cfg.seed)
    return report


@torch.no_grad()
def layer_logprobs(model: RefinementCaptioner, split, tokenizer, index: np.ndarray, captions: list[list[str]], layer: int,
                   image_size: int, max_len: int, batch_size: int = 128) -> torch.Tensor:
    """Teacher-forced log-probability of ``captions[j][m]`` for image ``index[j]`` at ``layer`` -> [len(index), m]."""
    device, m = next(model.parameters()).device, len(captions[0])
    out = []
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        tokens = tokenizer.encode_batch([c for cs in captions[start:start + batch_size] for c in cs], max_len)
        pixels = model.encoder.preprocess(load_images(split, idx, image_size).to(device))
        out.append(model.sequence_logprobs(pixels, eval_z0_seeds(idx).to(device), [layer],
                                           tokens.view(len(idx), 1, m, -1).to(device))[:, 0].cpu())
    return torch.cat(out)


def encoder_overrides(cfg: RecipeConfig) -> dict:
    """`model.encoder.kind: evaluator` is the visual tower of this run's learned evaluator, an open_clip folder."""
    if cfg.model.encoder.kind != "evaluator":
        return {}
    folder = cfg.run_path / "evaluator"
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"model.encoder.kind is 'evaluator' but no learned evaluator in '{folder}': run "
            f"`rlrefine train-evaluator --config <recipe>` first (`rlrefine run` does it for you)")
    return {"kind": "open_clip", "checkpoint": f"local-dir:{folder}"}


def locate_targets(tokens: torch.Tensor, index, split, words: list[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the locate loss for a batch: tokens [B, T] (bos ... eos pad) of captions of ``split``'s images
    ``index`` -> (centres [B, T-1, 2], mask [B, T-1]). Input position t holds token t; where it is the shape word of a
    mention of an object in the image (`rlrefine.data.shapes.mention_centres`), the target is that object's centre: the
    readout state there is the one that chooses the next word ("above", "and", ...). ``words[i]`` is token i's text."""
    from rlrefine.data.shapes import mention_centres

    B, T = tokens.shape
    centres, mask = torch.zeros(B, T - 1, 2), torch.zeros(B, T - 1, dtype=torch.bool)
    for b, (row, i) in enumerate(zip(tokens[:, :-1].tolist(), np.asarray(index).tolist())):
        for t, centre in mention_centres([words[tok] for tok in row], split.scenes[i], image_size):
            centres[b, t] = torch.tensor(centre)
            mask[b, t] = True
    return centres, mask


class PretrainLoop(TrainingLoop):
    """XE pretraining on the shared loop (module docstring)."""

    def __init__(self, cfg: RecipeConfig, on_step_end: Callable[..., None] | None = None):
        p = cfg.pretrain
        self.cfg = cfg
        super().__init__(LoopSettings.of_recipe(
            cfg, "pretrain", "pretrain", steps=p.steps, log_every=p.log_every, checkpoint_every=p.checkpoint_every,
            eval_every=p.eval_every, grad_clip=p.grad_clip, max_nonfinite_steps=p.max_nonfinite_steps,
            mixed_precision=p.mixed_precision,
            advice=f"Lower pretrain.lr (now {p.lr}) or pretrain.grad_clip (now {p.grad_clip}), or use "
                   f"pretrain.mixed_precision=no (now {p.mixed_precision})", hparams=p.model_dump()), on_step_end, recipe=cfg)

    def setup(self, start_step: int) -> None:
        cfg, p, acc = self.cfg, self.cfg.pretrain, self.acc
        self.splits = splits = load_splits(cfg.data, self.issues)
        for name in ("val", "test", "test_novel"):
            if name in splits:
                n = max(p.num_eval_images, 256 if name == "val" else 0)
                splits[name] = drop_unreadable(splits[name], n, cfg.data.image_size, cfg.data.bad_image, self.issues, name)
        self.tokenizer = build_tokenizer(cfg.tokenizer, splits["train"].all_captions(),
                                         save_dir=self.stage_dir / "tokenizer" if acc.is_main_process else None)
        if p.locate_weight and splits["train"].scenes is None:
            raise RecipeError(f"pretrain.locate_weight ({p.locate_weight}) needs to know where each object of a training "
                              f"image is, which only the shapes world records (data.kind: shapes); set "
                              f"pretrain.locate_weight=0 for data.kind {cfg.data.kind!r}")
        # each token's text, for the locate loss's targets (decoding a large vocabulary one id at a time costs seconds)
        self.words = [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)] if p.locate_weight else []
        model = RefinementCaptioner(CaptionerConfig.from_section(cfg.model, self.tokenizer, cfg.data.max_caption_len,
                                                                 locate_head=p.locate_weight > 0, **encoder_overrides(cfg)))
        self.K = K = model.config.num_refine_layers
        self.n_params = sum(t.numel() for t in model.parameters() if t.requires_grad)
        log.debug("captioner: %.2fM trainable parameters, K=%d", self.n_params / 1e6, K)
        encoder_params = [t for t in model.encoder.parameters() if t.requires_grad]
        encoder_ids = {id(t) for t in encoder_params}
        rest = [t for t in model.parameters() if t.requires_grad and id(t) not in encoder_ids]
        self.optimizer = torch.optim.AdamW([{"params": rest}, {"params": encoder_params, "lr": p.lr * p.encoder_lr_mult}],
                                           lr=p.lr, weight_decay=p.weight_decay, betas=(0.9, 0.98))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, p.warmup_steps, p.steps, p.min_lr_ratio))
        self.model = model
        self.weights = layer_weights(p.layer_weights, K).to(acc.device)
        self.sched = schedule(p.schedule, K, p.schedule_eps).to(acc.device)
        self.layers = list(range(1, K + 1))
        try:
            self.emphasis_ids = self.tokenizer.word_ids(p.emphasis_words, "pretrain.emphasis_words").to(acc.device)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        self.log_index = np.arange(min(p.num_log_images, len(splits["val"].captions)))
        self.stream = batch_stream(splits["train"], self.tokenizer, p.batch_size, cfg.seed, start_step,
                                   cfg.data.max_caption_len, cfg.data.label_weight, cfg.data.image_size, acc.process_index,
                                   acc.num_processes, bad_image=cfg.data.bad_image, issues=self.stream_issues,
                                   num_workers=cfg.data.num_workers)

    @property
    def core(self) -> RefinementCaptioner:
        return self.whole_model

    def train_step(self, step: int) -> StepOutput:
        acc, p = self.acc, self.cfg.pretrain
        self.model.train()
        batch = next(self.stream)
        tokens = batch.tokens.to(acc.device)
        pixels = self.core.encoder.preprocess(batch.images.to(acc.device))
        seeds = batch.z0_seeds.to(acc.device)
        with acc.autocast():
            out = self.model(pixels, tokens, seeds, layers=self.layers, return_hidden=bool(p.locate_weight))
            targets = tokens[:, 1:]
            if p.coarse_to_fine:
                targets = coarse_to_fine_targets(targets, 1 - self.sched[1:], self.tokenizer.eos_id, self.tokenizer.pad_id)
            loss_xe, ce_layers = xe_loss(out.logits.float(), targets, self.weights, self.tokenizer.pad_id)
            loss_grad, d_mean = latent_graduality_loss(out.latents.float(), self.sched)
            loss = loss_xe + p.lambda_grad * loss_grad
            loss_emph = loss.new_zeros(())
            if len(self.emphasis_ids):
                final = targets[:, -1] if targets.dim() == 3 else targets  # layer K's targets
                loss_emph = word_emphasis_loss(out.logits[:, -1], final, self.emphasis_ids, self.tokenizer.pad_id,
                                               p.emphasis_weight, p.emphasis_caption_weight)
                loss = loss + loss_emph
            loss_locate = loss.new_zeros(())
            if p.locate_weight:
                centres, named = locate_targets(batch.tokens, batch.index, self.splits["train"], self.words,
                                                self.cfg.data.image_size)
                loss_locate = locate_loss(self.core.locate_head(out.hidden[:, -1]), centres.to(acc.device),
                                          named.to(acc.device))
                loss = loss + p.locate_weight * loss_locate

        def scalars() -> dict:
            return {"train/xe": loss_xe.detach(), "train/latent_graduality": loss_grad.detach(),
                    **({"train/emphasis": loss_emph.detach()} if len(self.emphasis_ids) else {}),
                    **({"train/locate": loss_locate.detach()} if p.locate_weight else {}),
                    **{f"train/ce_layer_{k}": ce_layers[k - 1] for k in self.layers},
                    **{f"train/latent_distance_layer_{k}": d_mean[k] for k in range(self.K + 1)}}

        return StepOutput(loss, scalars, lambda s: {"loss": f"{s['train/loss']:.3f}", "ce_K": f"{s[f'train/ce_layer_{self.K}']:.3f}"},
                          hook={"batch": batch})

    def validate(self, step: int) -> None:
        """Per-layer val CE and, in TensorBoard, the captions of fixed val images at every layer."""
        cfg, core, val = self.cfg, self.core, self.splits["val"]
        core.eval()
        ce = per_layer_ce(core, val, self.tokenizer, np.arange(min(256, len(val.captions))), cfg.data.max_caption_len,
                          cfg.data.image_size)
        self.acc.log({f"val/ce_layer_{k + 1}": float(v) for k, v in enumerate(ce)}, step=step)
        if self.writer is not None and len(self.log_index):
            caps = greedy_captions(core, val, self.tokenizer, self.log_index, list(range(self.K + 1)), cfg.data.image_size,
                                   cfg.data.max_caption_len)
            for k in range(self.K + 1):
                lines = [f"**image {i}**: {c[k]}  \n(ref: {val.captions[i][0]})" for i, c in zip(self.log_index, caps)]
                self.writer.add_text(f"captions/layer_{k}", "\n\n".join(lines), global_step=step)

    def finish(self, train_seconds: float) -> dict:
        cfg, core = self.cfg, self.core
        core.eval()
        card = render_model_card(f"Refinement captioner (XE pretrained, K = {self.K})",
                                 f"Teacher-forced (XE) pretraining, {cfg.pretrain.steps} steps (`rlrefine pretrain`).", cfg)
        core.save_pretrained(self.stage_dir / "model", tokenizer=self.tokenizer, model_card=card)
        report = {"trainable_params": self.n_params}
        for name in ("val", "test", "test_novel"):
            if name in self.splits:
                report[name] = evaluate_split(core, self.splits[name], self.tokenizer, cfg, cfg.pretrain.num_eval_images)
        where = report.get("test", {}).get("position")
        if where:
            log.info("pretrain: does the captioner know where things are (test, layer K, chance 0.5)? true relation above "
                     "inverted %.3f of %d images, above the same on the other axis %.3f, true region above the opposite "
                     "%.3f of %d",
                     where["relation_true_over_inverted"], where["relation_true_over_inverted_images"],
                     where["relation_true_over_wrong_axis"],
                     where["region_true_over_opposite"], where["region_true_over_opposite_images"])
        return report


def pretrain(cfg: RecipeConfig, resume: bool = False, on_step_end: Callable[..., None] | None = None) -> dict:
    """`rlrefine pretrain`: XE pretraining as configured; returns the report (also written to report.json).

    ``on_step_end(step=, model=, batch=, loss=, accelerator=)``, if given, is called on every process
    after each optimizer step (``model`` is the unwrapped captioner, ``loss`` this process's loss):
    a hook for tests and debugging, e.g. to compare parameters across processes.
    """
    return PretrainLoop(cfg, on_step_end).run(resume)
