"""rewards.distill: rank correlations against hand values, and a short real distillation."""
import math

import numpy as np
import pytest
import torch

from rewards.distill import DistillConfig, DistilledScore
from rewards.fidelity import kendall_tau, rankdata, spearman
from rlrefine.trainers.distill import distill_reward

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230)}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def test_rank_correlations_hand_computed():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    assert np.allclose(rankdata(y), [1, 2, 3.5, 5, 3.5])
    # ranks y = [1, 2, 3.5, 5, 3.5]: cov = 8, var_x = 10, var_y = 9.5
    assert math.isclose(spearman(x, y), 8 / math.sqrt(95), rel_tol=1e-12)
    # 8 concordant, 1 discordant, 1 pair tied in y: tau_b = 7 / sqrt(10 * 9)
    assert math.isclose(kendall_tau(x, y), 7 / math.sqrt(90), rel_tol=1e-12)
    # against the O(n^2) definition on data with ties on both sides and pairs tied in both
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 300).astype(float), rng.integers(0, 8, 300).astype(float)
    sx, sy = np.sign(a[:, None] - a[None]), np.sign(b[:, None] - b[None])
    n0, t_a, t_b = 300 * 299 / 2, ((sx == 0).sum() - 300) / 2, ((sy == 0).sum() - 300) / 2
    assert math.isclose(kendall_tau(a, b), (sx * sy).sum() / 2 / math.sqrt((n0 - t_a) * (n0 - t_b)), rel_tol=1e-12)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert spearman([3, 2, 1], [1, 2, 3]) == -1.0 and math.isnan(spearman([1, 1], [1, 2]))


