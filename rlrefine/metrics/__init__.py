"""Evaluation metrics, computed per refinement layer (docs/design.md).

Where this sits in the flow: ``trainers -> **metrics** / evaluate -> cli``.

* :mod:`.captions`    BLEU-4, ROUGE-L, CIDEr-D (pycocoevalcap, Java-free tokenization), METEOR /
  SPICE when Java and their jars are present (else ``None``)
* :mod:`.graduality`  progress curve, graduality G, layer score P, refinement score RS
* :mod:`.text_stats`  mean length, vocabulary size, repeated-n-gram rate
* :mod:`.grounding`   grounded precision / recall against synthetic scenes (``grounding_scores``),
  imported lazily so this package imports without it
"""

from __future__ import annotations

from typing import Any

from rlrefine.metrics.captions import bleu4, caption_metrics, cider_d, meteor, ptb_tokenize, rouge_l, spice
from rlrefine.metrics.graduality import graduality, layer_score, progress_curve, refinement_score
from rlrefine.metrics.text_stats import text_stats

__all__ = [
    "bleu4",
    "caption_metrics",
    "cider_d",
    "meteor",
    "ptb_tokenize",
    "rouge_l",
    "spice",
    "graduality",
    "layer_score",
    "progress_curve",
    "refinement_score",
    "text_stats",
    "grounding_scores",
]


def __getattr__(name: str) -> Any:
    # grounding.py is owned by the data side and may import scene parsing; load it on first use.
    if name == "grounding_scores":
        from rlrefine.metrics.grounding import grounding_scores

        return grounding_scores
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
