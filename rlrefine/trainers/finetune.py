"""Fine-tuning with a reward applied at every refinement layer, for any registered method (`rlrefine.methods`).

One step, for a batch of B images and the L configured layers:

1. candidates: n captions per image and layer from the current policy, drawn as the method draws them
   (`Method.generate`: DiCO's beams, SCST's and GRPO's samples), plus the greedy captions of layer 0 (z_0)
   and layer K (and of any layer whose greedy reward the method's loss needs), all with the same z_0
   seeds; no grad.
2. rewards of all candidates and anchors in one batched call; shaped rewards
   r̃_k = r − λ_grad·|p_k − (1 − s(k))|·[k<K] − λ_len·excess length over the layer's budget.
3. policy log-probs (with grad) and frozen-reference log-probs (no grad) of every candidate, each in one
   forward over the generated tokens with the same z_0 (per token for token-level methods);
   the method's loss per layer (`Method.layer_loss`).
4. L = Σ_k w_k L_k / Σ_k w_k (+ kl_coef · mean(log π − log π_ref)).

A method may take several optimizer steps on one generation (`Method.updates_per_rollout`): the rollout,
its batch and the policy's log-probs at generation time are kept for those steps.

Logged per layer (TensorBoard, TRL-style names): `layer_k/reward` (mean, and `reward_std`, `reward_best`),
`layer_k/shaped_reward`, `layer_k/progress` vs `layer_k/progress_target`, `layer_k/length`, `layer_k/kl_ref`
and the method's own scalars (DiCO: `layer_k/rewards/chosen|rejected|margins|accuracies`); for a `sum`
reward every term, unweighted, as `reward_terms/<name>` and `layer_k/reward_terms/<name>`; sample
captions of fixed val images at every layer. Outputs: `<run_dir>/<output>/model` (the fine-tuned
captioner), `report.json` (with the data-issue counts), checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from trl.trainer.utils import disable_dropout_in_model

from rlrefine.config import FinetuneSection, RecipeConfig
from rlrefine.data.batches import batch_stream, drop_unreadable, step_z0_seeds
from rlrefine.data.sources import load_splits
from rlrefine.data.tokenizer import CaptionTokenizer
from rlrefine.losses import embedding_progress, kl_to_reference, layer_weights, schedule, shape_rewards
from rlrefine.methods import METHODS, LayerInputs, Method
from rlrefine.models import RefinementCaptioner
from rlrefine.trainers.loop import LoopSettings, StepOutput, TrainingLoop, warmup_cosine
from rlrefine.trainers.model_card import render_model_card
from rlrefine.trainers.pretrain import greedy_captions

log = logging.getLogger(__name__)

__all__ = ["FinetuneLoop", "Generation", "Rollout", "SequenceScorer", "compute_loss", "finetune", "policy_loss", "rollout",
           "word_lengths"]


class SequenceScorer(torch.nn.Module):
    """`forward` = the captioner's `sequence_logprobs` (or, per token, `token_logprobs`), so the gradient pass
    goes through the accelerate-prepared (DDP / FSDP) wrapper and gradients are synchronised across processes."""

    def __init__(self, captioner: RefinementCaptioner):
        super().__init__()
        self.captioner = captioner

    def tie_weights(self) -> None:
        """accelerate's FSDP2 preparation re-ties weights through this (`RefinementCaptioner.tie_weights`)."""
        self.captioner.tie_weights()

    def forward(self, pixels, z0_seed, layers, tokens, per_token: bool = False, entropy: bool = False):
        if per_token:
            return self.captioner.token_logprobs(pixels, z0_seed, layers, tokens, entropy=entropy)
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
    greedy_rewards: torch.Tensor | None  # [B, L] raw reward of each layer's greedy caption (when the method asks)
    terms: dict[str, torch.Tensor] | None = None  # name -> [B, L, n] unweighted term scores (a `sum` reward)


def check_shaping_reward(f: FinetuneSection, reward) -> None:
    """Fail before training when the shaping cannot measure progress with this reward."""
    if f.shaping_progress == "embedding" and f.lambda_grad > 0 and not hasattr(reward, "embed_texts"):
        raise ValueError(f"{f.output}.shaping_progress: embedding needs a reward with text embeddings (embed_texts), and "
                         f"reward kind {f.reward.kind!r} has none; set {f.output}.shaping_progress=reward")


