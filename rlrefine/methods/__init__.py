"""Fine-tuning methods as registered parts (`rlrefine.methods.base`): each module registers one.

``finetune.method`` names one of `METHODS`; its section is ``finetune.<name>``. The fine-tuning loop
(`rlrefine.trainers.finetune`) names no method.
"""

from rlrefine.methods.base import METHODS, LayerInputs, Method, MethodConfig, SamplingConfig, register_method
from rlrefine.methods import dico, grpo, scst  # noqa: F401  (each registers its method)

__all__ = ["METHODS", "LayerInputs", "Method", "MethodConfig", "SamplingConfig", "register_method"]
