"""DiCO (Moratelli et al., BMVC 2024): a weighted preference loss over the policy's own candidates.

Per layer: the candidate with the highest shaped reward is chosen, the others are rejected with weights
γ_j = softmax_j(τ · (r̃_w − r̃_j)), and L = −log σ(β · h) with h the policy's log-ratio margin minus the
frozen reference's (`rlrefine.losses.dico_loss`). Candidates are all n beams of a beam search, as the
DiCO reference code draws them (the default), n samples, or a mix of both (`mix_beams` beams and the rest
samples), which explores beyond the policy's modes. Logged per layer under TRL's DPO names:
``rewards/chosen|rejected|margins|accuracies``, ``logps/chosen|rejected``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlrefine.losses import dico_loss
from rlrefine.models.generation import concat_candidates
from rlrefine.methods.base import LayerInputs, Method, SamplingConfig, register_method


class DicoConfig(SamplingConfig):
    """DiCO (`finetune.method: dico`). Defaults after Moratelli et al. 2024 (β = 0.2, 5 beams); τ is the
    embedded default's (the reference code's τ 300 is for rewards of 2.0·cos PAC-S, recipes/coco_vitb32.yaml)."""

    generation: Literal["beam", "sample", "mix"] = Field(
        "beam", description="beam: all n beams are the candidates (the DiCO reference code); sample: n samples (temperature, "
                            "top_p); mix: `mix_beams` beams and n − mix_beams samples (explores beyond the modes)")
    mix_beams: int = Field(2, ge=1, description="generation: mix: how many of the n candidates are beams (the rest are samples)")
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
        if c.generation == "sample":
            return policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates,
                                   max_len=f.max_len, temperature=c.temperature, top_p=c.top_p, generator=generator)
        if not 1 <= c.mix_beams < f.num_candidates:
            raise ValueError(f"finetune.dico.mix_beams ({c.mix_beams}) must be in 1..num_candidates − 1 "
                             f"({f.num_candidates - 1}) so that the mix holds beams and samples")
        beams = policy.generate(pixels, seeds, layers, method="beam", num_candidates=c.mix_beams, max_len=f.max_len)
        samples = policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates - c.mix_beams,
                                  max_len=f.max_len, temperature=c.temperature, top_p=c.top_p, generator=generator)
        return concat_candidates(beams, samples, policy.config.pad_id)

    def layer_loss(self, x: LayerInputs):
        return dico_loss(x.logps, x.ref_logps, x.shaped, self.config.beta, self.config.tau)
