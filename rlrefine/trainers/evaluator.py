"""`train-evaluator`: train the learned caption evaluator (`rewards.evaluator`) on the shared loop.

Loss, per step of ``batch_size`` images with one reference caption each:

* symmetric InfoNCE over the batch (open_clip's ``ClipLoss``);
* a hard-negative cross-entropy of each image's positive caption against (a) the same caption with one
  attribute word swapped (`rewards.evaluator.swap_attribute`) and (b) captions of its nearest images in
  the current image-embedding space (re-mined every ``neighbour_refresh_every`` steps);
* when the data supplies them (``preference_pairs``), a pairwise logistic loss that orders captions of
  the same image, ``softplus(logit_scale · (cos(img, worse) − cos(img, better)))`` (shapes: the complete
  description above a correct partial one, and that above the same plus one misnamed object). With
  ``preference_steps`` > 0 the pairs are taught in that many extra steps that train the text tower only
  (the image tower, which the captioner may reuse as its encoder, stays as contrastive training left it).

AdamW (no decay on gains, biases, embeddings and the logit scale, as open_clip trains), warm-up then
cosine, restarted for the text-only phase. `train_evaluator` is the library entry point (a config, two
splits, an output folder); `train_evaluator_stage` is the recipe stage (on shapes data the teacher learns
from complete descriptions of every object, as PAC-S from curated data, and its orders are probed on
held-out images, `rlrefine.data.shapes_probes`). Outputs (``out_dir``): the evaluator (see
`rewards.evaluator`), ``report.json``, TensorBoard under ``tb/``, checkpoints (``--resume``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.evaluator import (EvaluatorConfig, build_dual_encoder, embed_all_images, evaluate_dual_encoder,
                               save_dual_encoder, swap_attribute)
from rlrefine.config import RecipeConfig
from rlrefine.data.split import image_rows, images_and_captions
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["EvaluatorLoop", "clip_param_groups", "train_evaluator", "train_evaluator_stage"]

PreferencePairs = Callable[[int, random.Random], Sequence[tuple[str, str]]]


def clip_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip trains: no decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def evaluator_lr(cfg: EvaluatorConfig) -> Callable[[int], float]:
    """LR multiplier over both phases: warm-up + cosine to 0 over ``steps``; then, for the text-only phase,
    warm-up over a tenth of ``preference_steps`` + cosine to 0 over them."""
    text_warmup = max(1, cfg.preference_steps // 10)
    return lambda s: (warmup_cosine(s, cfg.warmup_steps, cfg.steps) if s < cfg.steps
                      else warmup_cosine(s - cfg.steps, text_warmup, cfg.preference_steps))


class EvaluatorLoop(TrainingLoop):
    """The evaluator's training (module docstring); ``finish`` saves it to the stage folder."""

    def __init__(self, ecfg: EvaluatorConfig, train_split: Any, val_split: Any | None, settings: LoopSettings,
                 preference_pairs: PreferencePairs | None = None, **loop_kwargs: Any):
        if ecfg.preference_pairs and preference_pairs is None:
            raise ValueError(f"evaluator.preference_pairs is {ecfg.preference_pairs} but this data gives no caption pairs "
                             "to order (the shapes data does); set evaluator.preference_pairs=0")
        super().__init__(settings, **loop_kwargs)
        self.ecfg, self.train_split, self.val_split, self.pair_fn = ecfg, train_split, val_split, preference_pairs

    def setup(self, start_step: int) -> None:
        c, device = self.ecfg, self.acc.device
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        self.model_cfg = c.model_cfg()
        self.name, model, self.tokenizer, self.preprocess = build_dual_encoder(c.model_name, self.model_cfg, device)
        import open_clip

        self.images, self.captions = images_and_captions(self.train_split)
        self.batch = min(c.batch_size, len(self.captions))
        self.groups = dict(c.attribute_groups)
        self.ref_sets = [set(x) for x in self.captions]
        self.clip_loss = open_clip.ClipLoss()
        self.neighbours: torch.Tensor | None = None  # [N, k] nearest train images, re-mined periodically
        self.n_neg = c.swap_negatives + c.neighbour_negatives
        self.history: dict[str, float] = {}
        if self.val_split is not None:
            self.history = {f"init/{k}": v for k, v in self._evaluate(model).items()}
        model.train()
        # One optimizer over both phases: at the text-only phase its state is reset and the image tower
        # gets no gradient, which is exactly a fresh AdamW over the text tower.
        self.optimizer = torch.optim.AdamW(clip_param_groups(model, c.weight_decay), lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, evaluator_lr(c))
        if start_step > c.steps:
            model.visual.requires_grad_(False)
        self.model = model

    def _evaluate(self, model) -> dict[str, float]:
        c = self.ecfg
        return evaluate_dual_encoder(model, self.tokenizer, self.preprocess, self.val_split, self.groups, c.eval_max_images,
                                     c.seed, self.acc.device, c.text_prefix)

    def _mine_neighbours(self) -> None:
        model = self.model
        model.eval()
        emb = embed_all_images(model, self.preprocess, self.images, self.acc.device)
        sims = emb @ emb.T
        sims.fill_diagonal_(float("-inf"))
        self.neighbours = sims.topk(min(self.ecfg.neighbour_k, len(self.captions) - 1), dim=1).indices.cpu()
        model.train()

    def _negatives(self, idx: list[int], pos: list[str]) -> tuple[list[str], list[bool]]:
        """Per image: ``swap_negatives`` attribute swaps and ``neighbour_negatives`` captions of near images
        (a random other image before the first mining); ``valid`` is False where no real negative exists."""
        c, rng = self.ecfg, self.rng
        negs: list[str] = []
        valid: list[bool] = []
        for i, p in zip(idx, pos):
            for _ in range(c.swap_negatives):
                s = swap_attribute(p[len(c.text_prefix):], self.groups, rng)
                ok = s is not None and s[0] not in self.ref_sets[i]
                negs.append(c.text_prefix + (s[0] if ok else p))
                valid.append(ok)
            for _ in range(c.neighbour_negatives):
                j = (int(rng.choice(self.neighbours[i].tolist())) if self.neighbours is not None
                     else rng.randrange(len(self.captions)))
                cap = rng.choice(self.captions[j])
                negs.append(c.text_prefix + cap)
                valid.append(cap not in self.ref_sets[i])
        return negs, valid

    def train_step(self, step: int) -> StepOutput:
        c, model, device, rng = self.ecfg, self.model, self.acc.device, self.rng
        if step == c.steps and c.preference_steps:  # text-only phase: freeze the image tower (BatchNorm statistics too)
            model.visual.requires_grad_(False)
            self.optimizer.optimizer.state.clear()
        if c.neighbour_negatives and step > 0 and step % c.neighbour_refresh_every == 0 and len(self.captions) > 1:
            self._mine_neighbours()
        if step >= c.steps:
            model.visual.eval()  # again after every evaluation (which restores train mode)
        idx = rng.sample(range(len(self.captions)), self.batch)
        pos = [c.text_prefix + rng.choice(self.captions[i]) for i in idx]
        negs, valid = self._negatives(idx, pos)
        better, worse, pair_owner = [], [], []
        pairs_now = not c.preference_steps or step >= c.steps
        for row, i in enumerate(idx):
            for _ in range(c.preference_pairs if pairs_now else 0):
                for b, w in self.pair_fn(i, rng):
                    better.append(c.text_prefix + b)
                    worse.append(c.text_prefix + w)
                    pair_owner.append(row)
        pix = self.preprocess(image_rows(self.images, idx), device=device)
        tokens = self.tokenizer(pos + negs + better + worse).to(device)
        img_f = model.encode_image(pix, normalize=True)  # [B, D]
        txt_f = model.encode_text(tokens, normalize=True)  # [B + B*H + 2*B*P, D]
        B, n_txt = self.batch, self.batch * (1 + self.n_neg)
        pos_f, neg_f = txt_f[:B], txt_f[B:n_txt].view(B, self.n_neg, -1)
        scale = model.logit_scale.exp()
        loss_clip = self.clip_loss(img_f, pos_f, scale)
        loss, scalars = loss_clip, {"evaluator/contrastive_loss": loss_clip.detach(), "evaluator/logit_scale": scale.detach()}
        if self.n_neg:
            hard = torch.cat([(img_f * pos_f).sum(-1, keepdim=True),
                              torch.einsum("bd,bhd->bh", img_f, neg_f)], dim=1) * scale  # [B, 1+H]
            mask = torch.tensor(valid, device=device).view(B, self.n_neg)
            hard[:, 1:] = hard[:, 1:].masked_fill(~mask, float("-inf"))
            loss_hard = F.cross_entropy(hard, torch.zeros(B, dtype=torch.long, device=device))
            loss = loss + c.hard_negative_weight * loss_hard
            scalars["evaluator/hard_negative_loss"] = loss_hard.detach()
        if better:
            pair_img = img_f[torch.tensor(pair_owner, device=device)]  # [pairs, D]
            b_f, w_f = txt_f[n_txt:n_txt + len(better)], txt_f[n_txt + len(better):]
            loss_pref = F.softplus(scale * ((pair_img * w_f).sum(-1) - (pair_img * b_f).sum(-1))).mean()
            loss = loss + c.preference_weight * loss_pref
            scalars["evaluator/preference_loss"] = loss_pref.detach()
        self.last_loss = loss.detach()
        return StepOutput(loss, lambda: scalars)

    def after_update(self, step: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def validate(self, step: int) -> None:
        c = self.ecfg
        if self.val_split is not None and c.eval_every and step > 0 and step % c.eval_every == 0 and step < self.settings.steps - 1:
            self.acc.log({f"evaluator/val_{k}": v for k, v in self._evaluate(self.model).items()}, step=step)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "neighbours": self.neighbours}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.neighbours = state["neighbours"]

    def finish(self, train_seconds: float) -> dict:
        c, model = self.ecfg, self.acc.unwrap_model(self.model)
        model.eval()
        metrics: dict[str, float] = {"final_loss": float(self.last_loss), **self.history}
        if self.val_split is not None:
            metrics.update(self._evaluate(model))
            self.acc.log({f"evaluator/val_{k}": v for k, v in metrics.items()}, step=self.settings.steps)
        save_dual_encoder(model, self.stage_dir, "evaluator", self.name, self.model_cfg,
                          {"w": c.score_w, "text_prefix": c.text_prefix, "clamp": True,
                           "metrics": metrics, "config": dataclasses.asdict(c)})
        log.debug("train-evaluator: saved to %s (%s)", self.stage_dir, metrics)
        return metrics


