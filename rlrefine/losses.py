"""Training losses for refinement captioners: pure tensor functions, no modules, no state.

Where this sits in the flow: ``data -> models -> rewards -> **losses** -> trainers``. The trainers
feed these functions the model's logits / log-probs and the rewards' scores; nothing here touches a
model, an optimizer or a device beyond the tensors it is given.

Layer indexing (docs/design.md): layer 0 is z_0 (noise), layers 1..K are refinement outputs, K final.

* :func:`layer_weights`            w_k for layers 1..K (less weight on early layers)
* :func:`schedule`                 re-exported from :mod:`rewards.shaping` (s(k), fraction still to go)
* :func:`shape_rewards`            re-exported from :mod:`rewards.shaping` (the graduality shaping)
* :func:`embedding_progress`       re-exported from :mod:`rewards.shaping` (progress on text embeddings)
* :func:`xe_loss`                  teacher-forced cross entropy over layers, Σ w_k CE_k / Σ w_k
* :func:`word_emphasis_loss`       extra CE on chosen words (e.g. position words) and the captions holding them
* :func:`locate_loss`              the readout says where each object it names is (squared error of its centre)
* :func:`latent_distances`         d_k = ‖z_k − z_K‖ / ‖z_0 − z_K‖
* :func:`latent_graduality_loss`   mean_k (d_k − s(k))² over the interior layers
* :func:`dico_loss`                DiCO (Moratelli et al., BMVC 2024) winner-vs-weighted-losers loss
* :func:`scst_loss`                self-critical policy gradient (greedy or leave-one-out baseline)
* :func:`kl_to_reference`          sequence-level KL monitor
* :func:`per_token_kl`             k3 per-token KL estimator (as TRL's GRPO trainer)
* :func:`listwise_kl`              listwise distillation of a teacher's per-image ranking
* :func:`hard_negative_margin`     best positive above the hard negatives, by a margin
* :func:`matching_losses`          a matching head's balanced match cross-entropy and true-above-false pairwise loss
* :func:`group_advantages`         GRPO's group-relative advantages (r − mean_group) / (std + 1e-4)
* :func:`grpo_loss`                GRPO's clipped token-level objective with a k3 KL term (as TRL)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rewards.shaping import embedding_progress, schedule, shape_rewards  # noqa: F401  (re-exported, owned by rewards)

__all__ = [
    "LAYER_WEIGHT_KINDS",
    "layer_weights",
    "schedule",
    "shape_rewards",
    "xe_loss",
    "word_emphasis_loss",
    "locate_loss",
    "coarse_to_fine_targets",
    "latent_distances",
    "latent_graduality_loss",
    "dico_loss",
    "scst_loss",
    "kl_to_reference",
    "per_token_kl",
    "listwise_kl",
    "hard_negative_margin",
    "group_advantages",
    "grpo_loss",
]

LAYER_WEIGHT_KINDS = ("linear", "log", "uniform", "final")


# --------------------------------------------------------------------------------------------
# Layer weights
# --------------------------------------------------------------------------------------------


def layer_weights(kind: str, K: int) -> Tensor:
    """Unnormalised weights w_k of refinement layers k = 1..K, as a float tensor of shape [K].

    * ``linear``:  w_k = k              (default: early layers matter less)
    * ``log``:     w_k = log(1 + k)
    * ``uniform``: w_k = 1
    * ``final``:   w_k = [k == K]       (only the last layer is trained / scored)

    Entry ``i`` of the result is the weight of layer ``k = i + 1``. Losses and scores normalise by
    Σ w_k themselves, so the scale does not matter.
    """
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K (number of refinement layers) must be an int >= 1, got {K!r}")
    k = torch.arange(1, K + 1, dtype=torch.float32)
    if kind == "linear":
        return k
    if kind == "log":
        return torch.log1p(k)
    if kind == "uniform":
        return torch.ones(K)
    if kind == "final":
        w = torch.zeros(K)
        w[-1] = 1.0
        return w
    raise ValueError(f"unknown layer weight kind {kind!r}; choose one of {list(LAYER_WEIGHT_KINDS)}")


def _check_weights(weights: Tensor, L: int, what: str) -> Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (L,):
        raise ValueError(f"{what}: weights must have shape [{L}], got {tuple(weights.shape)}")
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"{what}: weights must be >= 0 with a positive sum, got {weights.tolist()}")
    return weights


# --------------------------------------------------------------------------------------------
# Teacher-forced pretraining
# --------------------------------------------------------------------------------------------


def xe_loss(logits: Tensor, targets: Tensor, weights: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Layer-weighted teacher-forced cross entropy.

    ``logits`` [B, L, T, V] are the readout's predictions for the L selected layers; ``targets``
    [B, T] (the same for every layer) or [B, L, T] (one per layer, e.g. `coarse_to_fine_targets`)
    are the token ids they predict, already shifted (for the captioner that is ``tokens[:, 1:]``:
    logit position t predicts target t). Target positions equal to ``pad_id`` are ignored.

        CE_l = Σ_{b,t: y_blt ≠ pad} −log softmax(logits[b, l, t])[y_blt]  /  #{b,t: y_blt ≠ pad}
        loss = Σ_l w_l CE_l / Σ_l w_l

    i.e. a token mean over the whole batch per layer (every non-pad token counts equally, as
    ``F.cross_entropy(..., ignore_index=pad_id)`` does), then a weighted mean over layers.
    Returns ``(loss, per_layer_ce)``; ``per_layer_ce`` [L] is detached, for logging. A layer with
    no non-pad target has CE_l = 0.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be [B, L, T, V], got shape {tuple(logits.shape)}")
    B, L, T, V = logits.shape
    if targets.shape == (B, T):
        targets = targets.unsqueeze(1).expand(B, L, T)  # the same caption at every layer
    elif targets.shape != (B, L, T):
        raise ValueError(f"targets must be [B, T] = [{B}, {T}] or [B, L, T] = [{B}, {L}, {T}] to match logits, "
                         f"got {tuple(targets.shape)}")
    w = _check_weights(weights, L, "xe_loss").to(logits.device)

    token_ce = F.cross_entropy(logits.reshape(B * L * T, V).float(), targets.reshape(-1), ignore_index=pad_id,
                               reduction="none").view(B, L, T)
    mask = (targets != pad_id).to(token_ce.dtype)  # [B, L, T]
    per_layer_ce = (token_ce * mask).sum(dim=(0, 2)) / mask.sum(dim=(0, 2)).clamp_min(1.0)  # [L]
    loss = (w * per_layer_ce).sum() / w.sum()
    return loss, per_layer_ce.detach()


def word_emphasis_loss(logits: Tensor, targets: Tensor, word_ids: Tensor, pad_id: int, word_weight: float,
                       caption_weight: float) -> Tensor:
    """Extra cross entropy on chosen words, added to `xe_loss` (one layer: the readout's final-layer predictions).

    A word that decides whether a caption is true but is one token among many ("above", "left") carries little of
    the token-mean XE, and a readout can settle on its marginal. This term weighs it up. With ``logits`` [B, T, V],
    ``targets`` [B, T] (shifted as for `xe_loss`) and ``word_ids`` the chosen words' ids:

        E = {(b, t): y_bt ∈ word_ids},  R = {(b, t): y_bt ≠ pad and some y_bt' ∈ word_ids}
        loss = word_weight · mean_{(b,t) ∈ E} CE_bt + caption_weight · mean_{(b,t) ∈ R} CE_bt

    i.e. the chosen words themselves, and every token of the captions that contain one. An empty set adds 0 (a
    batch with no chosen word costs nothing)."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    token_ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=pad_id, reduction="none")  # [B, T]
    chosen = torch.isin(targets, word_ids.to(targets.device))
    rows = chosen.any(dim=1, keepdim=True) & (targets != pad_id)
    loss = token_ce.new_zeros(())
    for weight, mask in ((word_weight, chosen), (caption_weight, rows)):
        if weight and mask.any():
            loss = loss + weight * token_ce[mask].mean()
    return loss


def locate_loss(pred: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Squared distance between predicted and true object centres, averaged over the positions that name an object.

    A readout that captions "a red circle above a blue square" must know, when it has written "circle", where that
    circle is; teacher-forced XE alone did not teach the shapes readout this (relation true over inverted ≈ chance)
    although its text encoding holds each object's place. ``pred`` [B, T, 2] is a linear head on the readout's
    state, ``targets`` [B, T, 2] the centres of the objects named at those positions (`mention_centres`) and ``mask``
    [B, T] which positions name one:

        loss = Σ_{(b,t) ∈ mask} ‖pred_bt − target_bt‖² / |mask|     (0 when no position names an object)
    """
    if pred.shape != targets.shape or pred.shape[:-1] != mask.shape:
        raise ValueError(f"pred and targets must be [B, T, D] and mask [B, T]; got {tuple(pred.shape)}, "
                         f"{tuple(targets.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if not mask.any():
        return pred.sum() * 0.0  # keeps the graph (and every process's backward) the same
    return ((pred.float() - targets.float()) ** 2).sum(-1)[mask].mean()


def coarse_to_fine_targets(targets: Tensor, fractions: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Per-layer XE targets that grow with the layer: layer l predicts the first
    ``n_l = clamp(ceil(fractions[l] · n), 1, n)`` tokens of the caption, then eos (optional coarse-to-fine
    targets, docs/design.md).

    ``targets`` [B, T]: shifted caption ids (tokens, eos, pads; n = the tokens before the first
    eos); ``fractions`` [L] in (0, 1], e.g. ``1 − s(k)`` for k = 1..K -> [B, L, T]. Row (b, l) is
    ``targets[b, :n_l]``, eos, pads. Teacher-forced inputs need no change: the readout is causal, so
    positions up to n_l see the same prefix as the short caption would give them.
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, T], got shape {tuple(targets.shape)}")
    fractions = torch.as_tensor(fractions, dtype=torch.float64, device=targets.device).flatten()
    if fractions.numel() == 0 or bool(((fractions <= 0) | (fractions > 1)).any()):
        raise ValueError(f"fractions must be in (0, 1], got {fractions.tolist()}")
    B, T = targets.shape
    is_eos = targets == eos_id
    pos = torch.arange(T, device=targets.device)
    n = torch.where(is_eos.any(1), torch.where(is_eos, pos, T).amin(1), (targets != pad_id).sum(1))  # [B]
    keep = torch.ceil(fractions[None, :] * n[:, None].double() - 1e-6).long()  # [B, L]; the 1e-6 absorbs float
    # error in fractions such as 1 - s(k) = 0.7500001
    keep = torch.minimum(keep.clamp_min(1), n[:, None])
    t = pos[None, None, :]  # [1, 1, T]
    out = targets[:, None, :].expand(B, fractions.numel(), T)
    out = torch.where(t < keep[..., None], out, torch.full_like(out, pad_id))
    return torch.where(t == keep[..., None], torch.full_like(out, eos_id), out)


def latent_distances(Z: Tensor, eps: float = 1e-8) -> Tensor:
    """Relative distance of each layer's latent to the final one, per sample.

        d_k = ‖z_k − z_K‖_F / max(‖z_0 − z_K‖_F, eps)        (Frobenius norm over the M × d slots)

    ``Z`` [B, K+1, M, d] (any trailing shape is flattened) -> ``d`` [B, K+1], with d_0 = 1 and
    d_K = 0 (up to eps). Differentiable; the eps keeps a degenerate sample (z_0 = z_K) finite.
    """
    if Z.dim() < 3:
        raise ValueError(f"Z must be [B, K+1, ...] with K >= 1, got shape {tuple(Z.shape)}")
    B, K1 = Z.shape[:2]
    if K1 < 2:
        raise ValueError(f"Z needs at least 2 layers (z_0 and z_K), got {K1}")
    flat = Z.reshape(B, K1, -1)
    to_final = (flat - flat[:, -1:]).norm(dim=-1)  # [B, K+1]
    return to_final / to_final[:, :1].clamp_min(eps)


def latent_graduality_loss(Z: Tensor, sched: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Latent graduality penalty L_grad (docs/design.md).

        L_grad = mean_{b, k=1..K−1} (d_k^(b) − s(k))²

    with d from :func:`latent_distances` and ``sched`` = s(0..K) [K+1] from :func:`schedule`
    (s(0) = 1, s(K) = 0, so the end points carry no information and are left out). For K = 1 there
    is no interior layer and the loss is 0. Returns ``(loss, mean_d)`` where ``mean_d`` [K+1] is
    the batch mean of d_k, detached, for logging.
    """
    d = latent_distances(Z, eps=eps)  # [B, K+1]
    K1 = d.shape[1]
    sched = torch.as_tensor(sched, dtype=d.dtype, device=d.device)
    if sched.shape != (K1,):
        raise ValueError(f"sched must have shape [K+1] = [{K1}] to match Z, got {tuple(sched.shape)}")
    mean_d = d.detach().mean(dim=0)
    if K1 <= 2:
        return d.sum() * 0.0, mean_d
    loss = ((d[:, 1:-1] - sched[1:-1]) ** 2).mean()
    return loss, mean_d


# --------------------------------------------------------------------------------------------
# DiCO
# --------------------------------------------------------------------------------------------


def _first_argmax(x: Tensor) -> Tensor:
    """Index of the row maximum, the lowest index on ties (deterministic on every device)."""
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device).expand_as(x)
    is_max = x == x.max(dim=-1, keepdim=True).values
    return torch.where(is_max, idx, torch.full_like(idx, n)).min(dim=-1).values


def dico_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    beta: float,
    tau: float,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """DiCO loss (Moratelli et al., "Revisiting Image Captioning Training Paradigm via Direct
    CLIP-based Optimization", BMVC 2024): one winner against a weighted set of losers.

    Inputs are [B, n]: for each of B images, n candidates' summed sequence log-probs under the
    policy (``policy_logps``, with grad) and the frozen reference (``ref_logps``), and their
    rewards (no grad is taken through rewards). n >= 2.

    * chosen c = argmax_j r_j per row; ties go to the **lowest index** (deterministic).
    * rejected weights over the other candidates j ≠ c:
          γ_j = exp(τ (r_c − r_j)) / Σ_{i≠c} exp(τ (r_c − r_i)),     γ_c = 0, Σ_j γ_j = 1
    * h = (π_c − Σ_j γ_j π_j) − (ref_c − Σ_j γ_j ref_j)
    * loss = mean_b −log σ(β h)

    Sign of γ: we follow the DiCO reference code (aimagelab/DiCO, ``trainers/dico_trainer.py``,
    ``weight_quality_distances``: ``softmax(tau * (max_reward - reward))`` over the losers, with
    default ``dico_tau = 300`` and ``dico_beta = 0.2`` in ``main.py``). With τ > 0 the weight grows
    with the reward gap to the winner, so the *worst* candidates are pushed down hardest and
    near-ties with the winner (often paraphrases of it among beam candidates) are barely
    penalised; τ → 0 gives uniform weights over the losers, τ → ∞ the single worst loser.
    A negative τ would instead focus on the losers closest to the winner (hard negatives); that
    is not what DiCO does.

    Returns ``(loss, metrics)``. ``metrics`` holds floats under TRL's DPO names:
    ``rewards/chosen`` = mean β(π_c − ref_c), ``rewards/rejected`` = mean Σ_j γ_j β(π_j − ref_j),
    ``rewards/margins`` = their difference (= mean β h), ``rewards/accuracies`` = fraction of rows
    with h > 0, ``logps/chosen`` = mean π_c, ``logps/rejected`` = mean Σ_j γ_j π_j; plus detached
    tensors ``h`` [B], ``gamma`` [B, n] and ``chosen_index`` [B] for callers that want them.
    """
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must be [B, n], got shape {tuple(policy_logps.shape)}")
    if ref_logps.shape != policy_logps.shape or rewards.shape != policy_logps.shape:
        raise ValueError(
            "policy_logps, ref_logps and rewards must share one [B, n] shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(rewards.shape)}"
        )
    B, n = policy_logps.shape
    if n < 2:
        raise ValueError(f"DiCO needs at least 2 candidates per image, got n = {n}")

    r = rewards.detach().to(torch.float32)
    ref_logps = ref_logps.detach()
    chosen = _first_argmax(r)  # [B]
    chosen_mask = F.one_hot(chosen, n).bool()  # [B, n]
    r_c = r.gather(1, chosen[:, None])  # [B, 1]
    gamma_logits = (tau * (r_c - r)).masked_fill(chosen_mask, float("-inf"))
    gamma = torch.softmax(gamma_logits, dim=-1).to(policy_logps.dtype)  # [B, n], 0 at chosen

    pi_c = policy_logps.gather(1, chosen[:, None]).squeeze(1)  # [B]
    ref_c = ref_logps.gather(1, chosen[:, None]).squeeze(1)
    pi_rej = (gamma * policy_logps).sum(-1)  # [B]
    ref_rej = (gamma * ref_logps).sum(-1)
    h = (pi_c - pi_rej) - (ref_c - ref_rej)
    loss = -F.logsigmoid(beta * h).mean()

    with torch.no_grad():
        chosen_rewards = beta * (pi_c - ref_c)
        rejected_rewards = beta * (pi_rej - ref_rej)
        metrics: dict[str, float | Tensor] = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (h > 0).float().mean().item(),
            "logps/chosen": pi_c.mean().item(),
            "logps/rejected": pi_rej.mean().item(),
            "h": h.detach(),
            "gamma": gamma.detach(),
            "chosen_index": chosen,
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# SCST
# --------------------------------------------------------------------------------------------


def scst_loss(
    logps: Tensor,
    rewards: Tensor,
    baseline: str = "greedy",
    greedy_rewards: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Self-critical sequence training (Rennie et al., CVPR 2017) with a choice of baseline.

    ``logps`` [B, n] summed sequence log-probs of n sampled captions per image (with grad),
    ``rewards`` [B, n].

    * ``baseline="greedy"``: b_bj = ``greedy_rewards``[b], the reward of the greedy caption
      (the original SCST).
    * ``baseline="mean"``: leave-one-out mean of the other samples,
      b_bj = (Σ_i r_bi − r_bj) / (n − 1)   (needs n >= 2; as in "mean of samples" SCST variants,
      leaving the sample itself out keeps the gradient estimate unbiased).

        A_bj = r_bj − b_bj        (no grad)
        loss = −mean_{b,j} A_bj · ℓ_bj

    where ℓ = ``logps``, or, when ``lengths`` [B, n] (tokens per caption, > 0) is given,
    ℓ = logps / lengths: the per-token mean log-prob, which removes SCST's bias toward short
    captions when the rewards do not themselves penalise length.

    Returns ``(loss, metrics)`` with floats ``scst/reward``, ``scst/baseline``, ``scst/advantage``
    (means) and ``scst/advantage_std``.
    """
    if logps.dim() != 2 or rewards.shape != logps.shape:
        raise ValueError(
            f"logps and rewards must share one [B, n] shape, got {tuple(logps.shape)} and {tuple(rewards.shape)}"
        )
    B, n = logps.shape
    r = rewards.detach().to(logps.dtype)
    if baseline == "greedy":
        if greedy_rewards is None:
            raise ValueError('scst_loss: baseline="greedy" needs greedy_rewards [B]')
        if greedy_rewards.shape != (B,):
            raise ValueError(f"greedy_rewards must be [B] = [{B}], got {tuple(greedy_rewards.shape)}")
        b = greedy_rewards.detach().to(logps.dtype)[:, None].expand(B, n)
    elif baseline == "mean":
        if n < 2:
            raise ValueError('scst_loss: baseline="mean" (leave-one-out) needs n >= 2 samples per image')
        b = (r.sum(dim=1, keepdim=True) - r) / (n - 1)
    else:
        raise ValueError(f"unknown SCST baseline {baseline!r}; choose one of ['greedy', 'mean']")
    advantage = (r - b).detach()

    ell = logps
    if lengths is not None:
        if lengths.shape != logps.shape:
            raise ValueError(f"lengths must be [B, n] = {tuple(logps.shape)}, got {tuple(lengths.shape)}")
        ell = logps / lengths.to(logps.dtype).clamp_min(1.0)
    loss = -(advantage * ell).mean()
    metrics = {
        "scst/reward": r.mean().item(),
        "scst/baseline": b.mean().item(),
        "scst/advantage": advantage.mean().item(),
        "scst/advantage_std": advantage.std(unbiased=False).item(),
    }
    return loss, metrics


# --------------------------------------------------------------------------------------------
# KL to the reference model
# --------------------------------------------------------------------------------------------


def kl_to_reference(policy_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Sequence-level KL monitor: mean(π − ref) over the given candidates (a scalar, no grad).

    KL(π‖ref) = E_{c~π}[log π(c) − log ref(c)], so this mean is an unbiased Monte-Carlo estimate
    only when the candidates are *sampled* from the policy. Beam-search candidates (DiCO's
    default) are the policy's modes, not samples, so there it is a biased estimate: use it as a
    drift monitor, not as a quantity to report as "the KL".
    """
    if policy_logps.shape != ref_logps.shape:
        raise ValueError(f"shape mismatch: {tuple(policy_logps.shape)} vs {tuple(ref_logps.shape)}")
    return (policy_logps.detach() - ref_logps.detach()).float().mean()


def per_token_kl(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token KL penalty with the k3 estimator (Schulman, "Approximating KL Divergence", 2020),
    as TRL's GRPO trainer computes it:

        ρ_t = ref_t − π_t          (log of ref / policy at the sampled token)
        kl_t = exp(ρ_t) − ρ_t − 1  (>= 0, unbiased for KL(π‖ref) under tokens sampled from π)

    Inputs [..., T] log-probs of the sampled tokens; ``mask`` [..., T] (1 = real token) zeroes
    padding. Returns the masked per-token values [..., T], differentiable w.r.t. the policy; reduce
    them as the trainer needs, e.g. ``(kl * mask).sum(-1) / mask.sum(-1)``.
    """
    if policy_token_logps.shape != ref_token_logps.shape:
        raise ValueError(f"shape mismatch: {tuple(policy_token_logps.shape)} vs {tuple(ref_token_logps.shape)}")
    rho = ref_token_logps.detach() - policy_token_logps
    kl = torch.exp(rho) - rho - 1.0
    if mask is not None:
        kl = kl * mask.to(kl.dtype)
    return kl


# --------------------------------------------------------------------------------------------
# Reward distillation (distill-reward)
# --------------------------------------------------------------------------------------------


def listwise_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Listwise distillation: mean over lists of KL(softmax(t / T) ‖ softmax(s / T)).

    ``student`` / ``teacher`` [G, P]: the scores of G lists (e.g. one image's pairs) padded to P entries
    with −inf (a padded entry has probability 0 on both sides and adds nothing).

        KL_g = Σ_j p_gj (log p_gj − log q_gj),  p = softmax(t_g / T),  q = softmax(s_g / T)
    """
    p_t = torch.softmax(teacher / temperature, dim=1)
    log_p_s = torch.log_softmax(student / temperature, dim=1)
    valid = torch.isfinite(teacher)
    kl = (p_t * (torch.log(p_t.clamp(min=1e-12)) - log_p_s)).masked_fill(~valid, 0.0).sum(1)
    return kl.mean()


def hard_negative_margin(student: Tensor, teacher: Tensor, kinds: Tensor, margin: float, positive_kind: int,
                         hard_kind: int) -> Tensor:
    """Hinge that keeps each list's best positive above its hard negatives.

    ``student`` / ``teacher`` [G, P] scores (−inf padded), ``kinds`` [G, P] the kind of each entry. Per list g
    the positive is the ``positive_kind`` entry the teacher scores highest (b_g); every ``hard_kind`` entry j
    the teacher scores below it pays ``relu(margin − (s_{g,b_g} − s_gj))``; the loss is the mean over those
    entries (0 when there are none).
    """
    pos_t = teacher.masked_fill(kinds != positive_kind, float("-inf"))
    best = pos_t.argmax(dim=1)  # [G]
    has_pos = torch.isfinite(pos_t.max(dim=1).values)
    s_pos, t_pos = student.gather(1, best[:, None]), teacher.gather(1, best[:, None])  # [G, 1]
    hard = (kinds == hard_kind) & (teacher < t_pos) & has_pos[:, None]
    hinge = F.relu(margin - (s_pos - student.masked_fill(~hard, 0.0)))
    return (hinge * hard).sum() / hard.sum().clamp(min=1)


def matching_losses(logits: Tensor, target: Tensor, true_of: Tensor) -> tuple[Tensor, Tensor]:
    """A matching head's two losses over T captions in groups (a true caption, its false variants).

    ``logits`` [T] the head's ℓ; ``target`` [T] 1 / 0 (or a teacher's σ(ℓ_t)); ``true_of`` [T] long: for a false
    caption the position of its group's true caption, −1 for a true one. With 𝒯 the true and ℱ the false captions:

        match    = Σ_{i∈𝒯} BCE(ℓ_i, y_i) / (2|𝒯|) + Σ_{j∈ℱ} BCE(ℓ_j, y_j) / (2|ℱ|)    (true and false weigh the same)
        pairwise = mean_{j∈ℱ} softplus(ℓ_j − ℓ_{true_of[j]})

    Returns (match, pairwise); pairwise is 0 without false captions.
    """
    is_true = true_of < 0
    weight = torch.where(is_true, 0.5 / is_true.sum().clamp(min=1), 0.5 / (~is_true).sum().clamp(min=1))
    match = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), weight=weight, reduction="sum")
    false = (~is_true).nonzero().squeeze(1)
    if false.numel() == 0:
        return match, logits.new_zeros(())
    return match, F.softplus(logits[false] - logits[true_of[false]]).mean()


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, "DeepSeekMath"; TRL's ``GRPOTrainer``).

    ``rewards`` [N] holds N / group_size groups of ``group_size`` consecutive completions (one prompt each):

        A_i = (r_i − mean_group(r)) / (std + eps)

    with std the group's standard deviation (``scale_rewards="group"``), the whole batch's (``"batch"``), or
    no division at all (``"none"``, Dr. GRPO's unscaled advantages). The standard deviation has Bessel's
    correction (n − 1), as TRL's ``nanstd``; a group of one has std 0 here.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose one of {list(SCALE_REWARDS)}")
    r = rewards.detach().float().reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    grouped = r.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = grouped.std(dim=1, unbiased=True, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 \
            else torch.zeros_like(r)
    else:
        std = r.std(unbiased=True).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    return advantages / (std + eps)


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor, *,
              beta: float, epsilon: float, epsilon_high: float | None = None,
              loss_type: str = "dapo") -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective as TRL's ``GRPOTrainer`` computes it (token-level importance ratio, two-sided clip).

    ``logp`` [N, T]: per-token log-probs of N completions under the policy (with grad); ``old_logp`` [N, T]:
    under the policy that generated them (no grad; ``logp.detach()`` when each generation is used for one
    update); ``ref_logp`` [N, T]: under the frozen reference (used when β > 0); ``advantages`` [N] (see
    `group_advantages`); ``mask`` [N, T]: 1 for the completion's tokens.

        ρ_t    = exp(logp_t − old_t),   ρ̂_t = clip(ρ_t, 1 − ε, 1 + ε_high)
        ℓ_t    = −min(ρ_t A, ρ̂_t A) + β · (exp(ref_t − logp_t) − (ref_t − logp_t) − 1)   (k3 KL estimator)
        grpo:    mean_i [Σ_t m_it ℓ_it / Σ_t m_it]          (each completion's token mean, then the mean)
        dr_grpo: Σ_it m_it ℓ_it / (N · T)                   (a constant normaliser, T = the padded length)
        dapo:    Σ_it m_it ℓ_it / Σ_it m_it                 (every token of the batch counts the same)

    ``epsilon_high`` defaults to ``epsilon``. Returns ``(loss, metrics)``: ``kl`` (masked mean of the k3 term,
    when β > 0), ``clip_ratio/low_mean`` (ρ < 1 − ε with A < 0), ``clip_ratio/high_mean`` (ρ > 1 + ε_high with
    A > 0), ``clip_ratio/region_mean`` (either), each a masked token mean.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {list(GRPO_LOSS_TYPES)}")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must share one [N, T] shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # [N, 1]
    coef_1 = torch.exp(logp - old_logp.detach())
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logp is None or ref_logp.shape != logp.shape:
            raise ValueError("grpo_loss with beta != 0 needs ref_logp of logp's [N, T] shape")
        delta = ref_logp.detach() - logp
        per_token_kl = torch.exp(delta) - delta - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * per_token_loss.size(1))
    else:
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    with torch.no_grad():
        def masked_mean(x: Tensor) -> float:
            return float((x * mask).sum() / mask.sum().clamp(min=1.0))

        if beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl)
        low = (coef_1 < 1 - epsilon) & (adv < 0)
        high = (coef_1 > 1 + eps_high) & (adv > 0)
        metrics.update({"clip_ratio/low_mean": masked_mean(low.to(mask.dtype)),
                        "clip_ratio/high_mean": masked_mean(high.to(mask.dtype)),
                        "clip_ratio/region_mean": masked_mean((low | high).to(mask.dtype))})
    return loss, metrics
