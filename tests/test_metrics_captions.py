"""Tests for rlrefine/metrics/captions.py: agreement with pycocoevalcap's scorers, hand cases,
the Java-free tokenizer against Stanford's PTBTokenizer (when Java is present)."""

import math
import os
import random
import shutil
import subprocess

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from rlrefine.metrics import captions as cap
from rlrefine.metrics.captions import (
    PTB_PUNCTUATIONS,
    bleu4,
    caption_metrics,
    cider_d,
    meteor,
    ptb_tokenize,
    rouge_l,
    spice,
    tokenize_corpus,
)

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["cube", "ball", "cone", "ring", "star", "pyramid", "cylinder"]
SIZES = ["small", "large", "tiny", "big"]
RELATIONS = ["left of", "right of", "above", "below", "next to", "behind"]
OPENERS = ["A", "There is a", "An image of a", "This picture shows a", "We see a", "a"]
ENDINGS = [".", "", "!", " .", "...", "?"]


def _phrase(rng):
    return f"{rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}"


def _caption(rng, a, b, rel):
    forms = [
        f"{rng.choice(OPENERS)} {a} {rel} a {b}{rng.choice(ENDINGS)}",
        f"The {a}'s {rel} the {b}, isn't it{rng.choice(ENDINGS)}",
        f"A {a} (and a {b}) -- {rel}{rng.choice(ENDINGS)}",
        f"Two objects: a {a}; a {b}{rng.choice(ENDINGS)}",
        f'A "{a}" sits {rel} a {b}, doesn\'t it',
    ]
    text = rng.choice(forms)
    return text.upper() if rng.random() < 0.1 else text


def make_fixture(n_images=60, seed=0):
    """Deterministic varied captions: 5 references and 1 candidate per image, raw text."""
    rng = random.Random(seed)
    gts, res = {}, {}
    for i in range(n_images):
        a, b, rel = _phrase(rng), _phrase(rng), rng.choice(RELATIONS)
        gts[i] = [_caption(rng, a, b, rel) for _ in range(5)]
        u = rng.random()
        if u < 0.4:  # a paraphrase of the truth
            res[i] = [_caption(rng, a, b, rel)]
        elif u < 0.7:  # partly wrong
            res[i] = [_caption(rng, a, _phrase(rng), rng.choice(RELATIONS))]
        elif u < 0.9:  # unrelated
            res[i] = [_caption(rng, _phrase(rng), _phrase(rng), rng.choice(RELATIONS))]
        else:  # degenerate
            res[i] = [rng.choice(["", "a a a a", "red", "a red red cube cube."])]
    return gts, res


# ---------------------------------------------------------------------------- agreement with pycocoevalcap


def test_metrics_agree_with_pycocoevalcap_scorers():
    gts, res = make_fixture()
    assert len(gts) >= 50
    g, r = tokenize_corpus(gts), tokenize_corpus(res)
    bleu_ref = Bleu(4).compute_score(g, r, verbose=0)[0][3]
    cider_ref = Cider().compute_score(g, r)[0]
    rouge_ref = Rouge().compute_score(g, r)[0]
    assert bleu4(gts, res) == pytest.approx(bleu_ref, abs=1e-6)
    assert cider_d(gts, res) == pytest.approx(cider_ref, abs=1e-6)
    assert rouge_l(gts, res) == pytest.approx(rouge_ref, abs=1e-6)
    # sanity: a non-trivial corpus gives non-trivial scores
    assert 0.05 < bleu4(gts, res) < 0.95
    assert 0.1 < cider_d(gts, res) < 10
    assert 0.1 < rouge_l(gts, res) < 1


def test_better_candidates_score_higher():
    gts, _ = make_fixture(seed=1)
    perfect = {k: [v[0]] for k, v in gts.items()}
    other = {k: [gts[(k + 1) % len(gts)][0]] for k in gts}
    for metric in (bleu4, cider_d, rouge_l):
        assert metric(gts, perfect) > metric(gts, other)


def _java_ptb(texts, tmp_path):
    """Run Stanford's PTBTokenizer exactly as pycocoevalcap does, then drop its punctuation list."""
    jar = os.path.join(cap._pycocoevalcap_dir(), "tokenizer", "stanford-corenlp-3.4.1.jar")
    src = tmp_path / "sentences.txt"
    src.write_text("\n".join(t.replace("\n", " ") for t in texts))
    cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(src)]
    lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS) for line in lines[: len(texts)]]


