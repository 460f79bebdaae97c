"""DiCO (Moratelli et al., BMVC 2024): a weighted preference loss over the policy's own candidates.

Per layer: the candidate with the highest shaped reward is chosen, the others are rejected with weights
γ_j = softmax_j(τ · (r̃_w − r̃_j)), and L = −log σ(β · h) with h the policy's log-ratio margin minus the
frozen reference's (`rlrefine.losses.dico_loss`). Candidates are all n beams of a beam search, as the
DiCO reference code draws them (the default), n samples, or a mix of both (`mix_beams` beams and the rest
samples), which explores beyond the policy's modes. `generation: branch` adds to the n beams a second
preference group: the greedy caption and `branches` greedy decodes that part from it at the first word of
`branch_words` it says (`rlrefine.models.generation.branch_choice`), so they differ only from that word on
("above" against "left of" against "and") and the reward decides exactly that word. `branch_to` names the words a
branch says instead (default: the other `branch_words`); with `[and]` the only alternative to a stated relation is
stating none. Each group has its own chosen candidate and the loss is L_beams + `branch_weight` · L_branches: in
one group with the beams, the branches' shared start would be pushed down whenever a beam with another start wins.
Logged per layer under TRL's DPO names:
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

    generation: Literal["beam", "sample", "mix", "branch"] = Field(
        "beam", description="beam: all n beams are the candidates (the DiCO reference code); sample: n samples (temperature, "
                            "top_p); mix: `mix_beams` beams and n − mix_beams samples (explores beyond the modes); branch: "
                            "the n beams, and as a second group the greedy caption and `branches` greedy decodes that "
                            "swap the first of `branch_words` it says for another of them (the reward decides that word)")
    mix_beams: int = Field(2, ge=1, description="generation: mix: how many of the n candidates are beams (the rest are samples)")
    branches: int = Field(3, ge=1, description="generation: branch: greedy decodes that part from the greedy caption")
    branch_words: list[str] = Field(["above", "below", "over", "under", "left", "right", "and"], min_length=2,
                                    description="generation: branch: the words the branches part at, each one token of "
                                                "the caption vocabulary (default: the shapes world's relations and 'and')")
    branch_to: list[str] | None = Field(None, min_length=1,
                                        description="generation: branch: the words a branch says instead (default: the "
                                                    "other branch_words); [and] pits each stated relation against "
                                                    "stating none")
    branch_weight: float = Field(1.0, ge=0.0, description="generation: branch: weight of the branch group's DiCO loss "
                                                          "beside the beams'")
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

    def __init__(self, config, finetune, tokenizer=None):
        super().__init__(config, finetune, tokenizer)
        self.branch_ids = self.branch_to = None
        if config.generation == "branch":
            if tokenizer is None:
                raise ValueError("finetune.dico.generation: branch needs the captioner's tokenizer to find branch_words")
            self.branch_ids = tokenizer.word_ids(config.branch_words, "finetune.dico.branch_words")
            if config.branch_to is not None:
                self.branch_to = tokenizer.word_ids(config.branch_to, "finetune.dico.branch_to")

    def generate(self, policy, pixels, seeds, layers, generator):
        c, f = self.config, self.finetune
        if c.generation == "beam":
            return policy.generate(pixels, seeds, layers, method="beam", num_candidates=f.num_candidates, max_len=f.max_len)
        if c.generation == "sample":
            return policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates,
                                   max_len=f.max_len, temperature=c.temperature, top_p=c.top_p, generator=generator)
        if c.generation == "branch":
            beams = policy.generate(pixels, seeds, layers, method="beam", num_candidates=f.num_candidates, max_len=f.max_len)
            parted = policy.generate(pixels, seeds, layers, method="branch", num_candidates=c.branches + 1,
                                     max_len=f.max_len, branch_ids=self.branch_ids, branch_to=self.branch_to,
                                     generator=generator)  # greedy first
            return concat_candidates(beams, parted, policy.config.pad_id)
        if not 1 <= c.mix_beams < f.num_candidates:
            raise ValueError(f"finetune.dico.mix_beams ({c.mix_beams}) must be in 1..num_candidates − 1 "
                             f"({f.num_candidates - 1}) so that the mix holds beams and samples")
        beams = policy.generate(pixels, seeds, layers, method="beam", num_candidates=c.mix_beams, max_len=f.max_len)
        samples = policy.generate(pixels, seeds, layers, method="sample", num_candidates=f.num_candidates - c.mix_beams,
                                  max_len=f.max_len, temperature=c.temperature, top_p=c.top_p, generator=generator)
        return concat_candidates(beams, samples, policy.config.pad_id)

    def layer_loss(self, x: LayerInputs):
        c = self.config
        if c.generation != "branch":
            return dico_loss(x.logps, x.ref_logps, x.shaped, c.beta, c.tau)
        n = self.finetune.num_candidates  # the beams; then the greedy caption and its branches
        loss, metrics = dico_loss(x.logps[:, :n], x.ref_logps[:, :n], x.shaped[:, :n], c.beta, c.tau)
        b_loss, b_metrics = dico_loss(x.logps[:, n:], x.ref_logps[:, n:], x.shaped[:, n:], c.beta, c.tau)
        parted = (x.rewards[:, n + 1:] != x.rewards[:, n:n + 1]).any(-1).float().mean()
        return loss + c.branch_weight * b_loss, {**metrics, **{f"branch/{k}": v for k, v in b_metrics.items()},
                                                 "branch/chosen_is_greedy": (b_metrics["chosen_index"] == 0).float().mean(),
                                                 "branch/reward_differs": parted}
