"""rlrefine.data: datasets, tokenizers and the torch-facing loading pieces (bottom of the flow).

Modules: `split` (CaptionSplit + cache, seeded hash splits), `shapes` (the embedded procedural
dataset), `coco` (Karpathy split or the official caption files), `captions_csv` (image,caption CSV
files), `imagefolder` (label-only data), `tokenizer` (CaptionTokenizer), `datasets`
(CaptionDataset, mixed_sampler, collate).
"""

from rlrefine.data.captions_csv import load_caption_csv
from rlrefine.data.coco import load_coco, load_karpathy_split
from rlrefine.data.datasets import (
    DEFAULT_LABEL_WEIGHT,
    BadImageError,
    CaptionDataset,
    collate,
    example_weights,
    make_collate,
    mixed_sampler,
)
from rlrefine.data.imagefolder import load_image_folder
from rlrefine.data.shapes import (
    ParsedCaption,
    Scene,
    SceneObject,
    ShapesConfig,
    generate_shapes,
    load_or_generate_shapes,
    parse_caption,
)
from rlrefine.data.split import CaptionSplit, load_split, save_split
from rlrefine.data.tokenizer import CaptionTokenizer

__all__ = [
    "BadImageError",
    "CaptionDataset",
    "CaptionSplit",
    "CaptionTokenizer",
    "DEFAULT_LABEL_WEIGHT",
    "ParsedCaption",
    "Scene",
    "SceneObject",
    "ShapesConfig",
    "collate",
    "example_weights",
    "generate_shapes",
    "load_caption_csv",
    "load_coco",
    "load_image_folder",
    "load_karpathy_split",
    "load_or_generate_shapes",
    "load_split",
    "make_collate",
    "mixed_sampler",
    "parse_caption",
    "save_split",
]
