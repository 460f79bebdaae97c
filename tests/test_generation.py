"""Generation: the batched, KV-cached decode agrees with the naive reference; log-probs agree with
re-scoring; beams are sorted and distinct; sampling is reproducible."""
import pytest
import torch

from rlrefine.models import CaptionerConfig, EncoderConfig, GenerationOutput, RefinementCaptioner, naive_generate, sample_next
from rlrefine.models.generation import branch_choice


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(seed=0, dtype=torch.float64, vocab=12, **kw):
    """Large random weights so captions vary in length; float64 so code paths compare exactly."""
    torch.manual_seed(seed)
    cfg = CaptionerConfig(encoder=EncoderConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2), d_model=16,
                          num_slots=4, num_refine_layers=3, n_heads=2, readout_layers=2, vocab_size=vocab, max_len=10, **kw)
    model = RefinementCaptioner(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def setup():
    """The first random model (by seed) whose greedy captions stop at several different lengths, so
    the comparisons below exercise early stopping and padding."""
    px = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seeds = torch.tensor([10, 11, 12, 13])
    for seed in range(50):
        model = tiny_model(seed)
        lengths = model.generate(px, seeds, [0, 1, 3], method="greedy").lengths
        if len(set(lengths.flatten().tolist())) > 2:
            return model, px, seeds
    raise AssertionError("no seed gives varied caption lengths")


def _check_well_formed(out: GenerationOutput, cfg):
    B, L, n, T = out.tokens.shape
    assert (out.tokens[..., 0] == cfg.bos_id).all()
    body = out.tokens[..., 1:]
    is_eos = body == cfg.eos_id
    for idx in torch.nonzero(torch.ones(B, L, n)):
        row, length = body[tuple(idx)], int(out.lengths[tuple(idx)])
        assert (row[:length] != cfg.pad_id).all() and (row[:length] != cfg.bos_id).all()
        assert (row[length:] == cfg.pad_id).all()
        if length < T - 1:  # stopped early: the last generated token is eos
            assert row[length - 1] == cfg.eos_id
        assert int(is_eos[tuple(idx)][:length].sum()) <= 1


@pytest.mark.parametrize("method,n,lp", [("greedy", 1, 0.0), ("beam", 4, 0.0), ("beam", 3, 1.0)])
def test_cached_batched_decode_equals_naive(setup, method, n, lp):
    model, px, seeds = setup
    layers = [0, 1, 3]
    fast = model.generate(px, seeds, layers, method=method, num_candidates=n, length_penalty=lp)
    slow = naive_generate(model, px, seeds, layers, method=method, num_candidates=n, length_penalty=lp)
    assert fast.tokens.shape[:3] == (4, 3, n)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.lengths, slow.lengths)
    torch.testing.assert_close(fast.logprobs, slow.logprobs)
    _check_well_formed(fast, model.config)
    assert len(set(fast.lengths.flatten().tolist())) > 2  # the test exercises early stopping and padding


@pytest.mark.parametrize("method,n", [("greedy", 1), ("beam", 4), ("sample", 5)])
def test_generate_logprobs_equal_sequence_logprobs(setup, method, n):
    model, px, seeds = setup
    g = torch.Generator().manual_seed(0)
    out = model.generate(px, seeds, [3, 1], method=method, num_candidates=n, generator=g, temperature=1.3, top_p=0.9)
    with torch.no_grad():
        rescored = model.sequence_logprobs(px, seeds, [3, 1], out.tokens)
    torch.testing.assert_close(out.logprobs, rescored)
    _check_well_formed(out, model.config)


def test_beams_sorted_distinct_and_best_first(setup):
    model, px, seeds = setup
    out = model.generate(px, seeds, None, method="beam", num_candidates=5)
    assert out.tokens.shape[:3] == (4, 4, 5)
    assert (out.logprobs[..., :-1] >= out.logprobs[..., 1:]).all()
    for b in range(4):
        for l in range(4):
            rows = {tuple(t.tolist()) for t in out.tokens[b, l]}
            assert len(rows) == 5
    greedy = model.generate(px, seeds, None, method="greedy")
    assert (out.logprobs[..., 0] >= greedy.logprobs[..., 0] - 1e-9).all()  # beam 0 is at least as good as greedy


