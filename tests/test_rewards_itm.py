"""rewards.itm: BLIP image-text matching from a local transformers folder, on a tiny random BLIP the test builds
(a WordPiece vocabulary written here, a 32 px ViT and a 1-layer BERT with cross-attention): it loads, scores
as the model's own forward does, refuses folders that are not ITM checkpoints, and serves as a fine-tuning
reward and a distillation teacher."""
import copy

import open_clip
import pytest
import torch

from rewards import ITMScore, PACScore
from rewards.distill import DistillConfig, DistilledScore
from rewards.fidelity import HELDOUT_FILE, load_pairs
from rewards.loading import register_model_config
from rewards.registry import RewardContext, build_reward
from rewards.text_student import TextStudentConfig
from rlrefine.config import FinetuneSection, RewardSection, load_recipe
from test_distill import COLOURS, tiny_colour_data

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "one", "red", "green", "blue", "square", "block", "that", "is",
         "circle", "small", "large"]
CLIP_NAME = "test-itm-image-tower"
CLIP_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
            "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_blip_config():
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=40,
                         bos_token_id=2, sep_token_id=3, pad_token_id=0),
        projection_dim=16, image_text_hidden_size=16)


@pytest.fixture(scope="module")
def blip_dirs(tmp_path_factory):
    """A BlipForImageTextRetrieval folder with its processor, a BLIP captioning folder and a CLIP folder."""
    from transformers import (BertTokenizer, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor,
                              BlipProcessor, CLIPConfig, CLIPModel)

    root = tmp_path_factory.mktemp("blip")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                              BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}))
    torch.manual_seed(0)
    BlipForImageTextRetrieval(tiny_blip_config()).save_pretrained(root / "itm")
    processor.save_pretrained(root / "itm")
    BlipForConditionalGeneration(tiny_blip_config()).save_pretrained(root / "captioner")
    processor.save_pretrained(root / "captioner")
    CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                         vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            image_size=32, patch_size=8), projection_dim=8)).save_pretrained(root / "clip")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def itm(blip_dirs):
    return build_reward(RewardSection(kind="itm", path=str(blip_dirs / "itm")), RewardContext(run_dir=blip_dirs))


def test_itm_scores_are_the_models_own_match_probabilities(itm, blip_dirs):
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    assert isinstance(itm, ITMScore) and itm.batch_size == 512  # the section's batch size
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=g)
    caps = ["a red square", "one blue circle", "a red square", "a large green block that is small", "a red square"]
    idx = torch.tensor([0, 0, 1, 2, 0])  # the last pair repeats the first: scored once
    scores = itm(images, caps, image_index=idx)
    # the reference: BlipForImageTextRetrieval's forward on the processor's own inputs, one pair at a time
    model = BlipForImageTextRetrieval.from_pretrained(blip_dirs / "itm", local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(blip_dirs / "itm", local_files_only=True)
    expected = []
    with torch.no_grad():
        for c, i in zip(caps, idx.tolist()):
            inputs = processor(images=[images[i].numpy()], text=[c], return_tensors="pt")
            logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                           attention_mask=inputs["attention_mask"]).itm_score
            expected.append(float(logits.softmax(-1)[0, 1]))
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5), (scores, expected)
    assert bool(((scores > 0) & (scores < 1)).all()) and scores[0] == scores[4]
    # the same with one image and two pairs per forward (the batching does not change a score)
    small = ITMScore.from_dir(blip_dirs / "itm", batch_size=2, image_batch_size=1)
    assert torch.allclose(small(images, caps, image_index=idx), scores, atol=1e-6)
    emb = itm.embed_images(images)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    assert itm.embed_texts(caps).shape == (5, 16)


def test_itm_refuses_folders_that_are_not_itm_checkpoints(blip_dirs):
    with pytest.raises(ValueError, match="holds a 'clip' checkpoint .*not BLIP"):
        ITMScore.from_dir(blip_dirs / "clip")
    with pytest.raises(ValueError, match="another head \\(BlipForConditionalGeneration\\)"):
        ITMScore.from_dir(blip_dirs / "captioner")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ITMScore.from_dir(blip_dirs / "empty")
    with pytest.raises(ValueError, match="kind 'itm' needs path"):
        RewardSection(kind="itm")
    with pytest.raises(ValueError, match="is not a folder"):
        RewardSection(kind="itm", path=str(blip_dirs / "nope"))


