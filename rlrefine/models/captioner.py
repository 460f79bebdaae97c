"""The refinement captioner (docs/design.md, "The captioner"), in one file, bottom-up.

    image -> ImageEncoder -> V [B, N, d_enc] -> Linear + LayerNorm -> V [B, N, d]
    z_0 ~ N(0, z0_std^2 I)   [B, M, d], drawn on the CPU from one torch.Generator per integer seed
    z_k = z_{k-1} + RefineBlock_k(z_{k-1}, V)        k = 1..K
          (pre-norm: self-attention over the M slots, cross-attention to V, MLP; each a residual branch)
    caption_k = Readout(z_k)                          one decoder shared by all layers

The readout is a GPT-style decoder whose input is `[LN(z_k) + P ; tok(y) + pos]` with P a learned
prefix position embedding (the same for every k: the readout is never told which layer it reads)
and a GIT-style mask: the M prefix slots attend to each other bidirectionally, text tokens attend
to the whole prefix and causally to earlier text. It never sees V, so everything the caption at
layer k says about the image had to pass through refinement blocks 1..k.

Layer indexing: layer 0 is z_0 (pure noise), layers 1..K are the blocks' outputs, K is final.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlrefine.models.encoders import EncoderConfig, ImageEncoder, build_encoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_ARCH_DIR = "encoder"


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index], [..., V] x [...] -> [...], in float32 (float64 for float64 logits).

    TRL's memory-lean `trl.trainer.utils.selective_log_softmax` (fused kernel on GPU) when trl is
    already imported in the process; otherwise the same math here (log p = logit - logsumexp),
    because importing trl just for this costs several seconds of start-up on every command.

    Always float32 for bf16 / fp16 logits (autocast): a caption's log-prob is a sum of ~30 of these,
    about -300 at the real recipe's vocabulary, where bf16's spacing is 2.0, and DiCO's margin is the
    difference of four such sums. TRL's fused kernel returns float32 from bf16 logits without an fp32
    copy of them; its fallback (CPU, or no triton) computes the log-softmax in bf16, so there the
    logits are upcast here first (tests/test_mixed_precision.py measures both).
    """
    trl_utils = sys.modules.get("trl.trainer.utils")
    fn = getattr(trl_utils, "selective_log_softmax", None)
    if fn is not None:
        low_precision = logits.dtype not in (torch.float32, torch.float64)
        if not low_precision or logits.device.type in ("cuda", "xpu"):
            out = fn(logits, index)
            if out.dtype in (torch.float32, torch.float64):  # the fused kernel ran (or the input was fp32)
                return out
        return fn(logits.float(), index)
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return logits.gather(-1, index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass
class CaptionerConfig:
    """Architecture of a RefinementCaptioner (saved as config.json next to the weights)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    d_model: int = 128  # width of the slots z_k and of the readout
    num_slots: int = 8  # M, number of text-encoding slots
    num_refine_layers: int = 4  # K, number of refinement blocks
    n_heads: int = 4
    readout_layers: int = 2  # depth of the shared readout decoder
    mlp_ratio: int = 4
    vocab_size: int = 1000
    max_len: int = 24  # longest token sequence, bos and eos included (text position embeddings)
    z0_std: float = 1.0  # sigma of z_0 ~ N(0, sigma^2 I)
    image_token_pos: bool = False  # a learned embedding per image-token position, added to V
    where_attention: bool = False  # each refinement cross-attention head also returns where it looked (`CrossAttention`)
    slot_competition: bool = False  # refinement cross-attention normalised over the slots, as Slot Attention (`competing_read`)
    locate_head: bool = False  # a linear head on the readout's state that says where a named object is (XE's locate loss)
    dropout: float = 0.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_section(cls, model: Any, tokenizer: Any, max_len: int, locate_head: bool = False,
                     **encoder_overrides: Any) -> "CaptionerConfig":
        """The architecture a recipe's `model` section describes (`rlrefine.config.ModelSection`, read by
        attribute): every field of this class and of `EncoderConfig` is taken from the section by its
        name, so the section and the saved config.json share one list of fields; the vocabulary and
        special ids come from ``tokenizer``, ``max_len`` from the data, ``locate_head`` from the XE stage
        (``pretrain.locate_weight`` > 0). ``encoder_overrides`` replace encoder fields (the trainer resolves
        ``kind: evaluator`` to an open_clip folder)."""
        encoder = {f.name: getattr(model.encoder, f.name) for f in fields(EncoderConfig)} | encoder_overrides
        arch = {f.name: getattr(model, f.name) for f in fields(cls)
                if f.name not in ("encoder", "locate_head", *TOKENIZER_FIELDS)}
        return cls(encoder=EncoderConfig(**encoder), **arch, locate_head=locate_head, vocab_size=tokenizer.vocab_size,
                   max_len=max_len, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CaptionerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CaptionerConfig keys {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        if "encoder" in d:
            d["encoder"] = EncoderConfig.from_dict(d["encoder"])
        return cls(**d)


TOKENIZER_FIELDS = ("vocab_size", "max_len", "pad_id", "bos_id", "eos_id")
"""CaptionerConfig fields set by the tokenizer and the data, not by the recipe's `model` section."""


