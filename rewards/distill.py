"""The distilled reward: a compact student dual encoder that imitates a teacher reward.

What the ``distill-reward`` stage trains (its training loop is `rlrefine.trainers.distill`; how well a
student imitates its teacher is `rewards.fidelity`). Here:

* `DistillConfig`: the student's architecture and its training recipe (the recipe's `distill.student`).
  The student is an open_clip model (default ``rlrefine-student-tiny``: width-32 towers, 2 layers, 16 px
  patches; with ``vision_init="teacher"`` a narrower ModifiedResNet of the teacher's depths starts from
  the teacher's strongest channels, `narrow_resnet_state`), saved as ``student.pt`` + ``student.json``;
* `WordTokens` (`rlrefine.data.tokenizer`): with ``tokenizer="word"`` the student's text tower reads a word vocabulary trained on
  the distillation captions (saved beside it as ``tokenizer.json``; the tower pools at the eos token),
  which skips open_clip's Python BPE, a third of a small teacher's time;
* `DistilledScore`: the student as a reward, ``max(w · cos(E_img, E_txt(c)) + b, 0)``, loaded with
  ``DistilledScore.from_dir(out_dir)``; registered as reward kind ``distilled``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlrefine.data.tokenizer import CaptionTokenizer, WordTokens

from .clip_score import LearnedScore, OpenCLIPReward
from .matching import MatchingHeadConfig
from .registry import register_reward
from .text_student import MANIFEST as TEXT_STUDENT_MANIFEST
from .text_student import TextStudentScore

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistilledScore", "StudentHeadConfig", "WordTokens", "narrow_resnet_state"]


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
class StudentHeadConfig(MatchingHeadConfig):
    """The student's matching head (rewards.matching): one cross-first block, a quarter of the teacher's width."""

    steps: int = 0  # training steps of the student's head on its frozen towers, after their distillation (0: no head; shapes: 1200)
    width: int = 32  # width d of the caption side
    heads: int = 4  # attention heads per block (8 left the student 3.3x faster than the teacher, 4: 4.2x)
    layers: int = 1  # one cross-first block: two blocks of the teacher's order left the student 2.7x faster than the teacher, not 3x
    cross_first: bool = True  # find the objects, then compare them along the caption, in the one block
    score_weight: float = 0.15  # not read: a student's head takes its teacher's lambda, so that its verdicts weigh as the teacher's


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
    log_every: int = 20  # steps between TensorBoard scalars
    checkpoint_every: int = 500  # steps between resumable checkpoints (--resume)
    seed: int = 0  # model initialisation, the held-out images and the draws of pairs
    matching_head: StudentHeadConfig = field(default_factory=StudentHeadConfig)  # the student's own cross-attention head (rewards.matching), trained after its towers, on them frozen, to give the teacher head's verdicts (steps 0: none; shapes: 1200; needs a teacher with a head; its score_weight is the teacher's)
    head_example_images: int = 8000  # training images whose true and false captions (the data's matching examples) the teacher scores once for the student's head (2000: relation swaps 0.83, the head learnt the examples)

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

    def model_cfg(self, vocab: CaptionTokenizer | None = None) -> dict:
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


class DistilledScore(LearnedScore):
    """The distilled student as a reward: ``max(w * cos(E_img, E_txt(c)) + b, 0)``.

    Load with ``DistilledScore.from_dir(out_dir)``: a dual-encoder student (``student.json`` + ``student.pt``,
    and for a ``word`` student its ``tokenizer.json``), or, where the folder holds ``text_student.json``, a
    text student (`rewards.text_student.TextStudentScore`), which is returned instead.
    """

    manifest_name = "student.json"

    @classmethod
    def from_dir(cls, out_dir: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> OpenCLIPReward:
        out_dir = Path(out_dir)
        if (out_dir / TEXT_STUDENT_MANIFEST).is_file():
            return TextStudentScore.from_dir(out_dir, device=device, **overrides)
        if not (out_dir / cls.manifest_name).is_file():
            raise FileNotFoundError(f"no distilled student in {out_dir}: neither {cls.manifest_name} (a dual-encoder "
                                    f"student) nor {TEXT_STUDENT_MANIFEST} (a text student); run `rlrefine distill-reward`")
        reward = super().from_dir(out_dir, device=device, **overrides)
        meta = json.loads((out_dir / cls.manifest_name).read_text())
        if meta.get("tokenizer", "open_clip") == "word":
            reward.tokenizer = WordTokens(CaptionTokenizer.from_dir(out_dir),
                                          meta["model_cfg"]["text_cfg"]["context_length"])
        return reward


def _student_dir(section: Any, ctx: Any) -> Path:
    """Where a ``distilled`` section's student is: ``path``, else the run's ``distill`` folder, or
    ``distill_<student>`` for a named student (`distill.extra_students`)."""
    if section.path:
        return Path(section.path)
    return ctx.run_dir / ("distill" if section.student is None else f"distill_{section.student}")


def _check_distilled(section: Any) -> None:
    if section.path and section.student:
        raise ValueError(f"reward kind 'distilled': give path ({section.path}) or student ({section.student}), not both")


register_reward("distilled", lambda section, ctx: DistilledScore.from_dir(_student_dir(section, ctx), device=ctx.device),
                "this run's distilled student (distill-reward: a dual encoder or a text student), `student:` one of the "
                "run's named students (distill.extra_students), or `path:` to another", uses=("path", "student"),
                check=_check_distilled)
