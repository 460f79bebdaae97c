"""Probes of what a reward or a captioner knows about the shapes world, beyond what its references say.

Where it sits: beside `rlrefine.data.shapes`, which it asks for the ground truth (scenes, complete
descriptions, misnamed objects). A reward is any callable of the reward protocol
(``reward(images, captions) -> Tensor``); nothing here imports a reward or a model.

* `preference_rate`: how often a reward scores a preferred caption of an image strictly above every
  one of a list of others.
* `teacher_preferences`: the two orders the teacher evaluator must know for reward fine-tuning to help
  and not hallucinate, on held-out images: ``complete_over_partial`` (an image's complete description
  above every reference that leaves an object out: the gap fine-tuning can exploit) and
  ``partial_over_misnamed`` (a correct partial description above the same plus one misnamed object; at
  0.5 the reward pays as much for a wrong object as it costs); and ``relation_over_and`` (two objects with
  their true relation above the same two joined by "and": below 0.5 a reward gives nothing for saying where
  things are, and fine-tuning against it does not learn to); and ``and_over_false_relation`` (the same two joined by
  "and" above them in an inverted, false relation: below 0.5 a reward pays for stating any relation, true or not, and
  fine-tuning against it states relations without making them true); ``relation_over_wrong_axis`` and
  ``and_over_wrong_axis``: the same against the relation moved to the other axis (`wrong_axis_statement`, "left of"
  for two objects that lie mostly one above the other), the near miss a captioner that knows where things are makes.
* `position_preferences`: whether a captioner knows where things are: its teacher-forced log-probability of a true
  statement against the same statement with its position word inverted, for two objects' relation and for one
  object's region. At 0.5 it places things by chance, and no reward can teach fine-tuning to pick true relations
  among candidates it draws by chance (docs/shapes_world.md, "The captioner does not learn where things are").
* `two_object_axes`, `one_object_centres` and `probe_predictions`: where a model's features lose the places. The
  first two give, for a split's images, what a relation needs (which axis two objects lie along, and how clear it
  is) and where one object is; `probe_predictions` fits a linear or MLP probe from any features (image tokens, the
  text encoding z_K) to them (docs/shapes_world.md, "Where the axis is lost").
* `colour_queries` and `reader_predictions`: whether image tokens keep which shape goes with which colour in a
  crowded scene, the binding a pooled vector loses. The first lists, for each object whose colour is unique in its
  scene, that colour and its shape; the second trains one cross-attention read, queried with the colour, to name the
  shape from a set of tokens (docs/shapes_world.md, "What the captioner's image tokens keep").
"""

from __future__ import annotations

import random
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from rlrefine.data.shapes import (COLOURS, DEFAULT_HELD_OUT, SHAPES, _centre, false_statements, misnamed_pair,
                                  parse_caption, relation, relation_and_pair, relation_description,
                                  wrong_axis_statement)
from rlrefine.data.split import CaptionSplit

__all__ = ["ColourQueries", "colour_queries", "one_object_centres", "position_preferences", "preference_rate",
           "probe_predictions", "reader_predictions", "teacher_preferences", "two_object_axes"]


