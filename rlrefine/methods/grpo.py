"""GRPO (Shao et al. 2024, "DeepSeekMath"), as TRL's ``GRPOTrainer`` defines it, at every refinement layer.

Per layer and image, a group of n sampled captions; advantages relative to the group,
A_i = (r̃_i − mean_group r̃) / (std_group r̃ + 1e-4) on the shaped rewards (`rlrefine.losses.group_advantages`;
``scale_rewards: group | batch | none``); the clipped token-level objective with the importance ratio
ρ = π_θ / π_old clipped to [1 − ε, 1 + ε_high], plus β times the k3 KL estimator to the frozen XE model,
aggregated as ``loss_type: grpo | dr_grpo | dapo`` (`rlrefine.losses.grpo_loss`). With ``num_iterations`` > 1
each generation is used for that many optimizer steps, π_old being the policy that generated it; with 1,
ρ = 1 and only the advantage-weighted log-likelihood remains (its gradient; the value is −mean A).

This is how GRPO replaces SCST's baseline for captioning (Image Captioning with GRPO, arXiv 2503.01333):
the group mean is the baseline, the group's spread the scale. Logged per layer under ``grpo/``: the share of
groups whose rewards all tie (no signal), KL, clip ratios, the policy's entropy and the completion length in
tokens; the loop logs the reward mean and std, raw and shaped.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlrefine.losses import group_advantages, grpo_loss
from rlrefine.methods.base import LayerInputs, Method, SamplingConfig, register_method


class GrpoConfig(SamplingConfig):
    """GRPO (`finetune.method: grpo`): a group of n samples per image and layer (`finetune.num_candidates`).
    Defaults after TRL's GRPOConfig (ε 0.2, loss_type dapo, scale_rewards group) with β 0.04 (DeepSeekMath):
    the KL anchor to the XE model that DiCO has through its reference log-ratio."""

    beta: float = Field(0.04, ge=0.0, description="β, weight of the k3 KL estimator to the frozen XE model (0: no KL)")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="ε, the importance ratio is clipped to [1 − ε, 1 + epsilon_high]")
    epsilon_high: float | None = Field(None, gt=0.0, description="upper clip ε_high (default: epsilon; DAPO uses 0.28)")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="divide the advantages by the group's "
                                                             "reward std (group), the batch's (batch), or not at all (none)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field("dapo", description="aggregation over tokens: grpo (each "
                                                          "completion's mean, then the mean), dr_grpo (sum / (N · max "
                                                          "length)), dapo (sum / all tokens)")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generation (π_old is the generating policy)")


@register_method
class GRPO(Method):
    name = "grpo"
    Config = GrpoConfig
    description = "GRPO: group-relative advantages over n samples, clipped ratio, k3 KL to the frozen XE model"
    token_level = True

    @property
    def updates_per_rollout(self) -> int:
        return self.config.num_iterations

    def generate(self, policy, pixels, seeds, layers, generator):
        c, f = self.config, self.finetune
        return policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates, max_len=f.max_len,
                               temperature=c.temperature, top_p=c.top_p, generator=generator)

    def layer_loss(self, x: LayerInputs):
        c = self.config
        B, n, T = x.token_logps.shape
        advantages = group_advantages(x.shaped.reshape(-1), n, c.scale_rewards).to(x.token_logps.device)
        logp = x.token_logps.reshape(B * n, T)
        old = logp.detach() if x.old_token_logps is None else x.old_token_logps.reshape(B * n, T)
        ref = x.ref_token_logps.reshape(B * n, T)
        mask = x.mask.reshape(B * n, T)
        loss, m = grpo_loss(logp, old, ref, advantages, mask, beta=c.beta, epsilon=c.epsilon, epsilon_high=c.epsilon_high,
                            loss_type=c.loss_type)
        with torch.no_grad():
            std = x.shaped.float().std(dim=1)
            tokens = mask.float().sum()
            metrics = {f"grpo/{k}": v for k, v in m.items()}
            metrics["grpo/tied_groups"] = float(torch.isclose(std, torch.zeros_like(std)).float().mean())
            metrics["grpo/completion_tokens"] = float(tokens / (B * n))
            if x.entropy is not None:
                metrics["grpo/entropy"] = float((x.entropy.reshape(B * n, T) * mask).sum() / tokens.clamp(min=1.0))
        return loss, metrics
