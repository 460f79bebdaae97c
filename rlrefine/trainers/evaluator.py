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
  (the image tower, which the captioner may reuse as its encoder, stays as contrastive training left it);
* with ``matching_head.steps`` > 0, a last phase trains a matching head (`rewards.matching`) on both towers frozen:
  groups of a true caption and its false variants (an inverted relation, two objects exchanged, a renamed colour or
  shape, a misnamed object) with `rlrefine.losses.matching_losses`, and the grounding loss `matching_head_loss` adds;
  the saved evaluator then scores ``w · cos + λ · (σ(ℓ) − 1)`` and its report's ``swap_acc`` is that score's (the
  dual encoder's own under ``dual_encoder/``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.evaluator import (EvaluatorConfig, build_dual_encoder, embed_all_images, evaluate_dual_encoder,
                               save_dual_encoder, swap_accuracy, swap_attribute)
from rewards.matching import build_matching_head, image_features, save_matching_head, text_features
from rlrefine.config import RecipeConfig
from rlrefine.data.split import image_rows, images_and_captions
from rlrefine.losses import matching_losses
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["EvaluatorLoop", "MatchingBatch", "clip_param_groups", "matching_batch", "matching_head_loss", "train_evaluator",
           "train_evaluator_stage"]

PreferencePairs = Callable[[int, random.Random], Sequence[tuple[str, str]]]
# what the matching head learns from training image i: groups (a true caption, its false variants) and places
# (a phrase naming one object, its centre), e.g. rlrefine.data.shapes.MatchingExamples
MatchingExampleFn = Callable[[int, random.Random], Any]


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
    """LR multiplier of the dual encoder over its two phases: warm-up + cosine to 0 over ``steps``; then, for the
    text-only phase, warm-up over a tenth of ``preference_steps`` + cosine to 0 over them (0 after them)."""
    text_warmup = max(1, cfg.preference_steps // 10)
    return lambda s: (warmup_cosine(s, cfg.warmup_steps, cfg.steps) if s < cfg.steps
                      else warmup_cosine(s - cfg.steps, text_warmup, cfg.preference_steps)
                      if s < cfg.steps + cfg.preference_steps else 0.0)


def matching_head_lr(cfg: EvaluatorConfig) -> Callable[[int], float]:
    """LR multiplier of the matching head: 0 until the dual encoder's phases end, then warm-up + cosine to 0."""
    h, start = cfg.matching_head, cfg.steps + cfg.preference_steps
    return lambda s: 0.0 if s < start else warmup_cosine(s - start, h.warmup_steps, h.steps)


@dataclass
class MatchingBatch:
    """The matching head's examples of one step, flattened: captions first, then the grounding phrases."""

    texts: list[str]  # [T] every true and false caption
    owner: list[int]  # [T] the image row of each caption
    label: list[float]  # [T] 1 true, 0 false
    true_of: list[int]  # [T] for a false caption, the position of its group's true caption; -1 for a true one
    phrases: list[str]  # [Q] phrases naming one object each
    phrase_owner: list[int]  # [Q]
    places: list[tuple[float, float]]  # [Q] where each phrase's object is, (x, y) in [-1, 1]


def matching_batch(examples: Sequence[Any], text_prefix: str = "") -> MatchingBatch:
    """Flatten per-image examples (``.groups`` of (true, [false, ...]) and ``.places`` of (phrase, (x, y)))."""
    b = MatchingBatch([], [], [], [], [], [], [])
    for row, ex in enumerate(examples):
        for true, falses in ex.groups:
            at = len(b.texts)
            b.texts += [text_prefix + true] + [text_prefix + f for f in falses]
            b.owner += [row] * (1 + len(falses))
            b.label += [1.0] + [0.0] * len(falses)
            b.true_of += [-1] + [at] * len(falses)
        for phrase, place in ex.places:
            b.phrases.append(text_prefix + phrase)
            b.phrase_owner.append(row)
            b.places.append(place)
    return b


def matching_head_loss(head: torch.nn.Module, batch: MatchingBatch, tokens: torch.Tensor, mask: torch.Tensor,
                       grid: torch.Tensor, pairwise_weight: float, locate_weight: float) -> tuple[torch.Tensor, dict]:
    """The matching head's loss on one batch, from the frozen towers' outputs (``tokens`` / ``mask`` of
    ``batch.texts + batch.phrases``, ``grid`` of its images):

        BCE(ℓ, y) over every caption (true and false ones weighing the same in total)
        +  pairwise_weight · mean softplus(ℓ_false − ℓ_true) within each group
        +  locate_weight · mean_q,axis (locate(phrase_q) − place_q)² over the grounding phrases

    y is 1 / 0 for the evaluator; a student's head takes its teacher's verdicts σ(ℓ_t) as soft targets."""
    device, T = grid.device, len(batch.texts)
    image = head.embed_image(grid)  # [B, G, d], once per image
    text = head.embed_text(tokens)
    long = int(mask[:T].sum(1).max())
    logits = head.match(text[:T, :long], mask[:T, :long], image, torch.tensor(batch.owner, device=device))  # [T]
    target = torch.tensor(batch.label, device=device)
    true_of = torch.tensor(batch.true_of, device=device, dtype=torch.long)
    # true and false captions weigh the same in total (each image brings ~3 false ones per true one): unweighted, the
    # head doubted true complete descriptions (mean σ 0.70) and its gate cost them their lead over partial ones
    loss_match, loss_pair = matching_losses(logits, target, true_of)
    loss = loss_match + pairwise_weight * loss_pair
    false = true_of >= 0
    margin = logits[true_of[false]] - logits[false]  # [F]
    scalars = {"matching/match_loss": loss_match.detach(), "matching/pairwise_loss": loss_pair.detach(),
               "matching/pair_accuracy": (margin > 0).float().mean().detach(),
               "matching/true_accuracy": (logits[target > 0.5] > 0).float().mean().detach(),
               "matching/false_accuracy": (logits[target <= 0.5] < 0).float().mean().detach()}
    if batch.phrases and locate_weight > 0:
        short = int(mask[T:].sum(1).max())  # phrases are a few tokens: drop the captions' padding
        where = head.locate(text[T:, :short], mask[T:, :short], image, torch.tensor(batch.phrase_owner, device=device))
        loss_locate = F.mse_loss(where, torch.tensor(batch.places, device=device, dtype=where.dtype))
        loss = loss + locate_weight * loss_locate
        scalars["matching/locate_loss"] = loss_locate.detach()
    return loss, scalars


class EvaluatorLoop(TrainingLoop):
    """The evaluator's training (module docstring); ``finish`` saves it to the stage folder."""

    def __init__(self, ecfg: EvaluatorConfig, train_split: Any, val_split: Any | None, settings: LoopSettings,
                 preference_pairs: PreferencePairs | None = None, matching_examples: MatchingExampleFn | None = None,
                 **loop_kwargs: Any):
        if ecfg.preference_pairs and preference_pairs is None:
            raise ValueError(f"evaluator.preference_pairs is {ecfg.preference_pairs} but this data gives no caption pairs "
                             "to order (the shapes data does); set evaluator.preference_pairs=0")
        if ecfg.matching_head.steps and matching_examples is None:
            raise ValueError(f"evaluator.matching_head.steps is {ecfg.matching_head.steps} but this data gives no true and "
                             "false captions to match (the shapes data does); set evaluator.matching_head.steps=0")
        super().__init__(settings, **loop_kwargs)
        self.ecfg, self.train_split, self.val_split, self.pair_fn = ecfg, train_split, val_split, preference_pairs
        self.example_fn = matching_examples
        self.head_start = ecfg.steps + ecfg.preference_steps  # the first step of the matching head's phase

    def setup(self, start_step: int) -> None:
        c, device = self.ecfg, self.acc.device
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        self.model_cfg = c.model_cfg()
        self.name, clip, self.tokenizer, self.preprocess = build_dual_encoder(c.model_name, self.model_cfg, device)
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
            self.history = {f"init/{k}": v for k, v in self._evaluate(clip).items()}
        clip.train()
        self.clip, self.head = clip, None
        # One optimizer over every phase: at the text-only phase its state is reset and the image tower gets no
        # gradient, which is exactly a fresh AdamW over the text tower; the matching head's groups have LR 0 (and no
        # gradient) until its phase, where the towers get none.
        groups, lr_lambdas = clip_param_groups(clip, c.weight_decay), [evaluator_lr(c)] * 2
        if c.matching_head.steps:
            self.head = build_matching_head(clip, c.matching_head, c.image_size)
            groups += clip_param_groups(self.head, c.matching_head.weight_decay)
            for g in groups[2:]:
                g["lr"] = c.matching_head.lr
            lr_lambdas += [matching_head_lr(c)] * 2
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambdas)
        if start_step > c.steps:
            clip.visual.requires_grad_(False)
        if self.head is not None and start_step > self.head_start:
            clip.requires_grad_(False)
        # what is trained and checkpointed: the dual encoder, and the head beside it when there is one
        self.model = clip if self.head is None else torch.nn.ModuleDict({"clip": clip, "head": self.head})

    def _evaluate(self, model) -> dict[str, float]:
        c = self.ecfg
        return evaluate_dual_encoder(model, self.tokenizer, self.preprocess, self.val_split, self.groups, c.eval_max_images,
                                     c.seed, self.acc.device, c.text_prefix)

    def _mine_neighbours(self) -> None:
        model = self.clip
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
        c, model, device, rng = self.ecfg, self.clip, self.acc.device, self.rng
        if self.head is not None and step >= self.head_start:
            return self._head_step(step)
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

    def _head_step(self, step: int) -> StepOutput:
        """One step of the matching head on the frozen towers, `matching_head_loss` on each image's examples."""
        c, h, clip, device, rng = self.ecfg, self.ecfg.matching_head, self.clip, self.acc.device, self.rng
        if step == self.head_start:
            clip.requires_grad_(False)
            self.optimizer.optimizer.state.clear()
        clip.eval()
        idx = rng.sample(range(len(self.captions)), min(h.batch_size, len(self.captions)))
        batch = matching_batch([self.example_fn(i, rng) for i in idx], c.text_prefix)
        with torch.no_grad():
            _, grid = image_features(clip.visual, self.preprocess(image_rows(self.images, idx), device=device), h.image_stage)
            _, tokens, mask = text_features(clip, self.tokenizer(batch.texts + batch.phrases).to(device))
        loss, scalars = matching_head_loss(self.head, batch, tokens, mask, grid, h.pairwise_weight, h.locate_weight)
        self.last_loss = loss.detach()
        return StepOutput(loss, lambda: scalars)

    def after_update(self, step: int) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))

    def validate(self, step: int) -> None:
        c = self.ecfg
        if self.val_split is not None and c.eval_every and step > 0 and step % c.eval_every == 0 and step < self.settings.steps - 1:
            self.acc.log({f"evaluator/val_{k}": v for k, v in self._evaluate(self.clip).items()}, step=step)

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "neighbours": self.neighbours}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.neighbours = state["neighbours"]

    def finish(self, train_seconds: float) -> dict:
        c, model = self.ecfg, self.clip
        model.eval()
        metrics: dict[str, float] = {"final_loss": float(self.last_loss), **self.history}
        if self.val_split is not None:
            metrics.update(self._evaluate(model))
        manifest = {"w": c.score_w, "text_prefix": c.text_prefix, "clamp": True, "config": dataclasses.asdict(c)}
        if self.head is not None:
            manifest["matching_head"] = save_matching_head(self.head, self.stage_dir, c.matching_head.score_weight,
                                                           c.matching_head.image_stage)
        save_dual_encoder(model, self.stage_dir, "evaluator", self.name, self.model_cfg, {**manifest, "metrics": metrics})
        if self.head is not None and self.val_split is not None:
            # the swap test again, scored as the saved evaluator scores (w·cos and the head); the dual encoder's own
            # figures stay under dual_encoder/
            from rewards import LearnedScore

            reward = LearnedScore.from_dir(self.stage_dir, device=self.acc.device)
            images, captions = images_and_captions(self.val_split)
            metrics = {**{f"dual_encoder/{k}": v for k, v in metrics.items() if k.startswith("swap_acc")}, **metrics,
                       **swap_accuracy(reward, images, captions, self.groups, c.eval_max_images, c.seed)}
            save_dual_encoder(model, self.stage_dir, "evaluator", self.name, self.model_cfg, {**manifest, "metrics": metrics})
        if self.val_split is not None:
            self.acc.log({f"evaluator/val_{k}": v for k, v in metrics.items()}, step=self.settings.steps)
        log.debug("train-evaluator: saved to %s (%s)", self.stage_dir, metrics)
        return metrics


