"""Small rewards that follow the protocol, for recipes with `reward: {kind: python, target: ...}` in the
tests (tests/ is on sys.path under pytest, so the target is 'reward_examples:<name>')."""

import torch


class WordCountReward:
    """Fraction of a caption's words that are `word` (a class: built with kwargs and device)."""

    def __init__(self, word: str = "red", device="cpu"):
        self.word, self.device = word, torch.device(device)

    def __call__(self, images, captions, references=None, image_index=None):
        return torch.tensor([c.split().count(self.word) / max(1, len(c.split())) for c in captions], device=self.device)


def length_reward(images, captions, references=None, image_index=None, scale: float = 1.0):
    """scale · number of words (a plain function: it is the reward; kwargs are bound)."""
    return torch.tensor([scale * len(c.split()) for c in captions])


def one_score_per_batch(images, captions, references=None, image_index=None):
    """Breaks the protocol: one number for the whole batch."""
    return torch.tensor(1.0)


NOT_CALLABLE = 3
