"""`distill-reward`: train a compact student reward (`rewards.distill`) to imitate a teacher, on the shared loop.

DiCO only consumes each image's *ranking* of its candidates (the argmax and the softmax weights), so the
student learns the teacher's scores and, above all, its per-image ordering, on the pairs fine-tuning will
show it:

* pairs: every reference caption of an image; the captioner's own candidates from every layer
  (`rlrefine.trainers.distill_stage.captioner_candidates`); and HELIP-style hard pairs, captions of the images nearest to each image in
  the *teacher's* image-embedding space;
* loss = ``mse_weight`` · mean (s − t)² + ``listwise_weight`` · `rlrefine.losses.listwise_kl` (per-image
  lists) + ``margin_weight`` · `rlrefine.losses.hard_negative_margin` (the image's best reference above its
  hard pairs the teacher scores lower), with t the teacher's scores and s = w · cos + b the student's (w, b
  learned); + ``embedding_weight`` · mean (1 − cos(student emb, teacher emb)) over the step's images and
  captions (feature distillation), plus ``extra_embedding_images`` images beyond ``max_images`` (image side).

Reported on held-out images' pairs (`rewards.fidelity.compare_to_teacher`; the pairs are saved as
``heldout_pairs.json`` so ``benchmarks/distill.py`` can measure them again): Spearman and Kendall with
the teacher, argmax agreement and regret, pairs/s of student and teacher, and which tower limits the
ranking. `distill_reward` is the library entry point (a config, a teacher, a split, an output folder); the
recipe stage is `rlrefine.trainers.distill_stage`. The pair data, the optimizer and the held-out report here are
shared with the text student (`rlrefine.trainers.distill_text`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import random
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.clip_score import OpenCLIPReward
from rewards.distill import DistillConfig, DistilledScore, WordTokens, narrow_resnet_state
from rewards.evaluator import build_dual_encoder, save_dual_encoder
from rewards.fidelity import (CANDIDATE, HARD, HELDOUT_FILE, REF, Pairs, compare_to_teacher, decision_agreement, groups_of,
                              ranking_report, save_pairs, score_pairs)
from rlrefine.data.split import image_rows, images_and_captions
from rlrefine.losses import hard_negative_margin, listwise_kl
from rewards.matching import build_matching_head, image_features, save_matching_head, text_features
from rlrefine.trainers.evaluator import MatchingExampleFn, clip_param_groups, matching_batch, matching_head_loss
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine

log = logging.getLogger(__name__)

__all__ = ["DistillLoop", "build_pairs", "distill_reward", "held_out_report", "prepare_pairs", "student_optimizer",
           "untrained_metrics"]


def build_pairs(captions: list[list[str]], rows: Sequence[int], neighbours: torch.Tensor,
                candidates: Sequence[tuple[int, str]] | None, hard_per_neighbour: int, rng: random.Random) -> Pairs:
    """The (image, caption) pairs of images ``rows``: each reference (REF), each caller candidate of the image
    (CANDIDATE), and ``hard_per_neighbour`` captions of each of its ``neighbours`` (HARD); a caption that occurs
    twice keeps its first kind (a reference stays a reference)."""
    rows_set = set(rows)
    by_image: dict[int, dict[str, int]] = {i: {} for i in rows}
    for i in rows:
        for c in captions[i]:
            by_image[i].setdefault(c, REF)
    for i, c in candidates or ():
        if int(i) in rows_set:
            by_image[int(i)].setdefault(c, CANDIDATE)
    for i in rows:
        for j in neighbours[i].tolist():
            for c in rng.sample(captions[j], min(hard_per_neighbour, len(captions[j]))):
                by_image[i].setdefault(c, HARD)
    image, caption, kind = [], [], []
    for i in rows:
        for c, k in by_image[i].items():
            image.append(i)
            caption.append(c)
            kind.append(k)
    return Pairs(torch.tensor(image), caption, torch.tensor(kind))


@dataclass
class PairData:
    """The pairs a student learns from and is tested on (`prepare_pairs`)."""

    images: Any  # the split's images (uint8 [N, H, W, 3] or paths)
    captions: list[list[str]]  # [N] references per image
    n: int  # images used: rows 0..n-1 (max_images)
    image_emb: torch.Tensor  # [n, D] L2-normalised embeddings of the mining tower (CPU)
    train_pairs: Pairs  # pairs of the training images (teacher scores not yet set)
    held_pairs: Pairs  # pairs of the held-out images (the report's)
    uses_refs: bool  # the teacher reads references (a Ref* reward)
    train_rows: list[int]  # the training images (rows 0..n-1 not held out)


def candidate_pairs(candidates: Sequence[tuple] | None) -> list[tuple[int, str]] | None:
    """``(image, caption)`` pairs of candidates given as pairs or as ``(image, layer, caption)`` triples."""
    return None if candidates is None else [(int(c[0]), c[-1]) for c in candidates]


def prepare_pairs(teacher: Callable, split: Any, candidates: Sequence[tuple] | None, rng: random.Random, *,
                  max_images: int | None, holdout_fraction: float, hard_neighbours: int, hard_per_neighbour: int,
                  teacher_batch_size: int | None = None, embed_images: Callable | None = None) -> PairData:
    """Hold out ``holdout_fraction`` of the first ``max_images`` images (``rng``) and build each side's pairs
    (`build_pairs`): references, the caller's candidates (pairs or triples), and HELIP-style hard pairs, the
    captions of each image's ``hard_neighbours`` nearest images in ``embed_images``' space (default: the teacher's)."""
    images, captions = images_and_captions(split)
    n = len(captions) if max_images is None else min(max_images, len(captions))
    if teacher_batch_size is not None and hasattr(teacher, "batch_size"):
        teacher.batch_size = teacher_batch_size
    embed = embed_images or teacher.embed_images
    with torch.no_grad():
        emb = torch.cat([embed(image_rows(images, range(i, min(i + 256, n)))).float().cpu() for i in range(0, n, 256)])
    sims = emb @ emb.T
    sims.fill_diagonal_(float("-inf"))
    neighbours = sims.topk(min(hard_neighbours, n - 1), dim=1).indices  # [n, k]
    order = list(range(n))
    rng.shuffle(order)
    n_hold = max(1, int(round(holdout_fraction * n)))
    held, train_rows = sorted(order[:n_hold]), sorted(order[n_hold:])
    pairs = candidate_pairs(candidates)
    train_pairs = build_pairs(captions, train_rows, neighbours, pairs, hard_per_neighbour, rng)
    held_pairs = build_pairs(captions, held, neighbours, pairs, hard_per_neighbour, rng)
    return PairData(images, captions, n, emb, train_pairs, held_pairs, bool(getattr(teacher, "uses_references", False)),
                    train_rows)


def held_decisions(student: Callable, teacher: Callable, images: Any, captions: list[list[str]], held_pairs: Pairs,
                   candidates: Sequence[tuple] | None) -> dict[str, float]:
    """Decision agreement on the held-out images (`rewards.fidelity.decision_agreement`): for each image and layer,
    is the student's best of the captioner's candidates (the stage's: ``candidate_beams`` beams + one sample) the
    teacher's? Needs ``(image, layer, caption)`` triples; empty without them."""
    held = set(held_pairs.image.tolist())
    triples = [c for c in candidates or () if len(c) == 3 and int(c[0]) in held]
    if not triples:
        return {}
    d = decision_agreement(student, teacher, images, captions, triples)
    out = {"decisions": float(d["decisions"]), "decision_agreement": d["argmax_agreement"],
           "decision_regret": d["argmax_regret"], "decision_spearman": d["spearman_per_image"]}
    out.update({f"decision_agreement/layer_{row['layer']}": row["argmax_agreement"] for row in d["by_layer"]})
    return out


def untrained_metrics(scores: torch.Tensor, held_pairs: Pairs) -> dict[str, float]:
    """The untrained student's ranking of the held-out pairs, as ``init/<figure>``: the baseline of the report."""
    init = ranking_report(scores, held_pairs.teacher, held_pairs.image, kendall=False)
    return {f"init/{k}": v for k, v in init.items()}


def student_optimizer(tower: torch.nn.Module, scale: list[torch.nn.Parameter], c: Any):
    """AdamW over a student's trained tower (CLIP's weight-decay groups) and its score scale w, b (no decay), with
    warm-up then cosine decay over ``c.steps``: every student kind trains with it."""
    params = clip_param_groups(tower, c.weight_decay)
    params.append({"params": scale, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, c.warmup_steps, c.steps))


class ScoredStudent(torch.nn.Module):
    """The student dual encoder and its score scale ``w`` and offset ``b``: s = w · cos + b; with a matching head
    (`rewards.matching`) s = w · cos + b + λ · (σ(ℓ) − 1), λ the teacher's."""

    def __init__(self, model: torch.nn.Module, w: float, head: torch.nn.Module | None = None):
        super().__init__()
        self.model = model
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.b = torch.nn.Parameter(torch.tensor(0.0))
        self.head = head


class DistillLoop(TrainingLoop):
    """The student's training (module docstring); ``finish`` saves it and writes the held-out report."""

    def __init__(self, dcfg: DistillConfig, teacher: Callable, split: Any, settings: LoopSettings,
                 candidates: Sequence[tuple[int, str]] | None = None, matching_examples: MatchingExampleFn | None = None,
                 **loop_kwargs: Any):
        h = dcfg.matching_head
        if h.steps and matching_examples is None:
            raise ValueError(f"distill.student.matching_head.steps is {h.steps} but this data gives no true and false captions "
                             "to match (the shapes data does); set distill.student.matching_head.steps=0")
        if h.steps and getattr(teacher, "matching_head", None) is None:
            raise ValueError(f"distill.student.matching_head.steps is {h.steps} but the teacher ({type(teacher).__name__}) has no "
                             "matching head to imitate: train one (evaluator.matching_head.steps > 0) or set "
                             "distill.student.matching_head.steps=0")
        super().__init__(settings, **loop_kwargs)
        self.dcfg, self.teacher, self.split, self.candidates = dcfg, teacher, split, candidates
        self.example_fn = matching_examples

    # -- setup: pairs, teacher scores, the student ------------------------------------------------
    def setup(self, start_step: int) -> None:
        c, teacher, device = self.dcfg, self.teacher, self.acc.device
        torch.manual_seed(c.seed)
        self.rng = random.Random(c.seed)
        data = prepare_pairs(teacher, self.split, self.candidates, self.rng, max_images=c.max_images,
                             holdout_fraction=c.holdout_fraction, hard_neighbours=c.hard_neighbours,
                             hard_per_neighbour=c.hard_captions_per_neighbour, teacher_batch_size=c.teacher_batch_size)
        self.images, self.captions, self.uses_refs = data.images, data.captions, data.uses_refs
        self.train_pairs, self.held_pairs = data.train_pairs, data.held_pairs
        self._teacher_targets(data.image_emb, data.n)
        self._head_examples(data.train_rows)
        self._build_student()
        self.metrics: dict[str, float] = untrained_metrics(self.student_scores(self.held_pairs), self.held_pairs)
        self.groups = list(groups_of(self.train_pairs.image).items())
        params = clip_param_groups(self.student.model, c.weight_decay)
        params.append({"params": [self.student.w, self.student.b], "weight_decay": 0.0})
        lambdas = [lambda s: warmup_cosine(s, c.warmup_steps, c.steps) if s < c.steps else 0.0] * len(params)
        if self.student.head is not None:  # LR 0 (and no gradient) until the head's phase, where the towers get none
            h = c.matching_head
            head_groups = clip_param_groups(self.student.head, h.weight_decay)
            for g in head_groups:
                g["lr"] = h.lr
            params += head_groups
            lambdas += [lambda s: 0.0 if s < c.steps else warmup_cosine(s - c.steps, h.warmup_steps, h.steps)] * len(head_groups)
            if start_step > c.steps:
                for p in (self.student.model, self.student.w, self.student.b):
                    p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.teacher_all, self.kind_all = self.train_pairs.teacher.to(device), self.train_pairs.kind.to(device)
        texts = [c.text_prefix + x for x in self.train_pairs.caption]  # tokenized once, not at every step
        self.train_tokens = torch.cat([self.tokenizer(texts[i:i + 4096]) for i in range(0, len(texts), 4096)]).to(device)
        self.student.model.train()
        self.model = self.student

    def _teacher_targets(self, t_emb: torch.Tensor, n: int) -> None:
        """Teacher scores of the train and held-out pairs, and (feature distillation) its embeddings."""
        c, teacher, device = self.dcfg, self.teacher, self.acc.device
        self.t_txt = None
        if c.embedding_weight > 0:
            if not hasattr(teacher, "embed_texts") or t_emb.shape[1] != c.embed_dim:
                raise ValueError(f"distill embedding_weight > 0 needs a teacher with embed_texts and student embed_dim "
                                 f"equal to the teacher's ({t_emb.shape[1]}); got embed_dim={c.embed_dim}. Set "
                                 f"embed_dim={t_emb.shape[1]} or embedding_weight=0.")
            with torch.no_grad():
                self.t_txt = torch.cat([teacher.embed_texts(self.train_pairs.caption[i:i + 4096]).float().cpu()
                                        for i in range(0, len(self.train_pairs.caption), 4096)])
        # with a head of its own the student's towers imitate the teacher's dual encoder (w·cos) and its head the
        # teacher's head; without one they imitate the teacher's whole score
        towers_only = getattr(teacher, "matching_head", None) is None or c.matching_head.steps > 0
        if (self.t_txt is not None and not self.uses_refs and type(teacher).__call__ is OpenCLIPReward.__call__
                and towers_only):
            # that __call__ is score_embeddings on these same embeddings; calling it would encode every
            # training image and caption again (about 15 s of the tiny recipe's 5-minute stage)
            self.train_pairs.teacher = teacher.score_embeddings(t_emb[self.train_pairs.image], self.t_txt).float().cpu()
        else:
            self.train_pairs.teacher, _ = score_pairs(teacher, self.images, self.captions, self.train_pairs, self.uses_refs)
        self.held_pairs.teacher, _ = score_pairs(teacher, self.images, self.captions, self.held_pairs, self.uses_refs)
        self.extra: list[int] = []
        if self.t_txt is not None:
            self.t_txt, self.t_img = self.t_txt.to(device), t_emb.to(device)
            # images beyond the pair images (rows n, n+1, ...): only their teacher image embeddings are used
            self.extra = list(range(n, min(len(self.captions), n + c.extra_embedding_images)))
            if self.extra:
                with torch.no_grad():
                    self.t_extra = torch.cat([teacher.embed_images(image_rows(self.images, self.extra[i:i + 256])).float().cpu()
                                              for i in range(0, len(self.extra), 256)]).to(device)

    def _head_examples(self, train_rows: Sequence[int]) -> None:
        """The matching head's examples (true and false captions, grounding phrases) of the first
        ``head_example_images`` training images, each caption's teacher verdict σ(ℓ_t) computed once."""
        c, teacher = self.dcfg, self.teacher
        self.examples: list[tuple[int, Any, list[float]]] = []  # (image row, its examples, teacher σ per caption)
        if not c.matching_head.steps:
            return
        rows = list(train_rows)[:c.head_example_images]
        rng = random.Random(c.seed + 1)  # not the towers' RNG: with or without a head they train the same
        drawn = [self.example_fn(i, rng) for i in rows]
        batch = matching_batch(drawn)
        _, logits = teacher.match_logits(image_rows(self.images, rows), batch.texts, torch.tensor(batch.owner))
        verdict = torch.sigmoid(logits).cpu().tolist()
        at = 0
        for i, ex in zip(rows, drawn):
            n = sum(1 + len(falses) for _, falses in ex.groups)
            self.examples.append((i, ex, verdict[at:at + n]))
            at += n

    def _build_student(self) -> None:
        c, device = self.dcfg, self.acc.device
        self.vocab = None
        if c.tokenizer == "word":  # the student's own word vocabulary: every caption it is trained or tested on
            from rlrefine.data.tokenizer import CaptionTokenizer

            self.vocab = CaptionTokenizer.train([x for caps in self.captions for x in caps]
                                                + [x for _, x in candidate_pairs(self.candidates) or ()])
        self.model_cfg = c.model_cfg(self.vocab)
        self.name, model, self.tokenizer, self.preprocess = build_dual_encoder(c.model_name, self.model_cfg, device)
        if self.vocab is not None:
            self.tokenizer = WordTokens(self.vocab, c.context_length)
        if c.vision_init == "teacher":
            t_model = getattr(self.teacher, "model", None)
            if t_model is None or not hasattr(t_model, "visual"):
                raise ValueError(f"distill vision_init=teacher needs an open_clip teacher (a .model.visual image tower); "
                                 f"{type(self.teacher).__name__} has none. Use vision_init=random.")
            model.visual.load_state_dict(narrow_resnet_state(t_model.visual, model.visual))
        # channels-last convolutions train the small ResNet faster on CPU (64 images fwd + bwd: 58 -> 41 ms);
        # the saved weights are contiguous again (save_dual_encoder), and scoring is unchanged
        model.visual.to(memory_format=torch.channels_last)
        self.nhwc = partial(torch.Tensor.contiguous, memory_format=torch.channels_last)
        head = None
        if c.matching_head.steps:
            head = build_matching_head(model, c.matching_head, c.image_size)
        self.student = ScoredStudent(model, float(getattr(self.teacher, "w", 2.5)), head).to(device)

    @torch.no_grad()
    def student_scores(self, pairs: Pairs) -> torch.Tensor:
        """Inference scores of the current student (clamped like the saved reward)."""
        c, device, model = self.dcfg, self.acc.device, self.student.model
        model.eval()
        rows = sorted(set(pairs.image.tolist()))
        local = {r: k for k, r in enumerate(rows)}
        img = torch.cat([model.encode_image(self.preprocess(image_rows(self.images, rows[i:i + 256]), device=device),
                                            normalize=True) for i in range(0, len(rows), 256)])
        texts = [c.text_prefix + x for x in pairs.caption]
        txt = torch.cat([model.encode_text(self.tokenizer(texts[i:i + 512]).to(device), normalize=True)
                         for i in range(0, len(texts), 512)])
        own = torch.tensor([local[i] for i in pairs.image.tolist()], device=device)
        s = self.student.w * (img[own] * txt).sum(-1) + self.student.b
        model.train()
        return (s.clamp(min=0) if c.clamp else s).float().cpu()

    # -- the step ---------------------------------------------------------------------------------
    def _head_step(self, step: int) -> StepOutput:
        """One step of the student's matching head on its frozen towers: `matching_head_loss` with the teacher's
        verdicts σ(ℓ_t) as the targets of the match cross-entropy."""
        c, h, device, rng, student = self.dcfg, self.dcfg.matching_head, self.acc.device, self.rng, self.student
        if step == c.steps:
            for p in (student.model, student.w, student.b):
                p.requires_grad_(False)
            self.optimizer.optimizer.state.clear()
        student.model.eval()
        chosen = rng.sample(self.examples, min(h.batch_size, len(self.examples)))
        batch = matching_batch([ex for _, ex, _ in chosen], c.text_prefix)
        batch.label = [v for _, _, verdict in chosen for v in verdict]
        pix = self.nhwc(self.preprocess(image_rows(self.images, [i for i, _, _ in chosen]), device=device))
        with torch.no_grad():
            _, grid = image_features(student.model.visual, pix, h.image_stage)
            _, tokens, mask = text_features(student.model, self.tokenizer(batch.texts + batch.phrases).to(device))
        loss, scalars = matching_head_loss(student.head, batch, tokens, mask, grid, h.pairwise_weight, h.locate_weight)
        return StepOutput(loss, lambda: scalars)

    def train_step(self, step: int) -> StepOutput:
        c, device, rng, student = self.dcfg, self.acc.device, self.rng, self.student
        if student.head is not None and step >= c.steps:
            return self._head_step(step)
        chosen = rng.sample(self.groups, min(c.images_per_step, len(self.groups)))
        rows = [r for r, _ in chosen]
        lists = [rng.sample(idx, min(len(idx), c.max_pairs_per_image)) for _, idx in chosen]
        G, P = len(lists), max(len(x) for x in lists)
        flat = [p for x in lists for p in x]
        slot = torch.tensor([g * P + j for g, x in enumerate(lists) for j in range(len(x))], device=device)
        owner = torch.tensor([g for g, x in enumerate(lists) for _ in x], device=device)
        pix = self.nhwc(self.preprocess(image_rows(self.images, rows), device=device))
        flat_idx = torch.tensor(flat, device=device)  # [T] the step's pairs
        img_f = student.model.encode_image(pix, normalize=True)  # [G, D]
        txt_f = student.model.encode_text(self.train_tokens[flat_idx], normalize=True)  # [T, D]
        s = student.w * (img_f[owner] * txt_f).sum(-1) + student.b  # [T] student scores (unclamped)
        t, kind = self.teacher_all[flat_idx], self.kind_all[flat_idx]
        loss_mse = F.mse_loss(s, t)
        # per-image lists padded to [G, P]
        S = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), s).view(G, P)
        Tt = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), t).view(G, P)
        K = torch.full((G * P,), -1, device=device, dtype=torch.long).index_put((slot,), kind).view(G, P)
        loss_list = listwise_kl(S, Tt, c.listwise_temperature)
        loss_margin = hard_negative_margin(S, Tt, K, c.margin, REF, HARD)
        loss = c.mse_weight * loss_mse + c.listwise_weight * loss_list + c.margin_weight * loss_margin
        loss_emb = torch.zeros((), device=device)
        if self.t_txt is not None:
            loss_emb = ((1 - (img_f * self.t_img[torch.tensor(rows, device=device)]).sum(-1)).mean()
                        + (1 - (txt_f * self.t_txt[flat_idx]).sum(-1)).mean())
            if self.extra:
                pick = rng.sample(range(len(self.extra)), min(c.images_per_step, len(self.extra)))
                e_f = student.model.encode_image(self.nhwc(self.preprocess(image_rows(self.images, [self.extra[i] for i in pick]),
                                                                           device=device)), normalize=True)
                loss_emb = loss_emb + (1 - (e_f * self.t_extra[torch.tensor(pick, device=device)]).sum(-1)).mean()
            loss = loss + c.embedding_weight * loss_emb
        return StepOutput(loss, lambda: {
            "distill/score_regression_loss": loss_mse.detach(), "distill/listwise_kl_loss": loss_list.detach(),
            "distill/hard_margin_loss": loss_margin.detach(), "distill/embedding_loss": loss_emb.detach(),
            "distill/score_scale_w": student.w.detach(), "distill/score_offset_b": student.b.detach()})

    def extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])

    def finish(self, train_seconds: float) -> dict:
        c, out_dir, student = self.dcfg, self.stage_dir, self.acc.unwrap_model(self.student)
        student.model.eval()
        manifest = {"w": student.w.item(), "bias": student.b.item(), "text_prefix": c.text_prefix, "clamp": c.clamp,
                    "tokenizer": c.tokenizer, "teacher": repr(self.teacher), "config": dataclasses.asdict(c)}
        if student.head is not None:
            manifest["matching_head"] = save_matching_head(student.head, out_dir, self.teacher.head_weight,
                                                           c.matching_head.image_stage)
        if self.vocab is not None:
            self.vocab.save(out_dir)
        save_dual_encoder(student.model, out_dir, "student", self.name, self.model_cfg, manifest)
        # held-out report, with the saved student loaded through the reward protocol
        save_pairs(self.held_pairs, out_dir / HELDOUT_FILE)
        scorer = DistilledScore.from_dir(out_dir, device=self.acc.device)
        metrics = held_out_report(self, scorer, c.timing_repeats)
        save_dual_encoder(student.model, out_dir, "student", self.name, self.model_cfg, {**manifest, "metrics": metrics})
        log.debug("distill-reward: saved to %s (%s)", out_dir, metrics)
        return metrics