def loop_settings(ecfg: EvaluatorConfig, stage_dir: Path, **fields: Any) -> LoopSettings:
    return LoopSettings(stage_dir=stage_dir, section="evaluator", steps=ecfg.steps + ecfg.preference_steps + ecfg.matching_head.steps,
                        log_every=ecfg.log_every, checkpoint_every=ecfg.checkpoint_every, eval_every=1,
                        advice=f"Lower evaluator.lr (now {ecfg.lr})", hparams=dataclasses.asdict(ecfg), **fields)


def train_evaluator(cfg: EvaluatorConfig, train_split: Any, val_split: Any | None, out_dir: str | Path,
                    preference_pairs: PreferencePairs | None = None, resume: bool = False,
                    on_log: Callable[[dict[str, float], int], None] | None = None, device: str = "auto",
                    matching_examples: MatchingExampleFn | None = None) -> dict:
    """Train the learned evaluator on ``train_split`` and save it to ``out_dir``; returns its report
    (``val_split`` metrics before and after training, see `rewards.evaluator.evaluate_dual_encoder`).

    ``train_split`` / ``val_split``: CaptionSplit-like (``images`` uint8 [N,H,W,3] or image paths,
    ``captions`` list of reference lists). ``preference_pairs(i, rng) -> [(better, worse), ...]``: pairs
    of captions of training image i the evaluator must order, drawn ``cfg.preference_pairs`` times per
    image per step. ``matching_examples(i, rng)``: what the matching head (``cfg.matching_head.steps`` > 0) learns
    from training image i, ``.groups`` of (a true caption, [false captions]) and ``.places`` of (a phrase naming one
    object, its centre (x, y) in [-1, 1]) (`rlrefine.data.shapes.MatchingExamples`). ``on_log(scalars, step)`` sees
    every logged set of scalars.
    """
    settings = loop_settings(cfg, Path(out_dir), seed=cfg.seed, device=device)
    return EvaluatorLoop(cfg, train_split, val_split, settings, preference_pairs, matching_examples, on_log=on_log).run(resume)


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
    pairs = examples = None
    if shapes and cfg.evaluator.preference_pairs:
        from rlrefine.data.shapes import DEFAULT_HELD_OUT, ordered_descriptions

        size = cfg.data.shapes.image_size
        relations = cfg.evaluator.preference_relations
        pairs = lambda i, rng: ordered_descriptions(train.scenes[i], size, rng, exclude=DEFAULT_HELD_OUT,  # noqa: E731
                                                    relations=relations)
    if shapes and cfg.evaluator.matching_head.steps:
        from rlrefine.data.shapes import DEFAULT_HELD_OUT, matching_examples

        size, fraction = cfg.data.shapes.image_size, cfg.evaluator.matching_head.relation_fraction
        examples = lambda i, rng: matching_examples(train.scenes[i], size, rng, fraction, DEFAULT_HELD_OUT,
                                                    cfg.evaluator.matching_head.axis_negatives)  # noqa: E731
    stage_dir = cfg.run_path / "evaluator"
    settings = loop_settings(cfg.evaluator, stage_dir, seed=cfg.seed, device=cfg.device, threads=cfg.threads)
    loop = EvaluatorLoop(cfg.evaluator, train, val, settings, pairs, examples, recipe=cfg)
    report = loop.run(resume)
    if not loop.acc.is_main_process:
        return report
    if salient:
        from rewards import LearnedScore
        from rewards.evaluator import swap_accuracy
        from rlrefine.data.shapes import complete_descriptions
        from rlrefine.data.shapes_probes import teacher_preferences

        reward = LearnedScore.from_dir(stage_dir, device=loop.acc.device)
        report.update(teacher_preferences(reward, splits["val"], val.captions, cfg.data.shapes.image_size,
                                          cfg.evaluator.eval_max_images, cfg.seed))
        # the swap test on images that each hold a colour-shape pair never seen in training
        novel = splits["test_novel"]
        novel_captions = complete_descriptions(novel, cfg.data.shapes.image_size, seed=cfg.seed + 3)
        report.update({f"test_novel/{k}": v for k, v in swap_accuracy(
            reward, images_and_captions(novel)[0], novel_captions, cfg.evaluator.attribute_groups,
            cfg.evaluator.eval_max_images, cfg.seed).items()})
    (stage_dir / "report.json").write_text(json.dumps(report, indent=1))
    write_model_card(stage_dir, "Learned evaluator (teacher reward)",
                     "A CLIP-style dual encoder (open_clip classes) trained contrastively with hard negatives "
                     "(`rlrefine train-evaluator`); load it with `rewards.LearnedScore.from_dir`.", cfg, scalars_table(report))
    log.info("evaluator: swap accuracy %.3f (colour %.3f, shape %.3f, relation %.3f; test_novel relation %.3f), R@1 i2t "
             "%.3f, complete description above every partial reference %.3f, partial description above a misnamed "
             "object %.3f, true relation above \"and\" %.3f, \"and\" above a false relation %.3f",
             *(report.get(k, float("nan")) for k in ("swap_acc", "swap_acc/colour", "swap_acc/shape", "swap_acc/relation",
                                                      "test_novel/swap_acc/relation", "r1_i2t", "complete_over_partial",
                                                      "partial_over_misnamed", "relation_over_and",
                                                      "and_over_false_relation")))
    return report
