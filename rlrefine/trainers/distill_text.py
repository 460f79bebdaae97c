"""`distill-reward` with `distill.student_kind: text`: a text student (`rewards.text_student`) on the shared loop.

The student keeps an open_clip image tower as it is (the teacher's, or `distill.image_tower`'s for a teacher
without one, such as the BLIP `itm` head) and trains only a small text tower, with a score scale w and
offset b, so that s = w · cos(E_img^tower, E_txt^student) + b imitates the teacher. The image tower is
frozen: every pair image's embedding is computed once in `setup`, and a step costs text-tower passes only.

* pairs: those of the dual student (`rlrefine.trainers.distill.prepare_pairs`): every reference of an
  image, the captioner's candidates from every layer, and hard pairs (captions of the nearest images in the
  image tower's space); the same held-out split of images;
* loss = ``embedding_weight`` · mean(1 − cos(E_txt^student(c), E_txt^teacher(c))) (only where the teacher's
  text embeddings live in the image tower's space: the teacher *is* the image tower's reward) + ``mse_weight`` ·
  mean (s − t)² + ``listwise_weight`` · `rlrefine.losses.listwise_kl` over each image's pairs;
* the report (`finish`): the dual student's fields on the held-out pairs, from the saved student loaded
  through the reward protocol (`rewards.fidelity.compare_to_teacher`: Spearman, Kendall, per-image Spearman,
  argmax agreement, regret, pairs/s and speed-up; which tower limits it), the decision agreement on the
  captioner's candidates per held-out image and layer, and ``heldout_pairs.json``.

`distill_text_student` is the library entry point (a config, a teacher, a split, an output folder);
`rlrefine.trainers.distill.distill_stage` runs it for a recipe.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.distill import DistilledScore
from rewards.fidelity import HELDOUT_FILE, Pairs, compare_to_teacher, groups_of, ranking_report, save_pairs, score_pairs
from rewards.text_student import TextStudentConfig, TextStudentScore, build_text_student
from rlrefine.losses import listwise_kl
from rlrefine.trainers.distill import candidate_pairs, held_decisions, prepare_pairs
from rlrefine.trainers.evaluator import clip_param_groups
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["TextDistillLoop", "distill_text_student", "text_loop_settings"]


class ScoredText(torch.nn.Module):
    """What the loop trains and checkpoints: the student's text tower and s = w · cos + b's w and b."""

    def __init__(self, text: torch.nn.Module, w: float):
        super().__init__()
        self.text = text
        self.w = torch.nn.Parameter(torch.tensor(float(w)))
        self.b = torch.nn.Parameter(torch.tensor(0.0))


class TextDistillLoop(TrainingLoop):
    """The text student's training (module docstring); ``finish`` saves it and writes the held-out report."""

    def __init__(self, tcfg: TextStudentConfig, teacher: Callable, split: Any, settings: LoopSettings,
                 candidates: Sequence[tuple] | None = None, image_tower: Any = None, **loop_kwargs: Any):
        """``candidates``: ``(image, layer, caption)`` (or ``(image, caption)``) of the captioner; ``image_tower``: the
        open_clip reward whose image tower the student keeps (default: the teacher)."""
        super().__init__(settings, **loop_kwargs)
        self.tcfg, self.teacher, self.split, self.candidates = tcfg, teacher, split, candidates
        self.tower = image_tower if image_tower is not None else teacher

    # -- setup: pairs, the image tower's embeddings, teacher targets, the student ------------------------
    def setup(self, start_step: int) -> None:
        c, device = self.tcfg, self.acc.device
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        data = prepare_pairs(self.teacher, self.split, self.candidates, self.rng, max_images=c.max_images,
                             holdout_fraction=c.holdout_fraction, hard_neighbours=c.hard_neighbours,
                             hard_per_neighbour=c.hard_captions_per_neighbour, teacher_batch_size=c.teacher_batch_size,
                             embed_images=self.tower.embed_images)
        self.images, self.captions, self.uses_refs = data.images, data.captions, data.uses_refs
        self.train_pairs, self.held_pairs = data.train_pairs, data.held_pairs
        self.img_emb = data.image_emb.to(device)  # [n, D] the kept tower's embeddings: exact, computed once
        vocab = None
        if c.tokenizer == "word":  # the student's own word vocabulary: every caption it is trained or tested on
            from rlrefine.data.tokenizer import CaptionTokenizer

            vocab = CaptionTokenizer.train([x for caps in self.captions for x in caps]
                                           + [x for _, x in candidate_pairs(self.candidates) or ()])
        self.student = build_text_student(self.tower, c, vocab)
        self._teacher_targets()
        self.scored = ScoredText(self.student.model.text, self.tower.w).to(device)
        texts = [c.text_prefix + x for x in self.train_pairs.caption]  # tokenized once, not at every step
        self.train_tokens = torch.cat([self.student.tokenizer(texts[i:i + 4096]) for i in range(0, len(texts), 4096)]).to(device)
        self.teacher_all = self.train_pairs.teacher.to(device)
        self.pair_image = self.train_pairs.image.to(device)
        init = ranking_report(self.student_scores(self.held_pairs), self.held_pairs.teacher, self.held_pairs.image, kendall=False)
        self.metrics: dict[str, float] = {f"init/{k}": v for k, v in init.items()}  # the untrained student's baseline
        self.groups = list(groups_of(self.train_pairs.image).items())
        params = clip_param_groups(self.scored.text, c.weight_decay)
        params.append({"params": [self.scored.w, self.scored.b], "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_cosine(s, c.warmup_steps, c.steps))
        self.scored.train()
        self.model = self.scored

    def _teacher_targets(self) -> None:
        """Teacher scores of the train and held-out pairs and, where they share the image tower's space, the teacher's
        text embeddings of the train pairs (the embedding target)."""
        c, teacher, device = self.tcfg, self.teacher, self.acc.device
        same_space = (teacher is self.tower and hasattr(teacher, "embed_texts")
                      and teacher.embed_texts(self.train_pairs.caption[:1]).shape[1] == self.img_emb.shape[1])
        self.t_txt = None
        if c.embedding_weight > 0 and same_space:
            with torch.no_grad():
                self.t_txt = torch.cat([teacher.embed_texts(self.train_pairs.caption[i:i + 4096]).float()
                                        for i in range(0, len(self.train_pairs.caption), 4096)]).to(device)
        if self.t_txt is not None and not self.uses_refs and hasattr(teacher, "score_embeddings"):
            # the teacher's score is its formula on these same embeddings: no second pass over images and captions
            rows = self.train_pairs.image.to(device)
            self.train_pairs.teacher = teacher.score_embeddings(self.img_emb[rows], self.t_txt).float().cpu()
        else:
            self.train_pairs.teacher, _ = score_pairs(teacher, self.images, self.captions, self.train_pairs, self.uses_refs)
        self.held_pairs.teacher, _ = score_pairs(teacher, self.images, self.captions, self.held_pairs, self.uses_refs)

    @torch.no_grad()
    def student_scores(self, pairs: Pairs) -> torch.Tensor:
        """Inference scores of the current student (clamped like the saved reward), from the cached image embeddings."""
        c, device = self.tcfg, self.acc.device
        text = self.student.model.text
        was_training = text.training
        text.eval()
        texts = [c.text_prefix + x for x in pairs.caption]
        txt = torch.cat([F.normalize(text(self.student.tokenizer(texts[i:i + 512]).to(device)).float(), dim=-1)
                         for i in range(0, len(texts), 512)])
        s = self.scored.w * (self.img_emb[pairs.image.to(device)] * txt).sum(-1) + self.scored.b
        text.train(was_training)
        return (s.clamp(min=0) if c.clamp else s).float().cpu()

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepOutput:
        c, device, scored = self.tcfg, self.acc.device, self.scored
        chosen = self.rng.sample(self.groups, min(c.images_per_step, len(self.groups)))
        lists = [self.rng.sample(idx, min(len(idx), c.max_pairs_per_image)) for _, idx in chosen]
        G, P = len(lists), max(len(x) for x in lists)
        flat = torch.tensor([p for x in lists for p in x], device=device)  # [T] the step's pairs
        slot = torch.tensor([g * P + j for g, x in enumerate(lists) for j in range(len(x))], device=device)
        txt = F.normalize(scored.text(self.train_tokens[flat]).float(), dim=-1)  # [T, D]
        s = scored.w * (self.img_emb[self.pair_image[flat]] * txt).sum(-1) + scored.b  # [T] unclamped
        t = self.teacher_all[flat]
        loss_mse = F.mse_loss(s, t)
        S = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), s).view(G, P)  # [G, P] per-image lists
        Tt = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), t).view(G, P)
        loss_list = listwise_kl(S, Tt, c.listwise_temperature)
        loss_emb = torch.zeros((), device=device)
        if self.t_txt is not None:
            loss_emb = (1 - (txt * self.t_txt[flat]).sum(-1)).mean()
        loss = c.mse_weight * loss_mse + c.listwise_weight * loss_list + c.embedding_weight * loss_emb
        return StepOutput(loss, lambda: {
            "distill/score_regression_loss": loss_mse.detach(), "distill/listwise_kl_loss": loss_list.detach(),
            "distill/embedding_loss": loss_emb.detach(), "distill/score_scale_w": scored.w.detach(),
            "distill/score_offset_b": scored.b.detach()})

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])

    def finish(self, train_seconds: float) -> dict:
        c, out_dir = self.tcfg, self.stage_dir
        scored = self.acc.unwrap_model(self.scored)
        scored.eval()
        student = self.student
        student.w, student.bias = scored.w.item(), scored.b.item()
        manifest = {"teacher": repr(self.teacher), "config": dataclasses.asdict(c)}
        student.save(out_dir, manifest)
        save_pairs(self.held_pairs, out_dir / HELDOUT_FILE)
        scorer = DistilledScore.from_dir(out_dir, device=self.acc.device)  # the saved student, through the protocol
        if not isinstance(scorer, TextStudentScore):
            raise RuntimeError(f"{out_dir} did not load back as a text student")
        metrics = dict(self.metrics)
        metrics.update(compare_to_teacher(scorer, self.teacher, self.images, self.captions, self.held_pairs,
                                          repeats=c.timing_repeats))
        metrics.update(held_decisions(scorer, self.teacher, self.images, self.captions, self.held_pairs, self.candidates))
        metrics["train_pairs"] = float(len(self.train_pairs.caption))
        self.acc.log({f"distill/heldout_{k}": v for k, v in metrics.items()}, step=self.settings.steps)
        student.save(out_dir, {**manifest, "metrics": metrics}, weights=False)
        log.debug("distill-reward (text student): saved to %s (%s)", out_dir, metrics)
        return metrics