def tiny_colour_data(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    captions = []
    for i in range(n):
        c = list(COLOURS)[rng.integers(3)]
        y, x = rng.integers(0, size - 6, size=2)
        images[i, y:y + 6, x:x + 6] = COLOURS[c]
        captions.append([f"a {c} square", f"one {c} block", f"a square that is {c}"])
    return {"images": images, "captions": captions}


class ColourTeacher:
    """A hand-made reward: 2 if the caption names the image's colour, else 0.2; embeds images by
    their mean colour (enough for hard-pair mining)."""

    w = 2.0
    uses_references = False

    def embed_images(self, images):
        x = torch.as_tensor(np.asarray(images)).float().flatten(1, 2).mean(1)  # [B, 3]
        return torch.nn.functional.normalize(x + 1e-3, dim=-1)

    def __call__(self, images, captions, references=None, image_index=None):
        images = torch.as_tensor(np.asarray(images))
        idx = torch.arange(len(captions)) if image_index is None else torch.as_tensor(image_index)
        names = list(COLOURS)
        rgb = torch.tensor([COLOURS[c] for c in names]).float()
        mean = images.float().flatten(1, 2).amax(1)  # [B, 3] brightest pixel per channel
        colour = [names[int(j)] for j in torch.cdist(mean, rgb).argmin(1)]
        return torch.tensor([2.0 if colour[int(i)] in c else 0.2 for c, i in zip(captions, idx)])


def test_distillation_improves_rank_correlation(tmp_path):
    data = tiny_colour_data(80)
    # the caller's candidates (e.g. from every captioner layer): all colours for some images
    candidates = [(i, f"a {c} square") for i in range(0, 80, 2) for c in COLOURS]
    cfg = DistillConfig(model_name="rlrefine-test-student", embed_dim=32, image_size=32,
                        patch_size=8, vision_width=32, vision_layers=1, vision_head_width=16,
                        text_width=32, text_heads=2, text_layers=1, context_length=12, steps=60,
                        images_per_step=16, lr=3e-3, warmup_steps=5, hard_neighbours=2,
                        holdout_fraction=0.25)
    teacher = ColourTeacher()
    metrics = distill_reward(cfg, teacher, data, tmp_path, candidates=candidates)
    assert metrics["spearman"] > metrics["init/spearman"] + 0.2, metrics
    assert metrics["spearman"] > 0.4 and -1 <= metrics["kendall"] <= 1
    assert 0 <= metrics["argmax_agreement"] <= 1
    assert metrics["pairs_per_s_student"] > 0 and metrics["pairs_per_s_teacher"] > 0
    student = DistilledScore.from_dir(tmp_path)
    imgs = torch.from_numpy(data["images"][:4])
    out = student(imgs, ["a red square", "a blue square"], image_index=torch.tensor([0, 0]))
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.all(out >= 0)


class ColourEmbeddingTeacher(ColourTeacher):
    """ColourTeacher with embeddings: one-hot colour for images and for the colour a caption names."""

    dim = 32

    def _one_hot(self, names):
        out = torch.full((len(names), self.dim), 1e-3)
        for row, name in enumerate(names):
            if name is not None:
                out[row, list(COLOURS).index(name)] = 1.0
        return torch.nn.functional.normalize(out, dim=-1)

    def embed_images(self, images):
        rgb = torch.tensor(list(COLOURS.values())).float()
        brightest = torch.as_tensor(np.asarray(images)).float().flatten(1, 2).amax(1)
        return self._one_hot([list(COLOURS)[int(j)] for j in torch.cdist(brightest, rgb).argmin(1)])

    def embed_texts(self, texts, add_prefix=True):
        return self._one_hot([next((c for c in COLOURS if c in t), None) for t in texts])


def test_feature_distillation_matches_teacher_embeddings(tmp_path):
    data = tiny_colour_data(80)
    candidates = [(i, f"a {c} square") for i in range(0, 80, 2) for c in COLOURS]
    base = dict(model_name="rlrefine-test-student", image_size=32, patch_size=8, vision_width=32, vision_layers=1,
                vision_head_width=16, text_width=32, text_heads=2, text_layers=1, context_length=12, steps=60,
                images_per_step=16, lr=3e-3, warmup_steps=5, hard_neighbours=2, holdout_fraction=0.25)
    teacher = ColourEmbeddingTeacher()
    with pytest.raises(ValueError, match="embed_dim equal to the teacher's \\(32\\)"):
        distill_reward(DistillConfig(embed_dim=16, embedding_weight=1.0, **base), teacher, data, tmp_path / "bad",
                       candidates=candidates)
    logged = {}
    metrics = distill_reward(DistillConfig(embed_dim=32, embedding_weight=1.0, **base), teacher, data, tmp_path,
                             candidates=candidates, on_log=lambda d, step: logged.setdefault(step, d))
    assert metrics["spearman"] > metrics["init/spearman"] + 0.2, metrics
    losses = [d["distill/embedding_loss"] for _, d in sorted(logged.items()) if "distill/embedding_loss" in d]
    assert len(losses) >= 3 and losses[-1] < 0.5 * losses[0], losses


def test_word_tokens_layout():
    from rlrefine.data.tokenizer import CaptionTokenizer
    from rewards.distill import WordTokens

    vocab = CaptionTokenizer.train(["a red square", "a blue circle"])
    tok = WordTokens(vocab, context_length=5)
    red, square, a = (vocab.backend.token_to_id(w) for w in ("red", "square", "a"))
    ids = tok(["a red square", "", "a red red red square zebra"])
    assert ids.shape == (3, 5)
    assert ids[0].tolist() == [vocab.bos_id, a, red, square, vocab.eos_id]
    assert ids[1].tolist() == [vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.pad_id, vocab.pad_id]  # empty: scored, not an error
    assert ids[2].tolist() == [vocab.bos_id, a, red, red, vocab.eos_id]  # cut, eos kept last


def test_word_student_distils_and_reloads_with_its_vocabulary(tmp_path):
    data = tiny_colour_data(80)
    candidates = [(i, f"a {c} square") for i in range(0, 80, 2) for c in COLOURS]
    cfg = DistillConfig(model_name="rlrefine-test-word-student", embed_dim=32, image_size=32, patch_size=8,
                        vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_heads=2,
                        text_layers=1, context_length=12, tokenizer="word", embedding_weight=1.0, steps=200,
                        images_per_step=16, lr=3e-3, warmup_steps=5, hard_neighbours=2, holdout_fraction=0.25)
    metrics = distill_reward(cfg, ColourEmbeddingTeacher(), data, tmp_path, candidates=candidates)
    assert metrics["spearman"] > 0.4, metrics  # the untrained student scores every pair 0 (nan correlation)
    assert (tmp_path / "tokenizer.json").is_file()
    student = DistilledScore.from_dir(tmp_path)
    assert student.model.vocab_size < 100  # the word vocabulary, not open_clip's 49408 BPE tokens
    from rewards.distill import WordTokens

    assert isinstance(student.tokenizer, WordTokens)
    imgs = torch.from_numpy(data["images"][:40])
    caps = [f"a {c} square" for c in COLOURS] * 40 + [""]
    index = torch.cat([torch.arange(40).repeat_interleave(3), torch.zeros(1, dtype=torch.long)])
    out = student(imgs, caps, image_index=index)
    assert out.shape == (121,) and torch.isfinite(out).all()  # the empty caption is scored too
    # the reloaded student scores the image's true colour above the other two, on average
    right = ColourTeacher()(imgs, caps[:120], image_index=index[:120]) == 2.0
    assert out[:120][right].mean() > out[:120][~right].mean() + 0.05, (out[:120][right].mean(), out[:120][~right].mean())
    with pytest.raises(ValueError, match="tokenizer"):
        DistillConfig(tokenizer="bpe")


def test_ranking_report_argmax_agreement_regret_and_gap_by_hand():
    from rewards.fidelity import Pairs, ranking_report

    # image 0: teacher 2.0 > 1.5 > 1.0, the student picks the 1.5 pair -> disagree, regret 0.5, gap 0.5
    # image 1: teacher 3.0 > 2.9, the student picks the 3.0 pair -> agree, regret 0, gap 0.1
    pairs = Pairs(torch.tensor([0, 0, 0, 1, 1]), ["a", "b", "c", "d", "e"], torch.zeros(5, dtype=torch.long))
    teacher = torch.tensor([2.0, 1.5, 1.0, 3.0, 2.9])
    student = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7])
    r = ranking_report(student, teacher, pairs.image)
    assert r["argmax_agreement"] == 0.5
    assert r["argmax_regret"] == pytest.approx(0.25)
    assert r["teacher_top2_gap_median"] == pytest.approx(0.3)
    assert r["pairs"] == 5


