"""DiCO (Moratelli et al., BMVC 2024): a weighted preference loss over the policy's own candidates.

Per layer: the candidate with the highest shaped reward is chosen, the others are rejected with weights
γ_j = softmax_j(τ · (r̃_w − r̃_j)), and L = −log σ(β · h) with h the policy's log-ratio margin minus the
frozen reference's (`rlrefine.losses.dico_loss`). Candidates are all n beams of a beam search, as the
DiCO reference code draws them, or n samples. Logged per layer under TRL's DPO names:
``rewards/chosen|rejected|margins|accuracies``, ``logps/chosen|rejected``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlrefine.losses import dico_loss
from rlrefine.methods.base import LayerInputs, Method, SamplingConfig, register_method


class DicoConfig(SamplingConfig):
    """DiCO (`finetune.method: dico`). Defaults after Moratelli et al. 2024 (β = 0.2, 5 beams); τ is the
    embedded default's (the reference code's τ 300 is for rewards of 2.0·cos PAC-S, recipes/coco_vitb32.yaml)."""

    generation: Literal["beam", "sample"] = Field("beam", description="beam: all n beams are the candidates (the DiCO "
                                                  "reference code); sample: n samples (temperature, top_p)")
    beta: float = Field(0.2, gt=0.0, description="β of −log σ(β·h) (paper: 0.2)")
    tau: float = Field(1.0, gt=0.0, description="τ in the rejected-candidate weights γ_j = softmax_j(τ·(r̃_w − r̃_j)) "
                                                "(DiCO reference code: 300 on 2.0·cos PAC-S rewards)")


@register_method
class DiCO(Method):
    name = "dico"
    Config = DicoConfig
    description = "DiCO: the best candidate against the weighted others, anchored to the frozen XE model"
    moved_keys = {"beta": "beta", "tau": "tau", "generation": "generation", "temperature": "temperature",
                  "top_p": "top_p"}

    def generate(self, policy, pixels, seeds, layers, generator):
        c, f = self.config, self.finetune
        if c.generation == "beam":
            return policy.generate(pixels, seeds, layers, method="beam", num_candidates=f.num_candidates, max_len=f.max_len)
        return policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates, max_len=f.max_len,
                               temperature=c.temperature, top_p=c.top_p, generator=generator)

    def layer_loss(self, x: LayerInputs):
        return dico_loss(x.logps, x.ref_logps, x.shaped, self.config.beta, self.config.tau)
