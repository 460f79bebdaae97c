"""rlrefine.data: datasets, tokenizers and training batches (bottom of the flow).

Modules: `split` (CaptionSplit, seeded hash splits, the caption policy `sanitize_split` and its
`DataIssues` counts), `sources` (the data kinds and `load_splits`), `shapes` (the embedded procedural
dataset) and `shapes_probes` (what a reward knows about it), `coco` (Karpathy split or the official
caption files), `captions_csv` (image,caption CSV files), `webdataset` (tar shards), `imagefolder`
(label-only data), `images` (decoding files, `BadImageError`), `tokenizer` (CaptionTokenizer),
`batches` (the step-indexed training batch stream and z_0 seeds), `cache` (splits on disk).
"""

from rlrefine.data.batches import Batch, batch_stream, eval_z0_seeds, load_images, step_z0_seeds
from rlrefine.data.cache import load_or_generate_shapes, load_split, save_split
from rlrefine.data.captions_csv import load_caption_csv
from rlrefine.data.coco import load_coco, load_karpathy_split
from rlrefine.data.imagefolder import load_image_folder
from rlrefine.data.images import BadImageError, load_image
from rlrefine.data.shapes import (
    ParsedCaption,
    Scene,
    SceneObject,
    ShapesConfig,
    generate_shapes,
    parse_caption,
)
from rlrefine.data.sources import DATA_KINDS, load_splits
from rlrefine.data.split import CaptionSplit, DataIssues, sanitize_split
from rlrefine.data.tokenizer import CaptionTokenizer, build_tokenizer

__all__ = [
    "Batch",
    "BadImageError",
    "CaptionSplit",
    "CaptionTokenizer",
    "DATA_KINDS",
    "DataIssues",
    "ParsedCaption",
    "Scene",
    "SceneObject",
    "ShapesConfig",
    "batch_stream",
    "build_tokenizer",
    "eval_z0_seeds",
    "generate_shapes",
    "load_caption_csv",
    "load_coco",
    "load_image",
    "load_image_folder",
    "load_images",
    "load_karpathy_split",
    "load_or_generate_shapes",
    "load_split",
    "load_splits",
    "parse_caption",
    "sanitize_split",
    "save_split",
    "step_z0_seeds",
]
