"""RefinementCaptioner: z_0 determinism, the readout sees only z_k, teacher forcing vs re-scoring,
checkpoints, and a small overfit run on synthetic images."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rlrefine.models import CaptionerConfig, CaptionerOutput, EncoderConfig, RefinementCaptioner


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(**kw):
    base = dict(encoder=EncoderConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2), d_model=16,
                num_slots=4, num_refine_layers=3, n_heads=2, readout_layers=2, vocab_size=12, max_len=10)
    base.update(kw)
    return CaptionerConfig(**base)


def tiny_model(seed=0, dtype=torch.float64, **kw):
    """A tiny model with large random weights (so captions vary in length), in float64 so that exact
    comparisons between code paths are not at the mercy of rounding."""
    torch.manual_seed(seed)
    model = RefinementCaptioner(tiny_config(**kw)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


def test_config_roundtrip_and_unknown_keys():
    cfg = tiny_config(z0_std=0.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert CaptionerConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        CaptionerConfig.from_dict({**d, "bogus": 1})


def test_z0_is_deterministic_per_seed():
    model = tiny_model()
    a = model.z0(torch.tensor([5, 7, 5]))
    assert a.shape == (3, 4, 16)
    torch.testing.assert_close(a[0], a[2])
    assert not torch.allclose(a[0], a[1])
    torch.testing.assert_close(model.z0(torch.tensor([7])), a[1:2])  # same seed, any batch, any call
    other = tiny_model(seed=1, dtype=torch.float32)  # other weights, other dtype: same noise
    torch.testing.assert_close(other.z0(torch.tensor([5, 7])), a[:2].float())
    z = model.z0(torch.arange(200))
    assert abs(z.std().item() - 1.0) < 0.05
    z_half = tiny_model(z0_std=0.5).z0(torch.tensor([5]))
    torch.testing.assert_close(z_half, 0.5 * a[:1])


def test_refine_stacks_all_layers():
    model = tiny_model()
    px, seeds = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2])
    V = model.encode_image(px)
    assert V.shape == (2, 4, 16)
    Z = model.refine(V, seeds)
    assert Z.shape == (2, 4, 4, 16)  # [B, K+1, M, d]
    torch.testing.assert_close(Z[:, 0], model.z0(seeds))
    z1 = model.refine_blocks[0](Z[:, 0], V, model.slot_pos)
    torch.testing.assert_close(Z[:, 1], z1)


def test_readout_never_sees_the_image():
    model = tiny_model()
    seeds = torch.tensor([1, 2])
    px_a, px_b = torch.randn(2, 2, 3, 16, 16, dtype=torch.float64)
    tokens = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 2, 0, 0]])
    out_a, out_b = model(px_a, tokens, seeds), model(px_b, tokens, seeds)
    # layer 0 is z_0: its captions cannot depend on the image; refined layers do
    torch.testing.assert_close(out_a.logits[:, 0], out_b.logits[:, 0])
    assert not torch.allclose(out_a.logits[:, 3], out_b.logits[:, 3])
    # feed image B but the latents of image A: the logits are those of image A exactly
    Z_a = out_a.latents
    model.refine = lambda V, z0_seed: Z_a
    torch.testing.assert_close(model(px_b, tokens, seeds).logits, out_a.logits)


def test_forward_batches_layers_and_matches_single_layer_calls():
    model = tiny_model()
    px, seeds = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([4, 5, 6])
    tokens = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 6, 7, 8, 9, 2], [1, 2, 0, 0, 0, 0]])
    out = model(px, tokens, seeds, layers=[3, 1])
    assert isinstance(out, CaptionerOutput)
    assert out.logits.shape == (3, 2, 5, 12) and out.latents.shape == (3, 4, 4, 16)
    torch.testing.assert_close(out.logits[:, 0], model(px, tokens, seeds, layers=[3]).logits[:, 0])
    torch.testing.assert_close(out.logits[:, 1], model.readout(out.latents[:, 1], tokens[:, :-1]))
    assert model(px, tokens, seeds).logits.shape[1] == 4  # default: all layers 0..K
    with pytest.raises(ValueError, match="layers"):
        model(px, tokens, seeds, layers=[4])


def test_git_mask_prefix_bidirectional_text_causal():
    model = tiny_model()
    m = model.readout.git_mask(3, "cpu")
    M = 4
    assert m[:M, :M].all() and not m[:M, M:].any()  # prefix <-> prefix only
    assert m[M:, :M].all()  # text sees the whole prefix
    assert torch.equal(m[M:, M:], torch.ones(3, 3, dtype=torch.bool).tril())  # and earlier text
    # causality: changing a later token leaves earlier logits unchanged
    z = torch.randn(1, 4, 16, dtype=torch.float64)
    a = model.readout(z, torch.tensor([[1, 4, 5, 6]]))
    b = model.readout(z, torch.tensor([[1, 4, 9, 9]]))
    torch.testing.assert_close(a[:, :2], b[:, :2])
    # the prefix is order-aware (learned slot positions) but is told nothing about the layer
    assert model.readout.prefix_pos.shape == (4, 16)


def test_sequence_logprobs_matches_teacher_forcing():
    model = tiny_model()
    px, seeds = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([8, 9])
    tokens = torch.tensor([[1, 4, 5, 2, 0, 0], [1, 6, 7, 8, 9, 2]])
    layers = [0, 2, 3]
    out = model(px, tokens, seeds, layers=layers)
    logp = torch.log_softmax(out.logits, -1).gather(-1, tokens[:, None, 1:, None].expand(-1, 3, -1, 1)).squeeze(-1)
    expected = (logp * (tokens[:, None, 1:] != 0)).sum(-1)  # [B, L]
    # n = 3 candidates per (image, layer); candidate 1 carries junk after eos, which must not count
    cands = tokens[:, None, None].expand(2, 3, 3, 6).clone()
    cands[:, :, 1, 4:] = torch.where(tokens[:, 4:] == 0, 7, tokens[:, 4:])[:, None]
    cands[0, :, 2] = torch.tensor([1, 3, 2, 0, 0, 0])
    calls = []
    encode = model.encoder.encode
    model.encoder.encode = lambda px: calls.append(px.shape[0]) or encode(px)
    got = model.sequence_logprobs(px, seeds, layers, cands)
    assert calls == [2]  # the encoder ran once, on the images, not once per candidate
    assert got.shape == (2, 3, 3)
    torch.testing.assert_close(got[:, :, 0], expected)
    torch.testing.assert_close(got[:, :, 1], expected)
    short = model(px[:1], cands[0, 0, 2, :3][None], seeds[:1], layers=layers).logits  # [1, L, 2, V]
    ref = torch.log_softmax(short, -1)[0, :, [0, 1], [3, 2]].sum(-1)
    torch.testing.assert_close(got[0, :, 2], ref)
    # differentiable (DiCO back-propagates through it)
    got.sum().backward()
    assert model.readout.tok_emb.weight.grad is not None


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model()
    px, seeds = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2])

    class StubTokenizer:
        def save(self, d):
            (d / "tokenizer.json").write_text("{}")

    model.save_pretrained(tmp_path / "ckpt", tokenizer=StubTokenizer())
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folders left behind
    loaded = RefinementCaptioner.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    assert loaded.readout.lm_head.weight is loaded.readout.tok_emb.weight  # tying survives
    for method, n in (("greedy", 1), ("beam", 3)):
        a = model.generate(px, seeds, None, method=method, num_candidates=n)
        b = loaded.generate(px, seeds, None, method=method, num_candidates=n)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.logprobs, b.logprobs)
    # overwriting an existing checkpoint replaces it whole
    tiny_model(seed=3).save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_from_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        RefinementCaptioner.from_pretrained(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RefinementCaptioner.from_pretrained(tmp_path / "half")


def test_default_config_builds():
    model = RefinementCaptioner(CaptionerConfig(vocab_size=50))
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 3_000_000
    px = torch.randn(2, 3, 64, 64)
    out = model(px, torch.tensor([[1, 5, 2], [1, 6, 2]]), torch.tensor([0, 1]))
    assert out.logits.shape == (2, 5, 2, 50) and out.latents.shape == (2, 5, 8, 128)


def test_overfits_synthetic_colour_images():
    """Image of colour X -> caption "x": after a few hundred steps the final layer's greedy caption
    is right for every image, whatever the z_0 seed."""
    torch.manual_seed(0)
    colours = torch.tensor([[230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 220, 40]], dtype=torch.uint8)
    images = colours[:, None, None, :].expand(4, 16, 16, 3).contiguous()
    # vocab: 0 pad, 1 bos, 2 eos, 3 "a", 4 red, 5 green, 6 blue, 7 yellow, 8 "square"
    captions = torch.tensor([[1, 3, 4 + i, 8, 2] for i in range(4)])
    cfg = CaptionerConfig(encoder=EncoderConfig(image_size=16, patch_size=8, width=32, depth=1, heads=2), d_model=32,
                          num_slots=4, num_refine_layers=2, n_heads=2, readout_layers=1, vocab_size=9, max_len=8)
    model = RefinementCaptioner(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    px = model.encoder.preprocess(images)
    K = cfg.num_refine_layers
    for step in range(150):
        seeds = torch.randint(0, 2**31 - 1, (4,))
        out = model(px, captions, seeds, layers=range(1, K + 1))
        targets = captions[:, None, 1:].expand(-1, K, -1)
        loss = F.cross_entropy(out.logits.flatten(0, 2), targets.flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    gen = model.generate(px, torch.tensor([11, 12, 13, 14]), [K], method="greedy", max_len=8)
    assert torch.equal(gen.tokens[:, 0, 0], captions)


def test_image_token_pos_lets_slots_tell_cells_apart(tmp_path):
    """Cross-attention without positions reads the image tokens as a set: the same tokens in another order give the
    same z_K. With `image_token_pos` each token carries where it is, so the reordering changes z_K; the embedding is
    saved and loaded with the model."""
    torch.manual_seed(0)
    px, seeds = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 2])
    plain, placed = tiny_model(), tiny_model(image_token_pos=True)
    tokens = plain.encoder.encode(px)  # [2, N, C]
    assert plain.image_pos is None and placed.image_pos.shape == (tokens.shape[1], 16)

    def final(model, order):
        model.encoder.encode = lambda pixels: tokens[:, order]  # the encoder's tokens, reordered
        with torch.no_grad():
            return model.refine(model.encode_image(px), seeds)[:, -1]

    order, flipped = list(range(tokens.shape[1])), list(reversed(range(tokens.shape[1])))
    torch.testing.assert_close(final(plain, flipped), final(plain, order))
    assert (final(placed, flipped) - final(placed, order)).abs().max() > 1e-3
    del placed.encoder.encode
    placed.save_pretrained(tmp_path / "ckpt")
    loaded = RefinementCaptioner.from_pretrained(tmp_path / "ckpt").to(torch.float64).eval()
    assert loaded.config.image_token_pos and torch.equal(loaded.image_pos, placed.image_pos)
    torch.testing.assert_close(final(loaded, flipped), final(placed, flipped))


def test_locate_head_learns_where_the_named_object_is(tmp_path):
    """The readout state at a word, through `locate_head`, learns where a bright square is (`locate_loss`, the XE
    stage's locate term): the loss falls well below what one constant guess can reach. `return_hidden` leaves the
    logits as they were, and the head is saved and loaded with the model."""
    from rlrefine.losses import locate_loss

    torch.manual_seed(0)
    n, corners = 64, torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    which = torch.arange(n) % 4
    images = torch.zeros(n, 3, 16, 16)
    for i, c in enumerate(which.tolist()):  # a 6x6 square in one quadrant, centred at that quadrant's centre
        y, x = 8 * (c // 2) + 1, 8 * (c % 2) + 1
        images[i, :, y:y + 6, x:x + 6] = 1.0
    targets = corners[which][:, None].expand(n, 2, 2).clone()  # positions 0 (bos) and 1 (the word)
    named = torch.tensor([[False, True]]).expand(n, 2)
    tokens = torch.tensor([[1, 5, 2]]).expand(n, 3)
    model = RefinementCaptioner(tiny_config(image_token_pos=True, locate_head=True))
    K, seeds = model.config.num_refine_layers, torch.arange(n)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    baseline = ((targets[:, 1] - targets[:, 1].mean(0)) ** 2).sum(-1).mean().item()  # the best constant guess: 0.5
    losses = []
    for _ in range(150):
        out = model(images, tokens, seeds, layers=[K], return_hidden=True)
        loss = locate_loss(model.locate_head(out.hidden[:, -1]), targets, named)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * baseline, (losses[0], losses[-1], baseline)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images[:4], tokens[:4], seeds[:4], return_hidden=True).logits,
                                   model(images[:4], tokens[:4], seeds[:4]).logits)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RefinementCaptioner.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.locate_head and torch.equal(loaded.locate_head.weight, model.locate_head.weight)
    assert RefinementCaptioner(tiny_config()).locate_head is None  # off unless asked for: no extra weights


def test_where_attention_adds_the_attended_place_by_hand():
    """Each head's output gains where(Σ_n α_n (x_n, y_n)) beside proj(Σ_n α_n v_n), with the same α."""
    from rlrefine.models.captioner import CrossAttention

    torch.manual_seed(0)
    att = CrossAttention(8, 2, 0.0, where=True).double()
    x, ctx, places = torch.randn(3, 4, 8).double(), torch.randn(3, 5, 8).double(), torch.rand(5, 2).double() * 2 - 1
    q = att.q(x).view(3, 4, 2, 4).transpose(1, 2)
    k, v = att.kv(ctx).view(3, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)
    alpha = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # [3, heads, 4, 5], sqrt(head dim 4) = 2
    read = (alpha @ v).transpose(1, 2).reshape(3, 4, 8)
    seen = (alpha @ places).transpose(1, 2).reshape(3, 4, 4)  # per head (x, y), heads side by side
    torch.testing.assert_close(att(x, ctx, places), att.proj(read) + att.where(seen))
    plain = CrossAttention(8, 2, 0.0).double()
    plain.load_state_dict({k: v for k, v in att.state_dict().items() if not k.startswith("where.")})
    torch.testing.assert_close(plain(x, ctx), att.proj(read))


@pytest.mark.parametrize("where", [True, False])
def test_where_attention_learns_which_of_two_things_is_higher(where):
    """Two marked tokens on a 4x4 grid whose features say nothing about where they are: with the where path a
    cross-attention learns whether the first lies above the second; without it the places are out of reach."""
    from rlrefine.models.captioner import CrossAttention
    from rlrefine.models.encoders import cell_centres

    torch.manual_seed(0)
    d, places = 16, cell_centres(4)
    marks = torch.randn(2, d)
    att, queries, head = CrossAttention(d, 2, 0.0, where=where), nn.Parameter(torch.randn(2, d)), nn.Linear(2 * d, 1)
    opt = torch.optim.Adam([*att.parameters(), queries, *head.parameters()], lr=1e-2)

    def batch(n):
        cells = torch.stack([torch.randperm(16)[:2] for _ in range(n)])  # two different cells per scene
        cells = cells[places[cells[:, 0], 1] != places[cells[:, 1], 1]]  # not on one row
        ctx = 0.1 * torch.randn(len(cells), 16, d)
        ctx[torch.arange(len(cells)), cells[:, 0]] += marks[0]
        ctx[torch.arange(len(cells)), cells[:, 1]] += marks[1]
        return ctx, (places[cells[:, 0], 1] < places[cells[:, 1], 1]).float()

    def logits(ctx):
        return head(att(queries.expand(len(ctx), 2, d), ctx, places).flatten(1)).squeeze(1)

    for _ in range(300):
        ctx, above = batch(64)
        loss = F.binary_cross_entropy_with_logits(logits(ctx), above)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ctx, above = batch(1000)
    with torch.no_grad():
        acc = ((logits(ctx) > 0).float() == above).float().mean().item()
    assert acc > 0.95 if where else acc < 0.6, acc


def test_competing_read_by_hand():
    """Slot Attention's read: softmax over the slots for each token, then each slot's weights renormalised over the
    tokens; checked against the formula written out with loops, and a token one slot wins is not read by another."""
    from rlrefine.models.captioner import competing_read

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4).double(), torch.randn(2, 5, 4).double(), torch.randn(2, 5, 6).double()
    want = torch.zeros(2, 3, 6).double()
    for b in range(2):
        logits = [[float(q[b, t] @ k[b, n]) / 2.0 for n in range(5)] for t in range(3)]  # sqrt(4) = 2
        won = [[math.exp(logits[t][n]) / sum(math.exp(logits[u][n]) for u in range(3)) + 1e-8 for n in range(5)]
               for t in range(3)]
        for t in range(3):
            want[b, t] = sum(won[t][n] * v[b, n] for n in range(5)) / sum(won[t])
    torch.testing.assert_close(competing_read(q, k, v), want)
    # two slots, two tokens, each slot far closer to one token: each reads its own token alone
    q, k = torch.tensor([[10.0, 0.0], [0.0, 10.0]]), torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    torch.testing.assert_close(competing_read(q, k, torch.eye(2)), torch.eye(2), atol=1e-6, rtol=0)