def _score(reward, images, texts, references, image_index) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """One batched reward call; a `sum` reward also hands back its terms, unweighted."""
    if hasattr(reward, "term_scores"):  # rewards.weighted.WeightedSum: score once, keep every term
        term_scores = reward.term_scores(images, texts, references=references, image_index=image_index)
        return torch.as_tensor(reward.combine(term_scores)).float().cpu(), term_scores
    return torch.as_tensor(reward(images, texts, references=references, image_index=image_index)).float().cpu(), None


@torch.no_grad()
def rollout(policy: RefinementCaptioner, method: Method, reward, images: torch.Tensor, pixels: torch.Tensor,
            seeds: torch.Tensor, layers: list[int], f: FinetuneSection, tokenizer, sched: torch.Tensor,
            generator: torch.Generator | None = None, references: list[list[str]] | None = None) -> Rollout:
    """Generate the method's candidates at every configured layer, score them in one call, shape the rewards.

    ``references``: the B images' reference captions (for rewards that use them: cider, refclip, ...).
    A `sum` reward's terms are kept, unweighted, in ``Rollout.terms`` for logging."""
    K = policy.config.num_refine_layers
    B, L = pixels.shape[0], len(layers)
    was_training = policy.training
    policy.eval()
    gen = method.generate(policy, pixels, seeds, layers, generator)
    n = gen.tokens.shape[2]  # candidates per image and layer, as the method draws them
    # greedy anchors: layer 0 (r_0) and layer K (r_K) for progress, and the layers of the method's baseline
    baseline_layers = method.greedy_layers(layers)
    anchor_layers = sorted(set([0, K] + baseline_layers))
    greedy = policy.generate(pixels, seeds, anchor_layers, method="greedy", num_candidates=1, max_len=f.max_len)
    policy.train(was_training)

    cand_text = [c for per_img in tokenizer.decode_batch(gen.tokens.cpu()) for per_layer in per_img for c in per_layer]
    anchor_text = [row[0] for per_img in tokenizer.decode_batch(greedy.tokens.cpu()) for row in per_img]
    texts = cand_text + anchor_text
    image_index = torch.cat([torch.arange(B).repeat_interleave(L * n), torch.arange(B).repeat_interleave(len(anchor_layers))])
    scores, term_scores = _score(reward, images, texts, references, image_index)
    terms = None if term_scores is None else {k: v.float().cpu()[: B * L * n].view(B, L, n) for k, v in term_scores.items()}
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
    greedy_r = anchors[:, [anchor_layers.index(k) for k in layers]] if baseline_layers else None
    return Rollout(gen.tokens, cand_text, r, shaped, progress, greedy_r, terms)


@dataclass
class Generation:
    """One batch and its rollout, and what the steps that share them need (`Method.updates_per_rollout`)."""

    pixels: torch.Tensor  # [B, 3, H, W] preprocessed
    seeds: torch.Tensor  # [B] z_0 seeds
    ro: Rollout
    tokens: torch.Tensor  # [B, L, n, T] on the device
    lengths: torch.Tensor  # [B, L, n] generated tokens
    old_token_logps: torch.Tensor | None = None  # [B, L, n, T-1] the policy's at generation time


def generation_of(ro: Rollout, pixels: torch.Tensor, seeds: torch.Tensor, pad_id: int) -> Generation:
    tokens = ro.tokens.to(pixels.device)
    return Generation(pixels, seeds, ro, tokens, (tokens[..., 1:] != pad_id).sum(-1).float())