def loop_settings(ecfg: EvaluatorConfig, stage_dir: Path, **fields: Any) -> LoopSettings:
    return LoopSettings(stage_dir=stage_dir, section="evaluator", steps=ecfg.steps + ecfg.preference_steps,
                        log_every=ecfg.log_every, checkpoint_every=ecfg.checkpoint_every, eval_every=1,
                        advice=f"Lower evaluator.lr (now {ecfg.lr})", hparams=dataclasses.asdict(ecfg), **fields)


def train_evaluator(cfg: EvaluatorConfig, train_split: Any, val_split: Any | None, out_dir: str | Path,
                    preference_pairs: PreferencePairs | None = None, resume: bool = False,
                    on_log: Callable[[dict[str, float], int], None] | None = None, device: str = "auto") -> dict:
    """Train the learned evaluator on ``train_split`` and save it to ``out_dir``; returns its report
    (``val_split`` metrics before and after training, see `rewards.evaluator.evaluate_dual_encoder`).

    ``train_split`` / ``val_split``: CaptionSplit-like (``images`` uint8 [N,H,W,3] or image paths,
    ``captions`` list of reference lists). ``preference_pairs(i, rng) -> [(better, worse), ...]``: pairs
    of captions of training image i the evaluator must order, drawn ``cfg.preference_pairs`` times per
    image per step. ``on_log(scalars, step)`` sees every logged set of scalars.
    """
    settings = loop_settings(cfg, Path(out_dir), seed=cfg.seed, device=device)
    return EvaluatorLoop(cfg, train_split, val_split, settings, preference_pairs, on_log=on_log).run(resume)