def held_out_report(loop: Any, scorer: Callable, timing_repeats: int) -> dict[str, float]:
    """A distillation loop's final report: the saved student (``scorer``, loaded through the reward protocol) against
    the teacher on the held-out pairs (ranking, speed, the decisions of the captioner's candidates), beside the
    untrained student's figures; logged to the stage's TensorBoard run."""
    metrics = dict(loop.metrics)
    metrics.update(compare_to_teacher(scorer, loop.teacher, loop.images, loop.captions, loop.held_pairs,
                                      repeats=timing_repeats))
    metrics.update(held_decisions(scorer, loop.teacher, loop.images, loop.captions, loop.held_pairs, loop.candidates))
    metrics["train_pairs"] = float(len(loop.train_pairs.caption))
    loop.acc.log({f"distill/heldout_{k}": v for k, v in metrics.items()}, step=loop.settings.steps)
    return metrics


def loop_settings(dcfg: DistillConfig, stage_dir: Path, **fields: Any) -> LoopSettings:
    return LoopSettings(stage_dir=stage_dir, section="distill.student", steps=dcfg.steps + dcfg.matching_head.steps,
                        log_every=dcfg.log_every,
                        checkpoint_every=dcfg.checkpoint_every, advice=f"Lower distill.student.lr (now {dcfg.lr})",
                        hparams=dataclasses.asdict(dcfg), **fields)