def text_loop_settings(tcfg: TextStudentConfig, stage_dir: Path, section: str = "distill.text_student",
                       **fields: Any) -> LoopSettings:
    return LoopSettings(stage_dir=stage_dir, section=section, steps=tcfg.steps, log_every=tcfg.log_every,
                        checkpoint_every=tcfg.checkpoint_every, advice=f"Lower {section}.lr (now {tcfg.lr})",
                        hparams=dataclasses.asdict(tcfg), **fields)


def distill_text_student(cfg: TextStudentConfig, teacher: Callable, split: Any, out_dir: str | Path,
                         candidates: Sequence[tuple] | None = None, image_tower: Any = None, resume: bool = False,
                         on_log: Callable[[dict[str, float], int], None] | None = None, device: str = "auto") -> dict:
    """Distil ``teacher`` into a text student saved to ``out_dir``, keeping ``image_tower``'s image tower (an open_clip
    reward; default the teacher, which must then be one); returns the held-out report (the keys of
    `rlrefine.trainers.distill.distill_reward`'s, plus ``decision_agreement`` ... when ``candidates`` are triples).

    ``split``: CaptionSplit-like (``images`` uint8 [N,H,W,3] or paths, ``captions``); ``candidates``: optional
    ``(image_idx, layer, caption)`` (or ``(image_idx, caption)``), e.g. the captioner's candidates from every layer.
    """
    settings = text_loop_settings(cfg, Path(out_dir), seed=cfg.seed, device=device)
    return TextDistillLoop(cfg, teacher, split, settings, candidates, image_tower=image_tower, on_log=on_log).run(resume)
