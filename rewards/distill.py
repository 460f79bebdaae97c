"""Reward distillation: a compact student dual encoder that imitates a teacher reward.

The ``distill-reward`` stage. DiCO only consumes each image's *ranking* of its candidates (the
argmax and the softmax weights), so the student is trained to reproduce the teacher's scores and,
above all, its per-image ordering, on the pairs that fine-tuning will actually show it:

* pairs: every reference caption of an image; (when given) the captioner's own candidates from
  every layer, as ``(image_idx, caption)`` pairs built by the caller; and HELIP-style hard pairs:
  captions of the images nearest to each image in the *teacher's* image-embedding space.
* loss = ``mse_weight``      * mean (s - t)^2                                  (regression)
       + ``listwise_weight`` * mean_i KL(softmax(t_i / T) || softmax(s_i / T))  (per-image lists)
       + ``margin_weight``   * mean relu(margin - (s_pos - s_hard))            (hard negatives)
  where t are teacher scores, s = w * cos + b student scores (w, b learned), s_pos the student
  score of the image's best reference (by the teacher) and s_hard of a hard pair the teacher
  scores lower.
  + ``embedding_weight`` * mean (1 - cos(student emb, teacher emb)) over the step's images and
                           captions (feature distillation; 0 = off), plus as many images drawn from
                           ``extra_embedding_images`` split images beyond ``max_images`` (image side only)
* The student is an open_clip model (default ``rlrefine-student-tiny``: width-32 towers, 2
  layers, 16 px patches; with ``vision_init="teacher"`` a narrower ModifiedResNet of the teacher's
  depths starts from the teacher's strongest channels, :func:`narrow_resnet_state`)
  saved as ``student.pt`` + ``student.json`` and used through the reward protocol with
  ``DistilledScore.from_dir(out_dir)``. With ``tokenizer="word"`` its text tower reads a word
  vocabulary trained on the distillation captions (saved beside it as ``tokenizer.json``; the tower
  pools at the eos token), which skips open_clip's Python BPE, a third of a small teacher's time.
* Reported on held-out images' pairs (saved as ``heldout_pairs.json`` so that
  ``benchmarks/distill.py`` can measure them again): Spearman and Kendall tau-b with the teacher
  (overall and mean per image), argmax agreement per image, and pairs/s of student vs teacher
  measured in the same run on the same pairs (:func:`compare_to_teacher`); and which tower limits
  the ranking (:func:`tower_fidelity`). :func:`noise_sensitivity` tells what fidelity an argmax target
  needs: the teacher's ranking with its own embeddings moved at random to a given cosine.
  :func:`decision_agreement` measures the student on the choices fine-tuning makes: the best of one
  image's candidates at one layer.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .clip_score import LearnedScore, OpenCLIPReward
from .evaluator import (_cosine_with_warmup, _image_batch, _log, _param_groups, _split_fields,
                        build_dual_encoder, save_dual_encoder)

if TYPE_CHECKING:
    from rlrefine.data.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistilledScore", "WordTokens", "compare_to_teacher", "decision_agreement", "distill_reward",
           "kendall_tau", "load_pairs", "narrow_resnet_state", "noise_sensitivity", "perturb_to_cosine", "rankdata",
           "spearman", "tower_fidelity"]

REF, CANDIDATE, HARD = 0, 1, 2  # pair kinds
HELDOUT_FILE = "heldout_pairs.json"  # written by distill_reward beside the student


# ---------------------------------------------------------------------------------------------
# rank correlation (no scipy)
def rankdata(x: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(torch.as_tensor(x).detach().cpu().double())
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (nan if either side is constant)."""
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def _tied_pairs(v: np.ndarray) -> int:
    """Pairs of equal values in ``v``."""
    _, counts = np.unique(v, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` with n0 = n(n-1)/2 and n1, n2 the
    pairs tied in x and in y (nan if either side is constant). O(n log n) (Knight 1966): sorted by
    (x, y), the discordant pairs are the strict inversions of y, counted with a Fenwick tree."""
    x = np.asarray(torch.as_tensor(x).detach().cpu().double())
    y = np.asarray(torch.as_tensor(y).detach().cpu().double())
    n = len(x)
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(x), _tied_pairs(y)
    n3 = _tied_pairs(np.stack([x, y], 1).view(np.complex128).ravel())  # pairs tied in both
    ranks = np.unique(y, return_inverse=True)[1][np.lexsort((y, x))] + 1  # y's dense ranks, in (x, y) order
    tree = [0] * (int(ranks.max(initial=0)) + 1)
    discordant = 0
    for seen, r in enumerate(ranks.tolist()):
        k, not_above = r, 0  # earlier y's <= this one
        while k > 0:
            not_above += tree[k]
            k -= k & -k
        discordant += seen - not_above
        k = r
        while k < len(tree):
            tree[k] += 1
            k += k & -k
    concordant = n0 - n1 - n2 + n3 - discordant
    den = math.sqrt((n0 - n1) * (n0 - n2))
    return (concordant - discordant) / den if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
def _bn_scale(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """How much each output channel of a conv + BN pair is amplified: |gamma| / sqrt(var + eps)."""
    return (bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).detach()


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(score, k).indices).values


@torch.no_grad()
def narrow_resnet_state(teacher: torch.nn.Module, student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for ``student`` made of the teacher's strongest channels (structured pruning).

    Both are open_clip ``ModifiedResNet`` towers with the same stage depths, image size, output
    size and attention-pool head count; the student is narrower. Every conv keeps the output
    channels its BN amplifies most (``|gamma| / sqrt(var)``), and each stage's residual stream one
    channel set shared by its blocks. The attention pool keeps, in every head, the query/key dims
    with the largest ``|W_q| |W_k|`` (queries rescaled for the smaller head dim) and the value dims
    with the largest ``|W_v| |W_c|``. Where the dropped channels carry nothing the student computes
    exactly the teacher's function; otherwise it is a starting point for distillation, not a copy.
    """
    from open_clip.modified_resnet import ModifiedResNet

    if not (isinstance(teacher, ModifiedResNet) and isinstance(student, ModifiedResNet)):
        raise ValueError(f"distill vision_init=teacher needs a ModifiedResNet (list vision_layers) teacher and "
                         f"student image tower; got {type(teacher).__name__} and {type(student).__name__}. "
                         f"Use vision_init=random.")
    depths = [[len(getattr(m, f"layer{i}")) for i in range(1, 5)] for m in (teacher, student)]
    t_ap, s_ap = teacher.attnpool, student.attnpool
    same = {"stage depths": depths, "image size": [teacher.image_size, student.image_size],
            "output size": [t_ap.c_proj.out_features, s_ap.c_proj.out_features],
            "attention-pool heads": [t_ap.num_heads, s_ap.num_heads]}
    for what, (t, s) in same.items():
        if t != s:
            raise ValueError(f"distill vision_init=teacher: the student's {what} ({s}) must equal the teacher's ({t}). "
                             f"Match the student's vision config to the teacher's or use vision_init=random.")
    if student.conv1.out_channels > teacher.conv1.out_channels:
        raise ValueError(f"distill vision_init=teacher: the student ResNet (width {2 * student.conv1.out_channels}) is "
                         f"wider than the teacher's ({2 * teacher.conv1.out_channels}); use vision_init=random.")
    t_sd, out = teacher.state_dict(), {}

    def conv_bn(conv: str, bn: str, rows: torch.Tensor, cols: torch.Tensor) -> None:
        out[f"{conv}.weight"] = t_sd[f"{conv}.weight"][rows][:, cols].clone()
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{bn}.{k}"] = t_sd[f"{bn}.{k}"][rows].clone()
        out[f"{bn}.num_batches_tracked"] = t_sd[f"{bn}.num_batches_tracked"].clone()

    prev = torch.arange(3)
    for i in (1, 2, 3):  # the three-conv stem
        rows = _top(_bn_scale(getattr(teacher, f"bn{i}")), getattr(student, f"conv{i}").out_channels)
        conv_bn(f"conv{i}", f"bn{i}", rows, prev)
        prev = rows
    for i in range(1, 5):
        t_blocks, s_blocks = getattr(teacher, f"layer{i}"), getattr(student, f"layer{i}")
        stream = _bn_scale(t_blocks[0].downsample[-1]) + sum(_bn_scale(blk.bn3) for blk in t_blocks)
        stream = _top(stream, s_blocks[0].conv3.out_channels)
        for j, (t_blk, s_blk) in enumerate(zip(t_blocks, s_blocks)):
            p = f"layer{i}.{j}"
            a = _top(_bn_scale(t_blk.bn1), s_blk.conv1.out_channels)
            c = _top(_bn_scale(t_blk.bn2), s_blk.conv2.out_channels)
            conv_bn(f"{p}.conv1", f"{p}.bn1", a, prev if j == 0 else stream)
            conv_bn(f"{p}.conv2", f"{p}.bn2", c, a)
            conv_bn(f"{p}.conv3", f"{p}.bn3", stream, c)
            if j == 0:  # (AvgPool, conv, BN): the first block changes width or stride
                conv_bn(f"{p}.downsample.0", f"{p}.downsample.1", stream, prev)
        prev = stream
    heads, t_dim, s_dim = t_ap.num_heads, t_ap.q_proj.out_features // t_ap.num_heads, s_ap.q_proj.out_features // s_ap.num_heads
    qk = t_ap.q_proj.weight.norm(dim=1) * t_ap.k_proj.weight.norm(dim=1)
    vc = t_ap.v_proj.weight.norm(dim=1) * t_ap.c_proj.weight.norm(dim=0)
    qk_rows = torch.cat([h * t_dim + _top(qk[h * t_dim:(h + 1) * t_dim], s_dim) for h in range(heads)])
    v_rows = torch.cat([h * t_dim + _top(vc[h * t_dim:(h + 1) * t_dim], s_dim) for h in range(heads)])
    out["attnpool.positional_embedding"] = t_sd["attnpool.positional_embedding"][:, prev].clone()
    # attention divides q.k by sqrt(head dim): rescale q so the kept dims add what they added in the teacher
    q_scale = math.sqrt(s_dim / t_dim)
    for name, rows, mult in (("q_proj", qk_rows, q_scale), ("k_proj", qk_rows, 1.0), ("v_proj", v_rows, 1.0)):
        out[f"attnpool.{name}.weight"] = t_sd[f"attnpool.{name}.weight"][rows][:, prev] * mult
        out[f"attnpool.{name}.bias"] = t_sd[f"attnpool.{name}.bias"][rows] * mult
    out["attnpool.c_proj.weight"] = t_sd["attnpool.c_proj.weight"][:, v_rows].clone()
    out["attnpool.c_proj.bias"] = t_sd["attnpool.c_proj.bias"].clone()
    return out


# ---------------------------------------------------------------------------------------------
@dataclass
class DistillConfig:
    """Config of ``distill_reward`` (defaults: the embedded shapes recipe on 2 CPU cores)."""

    model_name: str = "rlrefine-student-tiny"  # architecture name registered with open_clip
    embed_dim: int = 32
    image_size: int = 64
    patch_size: int = 16  # 4 x 4 = 16 patches: ~4x fewer image tokens than the teacher
    vision_width: int = 32
    vision_layers: int | tuple[int, ...] = 2  # an int: ViT depth; a tuple: open_clip ModifiedResNet stage depths
    vision_head_width: int = 16  # -> 2 heads
    text_width: int = 32
    text_heads: int = 2
    text_layers: int = 2
    context_length: int = 24
    # "open_clip": the bundled BPE (vocab 49408); "word": a word-level vocabulary trained on the distillation
    # captions (saved beside the student; unknown words -> <unk>), far cheaper per caption than BPE
    tokenizer: Literal["open_clip", "word"] = "open_clip"
    # "teacher": start the image tower from the teacher's strongest channels (narrow_resnet_state;
    # a ModifiedResNet student of the teacher's depths); "random": open_clip's initialisation
    vision_init: Literal["random", "teacher"] = "random"
    steps: int = 800
    images_per_step: int = 32  # images per step; each brings up to max_pairs_per_image pairs
    max_pairs_per_image: int = 12
    max_images: int | None = 4000  # images of the split used (teacher scoring cost); None: all
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    hard_neighbours: int = 3  # nearest images (teacher space) whose captions give hard pairs
    hard_captions_per_neighbour: int = 1
    mse_weight: float = 1.0
    listwise_weight: float = 1.0
    listwise_temperature: float = 0.1  # T of the per-image softmax (score units)
    margin_weight: float = 0.5
    extra_embedding_images: int = 0  # split images beyond max_images used only for the image-embedding loss
    margin: float = 0.1  # score units
    embedding_weight: float = 0.0  # feature distillation: 1 - cos to the teacher's image and text embeddings
                                   # (needs embed_dim == the teacher's and a teacher with embed_texts)
    holdout_fraction: float = 0.2  # images whose pairs are held out for the report
    timing_repeats: int = 3  # held-out speed: best of this many interleaved student / teacher scorings
    text_prefix: str = ""  # student reads bare captions (the teacher applies its own prefix)
    clamp: bool = True  # student's inference score max(w*cos + b, 0), like CLIP-S
    teacher_batch_size: int | None = None  # override the teacher's internal batch size
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.tokenizer not in ("open_clip", "word"):
            raise ValueError(f"distill tokenizer must be 'open_clip' or 'word', got {self.tokenizer!r}")
        if self.vision_init not in ("random", "teacher"):
            raise ValueError(f"distill vision_init must be 'random' or 'teacher', got {self.vision_init!r}")
        if self.timing_repeats < 1:
            raise ValueError(f"distill timing_repeats must be >= 1, got {self.timing_repeats}")
        if self.extra_embedding_images > 0 and self.embedding_weight <= 0:
            raise ValueError("distill extra_embedding_images only feeds the image-embedding loss: set embedding_weight > 0 "
                             "or extra_embedding_images=0")

    def model_cfg(self, vocab: "CaptionTokenizer | None" = None) -> dict:
        """open_clip architecture config; ``vocab``: the word-level tokenizer of a ``word`` student
        (its vocabulary size, and the text tower pools at its eos token)."""
        text_cfg = {"context_length": self.context_length, "vocab_size": 49408,
                    "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers}
        if vocab is not None:
            text_cfg.update(vocab_size=vocab.vocab_size, pad_id=vocab.pad_id, eos_id=vocab.eos_id, pool_type="eos")
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                           "width": self.vision_width, "head_width": self.vision_head_width,
                           "patch_size": self.patch_size},
            "text_cfg": text_cfg,
        }


class WordTokens:
    """open_clip-style tokenizer over a word-level :class:`CaptionTokenizer`: captions ->
    LongTensor ``[N, context_length]`` = ``bos + words + eos``, padded with ``pad_id`` (a long
    caption is cut with eos kept last; an empty one is just ``bos eos``)."""

    def __init__(self, vocab: "CaptionTokenizer", context_length: int):
        self.vocab, self.context_length = vocab, int(context_length)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        v, n = self.vocab, self.context_length
        out = np.full((len(texts), n), v.pad_id, dtype=np.int64)
        for row, words in enumerate(v.tokenize_batch(texts)):
            words = words[:n - 2]
            out[row, 0], out[row, 1:len(words) + 1], out[row, len(words) + 1] = v.bos_id, words, v.eos_id
        return torch.from_numpy(out)


class DistilledScore(LearnedScore):
    """The distilled student as a reward: ``max(w * cos(E_img, E_txt(c)) + b, 0)``.

    Load with ``DistilledScore.from_dir(out_dir)`` (``student.json`` + ``student.pt``, and for a
    ``word`` student its ``tokenizer.json``).
    """

    manifest_name = "student.json"

    @classmethod
    def from_dir(cls, out_dir: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> "OpenCLIPReward":
        reward = super().from_dir(out_dir, device=device, **overrides)
        meta = json.loads((Path(out_dir) / cls.manifest_name).read_text())
        if meta.get("tokenizer", "open_clip") == "word":
            from rlrefine.data.tokenizer import CaptionTokenizer

            reward.tokenizer = WordTokens(CaptionTokenizer.from_dir(out_dir),
                                          meta["model_cfg"]["text_cfg"]["context_length"])
        return reward


@dataclass
class _Pairs:
    image: torch.Tensor  # [P] image row
    caption: list[str]  # [P]
    kind: torch.Tensor  # [P] REF / CANDIDATE / HARD
    teacher: torch.Tensor | None = None  # [P] teacher scores


def _build_pairs(captions: list[list[str]], rows: Sequence[int], neighbours: torch.Tensor,
                 candidates: Sequence[tuple[int, str]] | None, cfg: DistillConfig,
                 rng: random.Random) -> _Pairs:
    rows_set = set(rows)
    by_image: dict[int, dict[str, int]] = {i: {} for i in rows}
    for i in rows:
        for c in captions[i]:
            by_image[i].setdefault(c, REF)
    for i, c in candidates or ():
        if int(i) in rows_set:
            by_image[int(i)].setdefault(c, CANDIDATE)
    for i in rows:
        for j in neighbours[i].tolist():
            for c in rng.sample(captions[j], min(cfg.hard_captions_per_neighbour, len(captions[j]))):
                by_image[i].setdefault(c, HARD)  # an identical caption stays a reference
    image, caption, kind = [], [], []
    for i in rows:
        for c, k in by_image[i].items():
            image.append(i)
            caption.append(c)
            kind.append(k)
    return _Pairs(torch.tensor(image), caption, torch.tensor(kind))


def _score_teacher(teacher: Callable, images: Any, captions: list[list[str]], pairs: _Pairs,
                   uses_refs: bool) -> tuple[torch.Tensor, float]:
    """Teacher scores for ``pairs`` through the reward protocol; also returns seconds taken."""
    rows = sorted(set(pairs.image.tolist()))
    local = {r: k for k, r in enumerate(rows)}
    sub = _image_batch(images, rows)
    index = torch.tensor([local[i] for i in pairs.image.tolist()])
    refs = [captions[r] for r in rows] if uses_refs else None
    t0 = time.perf_counter()
    scores = teacher(sub, pairs.caption, refs, image_index=index)
    return scores.detach().float().cpu(), time.perf_counter() - t0


def _groups(group: torch.Tensor) -> dict[int, list[int]]:
    """Pair positions by group id (an image, or an image at one layer)."""
    out: dict[int, list[int]] = {}
    for p, i in enumerate(group.tolist()):
        out.setdefault(i, []).append(p)
    return out


def _ranking_report(student: torch.Tensor, teacher: torch.Tensor, group: torch.Tensor,
                    kendall: bool = True) -> dict[str, float]:
    """Student vs teacher scores of the same pairs; the per-group figures (argmax agreement, regret,
    top-2 gap, per-group Spearman) take the pairs of one ``group`` id as one list."""
    groups = _groups(group)
    per_image_rho, agree, regret, gap = [], [], [], []
    for idx in groups.values():
        t, s = teacher[idx], student[idx]
        if len(idx) > 1:
            rho = spearman(s, t)
            if not math.isnan(rho):
                per_image_rho.append(rho)
            top2 = t.topk(2).values
            gap.append(float(top2[0] - top2[1]))
        # argmax agreement: the student's top pair is (one of) the teacher's top pairs
        agree.append(float(t[int(s.argmax())] >= t.max() - 1e-6))
        regret.append(float(t.max() - t[int(s.argmax())]))  # teacher score lost by taking the student's pick
    out = {"spearman": spearman(student, teacher),
           "spearman_per_image": float(np.mean(per_image_rho)) if per_image_rho else float("nan"),
           "argmax_agreement": float(np.mean(agree)), "argmax_regret": float(np.mean(regret)),
           "teacher_top2_gap_median": float(np.median(gap)) if gap else float("nan"), "pairs": float(len(teacher))}
    if kendall:  # left out where only the ranking at the top is asked for
        out["kendall"] = kendall_tau(student, teacher)
    return out


def save_pairs(pairs: _Pairs, path: Path) -> None:
    """Write pairs (image row, caption, kind, teacher score) as JSON, atomically."""
    obj = {"image": pairs.image.tolist(), "caption": list(pairs.caption), "kind": pairs.kind.tolist(),
           "teacher": None if pairs.teacher is None else [round(float(t), 6) for t in pairs.teacher]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def load_pairs(path: str | Path) -> _Pairs:
    """The held-out pairs a distillation run wrote (``<out_dir>/heldout_pairs.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no held-out pairs at {path}: run `rlrefine distill-reward` (it writes them)")
    obj = json.loads(path.read_text())
    teacher = None if obj.get("teacher") is None else torch.tensor(obj["teacher"])
    return _Pairs(torch.tensor(obj["image"]), obj["caption"], torch.tensor(obj["kind"]), teacher)


def perturb_to_cosine(emb: torch.Tensor, cosine: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit rows of ``emb`` [N, D] moved in a random direction to an expected cosine ``cosine`` with the original.

    Adds isotropic noise ``n ~ N(0, sigma^2 / D * I)`` to the normalised rows and normalises again; since
    ``|n|^2 ~ sigma^2`` and ``n`` is almost orthogonal to the row, ``cos ~= 1 / sqrt(1 + sigma^2)``, so
    ``sigma = sqrt(1 / cosine^2 - 1)``. A student whose embeddings err like this but no worse sits at
    ``cosine`` from the teacher: :func:`noise_sensitivity` uses it to ask what fidelity a ranking needs.
    """
    if not 0.0 < cosine <= 1.0:
        raise ValueError(f"cosine must be in (0, 1], got {cosine}")
    e = F.normalize(emb.float(), dim=-1)
    sigma = math.sqrt(1.0 / cosine ** 2 - 1.0)
    noise = torch.randn(e.shape, generator=generator, dtype=e.dtype) * (sigma / math.sqrt(e.shape[1]))
    return F.normalize(e + noise.to(e.device), dim=-1)


def _embeddings(reward: Any, images: Any, pairs: _Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [rows, D], text embeddings [P, D], pair -> row index [P]) of ``reward`` on ``pairs``."""
    rows = sorted(set(pairs.image.tolist()))
    local = {r: k for k, r in enumerate(rows)}
    img = reward.embed_images(_image_batch(images, rows)).float().cpu()
    txt = reward.embed_texts(pairs.caption).float().cpu()
    return img, txt, torch.tensor([local[i] for i in pairs.image.tolist()])


def tower_fidelity(student: Any, teacher: Any, images: Any, pairs: _Pairs) -> dict[str, float]:
    """Which of the student's towers limits its ranking of ``pairs`` (both rewards need ``embed_images`` /
    ``embed_texts`` with one embedding size, and ``score_embeddings``).

    Returns ``image_cos`` / ``text_cos`` (mean cosine of student and teacher embeddings of the same image /
    caption) and, scored by the teacher's embedding formula (``w * cos``; a Ref-teacher's reference term is
    left out on both sides), ``image_side_*`` (the student's image embeddings with the teacher's text
    embeddings: every error left is the image tower's) and ``text_side_*`` (the teacher's image embeddings
    with the student's text embeddings), each ``spearman`` and ``argmax_agreement`` against the teacher.
    """
    s_img, s_txt, index = _embeddings(student, images, pairs)
    t_img, t_txt, _ = _embeddings(teacher, images, pairs)
    if s_img.shape[1] != t_img.shape[1]:
        raise ValueError(f"tower_fidelity needs one embedding size: student {s_img.shape[1]}, teacher {t_img.shape[1]}")
    reference = teacher.score_embeddings(t_img[index], t_txt).cpu()
    out = {"image_cos": float((s_img * t_img).sum(-1).mean()), "text_cos": float((s_txt * t_txt).sum(-1).mean())}
    for side, (img, txt) in (("image_side", (s_img, t_txt)), ("text_side", (t_img, s_txt))):
        r = _ranking_report(teacher.score_embeddings(img[index], txt).cpu(), reference, pairs.image, kendall=False)
        out[f"{side}_spearman"], out[f"{side}_argmax_agreement"] = r["spearman"], r["argmax_agreement"]
    return out


def noise_sensitivity(teacher: Any, images: Any, pairs: _Pairs, cosines: Sequence[float],
                      seed: int = 0) -> list[dict[str, float]]:
    """How the teacher's own ranking of ``pairs`` degrades when one tower's embeddings are moved at random
    to a given cosine (:func:`perturb_to_cosine`): the fidelity a student needs for a target argmax
    agreement, if its errors were no worse than random. One row per cosine: ``cosine``,
    ``image_argmax_agreement`` / ``image_spearman`` (image embeddings perturbed, text exact) and
    ``text_argmax_agreement`` / ``text_spearman``.
    """
    img, txt, index = _embeddings(teacher, images, pairs)
    reference = teacher.score_embeddings(img[index], txt).cpu()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in cosines:
        row = {"cosine": float(c)}
        for side in ("image", "text"):
            i = perturb_to_cosine(img, c, g) if side == "image" else img
            t = perturb_to_cosine(txt, c, g) if side == "text" else txt
            r = _ranking_report(teacher.score_embeddings(i[index], t).cpu(), reference, pairs.image, kendall=False)
            row[f"{side}_argmax_agreement"], row[f"{side}_spearman"] = r["argmax_agreement"], r["spearman"]
        rows.append(row)
    return rows


def compare_to_teacher(student: Callable, teacher: Callable, images: Any, captions: list[list[str]], pairs: _Pairs,
                       repeats: int = 1) -> dict[str, float]:
    """How well ``student`` imitates ``teacher`` on ``pairs``, and how much faster it is.

    Both score the same pairs through the reward protocol (each image encoded once, duplicate
    captions once); times are the best of ``repeats`` calls. Returns ``spearman``, ``kendall``,
    ``spearman_per_image``, ``argmax_agreement`` (the student's best pair of an image is one of the
    teacher's best), ``argmax_regret`` (mean teacher score lost per image by taking the student's
    best pair instead of the teacher's), ``teacher_top2_gap_median`` (median gap between the teacher's
    two best pairs of an image: how close the race for the argmax is), ``pairs_per_s_student``,
    ``pairs_per_s_teacher`` and ``speedup``; where both expose their embeddings, also
    ``fidelity/...`` (:func:`tower_fidelity`: which tower limits the ranking).
    """
    uses_refs = bool(getattr(teacher, "uses_references", False))
    times = {"student": [], "teacher": []}
    for _ in range(max(1, repeats)):
        student_s, t = _score_teacher(student, images, captions, pairs, False)
        times["student"].append(t)
        teacher_s, t = _score_teacher(teacher, images, captions, pairs, uses_refs)
        times["teacher"].append(t)
    out = _ranking_report(student_s, teacher_s, pairs.image)
    if (pairs.caption and all(hasattr(r, a) for r in (student, teacher)
                              for a in ("embed_images", "embed_texts", "score_embeddings"))
            and student.embed_texts(pairs.caption[:1]).shape[1] == teacher.embed_texts(pairs.caption[:1]).shape[1]):
        out.update({f"fidelity/{k}": v for k, v in tower_fidelity(student, teacher, images, pairs).items()})
    n = len(pairs.caption)
    out["pairs_per_s_student"] = n / max(min(times["student"]), 1e-9)
    out["pairs_per_s_teacher"] = n / max(min(times["teacher"]), 1e-9)
    out["speedup"] = out["pairs_per_s_student"] / out["pairs_per_s_teacher"]
    return out


def decision_agreement(student: Callable, teacher: Callable, images: Any, captions: list[list[str]],
                       candidates: Sequence[tuple[int, int, str]]) -> dict[str, Any]:
    """Student vs teacher on the decisions fine-tuning makes with a reward: which of one image's
    candidates at one refinement layer is best (DiCO's winner, whose softmax weight is largest).

    ``candidates``: ``(image_idx, layer, caption)``, e.g. the captioner's beams at every layer
    (``rlrefine.pipeline.captioner_candidates``); ``image_idx`` indexes ``images`` / ``captions``.
    Both rewards score every candidate once (a ``Ref*`` teacher with the image's references).
    Returns the per-group figures of the held-out report with one (image, layer) as one group
    (``argmax_agreement``, ``argmax_regret``, ``teacher_top2_gap_median``, ``spearman_per_image``:
    here per decision), ``decisions``, and ``by_layer``: the same for each layer's decisions alone.
    """
    if not candidates:
        raise ValueError("decision_agreement needs at least one (image, layer, caption) candidate")
    image, layer, caption = zip(*candidates)
    pairs = _Pairs(torch.tensor(image), list(caption), torch.full((len(caption),), CANDIDATE))
    student_s, _ = _score_teacher(student, images, captions, pairs, False)
    teacher_s, _ = _score_teacher(teacher, images, captions, pairs,
                                  bool(getattr(teacher, "uses_references", False)))
    layer_t = torch.tensor(layer)
    group = pairs.image * (int(layer_t.max()) + 1) + layer_t

    def report(mask: torch.Tensor) -> dict[str, float]:
        r = _ranking_report(student_s[mask], teacher_s[mask], group[mask], kendall=False)
        return {"decisions": len(set(group[mask].tolist())), **r}

    out: dict[str, Any] = report(torch.ones_like(layer_t, dtype=torch.bool))
    out["by_layer"] = [{"layer": k, **report(layer_t == k)} for k in sorted(set(layer))]
    return out


def distill_reward(cfg: DistillConfig, teacher: Callable, split: Any, out_dir: str | Path,
                   candidates: Sequence[tuple[int, str]] | None = None,
                   logger: Any = None) -> dict[str, float]:
    """Distil ``teacher`` (any protocol reward with ``embed_images``) into a compact student.

    Args:
        cfg: :class:`DistillConfig`.
        teacher: the reward to imitate (``CLIPScore``, ``PACScore``, ``LearnedScore``, ...). A
            ``Ref*`` teacher gets each image's references.
        split: CaptionSplit-like (``images`` uint8 [N,H,W,3] or paths, ``captions``).
        out_dir: where ``student.pt`` / ``student.json`` go.
        candidates: optional ``(image_idx, caption)`` pairs, e.g. the captioner's candidates from
            every layer, generated by the caller; ``image_idx`` indexes ``split``.
        logger: accelerate-style tracker (``.log(dict, step=)``) or callable; names ``distill/...``.

    Returns:
        metrics on held-out pairs: ``spearman``, ``kendall``, ``spearman_per_image``,
        ``argmax_agreement`` (and ``init/...`` for the untrained student), ``pairs_per_s_student``,
        ``pairs_per_s_teacher``, ``speedup``, ``train_time_s``.
    """
    out_dir = Path(out_dir)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    images, captions = _split_fields(split)
    n = len(captions) if cfg.max_images is None else min(cfg.max_images, len(captions))
    if cfg.teacher_batch_size is not None and hasattr(teacher, "batch_size"):
        teacher.batch_size = cfg.teacher_batch_size
    uses_refs = bool(getattr(teacher, "uses_references", False))

    # HELIP-style mining: nearest images in the teacher's image-embedding space
    with torch.no_grad():
        t_emb = torch.cat([teacher.embed_images(_image_batch(images, range(i, min(i + 256, n))))
                           .float().cpu() for i in range(0, n, 256)])
    sims = t_emb @ t_emb.T
    sims.fill_diagonal_(float("-inf"))
    neighbours = sims.topk(min(cfg.hard_neighbours, n - 1), dim=1).indices  # [n, k]

    order = list(range(n))
    rng.shuffle(order)
    n_hold = max(1, int(round(cfg.holdout_fraction * n)))
    held, train_rows = sorted(order[:n_hold]), sorted(order[n_hold:])
    train_pairs = _build_pairs(captions, train_rows, neighbours, candidates, cfg, rng)
    held_pairs = _build_pairs(captions, held, neighbours, candidates, cfg, rng)
    t_txt = None
    if cfg.embedding_weight > 0:
        if not hasattr(teacher, "embed_texts") or t_emb.shape[1] != cfg.embed_dim:
            raise ValueError(f"distill embedding_weight > 0 needs a teacher with embed_texts and student embed_dim "
                             f"equal to the teacher's ({t_emb.shape[1]}); got embed_dim={cfg.embed_dim}. Set "
                             f"embed_dim={t_emb.shape[1]} or embedding_weight=0.")
        with torch.no_grad():
            t_txt = torch.cat([teacher.embed_texts(train_pairs.caption[i:i + 4096]).float().cpu()
                               for i in range(0, len(train_pairs.caption), 4096)])
    if t_txt is not None and not uses_refs and type(teacher).__call__ is OpenCLIPReward.__call__:
        # that __call__ is score_embeddings on these same embeddings; calling it would encode every
        # training image and caption again (about 15 s of the tiny recipe's 5-minute stage)
        train_pairs.teacher = teacher.score_embeddings(t_emb[train_pairs.image], t_txt).float().cpu()
    else:
        train_pairs.teacher, _ = _score_teacher(teacher, images, captions, train_pairs, uses_refs)
    held_pairs.teacher, _ = _score_teacher(teacher, images, captions, held_pairs, uses_refs)
    if t_txt is not None:
        t_txt, t_img = t_txt.to(device), t_emb.to(device)
        # images beyond the pair images (rows n, n+1, ...): only their teacher image embeddings are used
        extra = list(range(n, min(len(captions), n + cfg.extra_embedding_images)))
        if extra:
            with torch.no_grad():
                t_extra = torch.cat([teacher.embed_images(_image_batch(images, extra[i:i + 256])).float().cpu()
                                     for i in range(0, len(extra), 256)]).to(device)

    vocab = None
    if cfg.tokenizer == "word":  # the student's own word vocabulary: every caption it is trained or tested on
        from rlrefine.data.tokenizer import CaptionTokenizer

        vocab = CaptionTokenizer.train([c for caps in captions for c in caps]
                                       + [c for _, c in candidates or ()])
    model_cfg = cfg.model_cfg(vocab)
    name, model, tokenizer, preprocess = build_dual_encoder(cfg.model_name, model_cfg, device)
    if vocab is not None:
        tokenizer = WordTokens(vocab, cfg.context_length)
    if cfg.vision_init == "teacher":
        t_model = getattr(teacher, "model", None)
        if t_model is None or not hasattr(t_model, "visual"):
            raise ValueError(f"distill vision_init=teacher needs an open_clip teacher (a .model.visual image tower); "
                             f"{type(teacher).__name__} has none. Use vision_init=random.")
        model.visual.load_state_dict(narrow_resnet_state(t_model.visual, model.visual))
    # channels-last convolutions train the small ResNet faster on CPU (64 images fwd + bwd: 58 -> 41 ms);
    # the saved weights are contiguous again (save_dual_encoder), and scoring is unchanged
    model.visual.to(memory_format=torch.channels_last)
    nhwc = partial(torch.Tensor.contiguous, memory_format=torch.channels_last)
    init_w = float(getattr(teacher, "w", 2.5))
    w = torch.nn.Parameter(torch.tensor(init_w, device=device))
    b = torch.nn.Parameter(torch.tensor(0.0, device=device))

    def student_scores(pairs: _Pairs) -> torch.Tensor:
        """Inference scores of the current student (clamped like the saved reward)."""
        model.eval()
        with torch.no_grad():
            rows = sorted(set(pairs.image.tolist()))
            local = {r: k for k, r in enumerate(rows)}
            img = torch.cat([model.encode_image(preprocess(_image_batch(images, rows[i:i + 256]),
                                                           device=device), normalize=True)
                             for i in range(0, len(rows), 256)])
            texts = [cfg.text_prefix + c for c in pairs.caption]
            txt = torch.cat([model.encode_text(tokenizer(texts[i:i + 512]).to(device), normalize=True)
                             for i in range(0, len(texts), 512)])
            own = torch.tensor([local[i] for i in pairs.image.tolist()], device=device)
            s = w * (img[own] * txt).sum(-1) + b
        model.train()
        return (s.clamp(min=0) if cfg.clamp else s).float().cpu()

    # the untrained student's baseline (no Kendall: it says nothing more here)
    init = _ranking_report(student_scores(held_pairs), held_pairs.teacher, held_pairs.image, kendall=False)
    metrics: dict[str, float] = {f"init/{k}": v for k, v in init.items()}

    groups = list(_groups(train_pairs.image).items())
    params = _param_groups(model, cfg.weight_decay)
    params.append({"params": [w, b], "weight_decay": 0.0})
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_with_warmup(cfg.warmup_steps, cfg.steps))
    teacher_all, kind_all = train_pairs.teacher.to(device), train_pairs.kind.to(device)
    texts = [cfg.text_prefix + c for c in train_pairs.caption]  # tokenized once, not at every step
    train_tokens = torch.cat([tokenizer(texts[i:i + 4096]) for i in range(0, len(texts), 4096)]).to(device)  # [P, ctx]
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="distill-reward", dynamic_ncols=True)
    for step in bar:
        chosen = rng.sample(groups, min(cfg.images_per_step, len(groups)))
        rows = [r for r, _ in chosen]
        lists = [rng.sample(idx, min(len(idx), cfg.max_pairs_per_image)) for _, idx in chosen]
        G, P = len(lists), max(len(x) for x in lists)
        flat = [p for x in lists for p in x]
        slot = torch.tensor([g * P + j for g, x in enumerate(lists) for j in range(len(x))],
                            device=device)
        owner = torch.tensor([g for g, x in enumerate(lists) for _ in x], device=device)
        pix = nhwc(preprocess(_image_batch(images, rows), device=device))
        flat_idx = torch.tensor(flat, device=device)  # [T] the step's pairs
        tokens = train_tokens[flat_idx]
        img_f = model.encode_image(pix, normalize=True)  # [G, D]
        txt_f = model.encode_text(tokens, normalize=True)  # [T, D]
        s = w * (img_f[owner] * txt_f).sum(-1) + b  # [T] student scores (unclamped)
        t = teacher_all[flat_idx]
        kind = kind_all[flat_idx]
        loss_mse = F.mse_loss(s, t)
        # per-image lists padded to [G, P]
        S = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), s).view(G, P)
        Tt = torch.full((G * P,), float("-inf"), device=device).index_put((slot,), t).view(G, P)
        tau = cfg.listwise_temperature
        p_t = torch.softmax(Tt / tau, dim=1)
        log_p_s = torch.log_softmax(S / tau, dim=1)
        valid = torch.isfinite(Tt)
        kl = (p_t * (torch.log(p_t.clamp(min=1e-12)) - log_p_s)).masked_fill(~valid, 0.0).sum(1)
        loss_list = kl.mean()
        # margin: each image's best reference (by the teacher) above its hard pairs the teacher
        # scores lower
        K = torch.full((G * P,), -1, device=device, dtype=torch.long).index_put((slot,), kind).view(G, P)
        ref_t = Tt.masked_fill(K != REF, float("-inf"))
        best = ref_t.argmax(dim=1)  # [G]
        has_ref = torch.isfinite(ref_t.max(dim=1).values)
        s_pos, t_pos = S.gather(1, best[:, None]), Tt.gather(1, best[:, None])  # [G, 1]
        hard = (K == HARD) & (Tt < t_pos) & has_ref[:, None]
        hinge = F.relu(cfg.margin - (s_pos - S.masked_fill(~hard, 0.0)))
        loss_margin = (hinge * hard).sum() / hard.sum().clamp(min=1)
        loss = (cfg.mse_weight * loss_mse + cfg.listwise_weight * loss_list
                + cfg.margin_weight * loss_margin)
        loss_emb = torch.zeros((), device=device)
        if t_txt is not None:
            loss_emb = ((1 - (img_f * t_img[torch.tensor(rows, device=device)]).sum(-1)).mean()
                        + (1 - (txt_f * t_txt[flat_idx]).sum(-1)).mean())
            if extra:
                pick = rng.sample(range(len(extra)), min(cfg.images_per_step, len(extra)))
                e_f = model.encode_image(nhwc(preprocess(_image_batch(images, [extra[i] for i in pick]), device=device)),
                                         normalize=True)
                loss_emb = loss_emb + (1 - (e_f * t_extra[torch.tensor(pick, device=device)]).sum(-1)).mean()
            loss = loss + cfg.embedding_weight * loss_emb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            _log(logger, {"distill/loss": loss.item(), "distill/loss_mse": loss_mse.item(),
                          "distill/loss_listwise": loss_list.item(),
                          "distill/loss_margin": loss_margin.item(), "distill/loss_embedding": loss_emb.item(),
                          "distill/w": w.item(),
                          "distill/b": b.item()}, step)
    bar.close()
    metrics["train_time_s"] = time.perf_counter() - start
    model.eval()
    manifest = {"w": w.item(), "bias": b.item(), "text_prefix": cfg.text_prefix, "clamp": cfg.clamp,
                "tokenizer": cfg.tokenizer, "teacher": repr(teacher), "config": dataclasses.asdict(cfg)}
    if vocab is not None:
        vocab.save(out_dir)
    save_dual_encoder(model, out_dir, "student", name, model_cfg, manifest)

    # held-out report, with the saved student loaded through the reward protocol
    save_pairs(held_pairs, out_dir / HELDOUT_FILE)
    student = DistilledScore.from_dir(out_dir, device=device)
    metrics.update(compare_to_teacher(student, teacher, images, captions, held_pairs, repeats=cfg.timing_repeats))
    metrics["train_pairs"] = float(len(train_pairs.caption))
    _log(logger, {f"distill/{k}": v for k, v in metrics.items()}, cfg.steps)
    save_dual_encoder(model, out_dir, "student", name, model_cfg, {**manifest, "metrics": metrics})
    log.debug("distill-reward: saved to %s (%s)", out_dir, metrics)
    return metrics