def test_slot_competition_drops_weights_only_in_training():
    """The refinement blocks' dropout reaches the competing read: a training-mode read differs from the eval-mode
    one, which is deterministic."""
    from rlrefine.models.captioner import CrossAttention

    torch.manual_seed(0)
    att = CrossAttention(8, 2, 0.5, compete=True).double()
    x, ctx = torch.randn(3, 4, 8).double(), torch.randn(3, 5, 8).double()
    att.eval()
    torch.testing.assert_close(att(x, ctx), att(x, ctx))
    att.train()
    assert not torch.allclose(att(x, ctx), att.eval()(x, ctx))


def test_slot_competition_is_a_saved_switch_of_the_refinement_reads(tmp_path):
    """`model.slot_competition` makes every refinement block's cross-attention read with `competing_read` (the
    same weights give a different z_k), and a saved model keeps it."""
    torch.manual_seed(0)
    model = RefinementCaptioner(tiny_config(slot_competition=True)).eval()
    assert all(block.cross_attn.compete for block in model.refine_blocks)
    plain = RefinementCaptioner(tiny_config()).eval()
    plain.load_state_dict(model.state_dict())
    images, seeds = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    with torch.no_grad():
        Z, Z_plain = model.latents(images, seeds), plain.latents(images, seeds)
    assert torch.equal(Z[:, 0], Z_plain[:, 0]) and not torch.allclose(Z[:, 1], Z_plain[:, 1])
    model.save_pretrained(tmp_path / "ckpt")
    loaded = RefinementCaptioner.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.slot_competition
    with torch.no_grad():
        torch.testing.assert_close(loaded.latents(images, seeds), Z)


def test_where_attention_needs_an_encoder_that_says_where_its_tokens_lie():
    with pytest.raises(ValueError, match="model.where_attention needs an image encoder .* TinyViT does not"):
        RefinementCaptioner(tiny_config(where_attention=True))