def test_extra_embedding_images_feed_the_image_embedding_loss(tmp_path):
    data = tiny_colour_data(80)
    seen = []

    class CountingTeacher(ColourEmbeddingTeacher):
        def embed_images(self, images):
            seen.append(len(images))
            return super().embed_images(images)

    cfg = DistillConfig(model_name="rlrefine-test-student", embed_dim=32, image_size=32, patch_size=8, vision_width=32,
                        vision_layers=1, vision_head_width=16, text_width=32, text_heads=2, text_layers=1,
                        context_length=12, steps=60, images_per_step=16, lr=3e-3, warmup_steps=5, hard_neighbours=2,
                        holdout_fraction=0.25, embedding_weight=1.0, max_images=40, extra_embedding_images=40)
    logged = {}
    metrics = distill_reward(cfg, CountingTeacher(), data, tmp_path, on_log=lambda d, step: logged.setdefault(step, d))
    assert 40 in seen  # the 40 images beyond max_images were embedded by the teacher once
    losses = [d["distill/embedding_loss"] for _, d in sorted(logged.items()) if "distill/embedding_loss" in d]
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["pairs"] > 0  # (held-out teacher scores are constant here: 10 images, one colour per image)


def test_perturb_to_cosine_reaches_the_asked_cosine():
    from rewards.fidelity import perturb_to_cosine

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4000, 64, generator=g) * 3.0  # not normalised: rows are normalised first
    unit = torch.nn.functional.normalize(emb, dim=-1)
    for c in (0.999, 0.99, 0.9):
        moved = perturb_to_cosine(emb, c, g)
        assert torch.allclose(moved.norm(dim=-1), torch.ones(4000), atol=1e-5)
        assert float((moved * unit).sum(-1).mean()) == pytest.approx(c, abs=0.003), c
    assert torch.allclose(perturb_to_cosine(emb, 1.0, g), unit)
    with pytest.raises(ValueError, match="cosine"):
        perturb_to_cosine(emb, 0.0)


class TableReward:
    """A reward from fixed embedding tables: ``images`` are row numbers, captions are keys of ``texts``."""

    def __init__(self, image_table, texts, w=2.5):
        self.image_table, self.texts, self.w = image_table, texts, w

    def embed_images(self, images):
        return torch.nn.functional.normalize(self.image_table[torch.as_tensor(images)], dim=-1)

    def embed_texts(self, texts, add_prefix=True):
        return torch.nn.functional.normalize(torch.stack([self.texts[t] for t in texts]), dim=-1)

    def score_embeddings(self, image_emb, text_emb):
        return self.w * (image_emb * text_emb).sum(-1)


def _table_pairs(n_images=60, per_image=4, dim=16, seed=0):
    from rewards.fidelity import Pairs

    g = torch.Generator().manual_seed(seed)
    texts = {f"caption {i}": torch.randn(dim, generator=g) for i in range(n_images * per_image)}
    teacher = TableReward(torch.randn(n_images, dim, generator=g), texts)
    image = torch.arange(n_images).repeat_interleave(per_image)
    return teacher, Pairs(image, list(texts), torch.zeros(len(image), dtype=torch.long)), g