class TokenLogprobs(NamedTuple):
    logprobs: torch.Tensor  # [B, L, n, T-1] log π of each target token, 0 outside the mask
    mask: torch.Tensor  # [B, L, n, T-1] bool: the tokens after bos up to and incl. the first eos
    entropy: torch.Tensor | None  # [B, L, n, T-1] readout entropy per position (no grad), when asked


class CaptionerOutput(NamedTuple):
    logits: torch.Tensor  # [B, L, T-1, V], position t predicts tokens[:, t+1]
    latents: torch.Tensor  # [B, K+1, M, d], Z[:, 0] = z_0
    hidden: torch.Tensor | None = None  # [B, L, T-1, d], the readout's final state before lm_head, when asked


# ----------------------------------------------------------------------------------- blocks
class MLP(nn.Module):
    def __init__(self, d: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d, mlp_ratio * d)
        self.proj = nn.Linear(mlp_ratio * d, d)  # residual projection (scaled init)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional boolean mask (True = may attend) and KV cache."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)  # residual projection (scaled init)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache: "KVCache | None" = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, hd]
        if cache is not None:  # append this step's keys/values, attend to everything cached so far
            k, v = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


def competing_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-8,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """Slot Attention's read (Locatello et al., 2020): q [..., T, c], k [..., N, c], v [..., N, c'] -> [..., T, c'].

    The softmax of q·k/√c runs over the queries (the slots), not over the tokens, so the slots compete for each
    token: a token one slot takes is not read by the others. Each slot then takes the mean of the values weighted
    by what it won, renormalised over the tokens (eps keeps a slot that won nothing finite). Plain attention lets
    every slot read the same salient tokens, and slots that start as noise read them at random. ``dropout_p`` drops
    attention weights before the renormalisation, as `F.scaled_dot_product_attention` drops them after its softmax."""
    won = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-2) + eps  # [..., T, N], sums to 1 over T
    won = F.dropout(won, dropout_p) if dropout_p > 0 else won
    return (won / (won.sum(dim=-1, keepdim=True) + eps)) @ v