def test_decode_stops_when_all_finished():
    model = tiny_model(seed=0)
    with torch.no_grad():
        e = model.readout.tok_emb.weight[model.config.eos_id]
        e *= 50 / e.norm()  # (tied weights) a long eos direction that the final bias points along:
        model.readout.ln_f.bias += 10 * e / e.norm()  # eos logit dominates at every position, everything ends soon
    px, seeds = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2])
    out = model.generate(px, seeds, None, method="greedy", max_len=10)
    assert out.tokens.shape[-1] == 1 + int(out.lengths.max()) < 10
    out = model.generate(px, seeds, None, method="beam", num_candidates=2, max_len=4)
    assert out.tokens.shape[-1] <= 4


def test_sampling_is_reproducible(setup):
    model, px, seeds = setup
    kw = dict(method="sample", num_candidates=6, temperature=1.0)
    a = model.generate(px, seeds, [2], generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(px, seeds, [2], generator=torch.Generator().manual_seed(5), **kw)
    c = model.generate(px, seeds, [2], generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    assert len({tuple(t.tolist()) for t in a.tokens[0, 0]}) > 1  # independent samples per image
    # a vanishing nucleus leaves only the most likely token: sampling becomes greedy
    g = model.generate(px, seeds, [2], method="greedy")
    s = model.generate(px, seeds, [2], method="sample", num_candidates=3, top_p=1e-6,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.tokens, g.tokens.expand_as(s.tokens))


def test_sample_next_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits, top_p=0.7, generator=g)
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    freq = (picks == 0).float().mean().item()
    assert abs(freq - 0.5 / 0.8) < 0.05
    hot = sample_next(logits, temperature=100.0, generator=g)
    assert set(hot.tolist()) == {0, 1, 2, 3}


def test_generation_restores_train_mode_and_validates(setup):
    model, px, seeds = setup
    model.train()
    model.generate(px[:1], seeds[:1], [1], method="greedy")
    assert model.training and model.readout.training
    model.eval()
    with pytest.raises(ValueError, match="method"):
        model.generate(px, seeds, [1], method="nucleus")
    with pytest.raises(ValueError, match="greedy"):
        model.generate(px, seeds, [1], method="greedy", num_candidates=2)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(px, seeds, [1], max_len=99)


def test_float32_cached_decode_matches_naive():
    """The same agreement in float32 on a bigger batch (ties are practically impossible)."""
    model = tiny_model(seed=2, dtype=torch.float32, vocab=30)
    px, seeds = torch.randn(6, 3, 16, 16), torch.arange(6)
    for method, n in (("greedy", 1), ("beam", 3)):
        fast = model.generate(px, seeds, None, method=method, num_candidates=n)
        slow = naive_generate(model, px, seeds, None, method=method, num_candidates=n)
        assert torch.equal(fast.tokens, slow.tokens)
        torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-4, rtol=1e-5)


def test_branch_choice_by_hand():
    """Branch words (7, 8, 9): a row with slot j >= 1 that would say one of them says the (j-1)-th of the other two
    instead, once; slot 0 never parts; a row that has parted, or says another word, keeps its token."""
    ids = torch.tensor([7, 8, 9])
    nxt = torch.tensor([7, 7, 8, 9, 3, 9, 7])
    parted = torch.tensor([False, False, False, False, False, True, False])
    slot = torch.tensor([1, 2, 1, 2, 1, 1, 0])
    tokens, now = branch_choice(nxt, parted, slot, ids)
    # 7 -> others (8, 9): slot 1 -> 8, slot 2 -> 9; 8 -> (7, 9): slot 1 -> 7; 9 -> (7, 8): slot 2 -> 8; slot 0 keeps 7
    assert tokens.tolist() == [8, 9, 7, 8, 3, 9, 7]
    assert now.tolist() == [True, True, True, True, False, True, False]
    later = torch.where(slot > 0, slot + 2, slot)
    assert branch_choice(nxt, parted, later, ids)[0].tolist() == tokens.tolist()  # slots wrap modulo S - 1


