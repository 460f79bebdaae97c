"""The CIDEr-D reward (rewards/cider.py): hand-computed values, equality with the evaluation metric
(and so with pycocoevalcap's Cider) on the same corpus, and the reward protocol."""

import math

import pytest
import torch

from rewards.cider import CiderD, CiderReward, document_frequencies, ngram_counts
from rlrefine.data.shapes import ShapesConfig, generate_shapes
from rlrefine.metrics.captions import cider_d


def test_ngram_counts_and_document_frequencies_by_hand():
    assert ngram_counts(["a", "a"]) == {("a",): 2, ("a", "a"): 1}
    df, n = document_frequencies([["a b", "a"], ["a c"]])
    assert n == 2 and df[("a",)] == 2.0 and df[("b",)] == 1.0 and df[("a", "b")] == 1.0


def test_cider_d_by_hand():
    # N = 2 sets; "a b" against its own reference: every n-gram has df 1, weight log 2; orders 1 and 2
    # have cosine 1, orders 3 and 4 are empty (0), equal lengths: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    scorer = CiderD([["a b"], ["c d"]])
    assert scorer.log_n == pytest.approx(math.log(2))
    assert scorer.score("a b", ["a b"]) == pytest.approx(5.0)
    assert scorer.score("c d", ["a b"]) == 0.0
    # an n-gram in every set has idf log 2 - log 2 = 0 and adds nothing
    assert CiderD([["x y"], ["x z"]]).score("x", ["x y"]) == 0.0
    # the length penalty: one more bigram than the reference scales the score by exp(-1/72)
    long = CiderD([["a b"], ["c d"]]).score("a b b", ["a b"])
    assert 0 < long < 5.0


def test_reward_equals_the_evaluation_metric_on_the_same_corpus():
    split = generate_shapes(ShapesConfig(num_train=40, num_val=4, num_test=4, num_test_novel=4, seed=3))["train"]
    index = [i for i in range(len(split)) if not split.is_label[i]][:30]
    refs = [list(split.captions[i]) for i in index]
    cands = [refs[(j + 1) % len(refs)][0] if j % 3 else refs[j][1] for j in range(len(refs))]  # some right, some wrong
    reward = CiderReward(refs)  # document frequencies from this corpus
    scores = reward(None, cands, references=refs)
    assert scores.shape == (len(cands),) and scores.dtype == torch.float32
    metric = cider_d({i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)})
    assert float(scores.double().mean()) == pytest.approx(metric, rel=1e-6)
    assert metric > 0.5


def test_reward_follows_the_protocol_image_index_and_needs_references():
    reward = CiderReward([["a red circle"], ["a blue square"], ["a green triangle"]])
    refs = [["a red circle"], ["a blue square"]]
    out = reward(None, ["a red circle", "a red circle", "a blue square"], references=refs,
                 image_index=torch.tensor([0, 1, 1]))
    assert out[0] > 0 and out[1] == 0 and out[2] == pytest.approx(out[0])
    with pytest.raises(ValueError, match="needs references"):
        reward(None, ["a red circle"])