EDGE_CAPTIONS = [
    "A man's riding a bike (on the street).",
    "Two dogs don't play with a frisbee, in the park!",
    'A "red" t-shirt hangs on a clothes-line; it\'s 3.5 feet long...',
    "The woman -- who is smiling -- holds an umbrella & a cup/mug?",
    "A cat sitting on a laptop's keyboard: it can't move.",
    "There're 2 kids 'playing' at 5:30 p.m. in the U.S.",
    "  Multiple   spaces and CAPS LOCK and $5 and 50% off",
    "A {curly} [square] bracket test, and the dogs' toys",
    "I'd, we'll, they've, you're, I'm gonna wanna cannot",
    "Mr. Smith stands near St. Louis, etc.",
    "A dog,cat and bird. 1,000 birds!!",
    "a dog 's bone",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for Stanford's PTBTokenizer")
def test_pure_python_tokenizer_matches_stanford_ptb(tmp_path):
    gts, res = make_fixture()
    texts = [c for v in gts.values() for c in v] + [v[0] for v in res.values()] + EDGE_CAPTIONS
    assert [ptb_tokenize(t) for t in texts] == _java_ptb(texts, tmp_path)


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for Stanford's PTBTokenizer")
def test_metrics_equal_the_java_tokenized_coco_pipeline(tmp_path):
    gts, res = make_fixture(seed=2)
    ids = list(gts)
    flat_g = _java_ptb([c for k in ids for c in gts[k]], tmp_path)
    g = {k: flat_g[5 * i : 5 * i + 5] for i, k in enumerate(ids)}
    r = dict(zip(ids, ([c] for c in _java_ptb([res[k][0] for k in ids], tmp_path))))
    assert cider_d(gts, res) == pytest.approx(Cider().compute_score(g, r)[0], abs=1e-6)
    assert bleu4(gts, res) == pytest.approx(Bleu(4).compute_score(g, r, verbose=0)[0][3], abs=1e-6)
    assert rouge_l(gts, res) == pytest.approx(Rouge().compute_score(g, r)[0], abs=1e-6)


# ---------------------------------------------------------------------------- tokenizer by hand


def test_ptb_tokenize_hand_cases():
    assert ptb_tokenize("A Man's riding a bike.") == "a man 's riding a bike"
    assert ptb_tokenize("Dogs don't fly, do they?") == "dogs do n't fly do they"
    assert ptb_tokenize('A "red" t-shirt; 3.5 feet...') == "a red t-shirt 3.5 feet"
    assert ptb_tokenize("A cat (on a mat)") == "a cat -lrb- on a mat -rrb-"  # kept, as in pycocoevalcap
    assert ptb_tokenize("") == ""
    assert ptb_tokenize(" . , ! ") == ""


# ---------------------------------------------------------------------------- hand-checked values


def test_bleu4_identical_is_one():
    gts = {1: ["a red cube left of a blue ball"], 2: ["two green cones"]}
    assert bleu4(gts, {1: ["A red cube left of a blue ball."], 2: ["Two green cones"]}) == pytest.approx(1.0, abs=1e-6)


def test_bleu4_brevity_penalty_hand_value():
    # candidate is a 4-word prefix of a 6-word reference: p1..p4 = 1, BP = exp(1 - 6/4)
    gts = {0: ["the cat sat on the mat"]}
    assert bleu4(gts, {0: ["the cat sat on"]}) == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_rouge_l_hand_value():
    # LCS("one two three four", "one three four five six") = 3: P = 3/4, R = 3/5, β = 1.2
    gts = {0: ["one three four five six"]}
    res = {0: ["one two three four"]}
    P, R, b2 = 3 / 4, 3 / 5, 1.2**2
    assert rouge_l(gts, res) == pytest.approx((1 + b2) * P * R / (R + b2 * P), abs=1e-9)


def test_cider_d_single_image_is_zero_and_identical_corpus_scores_high():
    # idf = log(N) - log(df) vanishes for a corpus of one image
    assert cider_d({0: ["a red cube"]}, {0: ["a red cube"]}) == 0.0
    gts = {0: ["a red cube"], 1: ["a blue ball"], 2: ["two green cones"]}
    res = {k: [v[0]] for k, v in gts.items()}
    # identical candidate and single reference: cosine 1 for every n with n-grams, length penalty 1
    # -> 10 * mean over n=1..4 of the n-gram cosines; "a red cube" has no 4-grams -> 10 * 3/4
    assert cider_d(gts, res) == pytest.approx(7.5, abs=1e-6)


# ---------------------------------------------------------------------------- empty candidates


def test_empty_candidate_does_not_crash_and_scores_nothing():
    gts, res = make_fixture(n_images=20, seed=3)
    res = dict(res)
    res[0] = [""]
    res[1] = ["..."]  # only punctuation -> empty after tokenization
    for metric in (bleu4, cider_d, rouge_l):
        assert math.isfinite(metric(gts, res))
    g, r = tokenize_corpus(gts), tokenize_corpus(res)
    assert Cider().compute_score(g, r)[1][0] == 0.0
    assert Rouge().compute_score(g, r)[1][0] == 0.0
    all_empty = {k: [""] for k in gts}
    assert bleu4(gts, all_empty) == pytest.approx(0.0, abs=1e-12)
    assert cider_d(gts, all_empty) == 0.0
    assert rouge_l(gts, all_empty) == 0.0


def test_input_validation():
    with pytest.raises(ValueError, match="same ids"):
        bleu4({0: ["a"], 1: ["b"]}, {0: ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        cider_d({0: ["a"]}, {0: ["a", "b"]})
    with pytest.raises(ValueError, match="bare string"):
        rouge_l({0: ["a"]}, {0: "a"})
    with pytest.raises(ValueError, match="empty"):
        bleu4({}, {})


# ---------------------------------------------------------------------------- METEOR / SPICE


def test_meteor_and_spice_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    gts, res = make_fixture(n_images=5)
    assert meteor(gts, res) is None
    assert spice(gts, res) is None
    m = caption_metrics(gts, res)
    assert set(m) == {"BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR", "SPICE"}
    assert m["METEOR"] is None and m["SPICE"] is None
    assert m["CIDEr-D"] == pytest.approx(cider_d(gts, res))


def test_spice_needs_corenlp_jars_present():
    jar = os.path.join(cap._pycocoevalcap_dir(), "spice", "lib", "stanford-corenlp-3.6.0.jar")
    assert cap.spice_available() == (shutil.which("java") is not None and os.path.isfile(jar)
                                     and os.path.isfile(jar.replace(".jar", "-models.jar")))


@pytest.mark.slow
@pytest.mark.skipif(not cap.meteor_available(), reason="needs java and meteor-1.5.jar")
def test_meteor_agrees_with_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = make_fixture(n_images=50)
    value = meteor(gts, res)
    expected = Meteor().compute_score(tokenize_corpus(gts), tokenize_corpus(res))[0]
    assert value == pytest.approx(expected, abs=1e-6)
    assert 0.0 < value < 1.0
