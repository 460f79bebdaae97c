"""Image encoders: every backend loads from a tiny checkpoint written to tmp_path through the same
path a user takes for a real one (open_clip ViT-B-32 file / local-dir:, HF model directory)."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from rlrefine.models import (
    CaptionerConfig,
    EncoderConfig,
    HFVision,
    OpenCLIPVisual,
    RefinementCaptioner,
    TinyViT,
    build_encoder,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY_CLIP_NAME = "rlrefine-test-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def _images(n=3, size=32, seed=0):
    g = np.random.default_rng(seed)
    return torch.from_numpy(g.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ tiny ViT
def test_tiny_vit_shapes_and_preprocess():
    enc = build_encoder(EncoderConfig(kind="tiny_vit", image_size=32, patch_size=8, width=32, depth=1, heads=2))
    assert isinstance(enc, TinyViT) and enc.out_dim == 32
    imgs = _images(2, 32)
    px = enc.preprocess(imgs)
    assert px.shape == (2, 3, 32, 32) and px.dtype == torch.float32
    torch.testing.assert_close(px, (imgs.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)
    # a list of PIL images gives the same pixels as the batched uint8 tensor
    pil = [Image.fromarray(im.numpy()) for im in imgs]
    torch.testing.assert_close(enc.preprocess(pil), px)
    # other sizes are resized to the encoder's input size
    assert enc.preprocess(_images(2, 48)).shape == (2, 3, 32, 32)
    V = enc.encode(px)
    assert V.shape == (2, 16, 32)


def test_frozen_flag_freezes():
    enc = build_encoder(EncoderConfig(kind="tiny_vit", image_size=16, patch_size=8, width=16, depth=1, heads=2, frozen=True))
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # stays in eval mode
    V = enc.encode(torch.randn(2, 3, 16, 16))
    assert not V.requires_grad
    # inside a captioner: the encoder gets no gradient, the rest does
    cfg = CaptionerConfig(encoder=EncoderConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, frozen=True),
                          d_model=16, num_slots=2, num_refine_layers=2, n_heads=2, readout_layers=1, vocab_size=10, max_len=6)
    model = RefinementCaptioner(cfg).train()
    assert not model.encoder.training and model.readout.training
    tokens = torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2]])
    model(torch.randn(2, 3, 16, 16), tokens, torch.tensor([0, 1])).logits.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.image_proj.weight.grad is not None


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder(EncoderConfig(kind="resnet"))


# ------------------------------------------------------------------------------------ open_clip
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model from a registered custom config, saved as a plain state_dict."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    (d / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d / f"{TINY_CLIP_NAME}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME).eval()
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return model, ckpt


def _reference_tokens(model, px):
    """What the original open_clip model says: class token + patch tokens, in the joint space."""
    v = model.visual
    v.output_tokens = True
    pooled, tokens = v(px)
    v.output_tokens = False
    return torch.cat([pooled[:, None], tokens @ v.proj], dim=1)


def test_open_clip_checkpoint_file(tiny_clip):
    model, ckpt = tiny_clip
    enc = build_encoder(EncoderConfig(kind="open_clip", model_name=TINY_CLIP_NAME, checkpoint=str(ckpt)))
    assert isinstance(enc, OpenCLIPVisual)
    imgs = _images(3, 32)
    px = enc.preprocess(imgs)
    assert px.shape == (3, 3, 32, 32)
    # same normalisation as open_clip's own (PIL) preprocessing when no resize is needed
    import open_clip

    ref_pre = open_clip.image_transform(32, is_train=False, mean=enc.mean, std=enc.std)
    torch.testing.assert_close(px, torch.stack([ref_pre(Image.fromarray(im.numpy())) for im in imgs]), atol=1e-5, rtol=0)
    with torch.no_grad():
        V = enc.encode(px)
        ref = _reference_tokens(model, px)
    assert V.shape == (3, 1 + 16, 24) and enc.out_dim == 24
    torch.testing.assert_close(V, ref)
    torch.testing.assert_close(V[:, 0], model.encode_image(px))  # first token = CLIP image embedding


def test_open_clip_local_dir(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_clip
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    enc = build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", frozen=True))
    px = enc.preprocess(_images(2, 40))  # resized (shortest edge) + centre-cropped to 32
    assert px.shape == (2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(px), _reference_tokens(model, px))


def _save_tiny_resnet_clip(d):
    """A tiny open_clip CLIP with a ModifiedResNet tower (64 px: a 2x2 last stage, 4x4 stage 3), saved as a local-dir."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg).eval()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "open_clip_model.safetensors")
    return model


