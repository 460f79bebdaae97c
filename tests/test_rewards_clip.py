"""rewards.clip_score / rewards.loading on a tiny random open_clip model saved to tmp_path."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from rewards import (CLIPScore, LearnedScore, PACScore, RefCLIPScore, RefPACScore, clip_s,
                     harmonic_mean, load_open_clip, register_model_config)

TINY = "rlrefine-test-tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_QG = "rlrefine-test-tiny-quickgelu"  # the QuickGELU twin, as open_clip pairs ViT-B-32 / ViT-B-32-quickgelu
TINY_QG_CFG = {**TINY_CFG, "quick_gelu": True}
OTHER = "rlrefine-test-tiny-wide"
OTHER_CFG = {**TINY_CFG, "embed_dim": 48}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    register_model_config(TINY, TINY_CFG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    d = tmp_path_factory.mktemp("tiny")
    torch.save(model.state_dict(), d / "plain.pt")
    torch.save({"model": model.state_dict()}, d / "wrapped_model.pt")
    # PAC-S release layout: {"state_dict": ...} of OpenAI CLIP (QuickGELU) weights, here also with a DDP
    # "module." prefix; same weights as `model`, read by the QuickGELU twin architecture
    register_model_config(TINY_QG, TINY_QG_CFG)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               d / "pacs.pth")
    qg_model = open_clip.create_model(TINY_QG, pretrained=None)
    qg_model.load_state_dict(model.state_dict())
    return d, model.eval(), qg_model.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 40, 48, 3), generator=g, dtype=torch.uint8)
    captions = ["a red circle", "two blue squares", "a red circle"]
    refs = [["a red circle above a square", "red ball"], ["blue squares"], ["something", "a red circle"]]
    return images, captions, refs


def _hand_embeddings(model, preprocess, images, texts, prefix):
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess(images)), dim=-1)
        tok = open_clip.get_tokenizer(TINY)([prefix + t for t in texts])
        txt = F.normalize(model.encode_text(tok), dim=-1)
    return img, txt


def test_clip_s_pure():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -1.0], [3.0, 3.0]])
    out = clip_s(img, txt, w=2.5)
    assert torch.allclose(out, torch.tensor([2.5 / 2 ** 0.5, 0.0, 2.5]), atol=1e-6)
    assert torch.allclose(harmonic_mean(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])),
                          torch.tensor([1.5, 0.0]))


def test_clip_and_refclip_match_hand_computation(tiny_ckpt, batch):
    d, model, _ = tiny_ckpt
    images, captions, refs = batch
    cs = CLIPScore.from_pretrained(TINY, d / "plain.pt")
    img, txt = _hand_embeddings(model, cs.preprocess, images, captions, "A photo depicts ")
    expected = 2.5 * (img * txt).sum(-1).clamp(min=0)
    out = cs(images, captions)
    assert out.dtype == torch.float32 and out.shape == (3,) and not out.requires_grad
    assert torch.allclose(out, expected, atol=1e-5)

    rcs = RefCLIPScore.from_pretrained(TINY, d / "plain.pt")
    ref_vals = []
    for i, c in enumerate(captions):
        _, r = _hand_embeddings(model, cs.preprocess, images[:1], refs[i], "A photo depicts ")
        ref_vals.append(max(float((txt[i] @ r.T).max()), 0.0))
    ref_vals = torch.tensor(ref_vals)
    hm = 2 * expected * ref_vals / (expected + ref_vals)
    hm = torch.where(expected + ref_vals > 0, hm, torch.zeros_like(hm))
    assert torch.allclose(rcs(images, captions, refs), hm, atol=1e-5)
    with pytest.raises(ValueError, match="references"):
        rcs(images, captions)


def test_pacs_from_state_dict_wrapper(tiny_ckpt, batch):
    d, model, qg_model = tiny_ckpt
    images, captions, refs = batch
    pacs = PACScore.from_pretrained(TINY_QG, d / "pacs.pth")
    img, txt = _hand_embeddings(qg_model, pacs.preprocess, images, captions, "A photo depicts ")
    expected = 2.0 * (img * txt).sum(-1).clamp(min=0)
    assert torch.allclose(pacs(images, captions), expected, atol=1e-5)
    refpacs = RefPACScore.from_pretrained(TINY, d / "wrapped_model.pt")
    out = refpacs(images, captions, refs)
    assert out.shape == (3,) and torch.all(out >= 0)
    # caption 2 is itself among its image's references: text side is 1 -> H-mean(p, 1); the GELU model's
    # CLIP-S of the same weights (wrapped_model.pt holds them for TINY)
    img, txt = _hand_embeddings(model, pacs.preprocess, images, captions, "A photo depicts ")
    p = 2.0 * (img[2] * txt[2]).sum().clamp(min=0)
    assert torch.allclose(out[2], 2 * p / (p + 1), atol=1e-5)


def test_image_index_and_dedup_match_row_aligned(tiny_ckpt, batch):
    d, _, _ = tiny_ckpt
    images, _, refs = batch
    rcs = RefCLIPScore.from_pretrained(TINY, d / "plain.pt", batch_size=2)
    cands = ["a red circle", "a blue star", "a red circle", "a red circle", "big", "a blue star"]
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    fast = rcs(images, cands, refs, image_index=index)
    slow = rcs(images[index], cands, [refs[i] for i in index.tolist()])
    assert torch.allclose(fast, slow, atol=1e-6)

    calls = []
    orig = rcs.model.encode_text
    rcs.model.encode_text = lambda t: (calls.append(t.shape[0]), orig(t))[1]
    rcs(images, cands, refs, image_index=index)
    n_unique = len(set(cands) | {r for rs in refs for r in rs})
    assert sum(calls) == n_unique


def test_score_embeddings_on_the_embeddings_is_the_protocol_call(tiny_ckpt, batch):
    # distill_reward scores its training pairs this way from embeddings it already has
    d, _, _ = tiny_ckpt
    images, _, _ = batch
    cs = CLIPScore.from_pretrained(TINY, d / "plain.pt", batch_size=2)
    cands = ["a red circle", "a blue star", "a red circle", "big", "two blue squares"]
    index = torch.tensor([0, 2, 1, 2, 0])
    via_embeddings = cs.score_embeddings(cs.embed_images(images)[index], cs.embed_texts(cands))
    assert torch.allclose(via_embeddings, cs(images, cands, image_index=index), atol=1e-6)


def test_input_forms_agree(tiny_ckpt, batch):
    from PIL import Image

    d, _, _ = tiny_ckpt
    images, captions, _ = batch
    cs = CLIPScore.from_pretrained(TINY, d / "plain.pt")
    ref = cs(images, captions)
    pil = [Image.fromarray(im.numpy()) for im in images]
    assert torch.allclose(cs(pil, captions), ref, atol=1e-5)
    assert torch.allclose(cs(images.numpy(), captions), ref, atol=1e-6)
    assert torch.allclose(cs(cs.preprocess(images), captions), ref, atol=1e-6)
    assert cs.embed_images(images).shape == (3, 32) and cs.embed_texts(["x", "x"]).shape == (2, 32)


def test_local_dir_and_learned_score(tiny_ckpt, batch, tmp_path):
    d, model, _ = tiny_ckpt
    images, captions, _ = batch
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    m, pre, tok = load_open_clip(f"local-dir:{folder}")
    ref = CLIPScore.from_pretrained(TINY, d / "plain.pt")(images, captions)
    assert torch.allclose(CLIPScore(m, pre, tok)(images, captions), ref, atol=1e-5)

    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "evaluator.pt")
    (run / "evaluator.json").write_text(json.dumps(
        {"model_name": "rlrefine-test-learned", "model_cfg": TINY_CFG, "weights": "evaluator.pt",
         "w": 3.0, "text_prefix": ""}))
    ls = LearnedScore.from_dir(run)
    img, txt = _hand_embeddings(model, ls.preprocess, images, captions, "")
    assert torch.allclose(ls(images, captions), 3.0 * (img * txt).sum(-1).clamp(min=0), atol=1e-5)


def test_missing_and_mismatched_checkpoints(tiny_ckpt, tmp_path):
    d, _, _ = tiny_ckpt
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        CLIPScore.from_pretrained(TINY, missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_open_clip(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="openai"):
        load_open_clip(TINY, "openai")  # a pretrained tag is never downloaded
    register_model_config(OTHER, OTHER_CFG)
    with pytest.raises(ValueError) as err:
        load_open_clip(OTHER, d / "plain.pt")
    msg = str(err.value)
    assert "plain.pt" in msg and OTHER in msg and "text_projection" in msg


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:FutureWarning")
def test_openai_layouts_into_a_gelu_architecture_are_refused_naming_quickgelu(tiny_ckpt, tmp_path):
    d, model, qg_model = tiny_ckpt
    with pytest.raises(ValueError, match=f"PAC-S release layout.*'{TINY}' uses GELU.*'{TINY_QG}'.*allow_gelu_for_openai_weights=true"):
        PACScore.from_pretrained(TINY, d / "pacs.pth")
    # an OpenAI TorchScript archive (the OpenAI release format) is refused the same way
    archive = tmp_path / "openai.pt"
    torch.jit.save(torch.jit.script(_archive_module(qg_model.state_dict())), archive)
    with pytest.raises(ValueError, match="TorchScript archive.*rlrefine-test-tiny-quickgelu"):
        load_open_clip(TINY, archive)
    assert load_open_clip(TINY_QG, archive)[0] is not None
    # the explicit override loads it anyway; a plain state dict (open_clip's own GELU releases) is never refused
    pacs = PACScore.from_pretrained(TINY, d / "pacs.pth", allow_gelu_for_openai_weights=True)
    assert torch.equal(pacs.model.visual.conv1.weight, model.visual.conv1.weight)
    assert load_open_clip(TINY, d / "plain.pt")[0] is not None


class _Node(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _archive_module(state: dict) -> torch.nn.Module:
    """A scriptable module tree whose state dict is `state` (same keys), as OpenAI's archives hold CLIP's weights."""
    root = _Node()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_buffer(leaf, value.clone())
    return root


@pytest.mark.parametrize("arch", [TINY_QG, pytest.param("ViT-B-32-quickgelu", marks=pytest.mark.slow)])
def test_recipe_pacs_reward_from_a_state_dict_file_equals_the_quickgelu_model(arch, tiny_ckpt, tmp_path):
    """The PAC-S reward recipes/coco_vitb32.yaml builds from a {"state_dict": ...} file (the PAC-S release layout)
    gives the image and text embeddings of the QuickGELU model those weights came from (to 1e-5): the recipe's own
    ViT-B-32-quickgelu (slow: 150M parameters), and the same path with a tiny QuickGELU architecture (fast)."""
    from pathlib import Path

    from rlrefine.config import load_recipe
    from rewards.registry import build_reward

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None).eval()
    half = {k: v.half() for k, v in model.state_dict().items()}  # fp16, as released; 300 MB instead of 600
    model.load_state_dict({k: v.float() for k, v in half.items()})
    torch.save({"state_dict": half}, tmp_path / "clip_ViT-B-32.pth")
    (tmp_path / "encoder.pt").write_bytes(b"")
    (tmp_path / "dataset_coco.json").write_text('{"images": []}')
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "coco_vitb32.yaml"
    cfg = load_recipe(recipe, [f"paths.annotations={tmp_path / 'dataset_coco.json'}", f"paths.images={tmp_path}",
                               f"paths.encoder_checkpoint={tmp_path / 'encoder.pt'}",
                               f"paths.reward_checkpoint={tmp_path / 'clip_ViT-B-32.pth'}"]
                     + ([] if arch == "ViT-B-32-quickgelu" else [f"finetune.reward.model_name={arch}",
                                                                  f"evaluate.evaluator.model_name={arch}"]))
    reward = build_reward(cfg.finetune.reward, cfg.reward_context("finetune.reward", "cpu"))
    assert isinstance(reward, PACScore) and (reward.w, reward.text_prefix, reward.clamp) == (2.0, "", False)

    images = torch.randint(0, 256, (2, 240, 320, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    captions = ["a man riding a horse on a beach", "two plates of food on a table"]
    with torch.no_grad():
        img = F.normalize(model.encode_image(reward.preprocess(images)), dim=-1)
        txt = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(captions)), dim=-1)
    assert torch.allclose(reward.embed_images(images), img, atol=1e-5)
    assert torch.allclose(reward.embed_texts(captions), txt, atol=1e-5)
    # the training reward is the reference code's 2.0 * cos (no clamp); evaluation keeps the official PAC-S
    assert torch.allclose(reward(images, captions), 2.0 * (img * txt).sum(-1), atol=1e-5)
    official = build_reward(cfg.evaluate.evaluator, cfg.reward_context("evaluate.evaluator", "cpu"))
    assert (official.w, official.text_prefix, official.clamp) == (2.0, "A photo depicts ", True)


def test_caption_image_index_checks_the_protocol_arguments():
    from rewards.protocol import caption_image_index

    assert caption_image_index(3, 3, None).tolist() == [0, 1, 2]
    assert caption_image_index(2, 4, [0, 0, 1, 1]).tolist() == [0, 0, 1, 1]
    assert caption_image_index(2, 0, []).numel() == 0
    with pytest.raises(ValueError, match="pass image_index"):
        caption_image_index(2, 3, None)
    with pytest.raises(ValueError, match="3 entries for 2 captions"):
        caption_image_index(2, 2, [0, 1, 1])
    with pytest.raises(ValueError, match="out of range for 2 images"):
        caption_image_index(2, 2, [0, 2])
