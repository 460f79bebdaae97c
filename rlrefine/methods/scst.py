"""SCST (Rennie et al., CVPR 2017): policy gradient on sampled captions against a baseline.

Per layer: A_j = r̃_j − b, L = −mean A_j · ℓ_j with ℓ the per-token mean log-prob of sample j and b the
greedy caption's reward (the original SCST) or the leave-one-out mean of the other samples
(`rlrefine.losses.scst_loss`). Logged per layer: ``scst/reward|baseline|advantage|advantage_std``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlrefine.losses import scst_loss
from rlrefine.methods.base import LayerInputs, Method, SamplingConfig, register_method


class ScstConfig(SamplingConfig):
    """SCST (`finetune.method: scst`): n samples per image and layer."""

    baseline: Literal["greedy", "mean"] = Field("mean", description="greedy (the greedy caption's reward) or mean "
                                                "(leave-one-out mean of the other samples)")


@register_method
class SCST(Method):
    name = "scst"
    Config = ScstConfig
    description = "SCST: self-critical policy gradient on samples, greedy or leave-one-out baseline"
    moved_keys = {"scst_baseline": "baseline", "temperature": "temperature", "top_p": "top_p"}

    def generate(self, policy, pixels, seeds, layers, generator):
        c, f = self.config, self.finetune
        return policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates, max_len=f.max_len,
                               temperature=c.temperature, top_p=c.top_p, generator=generator)

    def greedy_layers(self, layers):
        return list(layers) if self.config.baseline == "greedy" else []

    def layer_loss(self, x: LayerInputs):
        return scst_loss(x.logps, x.shaped, baseline=self.config.baseline, greedy_rewards=x.greedy_rewards,
                         lengths=x.lengths)