def test_open_clip_resnet_tower_gives_pooled_plus_dense_tokens(tmp_path):
    """A ModifiedResNet tower (the learned evaluator's kind) returns one pooled vector; the encoder
    returns it first, then the attention pool's value path at every grid cell (hand-computed here)."""
    model = _save_tiny_resnet_clip(tmp_path)
    enc = build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", frozen=True))
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        V = enc.encode(px)
        v = model.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(px)))))  # [2, C, 2, 2]: 64 px / 32
        cells = x.flatten(2).transpose(1, 2) + v.attnpool.positional_embedding[1:]
        dense = cells @ v.attnpool.v_proj.weight.T + v.attnpool.v_proj.bias
        dense = dense @ v.attnpool.c_proj.weight.T + v.attnpool.c_proj.bias
        assert V.shape == (2, 1 + 4, 16) and enc.out_dim == 16
        torch.testing.assert_close(V[:, 0], model.encode_image(px))
        torch.testing.assert_close(V[:, 1:], dense)
        assert not torch.allclose(V[:, 1], V[:, 2])  # the cells differ: spatial detail survives


def test_open_clip_resnet_grid_stage_adds_the_finer_cells(tmp_path):
    """grid_stage 3: after [pooled; dense] come the 4x4 cells of stage 3, each with the 2x2 stage-4 cell above it
    appended (hand-computed), every token zero outside its own block of features; a ViT tower refuses the key."""
    model = _save_tiny_resnet_clip(tmp_path)
    plain = build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", frozen=True))
    enc = build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", frozen=True, grid_stage=3))
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        V, joint = enc.encode(px), plain.encode(px)
        v = model.visual
        x3 = v.layer3(v.layer2(v.layer1(v.stem(px))))  # [2, 128, 4, 4]: width 8 * 4 * 4 channels
        x4 = v.layer4(x3)  # [2, 256, 2, 2]
    c3, c4 = x3.shape[1], x4.shape[1]
    assert V.shape == (2, 5 + 16, 16 + c3 + c4) and enc.out_dim == 16 + c3 + c4
    torch.testing.assert_close(V[:, :5, :16], joint)
    assert V[:, :5, 16:].abs().max() == 0 and V[:, 5:, :16].abs().max() == 0
    cells = V[:, 5:, 16:].reshape(2, 4, 4, c3 + c4)  # row-major over the 4x4 grid
    for i, j in ((0, 0), (1, 2), (3, 3)):
        torch.testing.assert_close(cells[:, i, j, :c3], x3[:, :, i, j])
        torch.testing.assert_close(cells[:, i, j, c3:], x4[:, :, i // 2, j // 2])
    with pytest.raises(ValueError, match="stages 0 \\(stem\\) .. 4"):
        build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", grid_stage=5))

    # a captioner on it has one learned position per token, and is rebuilt whole from its own checkpoint
    from rlrefine.models import CaptionerConfig, RefinementCaptioner

    cap = RefinementCaptioner(CaptionerConfig(
        encoder=EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path}", frozen=True, grid_stage=3),
        d_model=16, num_slots=4, num_refine_layers=2, n_heads=2, readout_layers=1, vocab_size=12, max_len=8,
        image_token_pos=True)).eval()
    assert cap.image_pos.shape == (21, 16)
    # where the tokens lie: the pooled one at the centre, the 2x2 dense cells, the 4x4 stage-3 cells (x right, y down)
    from rlrefine.models.encoders import cell_centres

    torch.testing.assert_close(cell_centres(2), torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    torch.testing.assert_close(cell_centres(4)[[0, 6, 15]], torch.tensor([[-0.75, -0.75], [0.25, -0.25], [0.75, 0.75]]))
    torch.testing.assert_close(enc.token_places(), torch.cat([torch.zeros(1, 2), cell_centres(2), cell_centres(4)]))
    torch.testing.assert_close(plain.token_places(), torch.cat([torch.zeros(1, 2), cell_centres(2)]))
    cap.save_pretrained(tmp_path / "captioner")
    loaded = RefinementCaptioner.from_pretrained(tmp_path / "captioner").eval()
    assert loaded.config.encoder.grid_stage == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(px), cap.encode_image(px))


def test_grid_stage_needs_a_resnet_tower(tiny_clip):
    _, ckpt = tiny_clip
    vit = build_encoder(EncoderConfig(kind="open_clip", model_name=TINY_CLIP_NAME, checkpoint=str(ckpt)))
    from rlrefine.models.encoders import cell_centres

    torch.testing.assert_close(vit.token_places(), torch.cat([torch.zeros(1, 2), cell_centres(4)]))  # class + 4x4 patches
    with pytest.raises(ValueError, match="needs an open_clip ModifiedResNet tower"):
        build_encoder(EncoderConfig(kind="open_clip", model_name=TINY_CLIP_NAME, checkpoint=str(ckpt), grid_stage=3))


def test_open_clip_missing_paths(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_encoder(EncoderConfig(kind="open_clip", model_name="ViT-B-32", checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nodir")):
        build_encoder(EncoderConfig(kind="open_clip", checkpoint=f"local-dir:{tmp_path / 'nodir'}"))
    with pytest.raises(ValueError, match="never downloads"):
        build_encoder(EncoderConfig(kind="open_clip", model_name="ViT-B-32"))


# ------------------------------------------------------------------------------------ transformers
def _save_hf(kind, d):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8))
        proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8), add_pooling_layer=False)
        proc = ViTImageProcessor(size={"height": 32, "width": 32})
    model.eval().save_pretrained(d)
    proc.save_pretrained(d)
    return model, proc


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_hf_vision_from_local_dir(kind, tmp_path):
    model, proc = _save_hf(kind, tmp_path)
    enc = build_encoder(EncoderConfig(kind="hf", checkpoint=str(tmp_path)))
    assert isinstance(enc, HFVision) and enc.out_dim == 32
    imgs = _images(2, 32)
    px = enc.preprocess(imgs)
    ref_px = proc(images=[im.numpy() for im in imgs], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, ref_px, atol=1e-5, rtol=0)
    with torch.no_grad():
        V = enc.encode(px)
        ref = model(pixel_values=px).last_hidden_state
    assert V.shape == (2, 17, 32)  # class token + 4x4 patches
    torch.testing.assert_close(V, ref)


