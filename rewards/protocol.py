"""The reward protocol's arguments, checked once for every reward kind that reads images.

A reward is called as ``reward(images, captions, references=None, image_index=None)``; ``image_index[i]``
is the row of ``images`` that caption ``i`` describes (default: one caption per image, in order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["caption_image_index"]


def caption_image_index(n_images: int, n_captions: int,
                        image_index: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    """The image row of each caption as a CPU LongTensor ``[n_captions]``; a clear error when the counts disagree
    or a row is out of range."""
    if image_index is None:
        if n_images != n_captions:
            raise ValueError(f"{n_captions} captions for {n_images} images: pass image_index "
                             "to score several captions per image")
        return torch.arange(n_images)
    index = torch.as_tensor(image_index, dtype=torch.long).flatten().cpu()
    if index.numel() != n_captions:
        raise ValueError(f"image_index has {index.numel()} entries for {n_captions} captions")
    if n_captions and (int(index.min()) < 0 or int(index.max()) >= n_images):
        raise ValueError(f"image_index out of range for {n_images} images")
    return index