def distill_reward(cfg: DistillConfig, teacher: Callable, split: Any, out_dir: str | Path,
                   candidates: Sequence[tuple[int, str]] | None = None, resume: bool = False,
                   on_log: Callable[[dict[str, float], int], None] | None = None, device: str = "auto",
                   matching_examples: MatchingExampleFn | None = None) -> dict:
    """Distil ``teacher`` (any protocol reward with ``embed_images``; a ``Ref*`` teacher gets each image's
    references) into a compact student saved to ``out_dir``; returns the held-out report (``spearman``,
    ``kendall``, ``spearman_per_image``, ``argmax_agreement``, ``init/...`` for the untrained student,
    ``pairs_per_s_student`` / ``pairs_per_s_teacher``, ``speedup``, ...).

    ``split``: CaptionSplit-like (``images`` uint8 [N,H,W,3] or paths, ``captions``); ``candidates``:
    optional ``(image_idx, caption)`` pairs, e.g. the captioner's candidates from every layer;
    ``matching_examples(i, rng)``: what the student's matching head (``cfg.matching_head.steps`` > 0) learns from
    training image i (`rlrefine.data.shapes.MatchingExamples`), with the teacher's verdicts as targets.
    """
    settings = loop_settings(cfg, Path(out_dir), seed=cfg.seed, device=device)
    return DistillLoop(cfg, teacher, split, settings, candidates, matching_examples, on_log=on_log).run(resume)