def test_hf_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_encoder(EncoderConfig(kind="hf", checkpoint=str(tmp_path / "absent")))


# ------------------------------------------------------------------------------------ captioner checkpoints
@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_captioner_checkpoint_carries_encoder(kind, tiny_clip, tmp_path, caplog):
    """save_pretrained stores the backbone's weights and architecture: from_pretrained works after the
    original encoder checkpoint is gone, gives the same outputs, and warns about nothing."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    if kind == "open_clip":
        shutil.copy(tiny_clip[1], src / "clip.pt")
        enc_cfg = EncoderConfig(kind="open_clip", model_name=TINY_CLIP_NAME, checkpoint=str(src / "clip.pt"))
    else:
        _save_hf("clip", src)
        enc_cfg = EncoderConfig(kind="hf", checkpoint=str(src))
    cfg = CaptionerConfig(encoder=enc_cfg, d_model=16, num_slots=2, num_refine_layers=2, n_heads=2,
                          readout_layers=1, vocab_size=10, max_len=6)
    torch.manual_seed(0)
    model = RefinementCaptioner(cfg).eval()
    px = model.encoder.preprocess(_images(2, 32))
    seeds = torch.tensor([3, 4])
    out = model.generate(px, seeds, [0, 2], method="beam", num_candidates=2)
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(src)
    with caplog.at_level("DEBUG"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = RefinementCaptioner.from_pretrained(tmp_path / "ckpt").eval()
    # loading is silent: no "No pretrained weights loaded ... initialized randomly" (the weights follow)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))] == []
    torch.testing.assert_close(loaded.encoder.encode(px), model.encoder.encode(px))
    out2 = loaded.generate(px, seeds, [0, 2], method="beam", num_candidates=2)
    assert torch.equal(out.tokens, out2.tokens)
    torch.testing.assert_close(out.logprobs, out2.logprobs)
