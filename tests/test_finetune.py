"""The fine-tuning step (rlrefine/trainers/finetune.py) of every registered method on real (tiny) computation.

A toy reward that counts the word "red" is easy to raise by changing what the readout says, so a
few dozen steps of the real loss (rollout -> rewards -> shaping -> DiCO at every layer) must raise it
at the final layer while the frozen reference stays put.
"""

import copy

import pytest
import torch
from accelerate import Accelerator

from rlrefine.config import FinetuneSection
from rlrefine.data.tokenizer import CaptionTokenizer
from rlrefine.losses import layer_weights, schedule
from rlrefine.methods import METHODS
from rlrefine.models import CaptionerConfig, EncoderConfig, RefinementCaptioner
from rlrefine.trainers.finetune import SequenceScorer, compute_loss, rollout

WORDS = "a red blue green circle square triangle small large"


class RedReward:
    """Protocol-conforming toy reward: fraction of words that are 'red' (higher is better)."""

    def __call__(self, images, captions, references=None, image_index=None):
        return torch.tensor([c.split().count("red") / max(1, len(c.split())) for c in captions])


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    tok = CaptionTokenizer.train([WORDS])
    cfg = CaptionerConfig(encoder=EncoderConfig(kind="tiny_vit", image_size=16, patch_size=8, width=32, depth=1, heads=2),
                          d_model=32, num_slots=4, num_refine_layers=2, n_heads=2, readout_layers=1,
                          vocab_size=tok.vocab_size, max_len=8, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    return RefinementCaptioner(cfg), tok


def method_of(f):
    return METHODS[f.method](f.method_config, f)


def final_layer_reward(policy, tok, pixels, seeds, f):
    """Mean toy reward of the final layer's beam candidates (deterministic)."""
    f = FinetuneSection(num_candidates=f.num_candidates, max_len=f.max_len, dico={"generation": "beam"})
    ro = rollout(policy, method_of(f), RedReward(), None, pixels, seeds, [1, 2], f, tok, schedule("linear", 2))
    return float(ro.rewards[:, -1].mean())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_finetune_step_raises_the_reward(method):
    policy, tok = tiny_policy()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    f = FinetuneSection(method=method, num_candidates=4, max_len=8, dico={"beta": 0.5, "tau": 1.0},
                        lambda_grad=0.0, lambda_len=0.0)
    acc = Accelerator(cpu=True)
    scorer = SequenceScorer(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
    pixels = policy.encoder.preprocess(images)
    seeds = torch.arange(8)
    before = final_layer_reward(policy, tok, pixels, seeds, f)
    w = layer_weights("linear", 2)
    for _ in range(40):
        loss, ro, metrics = compute_loss(policy, scorer, reference, method_of(f), RedReward(), images, pixels, seeds,
                                         [1, 2], f, tok, schedule("linear", 2), w, acc, generator=g)
        assert torch.isfinite(loss) and len(metrics) == 2 and "kl_ref" in metrics[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = final_layer_reward(policy, tok, pixels, seeds, f)
    assert after > before + 0.2, (before, after)
    # the reference model is untouched (the KL anchor is frozen)
    assert final_layer_reward(reference, tok, pixels, seeds, f) == pytest.approx(before)


def test_rollout_shapes_and_shaping_penalises_off_schedule_layers():
    policy, tok = tiny_policy(1)
    images = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    pixels = policy.encoder.preprocess(images)
    f_off = FinetuneSection(num_candidates=3, max_len=8, lambda_grad=0.0, lambda_len=0.0)
    f_on = FinetuneSection(num_candidates=3, max_len=8, lambda_grad=1.0, lambda_len=0.0)
    sched = schedule("linear", 2)
    ro_off = rollout(policy, method_of(f_off), RedReward(), images, pixels, torch.arange(3), [1, 2], f_off, tok, sched)
    ro_on = rollout(policy, method_of(f_on), RedReward(), images, pixels, torch.arange(3), [1, 2], f_on, tok, sched)
    assert ro_off.tokens.shape[:3] == (3, 2, 3) and len(ro_off.captions) == 3 * 2 * 3
    torch.testing.assert_close(ro_off.shaped, ro_off.rewards)  # no shaping: shaped == raw
    # layer 1 (k < K) pays |p - (1 - s(1))|; the final layer is judged on quality alone
    expected = ro_on.rewards[:, 0] - (ro_on.progress[:, 0] - 0.5).abs()
    torch.testing.assert_close(ro_on.shaped[:, 0], expected)
    torch.testing.assert_close(ro_on.shaped[:, 1], ro_on.rewards[:, 1])


class BagOfWordsReward(RedReward):
    """The red-word reward with text embeddings: word counts over the toy vocabulary."""

    def embed_texts(self, texts):
        vocab = WORDS.split()
        counts = torch.tensor([[c.split().count(w) for w in vocab] for c in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(counts + 1e-3, dim=-1)


def test_rollout_shapes_on_text_embedding_progress():
    from rlrefine.losses import embedding_progress

    policy, tok = tiny_policy(1)
    images = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)
    pixels = policy.encoder.preprocess(images)
    f = FinetuneSection(num_candidates=3, max_len=8, lambda_grad=1.0, lambda_len=0.0, shaping_progress="embedding")
    reward = BagOfWordsReward()
    ro = rollout(policy, method_of(f), reward, images, pixels, torch.arange(3), [1, 2], f, tok, schedule("linear", 2))
    greedy = policy.generate(pixels, torch.arange(3), [0, 2], method="greedy", num_candidates=1, max_len=8)
    anchors = reward.embed_texts([row[0] for per_img in tok.decode_batch(greedy.tokens) for row in per_img]).view(3, 2, -1)
    expected = embedding_progress(reward.embed_texts(ro.captions).view(3, 2, 3, -1), anchors[:, 0], anchors[:, 1])
    torch.testing.assert_close(ro.progress, expected)
    torch.testing.assert_close(ro.shaped[:, 0], ro.rewards[:, 0] - (expected[:, 0] - 0.5).abs())


def test_embedding_progress_needs_a_reward_with_text_embeddings():
    from rlrefine.trainers.finetune import check_shaping_reward

    f = FinetuneSection(shaping_progress="embedding", lambda_grad=1.0)
    with pytest.raises(ValueError, match="shaping_progress=reward"):
        check_shaping_reward(f, RedReward())
    check_shaping_reward(f, BagOfWordsReward())
    check_shaping_reward(f.model_copy(update={"lambda_grad": 0.0}), RedReward())  # no shaping, nothing to measure


def test_a_moved_key_is_an_error_naming_its_new_home():
    from rlrefine.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"finetune.beta moved to the method's own section: finetune.dico.beta"):
        load_recipe(None, ["finetune.beta=0.3"])
    with pytest.raises(RecipeError, match=r"finetune.scst_baseline moved .*finetune.scst.baseline"):
        load_recipe(None, ["finetune.scst_baseline=greedy"])
    with pytest.raises(RecipeError, match=r"finetune.dico.gamma"):  # unknown keys of a method section are errors too
        load_recipe(None, ["finetune.dico.gamma=1"])
    assert load_recipe(None, ["finetune.dico.beta=0.3"]).finetune.dico.beta == 0.3


def test_dico_mix_draws_beams_and_samples_side_by_side():
    policy, tok = tiny_policy(2)
    images = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels = policy.encoder.preprocess(images)
    f = FinetuneSection(num_candidates=4, max_len=8, dico={"generation": "mix", "mix_beams": 2})
    gen = method_of(f).generate(policy, pixels, torch.arange(3), [1, 2], torch.Generator().manual_seed(0))
    beams = policy.generate(pixels, torch.arange(3), [1, 2], method="beam", num_candidates=2, max_len=8)
    assert gen.tokens.shape[:3] == (3, 2, 4)
    T = beams.tokens.shape[-1]
    torch.testing.assert_close(gen.tokens[:, :, :2, :T], beams.tokens)  # the first two are the beams
    assert (gen.tokens[:, :, :2, T:] == tok.pad_id).all()
    # the samples' log-probs are the model's own, like the beams'
    lp = policy.sequence_logprobs(pixels, torch.arange(3), [1, 2], gen.tokens)
    torch.testing.assert_close(lp, gen.logprobs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mix_beams"):
        method_of(FinetuneSection(num_candidates=2, max_len=8, dico={"generation": "mix", "mix_beams": 2})).generate(
            policy, pixels, torch.arange(3), [1, 2], None)


def _red_share_before_and_after(policy, reference, method, f, tok, images, pixels, seeds, g, steps: int = 30):
    """How often the final layer's greedy caption names "red" first among the colours, before and after ``steps``
    DiCO steps against `RedReward` on layers 1 and 2."""
    colours = tok.word_ids(["red", "blue", "green"], "k").tolist()

    def red_share():
        greedy = policy.generate(pixels, seeds, [2], method="greedy", max_len=8).tokens[:, 0, 0]
        return sum(next((int(t) for t in row if t in colours), None) == colours[0] for row in greedy) / len(greedy)

    acc, scorer = Accelerator(cpu=True), SequenceScorer(policy)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    sched, w = schedule("linear", 2), layer_weights("linear", 2)
    before = red_share()
    for _ in range(steps):
        loss, _, _ = compute_loss(policy, scorer, reference, method, RedReward(), images, pixels, seeds, [1, 2], f, tok,
                                  sched, w, acc, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, red_share()


def test_dico_branch_candidates_part_at_the_branch_words_and_teach_the_one_the_reward_prefers():
    """generation: branch: the n beams, then the greedy caption and greedy decodes that each swap the first colour
    word it says for another colour. DiCO on them learns to say the colour the reward pays for ("red")."""
    policy, tok = tiny_policy(3)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    f = FinetuneSection(num_candidates=2, max_len=8, lambda_grad=0.0, lambda_len=0.0,
                        dico={"generation": "branch", "branches": 2, "branch_words": ["red", "blue", "green"], "beta": 0.5})
    method = METHODS["dico"](f.dico, f, tok)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
    pixels, seeds = policy.encoder.preprocess(images), torch.arange(8)
    gen = method.generate(policy, pixels, seeds, [1, 2], torch.Generator().manual_seed(0))
    beams = policy.generate(pixels, seeds, [1, 2], method="beam", num_candidates=2, max_len=8)
    greedy = policy.generate(pixels, seeds, [1, 2], method="greedy", max_len=8).tokens
    assert gen.tokens.shape[:3] == (8, 2, 5)
    torch.testing.assert_close(gen.tokens[:, :, :2, :beams.tokens.shape[-1]], beams.tokens)  # the beams come first
    torch.testing.assert_close(gen.tokens[:, :, 2:3, :greedy.shape[-1]], greedy)  # then the greedy caption
    colours = tok.word_ids(["red", "blue", "green"], "k")
    parted = 0
    for b in range(8):
        for l in range(2):
            natural = next((int(w) for w in greedy[b, l, 0] if w in colours), None)
            said = [next((int(w) for w in row[1:] if w in colours), None) for row in gen.tokens[b, l, 3:]]
            if natural is not None:  # the two branches say the two colours greedy does not say
                assert sorted(said + [natural]) == sorted(colours.tolist())
                parted += 1
    assert parted > 0

    before, after = _red_share_before_and_after(policy, reference, method, f, tok, images, pixels, seeds, g)
    assert after >= before + 0.5, (before, after)


def test_dico_branch_to_pits_what_the_caption_says_against_the_named_words_only():
    """branch_to: [red] with branch_words [blue, green]: the one branch says "red" where the greedy caption says blue or
    green, and DiCO on that group learns to say the colour the reward pays for."""
    policy, tok = tiny_policy(3)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    f = FinetuneSection(num_candidates=2, max_len=8, lambda_grad=0.0, lambda_len=0.0,
                        dico={"generation": "branch", "branches": 1, "branch_words": ["blue", "green"],
                              "branch_to": ["red"], "beta": 0.5})
    method = METHODS["dico"](f.dico, f, tok)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8, generator=g)
    pixels, seeds = policy.encoder.preprocess(images), torch.arange(8)
    gen = method.generate(policy, pixels, seeds, [1, 2], torch.Generator().manual_seed(0))
    greedy = policy.generate(pixels, seeds, [1, 2], method="greedy", max_len=8).tokens
    red, colours = int(tok.word_ids(["red"], "k")[0]), tok.word_ids(["red", "blue", "green"], "k").tolist()
    parted = 0
    for b in range(8):
        for l in range(2):
            natural = next((int(w) for w in greedy[b, l, 0] if w in colours), None)
            said = next((int(w) for w in gen.tokens[b, l, 3, 1:] if w in colours), None)
            if natural is not None:
                assert said == red
                parted += natural != red
    assert parted > 0
    before, after = _red_share_before_and_after(policy, reference, method, f, tok, images, pixels, seeds, g)
    assert after >= before + 0.5, (before, after)


def test_dico_branch_words_must_be_tokens_of_the_vocabulary():
    _, tok = tiny_policy()
    f = FinetuneSection(dico={"generation": "branch", "branch_words": ["red", "purple"]})
    with pytest.raises(ValueError, match="finetune.dico.branch_words: 'purple' is not one token"):
        METHODS["dico"](f.dico, f, tok)
    with pytest.raises(ValueError, match="needs the captioner's tokenizer"):
        METHODS["dico"](f.dico, f)
    f = FinetuneSection(dico={"generation": "branch", "branch_words": ["red", "blue"], "branch_to": ["purple"]})
    with pytest.raises(ValueError, match="finetune.dico.branch_to: 'purple' is not one token"):
        METHODS["dico"](f.dico, f, tok)
    with pytest.raises(ValueError, match="at least 2"):
        FinetuneSection(dico={"generation": "branch", "branch_words": ["red"]})