class CrossAttention(nn.Module):
    """Slots (queries) attend to the image tokens V (keys/values).

    ``where=True``: each head also returns *where* it looked, the attention-weighted mean of the tokens' places
    ``Σ_n α_n · (x_n, y_n)`` (``places`` [N, 2]), projected into the slots' stream beside what it read. A relation
    is then a comparison of two such places, the way the learned evaluator's matching head reads relations
    (`rewards.matching`), instead of something to decode from position embeddings mixed into the tokens.

    ``compete=True``: the slots compete for the tokens (`competing_read`) instead of each reading them alone."""

    def __init__(self, d: int, n_heads: int, dropout: float, where: bool = False, compete: bool = False):
        super().__init__()
        self.n_heads, self.dropout, self.compete = n_heads, dropout, compete
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)  # residual projection (scaled init)
        self.where = nn.Linear(2 * n_heads, d) if where else None
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, context, places=None):
        B, T, C = x.shape
        N, h = context.shape[1], self.n_heads
        q = self.q(x).view(B, T, h, C // h).transpose(1, 2)
        k, v = self.kv(context).view(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        if self.where is not None:
            v = torch.cat([v, places.to(v.dtype).expand(B, h, N, 2)], dim=-1)  # each value carries its token's place
        if self.compete:
            y = competing_read(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        if self.where is None:
            return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        y, seen = y[..., :-2], y[..., -2:]  # [B, h, T, C/h], [B, h, T, 2]
        out = self.proj(y.transpose(1, 2).reshape(B, T, C)) + self.where(seen.transpose(1, 2).reshape(B, T, 2 * h))
        return self.resid_dropout(out)


class RefineBlock(nn.Module):
    """One refinement step: z_k = z_{k-1} + RefineBlock_k(z_{k-1}, V), written as three pre-norm
    residual branches (slot self-attention, cross-attention to V, MLP)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float, where: bool = False,
                 compete: bool = False):
        super().__init__()
        self.ln_self = nn.LayerNorm(d)
        self.self_attn = SelfAttention(d, n_heads, dropout)
        self.ln_cross = nn.LayerNorm(d)
        self.cross_attn = CrossAttention(d, n_heads, dropout, where, compete)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio, dropout)

    def forward(self, z, V, slot_pos, places=None):  # z [B, M, d], V [B, N, d], slot_pos [M, d] -> z_next [B, M, d]
        # slot_pos gives every slot an identity (as DETR's query embeddings), so slot i can learn what
        # to look for while z itself starts totally random
        z = z + self.self_attn(self.ln_self(z) + slot_pos)
        z = z + self.cross_attn(self.ln_cross(z) + slot_pos, V, places)
        return z + self.mlp(self.ln_mlp(z))


class DecoderBlock(nn.Module):
    """Pre-norm GPT block of the readout (masked self-attention + MLP)."""

    def __init__(self, d: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, mlp_ratio, dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Per-decoder-layer keys/values [N, h, S_max, hd], preallocated and filled left to right.

    `reorder(idx)` gathers rows (beam search); `repeat(n)` gives each row n copies (one per
    candidate) after the shared prefix has been encoded once.
    """

    def __init__(self, n_layers: int, N: int, n_heads: int, head_dim: int, capacity: int, device, dtype):
        self.k = [torch.empty(N, n_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.empty(N, n_heads, capacity, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0  # positions filled (the same for every layer once a step has finished)
        self._pending = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        self._pending = t1
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def commit(self) -> None:
        self.length = self._pending

    def reorder(self, idx: torch.Tensor) -> None:
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]

    def repeat(self, n: int) -> None:
        if n > 1:
            self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
            self.v = [v.repeat_interleave(n, dim=0) for v in self.v]


class Readout(nn.Module):
    """Autoregressive decoder shared by all layers; reads z_k as a bidirectional prefix (GIT mask)."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        d, self.M, self.max_len = cfg.d_model, cfg.num_slots, cfg.max_len
        self.n_heads = cfg.n_heads
        self.prefix_norm = nn.LayerNorm(d)  # z_k's scale changes with k; the decoder sees it normalised
        self.prefix_pos = nn.Parameter(torch.zeros(cfg.num_slots, d))  # slot positions, layer-independent
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([DecoderBlock(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.readout_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """The output layer shares the token embedding's matrix (nanoGPT). Called again by whatever rebuilds the
        parameters one module at a time (accelerate's FSDP2 `cpu_ram_efficient_loading` moves the model to the meta
        device, which unties them, then calls ``tie_weights`` on the prepared model)."""
        self.lm_head.weight = self.tok_emb.weight

    def git_mask(self, T: int, device) -> torch.Tensor:
        """[M+T, M+T] bool, True = may attend: every row sees the prefix, text rows see earlier text."""
        S = self.M + T
        mask = torch.ones(S, S, dtype=torch.bool, device=device).tril_()
        mask[:, : self.M] = True
        mask[: self.M, self.M:] = False
        return mask

    def embed_prefix(self, z):  # [N, M, d]
        return self.prefix_norm(z) + self.prefix_pos

    def embed_tokens(self, tokens, start: int = 0):  # [N, T] at text positions start..start+T-1
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.tok_emb(tokens) + self.pos_emb(pos)

    def forward(self, z: torch.Tensor, tokens: torch.Tensor, return_hidden: bool = False):
        """Teacher forcing. z [N, M, d], tokens [N, T] -> logits [N, T, V] (position t predicts t+1); with
        ``return_hidden``, (logits, the final state before lm_head [N, T, d])."""
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"token sequence of length {T} exceeds max_len {self.max_len}")
        x = self.drop(torch.cat([self.embed_prefix(z), self.embed_tokens(tokens)], dim=1))
        mask = self.git_mask(T, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        hidden = self.ln_f(x[:, self.M:])
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    # --- incremental decoding (generation.py) ---
    def prefill(self, z: torch.Tensor, tokens: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVCache]:
        """Encode prefix + the first tokens once; returns (logits of the last position [N, V], cache)."""
        N, T = tokens.shape
        x = torch.cat([self.embed_prefix(z), self.embed_tokens(tokens)], dim=1)
        d = x.shape[-1]
        cache = KVCache(len(self.blocks), N, self.n_heads, d // self.n_heads, self.M + capacity, x.device, x.dtype)
        mask = self.git_mask(T, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, cache, i)
        cache.commit()
        return self.lm_head(self.ln_f(x[:, -1])), cache

    def step(self, token: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Feed one token per row at text position `pos`; token [N] -> next-token logits [N, V]."""
        x = self.embed_tokens(token[:, None], start=pos)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None, cache, i)  # a single query may attend to every cached position
        cache.commit()
        return self.lm_head(self.ln_f(x[:, 0]))


# ----------------------------------------------------------------------------------- the model
class RefinementCaptioner(nn.Module):
    """Image encoder + K refinement blocks + one shared readout. See the module docstring."""

    def __init__(self, config: CaptionerConfig, encoder_architecture_dir: str | os.PathLike | None = None):
        """Build the model. For open_clip / hf encoders the backbone's weights are loaded from
        `config.encoder.checkpoint`; with `encoder_architecture_dir` (used by `from_pretrained`)
        only its architecture is built there and the weights come from the captioner checkpoint."""
        super().__init__()
        self.config = cfg = config
        d, K = cfg.d_model, cfg.num_refine_layers
        self.encoder: ImageEncoder = build_encoder(cfg.encoder, architecture_dir=encoder_architecture_dir)
        self.image_proj = nn.Linear(self.encoder.out_dim, d)
        self.image_norm = nn.LayerNorm(d)
        self.image_pos = None  # [N, d]: where each image token is, so that slots can address cells by position
        if cfg.image_token_pos:
            with torch.no_grad():
                n = self.encoder.encode(torch.zeros(1, 3, *self.encoder.image_size)).shape[1]
            self.image_pos = nn.Parameter(torch.randn(n, d))  # comparable to the layer-normed tokens it is added to
        places = self.encoder.token_places() if cfg.where_attention else None
        if cfg.where_attention and places is None:
            raise ValueError(f"model.where_attention needs an image encoder that says where its tokens lie (open_clip "
                             f"ResNet or ViT towers, kind evaluator); {type(self.encoder).__name__} does not: set "
                             f"model.where_attention to false")
        # [N, 2]: where each image token lies, read by the refinement blocks' where path (None: no where path)
        self.register_buffer("image_places", places, persistent=False)
        self.refine_blocks = nn.ModuleList([RefineBlock(d, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.where_attention,
                                                        cfg.slot_competition)
                                            for _ in range(K)])
        self.slot_pos = nn.Parameter(torch.zeros(cfg.num_slots, d))  # slot identities for the refinement blocks
        self.readout = Readout(cfg)
        # from the readout's state at a word that names an object, where that object is (x, y) in [-1, 1]; trained by
        # XE's locate loss (`rlrefine.losses.locate_loss`) and used by nothing else
        self.locate_head = nn.Linear(d, 2) if cfg.locate_head else None

        # nanoGPT-style init for everything but the (possibly pretrained) encoder; residual
        # projections get std 0.02 / sqrt(number of residual branches they feed)
        for m in (self.image_proj, self.image_norm, self.refine_blocks, self.readout):
            m.apply(_init_weights)
        nn.init.normal_(self.readout.prefix_pos, std=0.02)
        nn.init.normal_(self.slot_pos, std=1.0)  # comparable to the layer-normed slots it is added to
        for blocks, n_branches in ((self.refine_blocks, 3 * K), (self.readout.blocks, 2 * cfg.readout_layers)):
            for name, p in blocks.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(n_branches))

    def tie_weights(self) -> None:
        """Re-tie the readout's output layer to its token embedding (`Readout.tie_weights`)."""
        self.readout.tie_weights()

    # -- pieces --------------------------------------------------------------------------------
    def z0(self, seeds: torch.Tensor) -> torch.Tensor:
        """z_0 for each seed: [B] ints -> [B, M, d], N(0, z0_std^2). Drawn on the CPU in float32 from
        `torch.Generator().manual_seed(seed)`, so the same seed gives the same z_0 on any device/dtype."""
        cfg, p = self.config, self.readout.prefix_pos
        seeds = torch.as_tensor(seeds).reshape(-1).tolist()
        noise = torch.stack([
            torch.randn(cfg.num_slots, cfg.d_model, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]) if seeds else torch.zeros(0, cfg.num_slots, cfg.d_model)
        return (noise * cfg.z0_std).to(device=p.device, dtype=p.dtype)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,H,W] -> V [B, N, d] (encoder tokens, projected and normalised)."""
        V = self.image_norm(self.image_proj(self.encoder.encode(pixels).to(self.image_proj.weight.dtype)))
        return V if self.image_pos is None else V + self.image_pos

    def refine(self, V: torch.Tensor, z0_seed: torch.Tensor) -> torch.Tensor:
        """Z [B, K+1, M, d] with Z[:, 0] = z_0(seed) and Z[:, k] = z_{k-1} + RefineBlock_k(z_{k-1}, V)."""
        z = self.z0(z0_seed)
        Z = [z]
        for block in self.refine_blocks:
            z = block(z, V, self.slot_pos, self.image_places)
            Z.append(z)
        return torch.stack(Z, dim=1)

    def _layers(self, layers) -> torch.Tensor:
        K = self.config.num_refine_layers
        if layers is None:
            layers = range(K + 1)
        t = torch.as_tensor(list(layers) if not isinstance(layers, torch.Tensor) else layers, dtype=torch.long).reshape(-1).cpu()
        if t.numel() == 0 or t.min() < 0 or t.max() > K:
            raise ValueError(f"layers must be ints in 0..{K}, got {t.tolist()}")
        return t

    def latents(self, pixels: torch.Tensor, z0_seed: torch.Tensor) -> torch.Tensor:
        """encode_image + refine: Z [B, K+1, M, d]."""
        return self.refine(self.encode_image(pixels), z0_seed)

    # -- teacher forcing -----------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor, z0_seed: torch.Tensor,
                layers: Sequence[int] | torch.Tensor | None = None, return_hidden: bool = False) -> CaptionerOutput:
        """Teacher-forced logits at the selected layers (default: all, 0..K), in ONE readout call.

        pixels [B,3,H,W], tokens [B,T] (bos ... eos pad ...), z0_seed [B]
        -> logits [B, L, T-1, V] (logits[:, l, t] predicts tokens[:, t+1]), latents Z [B, K+1, M, d] and, with
        ``return_hidden``, the readout's final state [B, L, T-1, d] (what `locate_head` reads).
        """
        Z = self.latents(pixels, z0_seed)
        idx = self._layers(layers).to(Z.device)
        B, L, T = Z.shape[0], idx.numel(), tokens.shape[1]
        prefix = Z.index_select(1, idx).flatten(0, 1)  # [B*L, M, d]
        inp = tokens[:, None, :-1].expand(B, L, T - 1).reshape(B * L, T - 1)
        if return_hidden:
            logits, hidden = self.readout(prefix, inp, return_hidden=True)  # [B*L, T-1, V], [B*L, T-1, d]
            return CaptionerOutput(logits.view(B, L, T - 1, -1), Z, hidden.view(B, L, T - 1, -1))
        logits = self.readout(prefix, inp)  # [B*L, T-1, V]
        return CaptionerOutput(logits.view(B, L, T - 1, -1), Z)

    def sequence_logprobs(self, pixels: torch.Tensor, z0_seed: torch.Tensor, layers: Sequence[int] | torch.Tensor,
                          tokens: torch.Tensor) -> torch.Tensor:
        """Summed log-probs of given captions: tokens [B, L, n, T] -> [B, L, n].

        tokens[b, l, j] is decoded from layer layers[l] of image b with z_0 from z0_seed[b]; the sum
        runs over the tokens after bos up to and including the first eos (pads ignored). The image
        encoder and the refinement run once per image; only the readout sees every candidate.
        """
        return self.token_logprobs(pixels, z0_seed, layers, tokens).logprobs.sum(-1)

    def token_logprobs(self, pixels: torch.Tensor, z0_seed: torch.Tensor, layers: Sequence[int] | torch.Tensor,
                       tokens: torch.Tensor, entropy: bool = False) -> "TokenLogprobs":
        """Per-token log-probs of given captions: tokens [B, L, n, T] -> TokenLogprobs with
        ``logprobs`` [B, L, n, T-1] (position t: log π(tokens[..., t+1] | prefix), 0 where ``mask`` is
        False), ``mask`` [B, L, n, T-1] (`target_mask`: the tokens after bos up to and including the
        first eos) and, with ``entropy``, the readout's entropy at each position [B, L, n, T-1] (no grad).
        """
        Z = self.latents(pixels, z0_seed)
        idx = self._layers(layers).to(Z.device)
        B, L, n, T = tokens.shape
        if L != idx.numel():
            raise ValueError(f"tokens has {L} layers on dim 1 but layers has {idx.numel()} entries")
        prefix = Z.index_select(1, idx)[:, :, None].expand(B, L, n, *Z.shape[2:]).reshape(B * L * n, *Z.shape[2:])
        flat = tokens.reshape(B * L * n, T)
        logits = self.readout(prefix, flat[:, :-1])  # [BLn, T-1, V]
        targets = flat[:, 1:]
        mask = self.target_mask(targets)
        logp = selective_log_softmax(logits, targets).masked_fill(~mask, 0.0)  # [BLn, T-1]
        ent = None
        if entropy:
            with torch.no_grad():
                lsm = torch.log_softmax(logits.float(), dim=-1)
                ent = -(lsm.exp() * lsm).sum(-1).masked_fill(~mask, 0.0).view(B, L, n, T - 1)
        return TokenLogprobs(logp.view(B, L, n, T - 1), mask.view(B, L, n, T - 1), ent)

    def target_mask(self, targets: torch.Tensor) -> torch.Tensor:
        """Which target tokens count (bool [..., T]): not pad, and at or before the first eos."""
        is_eos = targets == self.config.eos_id
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        return (targets != self.config.pad_id) & ~after_eos

    # -- generation ----------------------------------------------------------------------------
    def generate(self, pixels: torch.Tensor, z0_seed: torch.Tensor, layers: Sequence[int] | torch.Tensor | None = None,
                 method: str = "greedy", num_candidates: int = 1, max_len: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 length_penalty: float = 0.0, branch_ids: torch.Tensor | None = None,
                 branch_to: torch.Tensor | None = None):
        """Captions at the selected layers -> GenerationOutput(tokens [B,L,n,T], logprobs [B,L,n], lengths [B,L,n]).

        See `rlrefine.models.generation.generate` (batched over images x layers x candidates, KV cache)."""
        from rlrefine.models.generation import generate

        return generate(self, pixels, z0_seed, layers, method=method, num_candidates=num_candidates, max_len=max_len,
                        temperature=temperature, top_p=top_p, generator=generator, length_penalty=length_penalty,
                        branch_ids=branch_ids, branch_to=branch_to)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None, model_card: str | None = None) -> None:
        """Write `model.safetensors` (all weights, the image encoder's included), `config.json`,
        `encoder/` (the encoder backbone's architecture, open_clip / hf only) and, if given,
        the tokenizer (`tokenizer.save(dir)`) and a model card (`README.md`, the text given; see
        `rlrefine.trainers.model_card`). Written to a temporary sibling folder and renamed
        into place, so a crash never leaves a half-written checkpoint at `directory`."""
        from safetensors.torch import save_model

        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
            if self.config.encoder.kind != "tiny_vit":
                self.encoder.save_architecture(tmp / ENCODER_ARCH_DIR)
            if tokenizer is not None:
                tokenizer.save(tmp)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card)
            old = None
            if final.exists():
                old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "RefinementCaptioner":
        """Load a checkpoint written by `save_pretrained` onto `map_location`, in `dtype` (default:
        the dtype it was saved in). The encoder's original checkpoint is not needed: its weights
        are in model.safetensors and its architecture in `encoder/`."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"captioner checkpoint directory not found: {d}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"captioner checkpoint file not found: {d / name}")
        config = CaptionerConfig.from_dict(json.loads((d / CONFIG_NAME).read_text()))
        arch = d / ENCODER_ARCH_DIR if config.encoder.kind != "tiny_vit" else None
        model = cls(config, encoder_architecture_dir=arch)
        if dtype is None:
            floats = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                dtype = next((floats[t] for t in (f.get_slice(k).get_dtype() for k in f.keys()) if t in floats), None)
        model.to(device=map_location, dtype=dtype)
        load_model(model, str(d / WEIGHTS_NAME), strict=True, device=str(torch.device(map_location)))
        return model


def _init_weights(module: nn.Module) -> None:
    """nanoGPT init: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