def train_evaluator_stage(cfg: RecipeConfig, resume: bool = False) -> dict:
    """`rlrefine train-evaluator`: the learned evaluator on the recipe's data -> <run_dir>/evaluator."""
    import json

    from rlrefine.data.sources import load_splits
    from rlrefine.trainers.model_card import scalars_table, write_model_card

    splits = load_splits(cfg.data)
    train, val = splits["train"], splits["val"]
    shapes = cfg.data.kind == "shapes"
    salient = shapes and cfg.data.shapes.references == "salient"
    if salient:  # the teacher learns from descriptions of every object, as PAC-S from curated data
        from rlrefine.data.shapes import complete_descriptions

        size = cfg.data.shapes.image_size
        train = dataclasses.replace(train, captions=complete_descriptions(train, size, seed=cfg.seed + 1))
        val = dataclasses.replace(val, captions=complete_descriptions(val, size, seed=cfg.seed + 2))
    pairs = None
    if shapes and cfg.evaluator.preference_pairs:
        from rlrefine.data.shapes import DEFAULT_HELD_OUT, ordered_descriptions

        size = cfg.data.shapes.image_size
        pairs = lambda i, rng: ordered_descriptions(train.scenes[i], size, rng, exclude=DEFAULT_HELD_OUT)  # noqa: E731
    stage_dir = cfg.run_path / "evaluator"
    settings = loop_settings(cfg.evaluator, stage_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads)
    loop = EvaluatorLoop(cfg.evaluator, train, val, settings, pairs, recipe=cfg)
    report = loop.run(resume)
    if not loop.acc.is_main_process:
        return report
    if salient:
        from rewards import LearnedScore
        from rlrefine.data.shapes_probes import teacher_preferences

        reward = LearnedScore.from_dir(stage_dir, device=loop.acc.device)
        report.update(teacher_preferences(reward, splits["val"], val.captions, cfg.data.shapes.image_size,
                                          cfg.evaluator.eval_max_images, cfg.seed))
    (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
    write_model_card(stage_dir, "Learned evaluator (teacher reward)",
                     "A CLIP-style dual encoder (open_clip classes) trained contrastively with hard negatives "
                     "(`rlrefine train-evaluator`); load it with `rewards.LearnedScore.from_dir`.", cfg, scalars_table(report))
    log.info("evaluator: swap accuracy %.3f (colour %.3f, shape %.3f, relation %.3f), R@1 i2t %.3f, complete description "
             "above every partial reference %.3f, partial description above a misnamed object %.3f",
             *(report.get(k, float("nan")) for k in ("swap_acc", "swap_acc/colour", "swap_acc/shape", "swap_acc/relation",
                                                      "r1_i2t", "complete_over_partial", "partial_over_misnamed")))
    return report
