"""How faithfully a student reward imitates its teacher, and what fidelity a ranking needs.

Where it sits: ``rewards``, beside the students it measures (`rewards.distill`); the ``distill-reward``
stage (`rlrefine.trainers.distill`) reports these on held-out pairs, and ``benchmarks/distill.py``
measures them again from the saved ``heldout_pairs.json``. DiCO consumes each image's *ranking* of its
candidates (the argmax and the softmax weights), so beside rank correlations the report asks how often
the student picks the teacher's best candidate and what a wrong pick costs.

* `spearman`, `kendall_tau` (tau-b, O(n log n)), `rankdata`: rank correlations with ties;
* `Pairs` (image row, caption, kind, teacher score) with `save_pairs` / `load_pairs`; `score_pairs`
  scores them through the reward protocol;
* `ranking_report`: Spearman (overall and per group), Kendall, argmax agreement, regret, top-2 gap;
* `compare_to_teacher`: the held-out report plus pairs/s of student and teacher;
* `decision_agreement`: the same on the choices fine-tuning makes (one image's candidates at one layer);
* `tower_fidelity` / `noise_sensitivity` / `perturb_to_cosine`: which tower limits a student, and the
  fidelity a target needs if the student's errors were random.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rlrefine.data.split import image_rows

__all__ = ["CANDIDATE", "HARD", "HELDOUT_FILE", "REF", "Pairs", "compare_to_teacher", "decision_agreement", "kendall_tau",
           "load_pairs", "noise_sensitivity", "perturb_to_cosine", "rankdata", "ranking_report", "save_pairs", "score_pairs",
           "spearman", "tower_fidelity"]

REF, CANDIDATE, HARD = 0, 1, 2  # pair kinds
HELDOUT_FILE = "heldout_pairs.json"  # written by distill-reward beside the student

# ---------------------------------------------------------------------------------------------
# rank correlation
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
@dataclass
class Pairs:
    image: torch.Tensor  # [P] image row
    caption: list[str]  # [P]
    kind: torch.Tensor  # [P] REF / CANDIDATE / HARD
    teacher: torch.Tensor | None = None  # [P] teacher scores


def score_pairs(teacher: Callable, images: Any, captions: list[list[str]], pairs: Pairs,
                   uses_refs: bool) -> tuple[torch.Tensor, float]:
    """Teacher scores for ``pairs`` through the reward protocol; also returns seconds taken."""
    rows = sorted(set(pairs.image.tolist()))
    local = {r: k for k, r in enumerate(rows)}
    sub = image_rows(images, rows)
    index = torch.tensor([local[i] for i in pairs.image.tolist()])
    refs = [captions[r] for r in rows] if uses_refs else None
    t0 = time.perf_counter()
    scores = teacher(sub, pairs.caption, refs, image_index=index)
    return scores.detach().float().cpu(), time.perf_counter() - t0


def groups_of(group: torch.Tensor) -> dict[int, list[int]]:
    """Pair positions by group id (an image, or an image at one layer)."""
    out: dict[int, list[int]] = {}
    for p, i in enumerate(group.tolist()):
        out.setdefault(i, []).append(p)
    return out


def ranking_report(student: torch.Tensor, teacher: torch.Tensor, group: torch.Tensor,
                    kendall: bool = True) -> dict[str, float]:
    """Student vs teacher scores of the same pairs; the per-group figures (argmax agreement, regret,
    top-2 gap, per-group Spearman) take the pairs of one ``group`` id as one list."""
    groups = groups_of(group)
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


def save_pairs(pairs: Pairs, path: Path) -> None:
    """Write pairs (image row, caption, kind, teacher score) as JSON, atomically."""
    obj = {"image": pairs.image.tolist(), "caption": list(pairs.caption), "kind": pairs.kind.tolist(),
           "teacher": None if pairs.teacher is None else [round(float(t), 6) for t in pairs.teacher]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def load_pairs(path: str | Path) -> Pairs:
    """The held-out pairs a distillation run wrote (``<out_dir>/heldout_pairs.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no held-out pairs at {path}: run `rlrefine distill-reward` (it writes them)")
    obj = json.loads(path.read_text())
    teacher = None if obj.get("teacher") is None else torch.tensor(obj["teacher"])
    return Pairs(torch.tensor(obj["image"]), obj["caption"], torch.tensor(obj["kind"]), teacher)


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


def _embeddings(reward: Any, images: Any, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings [rows, D], text embeddings [P, D], pair -> row index [P]) of ``reward`` on ``pairs``."""
    rows = sorted(set(pairs.image.tolist()))
    local = {r: k for k, r in enumerate(rows)}
    img = reward.embed_images(image_rows(images, rows)).float().cpu()
    txt = reward.embed_texts(pairs.caption).float().cpu()
    return img, txt, torch.tensor([local[i] for i in pairs.image.tolist()])


def tower_fidelity(student: Any, teacher: Any, images: Any, pairs: Pairs) -> dict[str, float]:
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
        r = ranking_report(teacher.score_embeddings(img[index], txt).cpu(), reference, pairs.image, kendall=False)
        out[f"{side}_spearman"], out[f"{side}_argmax_agreement"] = r["spearman"], r["argmax_agreement"]
    return out


def noise_sensitivity(teacher: Any, images: Any, pairs: Pairs, cosines: Sequence[float],
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
            r = ranking_report(teacher.score_embeddings(i[index], t).cpu(), reference, pairs.image, kendall=False)
            row[f"{side}_argmax_agreement"], row[f"{side}_spearman"] = r["argmax_agreement"], r["spearman"]
        rows.append(row)
    return rows


def compare_to_teacher(student: Callable, teacher: Callable, images: Any, captions: list[list[str]], pairs: Pairs,
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
        student_s, t = score_pairs(student, images, captions, pairs, False)
        times["student"].append(t)
        teacher_s, t = score_pairs(teacher, images, captions, pairs, uses_refs)
        times["teacher"].append(t)
    out = ranking_report(student_s, teacher_s, pairs.image)
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
    (``rlrefine.trainers.distill_stage.captioner_candidates``); ``image_idx`` indexes ``images`` / ``captions``.
    Both rewards score every candidate once (a ``Ref*`` teacher with the image's references).
    Returns the per-group figures of the held-out report with one (image, layer) as one group
    (``argmax_agreement``, ``argmax_regret``, ``teacher_top2_gap_median``, ``spearman_per_image``:
    here per decision), ``decisions``, and ``by_layer``: the same for each layer's decisions alone.
    """
    if not candidates:
        raise ValueError("decision_agreement needs at least one (image, layer, caption) candidate")
    image, layer, caption = zip(*candidates)
    pairs = Pairs(torch.tensor(image), list(caption), torch.full((len(caption),), CANDIDATE))
    student_s, _ = score_pairs(student, images, captions, pairs, False)
    teacher_s, _ = score_pairs(teacher, images, captions, pairs,
                                  bool(getattr(teacher, "uses_references", False)))
    layer_t = torch.tensor(layer)
    group = pairs.image * (int(layer_t.max()) + 1) + layer_t

    def report(mask: torch.Tensor) -> dict[str, float]:
        r = ranking_report(student_s[mask], teacher_s[mask], group[mask], kendall=False)
        return {"decisions": len(set(group[mask].tolist())), **r}

    out: dict[str, Any] = report(torch.ones_like(layer_t, dtype=torch.bool))
    out["by_layer"] = [{"layer": k, **report(layer_t == k)} for k in sorted(set(layer))]
    return out