def layer_losses(method: Method, pol: torch.Tensor, ref: torch.Tensor, gen: Generation, tok=None,
                 ref_tok: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """The method's loss at every layer ([B, L, n] sequence log-probs; per token in ``tok`` / ``ref_tok`` for
    token-level methods) -> (losses [L], scalars [L], each with ``kl_ref``)."""
    ro, device = gen.ro, pol.device
    losses, metrics = [], []
    for l in range(pol.shape[1]):
        x = LayerInputs(logps=pol[:, l], ref_logps=ref[:, l], rewards=ro.rewards[:, l].to(device),
                        shaped=ro.shaped[:, l].to(device), lengths=gen.lengths[:, l].to(device),
                        greedy_rewards=None if ro.greedy_rewards is None else ro.greedy_rewards[:, l].to(device))
        if tok is not None:
            x.token_logps, x.ref_token_logps, x.mask = tok.logprobs[:, l].float(), ref_tok[:, l], tok.mask[:, l]
            x.entropy = None if tok.entropy is None else tok.entropy[:, l]
            x.old_token_logps = None if gen.old_token_logps is None else gen.old_token_logps[:, l]
        loss, m = method.layer_loss(x)
        m = {k: float(v) for k, v in m.items() if isinstance(v, (float, int)) or (torch.is_tensor(v) and v.numel() == 1)}
        m["kl_ref"] = float(kl_to_reference(pol[:, l].detach(), ref[:, l]))
        losses.append(loss)
        metrics.append(m)
    return losses, metrics


def policy_loss(scorer: torch.nn.Module, reference: RefinementCaptioner, method: Method, gen: Generation,
                layers: list[int], weights: torch.Tensor, kl_coef: float, acc) -> tuple[torch.Tensor, list[dict]]:
    """Step 3–4 on a rollout: policy log-probs (with grad, through the accelerate-prepared ``scorer``) and
    reference log-probs (no grad), the method's loss per layer, and L = Σ_k w_k L_k / Σ_k w_k."""
    scorer.train()
    with acc.autocast():
        tok = ref_tok = None
        if method.token_level:
            tok = scorer(gen.pixels, gen.seeds, layers, gen.tokens, per_token=True, entropy=True)
            pol = tok.logprobs.float().sum(-1)
            with torch.no_grad():
                ref_tok = reference.token_logprobs(gen.pixels, gen.seeds, layers, gen.tokens).logprobs.float()
            ref = ref_tok.sum(-1)
        else:
            pol = scorer(gen.pixels, gen.seeds, layers, gen.tokens)  # [B, L, n], with grad
            with torch.no_grad():
                ref = reference.sequence_logprobs(gen.pixels, gen.seeds, layers, gen.tokens)
        losses, metrics = layer_losses(method, pol.float(), ref.float(), gen, tok, ref_tok)
        w = weights.to(gen.pixels.device)
        loss = (torch.stack(losses) * w).sum() / w.sum()
        if kl_coef > 0:
            loss = loss + kl_coef * (pol - ref).mean()
    return loss, metrics


def compute_loss(core: RefinementCaptioner, scorer, reference: RefinementCaptioner, method: Method, reward,
                 images: torch.Tensor, pixels: torch.Tensor, seeds: torch.Tensor, layers: list[int], f: FinetuneSection,
                 tokenizer, sched: torch.Tensor, weights: torch.Tensor, acc, generator: torch.Generator | None = None,
                 references: list[list[str]] | None = None) -> tuple[torch.Tensor, Rollout, list[dict]]:
    """One fine-tuning step's loss: the rollout (no grad), then `policy_loss`. ``core`` is the bare policy (for
    generation), ``scorer`` the accelerate-prepared `SequenceScorer` around it (for the gradient pass)."""
    ro = rollout(core, method, reward, images, pixels, seeds, layers, f, tokenizer, sched, generator, references)
    loss, metrics = policy_loss(scorer, reference, method, generation_of(ro, pixels, seeds, tokenizer.pad_id), layers,
                                weights, f.kl_coef, acc)
    return loss, ro, metrics


class FinetuneLoop(TrainingLoop):
    """Fine-tuning on the shared loop (module docstring); the method is a registered part."""

    def __init__(self, cfg: RecipeConfig, on_step_end: Callable[..., None] | None = None):
        f = cfg.finetune
        self.cfg = cfg
        hparams = {**f.model_dump(exclude={name for name in METHODS}), **{f"{f.method}.{k}": v for k, v in f.method_config.model_dump().items()}}
        super().__init__(LoopSettings.of_recipe(
            cfg, f.output, "finetune", steps=f.steps, log_every=f.log_every, checkpoint_every=f.checkpoint_every,
            eval_every=f.eval_every, grad_clip=f.grad_clip, max_nonfinite_steps=f.max_nonfinite_steps,
            mixed_precision=f.mixed_precision, hparams=hparams,
            advice=f"Lower finetune.lr (now {f.lr}) or the {f.method} loss's scale"), on_step_end, recipe=cfg)

    def setup(self, start_step: int) -> None:
        cfg, f, acc = self.cfg, self.cfg.finetune, self.acc
        self.init = init = f.init or cfg.run_path / "pretrain" / "model"
        self.splits = splits = load_splits(cfg.data, self.issues)
        splits["val"] = drop_unreadable(splits["val"], 4, cfg.data.image_size, cfg.data.bad_image, self.issues, "val")
        policy = RefinementCaptioner.from_pretrained(init)
        self.reference = RefinementCaptioner.from_pretrained(init).to(acc.device).eval()
        self.reference.requires_grad_(False)
        disable_dropout_in_model(policy)
        disable_dropout_in_model(self.reference)
        self.tokenizer = CaptionTokenizer.from_dir(init)
        from rewards.registry import build_reward

        self.reward = build_reward(f.reward, cfg.reward_context(f"{f.output}.reward", acc.device, splits["train"]))
        check_shaping_reward(f, self.reward)
        try:
            self.method = METHODS[f.method](f.method_config, f, self.tokenizer)
        except ValueError as e:  # e.g. a branch word that is not one token
            raise RecipeError(str(e)) from None
        self.mu = self.method.updates_per_rollout
        if self.mu > 1 and (f.checkpoint_every % self.mu or start_step % self.mu):
            raise ValueError(f"finetune.checkpoint_every ({f.checkpoint_every}) must be a multiple of the {f.method} "
                             f"updates per generation ({self.mu}), so that a resumed run starts with a new generation")
        self.K = K = policy.config.num_refine_layers
        self.layers = f.layers or list(range(1, K + 1))
        self.weights = layer_weights(f.layer_weights, K)[torch.tensor(self.layers) - 1]
        self.sched = schedule(f.schedule, K, f.schedule_eps)
        self.optimizer = torch.optim.AdamW([t for t in policy.parameters() if t.requires_grad], lr=f.lr,
                                           weight_decay=f.weight_decay)
        min_ratio = 1.0 if f.lr_schedule == "constant" else 0.1  # a cosine to 1.0 is a constant after warm-up
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, f.warmup_steps, f.steps, min_ratio))
        self.model = SequenceScorer(policy)
        self.stream = batch_stream(splits["train"], self.tokenizer, f.batch_size, cfg.seed + 1, start_step // self.mu,
                                   cfg.data.max_caption_len, 0.0, cfg.data.image_size, acc.process_index, acc.num_processes,
                                   bad_image=cfg.data.bad_image, issues=self.stream_issues,
                                   num_workers=cfg.data.num_workers)
        self.log_index = np.arange(min(4, len(splits["val"].captions)))
        self.generation: Generation | None = None

    @property
    def core(self) -> RefinementCaptioner:
        """The policy with whole parameters (generation, validation, saving; `TrainingLoop.whole_model`)."""
        return self.whole_model.captioner

    def _generate(self, step: int) -> Generation:
        """A new batch and its rollout (step 1–2), keyed by the generation index step // μ."""
        cfg, f, acc = self.cfg, self.cfg.finetune, self.acc
        self.gather_model()  # under FSDP: the policy's current weights, whole, on every process
        batch = next(self.stream)
        images = batch.images.to(acc.device)
        pixels = self.core.encoder.preprocess(images)
        seeds = batch.z0_seeds.to(acc.device)
        sampler = torch.Generator(device=acc.device).manual_seed(int(step_z0_seeds(cfg.seed + 2, step // self.mu, 1)[0]))
        references = [list(self.splits["train"].captions[int(i)]) for i in batch.index]
        ro = rollout(self.core, self.method, self.reward, images, pixels, seeds, self.layers, f, self.tokenizer,
                     self.sched, sampler, references)
        gen = generation_of(ro, pixels, seeds, self.tokenizer.pad_id)
        if self.method.token_level and self.mu > 1:
            with torch.no_grad():
                gen.old_token_logps = self.core.token_logprobs(pixels, seeds, self.layers, gen.tokens).logprobs.float()
        return gen

    def train_step(self, step: int) -> StepOutput:
        if step % self.mu == 0 or self.generation is None:
            self.generation = self._generate(step)
        gen = self.generation
        loss, metrics = policy_loss(self.model, self.reference, self.method, gen, self.layers, self.weights,
                                    self.cfg.finetune.kl_coef, self.acc)
        return StepOutput(loss, lambda: self._scalars(gen.ro, metrics),
                          lambda s: {"loss": f"{s['train/loss']:.3f}", "r_K": f"{s[f'layer_{self.layers[-1]}/reward']:.3f}"},
                          hook={"rollout": gen.ro})

    def _scalars(self, ro: Rollout, metrics: list[dict]) -> dict[str, Any]:
        scalars: dict[str, Any] = {}
        lengths = word_lengths(ro.captions).view(ro.rewards.shape)
        for l, k in enumerate(self.layers):
            scalars[f"layer_{k}/reward"] = ro.rewards[:, l].mean()
            scalars[f"layer_{k}/reward_std"] = ro.rewards[:, l].std()
            scalars[f"layer_{k}/reward_best"] = ro.rewards[:, l].max(-1).values.mean()
            scalars[f"layer_{k}/shaped_reward"] = ro.shaped[:, l].mean()
            scalars[f"layer_{k}/shaped_reward_std"] = ro.shaped[:, l].std()
            scalars[f"layer_{k}/progress"] = ro.progress[:, l].mean()
            scalars[f"layer_{k}/progress_target"] = float(1 - self.sched[k])
            scalars[f"layer_{k}/length"] = lengths[:, l].mean()
            scalars.update({f"layer_{k}/{name}": torch.tensor(v) for name, v in metrics[l].items()})
            for name, t in (ro.terms or {}).items():
                scalars[f"layer_{k}/reward_terms/{name}"] = t[:, l].mean()
        for name, t in (ro.terms or {}).items():
            scalars[f"reward_terms/{name}"] = t.mean()
        return scalars

    def validate(self, step: int) -> None:
        """Captions of fixed val images at every layer, in TensorBoard."""
        if self.writer is None:
            return
        core, cfg = self.core, self.cfg
        core.eval()
        caps = greedy_captions(core, self.splits["val"], self.tokenizer, self.log_index, list(range(self.K + 1)),
                               cfg.data.image_size, cfg.finetune.max_len)
        for k in range(self.K + 1):
            self.writer.add_text(f"captions/layer_{k}", "\n\n".join(f"**image {i}**: {c[k]}" for i, c in zip(self.log_index, caps)), step)

    def finish(self, train_seconds: float) -> dict:
        f, core = self.cfg.finetune, self.core
        core.eval()
        card = render_model_card(f"Refinement captioner ({f.method.upper()} fine-tuned, K = {self.K})",
                                 f"{f.method.upper()} fine-tuning at layers {self.layers} against the `{f.reward.kind}` reward, "
                                 f"{f.steps} steps from `{self.init}` (`rlrefine finetune`, output `{f.output}`).", self.cfg)
        core.save_pretrained(self.stage_dir / "model", tokenizer=self.tokenizer, model_card=card)
        return {"method": f.method, "layers": self.layers}


def finetune(cfg: RecipeConfig, resume: bool = False, on_step_end: Callable[..., None] | None = None) -> dict:
    """`rlrefine finetune`: the recipe's method at every configured layer, from `finetune.init` (default: the
    run's XE model), which is also the frozen reference. Returns the report written to report.json.

    ``on_step_end(step=, model=, loss=, rollout=, accelerator=)``, if given, is called on every process
    after each optimizer step (tests use it to compare ranks).
    """
    return FinetuneLoop(cfg, on_step_end).run(resume)