def test_tower_fidelity_separates_the_image_and_text_towers():
    from rewards.fidelity import perturb_to_cosine, tower_fidelity

    teacher, pairs, g = _table_pairs()
    images = torch.arange(60)
    # the student's text tower is exact, its image tower is off
    student = TableReward(perturb_to_cosine(teacher.image_table, 0.8, g), teacher.texts)
    f = tower_fidelity(student, teacher, images, pairs)
    assert f["text_cos"] == pytest.approx(1.0, abs=1e-6)
    assert f["text_side_spearman"] == pytest.approx(1.0) and f["text_side_argmax_agreement"] == 1.0
    t_img, s_img = teacher.embed_images(images), student.embed_images(images)
    assert f["image_cos"] == pytest.approx(float((t_img * s_img).sum(-1).mean()), abs=1e-6)
    # by hand: an image agrees when the student's best of its 4 captions is the teacher's best
    txt = teacher.embed_texts(pairs.caption).view(60, 4, -1)
    agree = ((s_img[:, None] * txt).sum(-1).argmax(1) == (t_img[:, None] * txt).sum(-1).argmax(1)).float().mean()
    assert f["image_side_argmax_agreement"] == pytest.approx(float(agree))
    assert f["image_side_argmax_agreement"] < 1.0
    with pytest.raises(ValueError, match="one embedding size"):
        tower_fidelity(TableReward(torch.randn(60, 8), {k: v[:8] for k, v in teacher.texts.items()}), teacher,
                       images, pairs)


def test_noise_sensitivity_is_exact_at_cosine_one_and_degrades_below():
    from rewards.fidelity import noise_sensitivity

    teacher, pairs, _ = _table_pairs()
    rows = noise_sensitivity(teacher, torch.arange(60), pairs, [1.0, 0.99, 0.5])
    assert [r["cosine"] for r in rows] == [1.0, 0.99, 0.5]
    for side in ("image", "text"):
        assert rows[0][f"{side}_argmax_agreement"] == 1.0 and rows[0][f"{side}_spearman"] == pytest.approx(1.0)
        assert rows[2][f"{side}_argmax_agreement"] < rows[1][f"{side}_argmax_agreement"] <= 1.0
        assert rows[2][f"{side}_spearman"] < 0.9


# ------------------------------------------------------------------ narrowing the teacher's ResNet
def _resnet(width: int, layers=(1, 2, 1, 1), heads: int = 4):
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet(layers=list(layers), output_dim=24, heads=heads, image_size=64, width=width).eval()