def test_branch_choice_to_other_words_by_hand():
    """branch_to (5, 6): a row with slot j >= 1 that would say a branch word (7, 8) says the (j-1)-th (mod 2) of 5, 6
    instead; a row that would say its target anyway does not part there (it may part at a later branch word)."""
    ids, to = torch.tensor([7, 8, 5]), torch.tensor([5, 6])
    nxt = torch.tensor([7, 8, 8, 3, 5, 7, 7])
    parted = torch.tensor([False, False, False, False, False, True, False])
    slot = torch.tensor([1, 2, 3, 1, 1, 1, 0])
    tokens, now = branch_choice(nxt, parted, slot, ids, to)
    assert tokens.tolist() == [5, 6, 5, 3, 5, 7, 7]  # slot 3 wraps to 5; the row saying 5 with target 5 keeps it
    assert now.tolist() == [True, True, True, False, False, True, False]


def test_branch_decode_parts_greedy_captions_at_one_word(setup):
    """Row 0 is the greedy caption; each other row is the greedy caption up to its first branch word and says a
    different other branch word there; log-probs are the model's own (re-scoring agrees)."""
    model, px, seeds = setup
    greedy = model.generate(px, seeds, [0, 1, 3], method="greedy")
    body = greedy.tokens[..., 0, 1:]
    present = {int(t) for t in body.flatten()} - {model.config.pad_id, model.config.eos_id}
    ids = torch.tensor(sorted(present)[:3])  # three words the greedy captions do say
    out = model.generate(px, seeds, [0, 1, 3], method="branch", num_candidates=3, branch_ids=ids)
    _check_well_formed(out, model.config)
    torch.testing.assert_close(out.tokens[:, :, :1, :greedy.tokens.shape[-1]], greedy.tokens)  # row 0: the greedy caption
    with torch.no_grad():
        torch.testing.assert_close(out.logprobs, model.sequence_logprobs(px, seeds, [0, 1, 3], out.tokens))
    parted_rows = 0
    for b in range(4):
        for l in range(3):
            g = body[b, l].tolist()
            first = next((t for t, w in enumerate(g) if w in ids.tolist()), None)
            if first is None or g[first] == model.config.eos_id:
                assert all(out.tokens[b, l, j, 1:len(g) + 1].tolist() == g for j in (1, 2))  # nothing to part at
                continue
            said = [int(out.tokens[b, l, j, 1 + first]) for j in (1, 2)]
            assert all(out.tokens[b, l, j, 1:1 + first].tolist() == g[:first] for j in (1, 2))
            assert sorted(said) == sorted(set(ids.tolist()) - {g[first]})  # the two other words, one per row
            parted_rows += 1
    assert parted_rows > 0
    with pytest.raises(ValueError, match="branch_ids"):
        model.generate(px, seeds, [0], method="branch", num_candidates=2)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        model.generate(px, seeds, [0], method="branch", num_candidates=2, branch_ids=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="branch_to .* goes with branch_ids"):
        model.generate(px, seeds, [0], method="greedy", branch_to=torch.tensor([4]))
    to = torch.tensor([int(ids[0])])  # every branch says the first branch word wherever greedy says another
    out = model.generate(px, seeds, [0, 1, 3], method="branch", num_candidates=3, branch_ids=ids, branch_to=to)
    for b in range(4):
        for l in range(3):
            g = body[b, l].tolist()
            first = next((t for t, w in enumerate(g) if w in ids.tolist()[1:]), None)
            if first is not None and all(w != int(to) for w in g[:first]):
                assert [int(out.tokens[b, l, j, 1 + first]) for j in (1, 2)] == [int(to)] * 2