def test_itm_in_a_recipe_as_reward_score_and_teacher(blip_dirs):
    itm = f"{{kind: itm, path: {blip_dirs / 'itm'}}}"
    cfg = load_recipe(None, [f"finetune.reward={itm}", f"evaluate.extra_rewards.itm={itm}", f"distill.teacher={itm}"])
    assert cfg.finetune.reward.kind == cfg.evaluate.extra_rewards["itm"].kind == cfg.distill.teacher.kind == "itm"


def test_dico_fine_tunes_on_the_itm_reward(itm):
    from accelerate import Accelerator

    from rlrefine.losses import layer_weights, schedule
    from rlrefine.methods import METHODS
    from rlrefine.trainers.finetune import SequenceScorer, compute_loss
    from test_finetune import tiny_policy

    policy, tok = tiny_policy()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    f = FinetuneSection(num_candidates=3, max_len=8, dico={"beta": 0.5, "tau": 1.0})
    method = METHODS[f.method](f.method_config, f)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8, generator=g)
    for _ in range(3):
        loss, ro, _ = compute_loss(policy, SequenceScorer(policy), reference, method, itm, images, policy.encoder.preprocess(images),
                                   torch.arange(2), [1, 2], f, tok, schedule("linear", 2), layer_weights("linear", 2),
                                   Accelerator(cpu=True), generator=g)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bool(((ro.rewards > 0) & (ro.rewards < 1)).all())  # match probabilities of every layer's candidates
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_itm_teaches_a_dual_student_and_a_text_student_in_an_image_towers_space(itm, tmp_path):
    from rlrefine.trainers.distill import distill_reward
    from rlrefine.trainers.distill_text import distill_text_student

    data = tiny_colour_data(40, size=32)
    candidates = [(i, 1, f"a {c} square") for i in range(0, 40, 2) for c in COLOURS]
    dual = DistillConfig(model_name="rlrefine-test-itm-student", embed_dim=16, image_size=32, patch_size=8, vision_width=16,
                         vision_layers=1, vision_head_width=8, text_width=16, text_heads=2, text_layers=1, context_length=12,
                         steps=20, images_per_step=8, warmup_steps=2, hard_neighbours=2, holdout_fraction=0.25,
                         timing_repeats=1)
    report = distill_reward(dual, itm, data, tmp_path / "dual", candidates=candidates)
    held = set(load_pairs(tmp_path / "dual" / HELDOUT_FILE).image.tolist())
    assert report["pairs_per_s_teacher"] > 0 and -1 <= report["spearman"] <= 1
    assert report["decisions"] == len([i for i in held if i % 2 == 0])  # one per held-out image with candidates
    # a text student of the ITM teacher keeps an open_clip tower (here a tiny CLIP, as a user gives PAC-S)
    register_model_config(CLIP_NAME, CLIP_CFG)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(CLIP_NAME, pretrained=None).state_dict(), tmp_path / "clip.pt")
    tower = PACScore.from_pretrained(CLIP_NAME, tmp_path / "clip.pt")
    text = TextStudentConfig(width=16, layers=1, heads=2, context_length=12, steps=30, images_per_step=8, warmup_steps=2,
                             hard_neighbours=2, holdout_fraction=0.25, timing_repeats=1)
    logged = {}
    report = distill_text_student(text, itm, data, tmp_path / "text", candidates=candidates, image_tower=tower,
                                  on_log=lambda d, step: logged.setdefault(step, d))
    assert "fidelity/text_cos" not in report and 0 <= report["decision_agreement"] <= 1
    # ITM has no text embedding in the tower's space: the student learns the scores alone (a random ITM head's
    # probabilities sit close together, so this checks the regression, not the ranking)
    losses = [(d["distill/score_regression_loss"], d["distill/embedding_loss"]) for _, d in sorted(logged.items())]
    assert losses[-1][0] < 0.2 * losses[0][0] and all(e == 0 for _, e in losses), losses
    student = DistilledScore.from_dir(tmp_path / "text")
    images = torch.from_numpy(data["images"][:2])
    assert torch.equal(student.embed_images(images), tower.embed_images(images))