@torch.no_grad()
def _randomise_bn(net: torch.nn.Module, g: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@torch.no_grad()
def _silence_all_but(teacher, student, g: torch.Generator) -> None:
    """Make the teacher's channels beyond the student's widths carry exactly nothing, at random positions:
    BN gamma = beta = 0 (the conv+BN outputs 0, and 0 after ReLU), and in the attention pool zero
    query/key/value rows beyond each head's kept dims and zero columns for the silenced stream channels."""
    def keep(n_t, n_s):
        return torch.randperm(n_t, generator=g)[:n_s]

    def silence(bn, kept):
        mask = torch.ones(bn.num_features, dtype=torch.bool)
        mask[kept] = False
        bn.weight[mask] = 0.0
        bn.bias[mask] = 0.0

    for i in (1, 2, 3):
        silence(getattr(teacher, f"bn{i}"), keep(getattr(teacher, f"conv{i}").out_channels, getattr(student, f"conv{i}").out_channels))
    for i in range(1, 5):
        t_blocks, s_blocks = getattr(teacher, f"layer{i}"), getattr(student, f"layer{i}")
        stream = keep(t_blocks[0].conv3.out_channels, s_blocks[0].conv3.out_channels)
        silence(t_blocks[0].downsample[-1], stream)
        for t_blk, s_blk in zip(t_blocks, s_blocks):
            silence(t_blk.bn1, keep(t_blk.conv1.out_channels, s_blk.conv1.out_channels))
            silence(t_blk.bn2, keep(t_blk.conv2.out_channels, s_blk.conv2.out_channels))
            silence(t_blk.bn3, stream)
    ap, s_ap = teacher.attnpool, student.attnpool
    dropped_stream = torch.ones(ap.q_proj.in_features, dtype=torch.bool)
    dropped_stream[stream] = False
    t_dim, s_dim = ap.q_proj.out_features // ap.num_heads, s_ap.q_proj.out_features // s_ap.num_heads
    for proj in (ap.q_proj, ap.k_proj, ap.v_proj):
        proj.weight[:, dropped_stream] = 0.0
    for group in ((ap.q_proj, ap.k_proj), (ap.v_proj,)):
        rows = torch.ones(ap.q_proj.out_features, dtype=torch.bool)
        for h in range(ap.num_heads):
            rows[h * t_dim + keep(t_dim, s_dim)] = False
        for proj in group:  # q and k share their kept dims (their product is the attention logit)
            proj.weight[rows] = 0.0
            proj.bias[rows] = 0.0


def test_narrow_resnet_state_copies_the_teacher_when_the_dropped_channels_carry_nothing():
    from rewards.distill import narrow_resnet_state

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher, student = _resnet(16), _resnet(8)
    _randomise_bn(teacher, g)
    x = torch.randn(5, 3, 64, 64, generator=g)

    # Same width: the teacher, bit for bit (every channel kept, in order).
    twin = _resnet(16)
    twin.load_state_dict(narrow_resnet_state(teacher, twin))
    assert torch.equal(twin(x), teacher(x))

    # Half width, the other half of every layer silenced at random positions: the same function,
    # so the BN-scale and |W_q||W_k| / |W_v||W_c| rankings picked exactly the live channels.
    _silence_all_but(teacher, student, g)
    student.load_state_dict(narrow_resnet_state(teacher, student))
    want = teacher(x)
    assert want.abs().mean() > 1e-2  # the silenced teacher still computes something
    torch.testing.assert_close(student(x), want, rtol=1e-4, atol=1e-5)


def test_narrow_resnet_state_names_the_mismatch(tmp_path):
    from rewards.distill import narrow_resnet_state

    teacher = _resnet(16)
    with pytest.raises(ValueError, match=r"stage depths \(\[1, 1, 1, 1\]\) must equal the teacher's \(\[1, 2, 1, 1\]\)"):
        narrow_resnet_state(teacher, _resnet(8, layers=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="attention-pool heads"):
        narrow_resnet_state(teacher, _resnet(8, heads=2))
    with pytest.raises(ValueError, match="wider than the teacher's"):
        narrow_resnet_state(teacher, _resnet(32))
    with pytest.raises(ValueError, match="needs a ModifiedResNet"):
        narrow_resnet_state(teacher, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="vision_init must be 'random' or 'teacher'"):
        DistillConfig(vision_init="pruned")
    # a teacher that is not an open_clip model has no image tower to start from
    cfg = DistillConfig(model_name="rlrefine-test-student", image_size=32, vision_layers=[1, 1, 1, 1], vision_width=8,
                        embed_dim=32, text_width=32, text_layers=1, context_length=12, steps=1, vision_init="teacher")
    with pytest.raises(ValueError, match="needs an open_clip teacher .* ColourEmbeddingTeacher has none"):
        distill_reward(cfg, ColourEmbeddingTeacher(), tiny_colour_data(16), tmp_path)


class CaptionTable:
    """A reward that looks each caption's score up in a table (whatever the image)."""

    uses_references = False

    def __init__(self, table):
        self.table = table

    def __call__(self, images, captions, references=None, image_index=None):
        return torch.tensor([self.table[c] for c in captions])


def test_decision_agreement_groups_one_image_at_one_layer_by_hand():
    from rewards.fidelity import decision_agreement

    teacher = CaptionTable({"a": 1.0, "b": 0.5, "c": 2.0, "d": 1.9, "e": 1.0, "f": 0.0})
    student = CaptionTable({"a": 0.2, "b": 0.9, "c": 3.0, "d": 1.0, "e": 1.0, "f": 0.1})
    candidates = [(0, 0, "a"), (0, 0, "b"),               # student picks b: disagree, regret 0.5, gap 0.5
                  (0, 1, "c"), (0, 1, "d"), (0, 1, "e"),  # c: agree, gap 0.1
                  (1, 0, "a"), (1, 0, "f"),               # a: agree, gap 1.0
                  (1, 1, "d")]                            # a single candidate: agree, no gap
    images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    r = decision_agreement(student, teacher, images, [["x"], ["y"]], candidates)
    assert r["decisions"] == 4 and r["pairs"] == 8
    assert r["argmax_agreement"] == 0.75
    assert r["argmax_regret"] == pytest.approx(0.125)
    assert r["teacher_top2_gap_median"] == pytest.approx(0.5)
    by_layer = {row["layer"]: row for row in r["by_layer"]}
    assert set(by_layer) == {0, 1} and by_layer[0]["decisions"] == by_layer[1]["decisions"] == 2
    assert by_layer[0]["argmax_agreement"] == 0.5 and by_layer[0]["argmax_regret"] == pytest.approx(0.25)
    assert by_layer[0]["teacher_top2_gap_median"] == pytest.approx(0.75)
    assert by_layer[1]["argmax_agreement"] == 1.0 and by_layer[1]["teacher_top2_gap_median"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="at least one"):
        decision_agreement(student, teacher, images, [["x"], ["y"]], [])