@torch.no_grad()
def preference_rate(reward: Callable, images: Any, preferred: Sequence[str], others: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often ``reward`` scores ``preferred[i]`` strictly above every caption of ``others[i]`` for
    image i (images with no other caption are left out): ``rate`` and the ``images`` counted."""
    rows = [i for i, o in enumerate(others) if o]
    if not rows:
        return {"rate": float("nan"), "images": 0.0}
    owner = [i for i in rows for _ in range(1 + len(others[i]))]
    texts = [c for i in rows for c in (preferred[i], *others[i])]
    scores = reward(images[torch.as_tensor(owner)], texts).float().cpu()
    wins, at = 0, 0
    for i in rows:
        block = scores[at:at + 1 + len(others[i])]
        wins += int(bool(block[0] > block[1:].max()))
        at += len(block)
    return {"rate": wins / len(rows), "images": float(len(rows))}


def teacher_preferences(reward: Callable, split: CaptionSplit, descriptions: list[list[str]], image_size: int,
                        max_images: int, seed: int) -> dict[str, float]:
    """``complete_over_partial`` and ``partial_over_misnamed`` (module docstring) of ``reward`` on the first
    ``max_images`` images of a shapes ``split``, with ``descriptions[i][0]`` the complete description of
    image i (`rlrefine.data.shapes.complete_descriptions`), and the images each rate counts."""
    images = torch.from_numpy(split.images)
    n = min(len(split), max_images)
    partial = [[] if split.is_label[i] else
               [c for c in split.captions[i] if len(set(parse_caption(c).mentions)) < len(split.scenes[i].objects)]
               for i in range(n)]
    result = preference_rate(reward, images[:n], [d[0] for d in descriptions[:n]], partial)
    rng = random.Random(seed)
    rows = [i for i in range(n) if not split.is_label[i]]
    pairs = [misnamed_pair(split.scenes[i], image_size, rng, exclude=DEFAULT_HELD_OUT) for i in rows]
    misnamed = preference_rate(reward, images[rows], [b for b, _ in pairs], [[w] for _, w in pairs])
    multi = [i for i in rows if len(split.scenes[i].objects) > 1]
    related = [relation_and_pair(split.scenes[i], rng) for i in multi]
    relation = preference_rate(reward, images[multi], [b for b, _ in related], [[w] for _, w in related])
    wrong = [false_statements(b, split.scenes[i], rng)["relation"] for i, (b, _) in zip(multi, related)]
    hedge = preference_rate(reward, images[multi], [w for _, w in related], [[f] for f in wrong])
    side = [wrong_axis_statement(b, split.scenes[i]) for i, (b, _) in zip(multi, related)]
    axis_vs_true = preference_rate(reward, images[multi], [b for b, _ in related], [[w] if w else [] for w in side])
    axis_vs_and = preference_rate(reward, images[multi], [w for _, w in related], [[w] if w else [] for w in side])
    return {"complete_over_partial": result["rate"], "complete_over_partial_images": result["images"],
            "partial_over_misnamed": misnamed["rate"], "partial_over_misnamed_images": misnamed["images"],
            "relation_over_and": relation["rate"], "relation_over_and_images": relation["images"],
            "and_over_false_relation": hedge["rate"], "and_over_false_relation_images": hedge["images"],
            "relation_over_wrong_axis": axis_vs_true["rate"], "relation_over_wrong_axis_images": axis_vs_true["images"],
            "and_over_wrong_axis": axis_vs_and["rate"], "and_over_wrong_axis_images": axis_vs_and["images"]}


@torch.no_grad()
def position_preferences(logprob: Callable[[np.ndarray, list[list[str]]], torch.Tensor], split: CaptionSplit,
                         image_size: int, max_images: int, seed: int) -> dict[str, float]:
    """Does a captioner know where things are? ``logprob(index, captions)`` gives a model's log-probability of
    ``captions[j][m]`` for image ``index[j]`` of ``split`` ([len(index), m]). Over the first ``max_images``
    captioned images of a shapes ``split``:

    * ``relation_true_over_inverted``: two random objects of a multi-object image in their true relation ("a red
      circle above a blue square") scored above the same with the relation inverted ("... below ..."); chance 0.5;
    * ``relation_true_over_and``: the true relation above the same two joined by "and" (does it say where at all);
    * ``relation_true_over_wrong_axis``: the true relation above the same moved to the other axis, in the direction
      the objects do lie there (`wrong_axis_statement`: "left of" where the circle lies mostly above and a little
      left of the square): does it know which offset is larger;
    * ``region_true_over_opposite``: one object's true region ("one red circle in the top left") above the opposite
      one ("... in the bottom right"), on one-object images whose region has an opposite;

    each with its mean log-probability gap in nats (``..._gap``) and the images counted (``..._images``)."""
    rng = random.Random(seed)
    rows = [i for i in range(len(split)) if not split.is_label[i]][:max_images]
    related, regions, axis = [], [], []
    for i in rows:
        scene = split.scenes[i]
        if len(scene.objects) > 1:
            true, joined = relation_and_pair(scene, rng)
            related.append((i, [true, false_statements(true, scene, rng)["relation"], joined]))
            moved = wrong_axis_statement(true, scene)
            if moved is not None:
                axis.append((i, [true, moved]))
        else:
            true = relation_description(scene, image_size, rng)
            wrong = false_statements(true, scene, rng).get("relation")  # "in the middle" has no opposite
            if wrong is not None:
                regions.append((i, [true, wrong]))
    scored = {key: logprob(np.array([i for i, _ in items]), [c for _, c in items]).float().cpu() if items else None
              for key, items in (("related", related), ("regions", regions), ("axis", axis))}
    out: dict[str, float] = {}
    for name, key, other in (("relation_true_over_inverted", "related", 1), ("relation_true_over_and", "related", 2),
                             ("relation_true_over_wrong_axis", "axis", 1), ("region_true_over_opposite", "regions", 1)):
        lp = scored[key]
        if lp is None:
            out.update({name: float("nan"), f"{name}_gap": float("nan"), f"{name}_images": 0.0})
            continue
        gap = lp[:, 0] - lp[:, other]
        out.update({name: float((gap > 0).float().mean()), f"{name}_gap": float(gap.mean()), f"{name}_images": float(len(lp))})
    return out


def _scene_rows(split: CaptionSplit, max_images: int, objects_ok: Callable[[int], bool]) -> list[int]:
    """The first ``max_images`` captioned (not label-only) images of a shapes ``split`` whose number of objects
    ``objects_ok`` accepts."""
    rows = [i for i in range(len(split)) if not split.is_label[i] and objects_ok(len(split.scenes[i].objects))]
    return rows[:max_images]


def two_object_axes(split: CaptionSplit, max_images: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The first ``max_images`` captioned two-object images of a shapes ``split``: (rows, axis, ratio). ``axis`` is 1
    where the objects lie mostly one above the other (|dy| ≥ |dx|: their relation is "above" / "below", as
    `rlrefine.data.shapes.relation` names it) and 0 where they lie mostly side by side; ``ratio`` is the smaller
    offset over the larger (0: straight above or beside, 1: on the diagonal, where the axis is hardest to see)."""
    rows = _scene_rows(split, max_images, lambda n: n == 2)
    axis, ratio = [], []
    for i in rows:
        a, b = split.scenes[i].objects
        dx, dy = abs(b.x - a.x), abs(b.y - a.y)
        axis.append(int(relation(a, b) in ("above", "below")))
        ratio.append(min(dx, dy) / max(dx, dy, 1e-9))
    return rows, np.array(axis, dtype=np.int64), np.array(ratio, dtype=np.float64)


def one_object_centres(split: CaptionSplit, max_images: int, image_size: int) -> tuple[list[int], np.ndarray]:
    """The first ``max_images`` captioned one-object images of a shapes ``split``: (rows, centres [n, 2]), each
    centre (x, y) in [-1, 1] (y grows downward), in the locate loss's convention (`rlrefine.data.shapes._centre`)."""
    rows = _scene_rows(split, max_images, lambda n: n == 1)
    centres = [_centre(split.scenes[i].objects[0], image_size) for i in rows]
    return rows, np.array(centres, dtype=np.float32).reshape(-1, 2)


def probe_predictions(x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor, hidden: int = 0,
                      steps: int = 800, lr: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Fit a probe on ``x_train`` [n, F] (flattened features, standardised on the training rows) and predict for
    ``x_test``. Integer ``y_train`` [n]: a classifier (cross entropy; returns the predicted classes); float
    ``y_train`` [n, D]: a regressor (squared error; returns the predictions). ``hidden`` 0 is a linear probe, else an
    MLP with one hidden layer of that width (GELU, dropout 0.2): what a readout could recover, not only what a linear
    map could. AdamW (weight decay 1e-2), minibatches of 512; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test = x_train.float(), x_test.float()
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    classify = np.issubdtype(np.asarray(y_train).dtype, np.integer)
    y = torch.as_tensor(np.asarray(y_train))
    out = int(y.max()) + 1 if classify else y.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = (torch.nn.Linear(x_train.shape[1], out) if hidden == 0 else
               torch.nn.Sequential(torch.nn.Linear(x_train.shape[1], hidden), torch.nn.GELU(), torch.nn.Dropout(0.2),
                                   torch.nn.Linear(hidden, out)))
        opt = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-2)
        for _ in range(steps):
            net.train()
            batch = torch.randperm(len(y), generator=gen)[:512]
            pred = net(x_train[batch])
            loss = (torch.nn.functional.cross_entropy(pred, y[batch]) if classify else
                    ((pred - y[batch].float()) ** 2).sum(-1).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(x_test)
    return (pred.argmax(-1) if classify else pred).numpy()


class ColourQueries(NamedTuple):
    """Objects to name by their colour: ``rows`` are the split's images; per object, ``image`` (its position in
    ``rows``), ``colour`` and ``shape`` (indices into `COLOURS` and `SHAPES`), ``objects`` (how many its scene has)
    and ``small`` (its size word is "small")."""

    rows: list[int]
    image: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    objects: np.ndarray
    small: np.ndarray


def colour_queries(split: CaptionSplit, max_images: int, min_objects: int = 2) -> ColourQueries:
    """The first ``max_images`` captioned images of a shapes ``split`` with at least ``min_objects`` objects, and in
    them every object whose colour no other object of its scene has (so the colour names it)."""
    rows = _scene_rows(split, max_images, lambda n: n >= min_objects)
    colours = list(COLOURS)
    found = [(r, colours.index(o.colour), SHAPES.index(o.shape), len(objects), o.size == "small")
             for r, objects in enumerate(split.scenes[i].objects for i in rows)
             for o in objects if sum(p.colour == o.colour for p in objects) == 1]
    image, colour, shape, count, small = (np.array(c, dtype=np.int64) for c in zip(*found)) if found else (
        np.zeros(0, dtype=np.int64) for _ in range(5))
    return ColourQueries(rows, image, colour, shape, count, small.astype(bool))


def reader_predictions(tokens_train: torch.Tensor, image_train: np.ndarray, query_train: np.ndarray,
                       y_train: np.ndarray, tokens_test: torch.Tensor, image_test: np.ndarray, query_test: np.ndarray,
                       width: int = 128, heads: int = 4, steps: int = 3000, lr: float = 1e-3, batch_size: int = 256,
                       seed: int = 0) -> np.ndarray:
    """Fit one cross-attention read on sets of tokens and predict classes. ``tokens_*`` [images, N, F] (an image's
    tokens, e.g. the captioner's V, or an encoder's grid); example j reads ``tokens[image[j]]`` with a query built
    from ``query[j]`` (an int, e.g. a colour) and predicts ``y[j]`` (an int, e.g. the shape of the object of that
    colour). The read is what a refinement block does once: the tokens normalised and projected to ``width`` with a
    learned embedding per token position, one query (a learned vector plus the query's embedding) attending to them
    (`torch.nn.MultiheadAttention`), a residual MLP, a linear classifier. Unlike a probe on pooled features it can
    find the token that holds the queried colour and read that token's shape: the binding that pooling loses.
    AdamW (weight decay 1e-2), cross entropy, minibatches of ``batch_size``; deterministic given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    tokens_train, tokens_test = tokens_train.float(), tokens_test.float()
    n_tokens, n_features = tokens_train.shape[1:]
    n_queries = int(np.max(np.concatenate([np.asarray(query_train), np.asarray(query_test)]))) + 1
    n_classes = int(y_train.max()) + 1
    image_train, query_train, y_train = (torch.as_tensor(np.asarray(a)) for a in (image_train, query_train, y_train))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.ModuleDict({
            "project": torch.nn.Sequential(torch.nn.LayerNorm(n_features), torch.nn.Linear(n_features, width)),
            "query": torch.nn.Embedding(n_queries, width),
            "norm": torch.nn.LayerNorm(width),
            "read": torch.nn.MultiheadAttention(width, heads, batch_first=True),
            "mlp": torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width)),
            "classify": torch.nn.Linear(width, n_classes),
        })
        place = torch.nn.Parameter(torch.zeros(n_tokens, width))
        start = torch.nn.Parameter(torch.randn(width) * 0.5)

        def forward(tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
            v = net["project"](tokens) + place
            q = net["norm"](start + net["query"](query))[:, None]
            z = q + net["read"](q, v, v, need_weights=False)[0]
            z = z + net["mlp"](z)
            return net["classify"](z[:, 0])

        opt = torch.optim.AdamW([*net.parameters(), place, start], lr, weight_decay=1e-2)
        for _ in range(steps):
            net.train()
            b = torch.randint(0, len(y_train), (batch_size,), generator=gen)
            loss = torch.nn.functional.cross_entropy(forward(tokens_train[image_train[b]], query_train[b]), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            out = [forward(tokens_test[torch.as_tensor(image_test[s:s + 1024])],
                           torch.as_tensor(np.asarray(query_test[s:s + 1024]))).argmax(-1)
                   for s in range(0, len(image_test), 1024)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
