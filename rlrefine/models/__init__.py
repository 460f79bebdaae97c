"""rlrefine.models: image encoders, the refinement captioner and its generation routines, and
`clip_checkpoint` (reading CLIP / PAC-S checkpoint files and the QuickGELU guard, shared by the
open_clip encoder and every CLIP-style reward).

Flow: rlrefine.data -> rlrefine.models -> rewards -> rlrefine.losses -> rlrefine.trainers.
"""
from rlrefine.models.captioner import (
    CaptionerConfig,
    CaptionerOutput,
    RefinementCaptioner,
    selective_log_softmax,
)
from rlrefine.models.encoders import (
    EncoderConfig,
    HFVision,
    ImageEncoder,
    OpenCLIPVisual,
    TinyViT,
    build_encoder,
    preprocess_images,
)
from rlrefine.models.generation import GenerationOutput, generate, naive_generate, sample_next

__all__ = [
    "CaptionerConfig",
    "CaptionerOutput",
    "EncoderConfig",
    "GenerationOutput",
    "HFVision",
    "ImageEncoder",
    "OpenCLIPVisual",
    "RefinementCaptioner",
    "TinyViT",
    "build_encoder",
    "generate",
    "naive_generate",
    "preprocess_images",
    "sample_next",
    "selective_log_softmax",
]
