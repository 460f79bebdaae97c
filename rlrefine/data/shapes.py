"""The embedded **shapes** dataset: procedural images, scenes and paraphrased captions.

Where it sits: `rlrefine.data`, the bottom of the flow. `generate_shapes(cfg)` returns the splits
the embedded default trains and evaluates on (docs/shapes_world.md); `parse_caption` reads a caption back
into (colour, shape) mentions and relations, which `rlrefine.metrics.grounding` scores against the
`Scene` stored beside each image.

The world
---------
* 6 colours x 5 shapes = 30 colour–shape combinations; each object is ``small`` or ``large``.
* An image holds 1..``max_objects`` objects (uniform), all with *distinct* colour–shape pairs, so a
  caption such as "the blue square" always refers to one object. Objects never overlap.
* Relations are on the dominant axis between two object centres (image y grows downwards):
  A is "above" B when ``|dy| >= |dx|`` and A's centre is higher; otherwise "left of"/"right of".
  Placement keeps every pair clearly dominant on one axis (ratio >= 1.3), so the relation in a
  caption is visually unambiguous. ``Scene.relations`` lists the relation of every ordered pair.
* Held-out combinations (``cfg.held_out``) never appear in ``train``/``val``/``test`` (nor in the
  label-only examples); every ``test_novel`` image contains at least one of them, so test_novel
  measures compositional generalisation: each held-out colour and shape *is* seen in training,
  only not together.

Captions
--------
Every captioned image gets 5 distinct references from templates with paraphrases, e.g.
"a small red circle above a large blue square", "there is a blue square under a red circle",
"an image with a red circle and a blue square". Captions of 3-object images name all three
objects by colour and shape. The vocabulary is 40 words plus ","; captions have at most 17
words (19 tokens with bos/eos).
The ``train`` split also holds ``round(label_fraction * num_train)`` label-only examples
(single-object image, caption ``["red circle"]``, ``is_label=True``) appended after the captioned
images, the "ImageNet style" data pretraining mixes in at a low sampling weight (`data.label_weight`).

Everything is deterministic from ``cfg.seed``: each split draws from its own child of
``np.random.SeedSequence(seed)``, so changing one split's size does not change the others.
Rendering is vectorised (antialiased masks, one gather-blend-scatter per group of objects with
the same slot, shape and radius): 20k 64x64 images take a few seconds on one CPU core.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from rlrefine.data.split import CaptionSplit

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "DEFAULT_HELD_OUT",
    "ShapesConfig",
    "SceneObject",
    "Scene",
    "ParsedCaption",
    "MENTION_PROBABILITY",
    "misnamed_pair",
    "ordered_descriptions",
    "FALSE_STATEMENT_KINDS",
    "caption_holds",
    "caption_grounding_counts",
    "image_digest",
    "scene_index",
    "false_statements",
    "wrong_axis_statement",
    "MatchingExamples",
    "matching_examples",
    "mention_centres",
    "relation_description",
    "REFERENCE_STYLES",
    "complete_descriptions",
    "generate_shapes",
    "is_grammatical",
    "parse_caption",
    "salience_order",
    "SPLITS",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 100, 235),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
INVERSE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SPLITS: tuple[str, ...] = ("train", "val", "test", "test_novel")
REFERENCE_STYLES: tuple[str, ...] = ("salient", "complete")
# Salient references: the probability that a reference names the object of salience rank r
# (0 = most salient). For a 3-object image 55% of references name one object, 40% two, 5% all three;
# for a 2-object image 65% name one. Chosen so that most references leave something out, as COCO's do.
MENTION_PROBABILITY: tuple[float, ...] = (1.0, 0.35, 0.15)

# One held-out shape per colour for four colours, each shape at most once: every colour and every
# shape still occurs in training (4 of the 30 combinations are held out).
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "diamond"),
    ("blue", "cross"),
    ("yellow", "circle"),
)

# Radius of an object, as a fraction of the image side (drawn uniformly in the range).
_RADIUS_FRACTION = {"small": (0.09, 0.11), "large": (0.16, 0.19)}
# Two centres are at least _EXTENT * (r1 + r2) + _MIN_GAP apart: 1.2 r bounds the pointed parts
# (square corners 1.16 r, triangle base corners 1.21 r) on the axes that matter, so shapes never touch.
_EXTENT = 1.2
_MIN_GAP = 2
_DOMINANCE = 1.3  # every pair: |dominant axis offset| >= 1.3 * |other axis offset|


@dataclass
class ShapesConfig:
    """How the shapes dataset is generated (defaults: the embedded default)."""

    image_size: int = 64
    """Square image side in pixels."""
    num_train: int = 20000
    """Captioned training images (label-only examples come on top, see ``label_fraction``)."""
    num_val: int = 500
    """Validation images (i.i.d. with train)."""
    num_test: int = 1000
    """Test images (i.i.d. with train)."""
    num_test_novel: int = 1000
    """Test images that each contain at least one held-out colour–shape combination."""
    max_objects: int = 3
    """Objects per image are drawn uniformly from 1..max_objects (at most 3)."""
    label_fraction: float = 0.1
    """Extra label-only training examples ("red circle"), as a fraction of ``num_train``."""
    seed: int = 0
    """Seed of everything: scenes, rendering noise, caption choices."""
    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT
    """(colour, shape) pairs never shown in train/val/test; each test_novel image has one."""
    references: str = "salient"
    """``salient``: references written the way people write them (the most salient object always,
    the others with a probability that falls with salience, ``MENTION_PROBABILITY``); ``complete``:
    every reference names every object. Either way `complete_descriptions` gives captions that
    name every object (the teacher evaluator's corpus)."""

    def __post_init__(self) -> None:
        self.held_out = tuple((str(c), str(s)) for c, s in self.held_out)
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {self.max_objects}")
        if self.references not in REFERENCE_STYLES:
            raise ValueError(f"references must be one of {REFERENCE_STYLES}, got {self.references!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 0.0 <= self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in [0, 1], got {self.label_fraction}")
        for colour, shape in self.held_out:
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(
                    f"held_out pair ({colour!r}, {shape!r}) is not a known colour/shape; "
                    f"colours {list(COLOURS)}, shapes {list(SHAPES)}"
                )
        if not self.held_out:
            raise ValueError("held_out must name at least one (colour, shape) pair (test_novel needs one)")
        seen = set(_allowed_combos(self.held_out))
        for c in COLOURS:
            if not any(sc == c for sc, _ in seen):
                raise ValueError(f"held_out removes every shape of colour {c!r} from training")
        for s in SHAPES:
            if not any(ss == s for _, ss in seen):
                raise ValueError(f"held_out removes every colour of shape {s!r} from training")


@dataclass
class SceneObject:
    """One object: its shape, colour, size word, centre (x right, y down, pixels) and radius."""

    shape: str
    colour: str
    size: str
    x: int
    y: int
    radius: int

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    """Ground truth of one image: its objects and the relation of every ordered object pair.

    ``relations`` holds ``(i, rel, j)`` meaning "objects[i] is <rel> objects[j]", for all i != j.
    """

    objects: list[SceneObject]
    relations: list[tuple[int, str, int]] = field(default_factory=list)

    @classmethod
    def from_objects(cls, objects: list[SceneObject]) -> "Scene":
        """A scene with the relation of every ordered pair computed by `relation`."""
        rels = [(i, relation(a, b), j) for i, a in enumerate(objects) for j, b in enumerate(objects) if i != j]
        return cls(objects=list(objects), relations=rels)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(
            objects=[SceneObject(**o) for o in d["objects"]],
            relations=[(int(i), str(r), int(j)) for i, r, j in d["relations"]],
        )

    def index_of(self, colour: str, shape: str) -> int | None:
        """Index of the object with this colour and shape (combos are unique per scene), or None."""
        for i, o in enumerate(self.objects):
            if o.colour == colour and o.shape == shape:
                return i
        return None


def relation(a: SceneObject, b: SceneObject) -> str:
    """Relation of ``a`` to ``b`` on the dominant axis (y grows downwards)."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "left of" if dx > 0 else "right of"


# ------------------------------------------------------------------------------------ parsing
@dataclass
class ParsedCaption:
    """What a caption says: (colour, shape) mentions in order and relations between them."""

    mentions: list[tuple[str, str]]
    relations: list[tuple[tuple[str, str], str, tuple[str, str]]]
    colours: list[str]
    """Every colour word, mentioned with a shape or not (partial credit in grounding)."""
    shapes: list[str]
    """Every shape word, with a colour or not."""


_SIZE_WORDS = frozenset({"small", "large", "big", "little", "tiny", "huge"})
_REL_WORDS = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}
_WORD_RE = re.compile(r"[a-z]+")


def _normalise_shape(word: str) -> str | None:
    if word in SHAPES:
        return word
    if word.endswith("es") and word[:-2] in SHAPES:  # crosses
        return word[:-2]
    if word.endswith("s") and word[:-1] in SHAPES:  # circles, squares
        return word[:-1]
    return None


def parse_caption(text: str) -> ParsedCaption:
    """Read (colour, shape) mentions and relations out of a caption.

    A mention is a colour word followed by a shape word, with at most two size words between
    ("red circle", "red small circle"). A relation is read between two consecutive mentions when
    the words between them contain "above"/"over", "below"/"under"/"beneath", "left of" or
    "right of" (so "on the left" is a position, not a relation). Unknown words are ignored, so
    any model output can be parsed; an empty caption parses to nothing.
    """
    words = _WORD_RE.findall(text.lower())
    shapes_norm = [_normalise_shape(w) for w in words]
    mentions: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        if words[i] in COLOURS:
            k = i + 1
            while k < len(words) and k - i <= 2 and words[k] in _SIZE_WORDS:
                k += 1
            if k < len(words) and shapes_norm[k] is not None:
                mentions.append((words[i], shapes_norm[k]))
                spans.append((i, k))
                i = k + 1
                continue
        i += 1
    relations = []
    for m in range(len(mentions) - 1):
        between = words[spans[m][1] + 1 : spans[m + 1][0]]
        rel = _relation_in(between)
        if rel is not None:
            relations.append((mentions[m], rel, mentions[m + 1]))
    return ParsedCaption(
        mentions=mentions,
        relations=relations,
        colours=[w for w in words if w in COLOURS],
        shapes=[s for s in shapes_norm if s is not None],
    )


def _relation_in(words: Sequence[str]) -> str | None:
    for t, w in enumerate(words):
        if w in _REL_WORDS:
            return _REL_WORDS[w]
        if w in ("left", "right") and t + 1 < len(words) and words[t + 1] == "of":
            return f"{w} of"
    return None


# ----------------------------------------------------------------------------------- captions
_REL_SHORT = {"above": "above", "below": "below", "left of": "left of", "right of": "right of"}
_REL_ALT = {"above": "over", "below": "under", "left of": "to the left of", "right of": "to the right of"}


def _np(o: SceneObject, size: bool = False) -> str:
    """Noun phrase with the right indefinite article: "a small red circle", "an orange square"."""
    words = ([o.size] if size else []) + [o.colour, o.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _region(o: SceneObject, image_size: int) -> str:
    v = "top" if o.y < 0.35 * image_size else "bottom" if o.y > 0.65 * image_size else None
    h = "left" if o.x < 0.35 * image_size else "right" if o.x > 0.65 * image_size else None
    if v and h:
        return f"in the {v} {h}"
    if v:
        return f"at the {v}"
    if h:
        return f"on the {h}"
    return "in the middle"


def _captions_one(o: SceneObject, image_size: int) -> list[str]:
    reg = _region(o, image_size)
    return [
        _np(o, size=True),
        f"there is {_np(o)}",
        f"there is {_np(o, True)} {reg}",
        f"an image with {_np(o, True)}",
        f"a picture of {_np(o)} {reg}",
        f"{_np(o)} on a dark background",
        f"a single {o.size} {o.colour} {o.shape}",
        f"one {o.colour} {o.shape} {reg}",
    ]


def _template_two(t: int, x: SceneObject, y: SceneObject) -> str:
    """Template ``t`` (0..4) for two objects, ``x`` named first."""
    if t == 0:
        return f"{_np(x, True)} {_REL_SHORT[relation(x, y)]} {_np(y, True)}"
    if t == 1:
        return f"there is {_np(x)} {_REL_ALT[relation(x, y)]} {_np(y)}"
    if t == 2:
        return f"{_np(x)} {_REL_SHORT[relation(x, y)]} {_np(y)}"
    if t == 3:
        return f"an image with {_np(x)} and {_np(y)}"
    return f"{_np(x, True)} and {_np(y, True)}"


def _template_three(t: int, x: SceneObject, y: SceneObject, z: SceneObject) -> str:
    """Template ``t`` (0..4) for three objects in the order x, y, z; all three are named."""
    if t == 0:
        return f"{_np(x)} {_REL_SHORT[relation(x, y)]} {_np(y)} and {_np(z)}"
    if t == 1:
        return f"{_np(x, True)} , {_np(y, True)} and {_np(z, True)}"
    if t == 2:
        return f"an image with {_np(x)} , {_np(y)} and {_np(z)}"
    if t == 3:  # the longest caption: 17 words with two "left of"/"right of"
        return (
            f"{_np(x)} {_REL_SHORT[relation(x, y)]} {_np(y)} and {_np(z)} "
            f"{_REL_SHORT[relation(z, y)]} the {y.colour} {y.shape}"
        )
    return f"there is {_np(x)} and {_np(y)} {_REL_ALT[relation(y, z)]} {_np(z)}"


NUM_REFERENCES = 5


def _captions(objects: list[SceneObject], image_size: int, rnd: random.Random) -> list[str]:
    """5 distinct complete references: 5 of 8 templates (1 object) or all 5 templates, each with a
    random object order (2-3 objects). Distinct templates give distinct strings."""
    if len(objects) == 1:
        return rnd.sample(_captions_one(objects[0], image_size), NUM_REFERENCES)
    template_order = rnd.sample(range(NUM_REFERENCES), NUM_REFERENCES)
    out = []
    for t in template_order:
        perm = rnd.sample(objects, len(objects))
        out.append((_template_two if len(objects) == 2 else _template_three)(t, *perm))
    return out


def salience_order(objects: Sequence[SceneObject], image_size: int) -> list[int]:
    """Object indices, most salient first: large before small, then nearest the image centre."""
    c = (image_size - 1) / 2
    return sorted(range(len(objects)),
                  key=lambda i: (objects[i].size != "large", (objects[i].x - c) ** 2 + (objects[i].y - c) ** 2))


def _salient_caption(named: list[SceneObject], scene_size: int, image_size: int, rnd: random.Random) -> str:
    """One caption naming exactly ``named`` (most salient first) with a random template for that count;
    "a single ..." only when the image really holds one object."""
    if len(named) == 1:
        options = _captions_one(named[0], image_size)
        if scene_size > 1:
            options = [o for o in options if not o.startswith("a single ")]
        return rnd.choice(options)
    template = _template_two if len(named) == 2 else _template_three
    return template(rnd.randrange(NUM_REFERENCES), *named)


def _salient_captions(objects: list[SceneObject], image_size: int, rnd: random.Random) -> list[str]:
    """5 distinct human-style references: each names the most salient object and each further object
    of salience rank r with probability ``MENTION_PROBABILITY[r]``, drawn per reference."""
    order = [objects[i] for i in salience_order(objects, image_size)]
    out: list[str] = []
    while len(out) < NUM_REFERENCES:
        named = [o for r, o in enumerate(order) if r == 0 or rnd.random() < MENTION_PROBABILITY[r]]
        caption = _salient_caption(named, len(objects), image_size, rnd)
        if caption not in out:
            out.append(caption)
    return out


def complete_descriptions(split: CaptionSplit, image_size: int, seed: int = 0) -> list[list[str]]:
    """Per row of a shapes split, 5 captions that name every object (the templates of
    ``references: complete``); label-only rows keep their label. The corpus the teacher evaluator
    learns from when the references are salient, as PAC-S learns from curated data that alt-text lacks."""
    if split.scenes is None:
        raise ValueError("complete_descriptions needs a shapes split (one Scene per image)")
    rnd = random.Random(seed)
    return [list(caps) if is_label else _captions(scene.objects, image_size, rnd)
            for caps, scene, is_label in zip(split.captions, split.scenes, split.is_label)]


def misnamed_pair(scene: Scene, image_size: int, rnd: random.Random,
                  exclude: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
    """``(correct, misnamed)``: a human-style caption naming a correct subset of the scene's objects, and
    a caption naming the same objects plus one that is not in the image.

    The extra object is one the correct caption leaves out with its colour or its shape changed (on a
    1-object image, a made-up small object), so the pair teaches an evaluator that naming an object
    wrongly is worse than leaving it out, the ordering a hallucination-aware evaluator has. The subset
    is drawn as the salient references are (the most salient object, others by ``MENTION_PROBABILITY``);
    the wrong combination is never one in the scene or in ``exclude`` (e.g. the held-out pairs)."""
    objects = scene.objects
    order = [objects[i] for i in salience_order(objects, image_size)]
    taken = {o.combo for o in objects} | set(exclude)
    if len(order) > 1:
        left_out = rnd.randrange(1, len(order))
        base = order[left_out]
        ranks = [r for r in range(len(order)) if r != left_out and (r == 0 or rnd.random() < MENTION_PROBABILITY[r])]
    else:
        left_out, ranks = 1, [0]
        base = SceneObject(rnd.choice(SHAPES), rnd.choice(list(COLOURS)), "small",
                           rnd.randrange(image_size), rnd.randrange(image_size), 1)
    options = [(c, base.shape) for c in COLOURS] + [(base.colour, sh) for sh in SHAPES]
    options = [c for c in options if c not in taken]
    colour, shape = rnd.choice(options)
    wrong = SceneObject(shape, colour, base.size, base.x, base.y, base.radius)
    named = [order[r] for r in ranks]
    with_wrong = list(named)
    with_wrong.insert(sum(r < left_out for r in ranks), wrong)  # where the left-out object ranks in salience
    template_seed = rnd.random()
    correct = _salient_caption(named, len(objects), image_size, random.Random(template_seed))
    misnamed = _salient_caption(with_wrong, len(objects), image_size, random.Random(template_seed))
    return correct, misnamed


def ordered_descriptions(scene: Scene, image_size: int, rnd: random.Random,
                         exclude: Sequence[tuple[str, str]] = (), relations: bool = False) -> list[tuple[str, str]]:
    """Caption pairs ``(better, worse)`` of one image in the order a hallucination-aware evaluator keeps:
    the complete description above a correct partial one (multi-object images), and the partial one
    above the same plus a misnamed object (`misnamed_pair`). With ``relations``, also (multi-object images)
    two objects with their true relation above the same two joined by "and" (`relation_and_pair`)."""
    correct, misnamed = misnamed_pair(scene, image_size, rnd, exclude)
    pairs = [(correct, misnamed)]
    if len(scene.objects) > 1:
        order = [scene.objects[i] for i in salience_order(scene.objects, image_size)]
        pairs.insert(0, (_salient_caption(order, len(order), image_size, rnd), correct))
        if relations:
            pairs.append(relation_and_pair(scene, rnd))
    return pairs


def relation_and_pair(scene: Scene, rnd: random.Random) -> tuple[str, str]:
    """Two random objects of a multi-object ``scene`` in random order: ("a large red circle above a large blue
    square", "a large red circle and a large blue square"), the relation true; sizes named in both or in neither."""
    x, y = rnd.sample(scene.objects, 2)
    if rnd.random() < 0.5:
        return _template_two(0, x, y), _template_two(4, x, y)
    return _template_two(2, x, y), f"{_np(x)} and {_np(y)}"


# ------------------------------------------------------------------------ true and false statements
FALSE_STATEMENT_KINDS: tuple[str, ...] = ("relation", "exchange", "colour", "shape")
# Position words and their opposites: relations ("above", "over", "left of", "to the left of") and regions ("in the
# top left", "at the bottom"); every region is at least 0.3 of the image side from its opposite, so an inverted
# word is always false.
_OPPOSITE = {"above": "below", "below": "above", "over": "under", "under": "over", "left": "right", "right": "left",
             "top": "bottom", "bottom": "top"}


def caption_holds(caption: str, scene: Scene) -> bool:
    """True when every (colour, shape) ``caption`` names is in ``scene`` and every relation it states between two of
    them holds there (`relation`). Sizes and regions are not checked."""
    parsed = parse_caption(caption)
    if any(scene.index_of(*m) is None for m in parsed.mentions):
        return False
    for a, rel, b in parsed.relations:
        i, j = scene.index_of(*a), scene.index_of(*b)
        if i == j or relation(scene.objects[i], scene.objects[j]) != rel:
            return False
    return True


def caption_grounding_counts(caption: str, scene: Scene) -> dict[str, int]:
    """The raw counts of one caption against its scene: what `rlrefine.metrics.grounding.grounding_scores` sums and
    the `scene` reward scores."""
    parsed = parse_caption(caption)
    scene_pairs = {o.combo for o in scene.objects}
    mentioned = set(parsed.mentions)
    colours, shapes = set(parsed.colours), set(parsed.shapes)
    true_relations = set(scene.relations)
    stated = set(parsed.relations)
    relations_correct = 0
    for a, rel, b in stated:
        i, j = scene.index_of(*a), scene.index_of(*b)
        relations_correct += int(i is not None and j is not None and (i, rel, j) in true_relations)
    return {
        "mentions": len(mentioned),
        "mentions_correct": len(mentioned & scene_pairs),
        "objects": len(scene.objects),
        "objects_named": sum(o.combo in mentioned for o in scene.objects),
        "colours_named": sum(o.colour in colours for o in scene.objects),
        "shapes_named": sum(o.shape in shapes for o in scene.objects),
        "relations": len(stated),
        "relations_correct": relations_correct,
        "exact": int(mentioned == scene_pairs),
    }


def image_digest(image: np.ndarray) -> str:
    """A key for one rendered image (uint8 [H, W, 3]): the MD5 of its bytes. Rewards receive images, not their
    index, so a reward that reads the ground truth (`rewards.scene`) finds an image's scene by this key."""
    return hashlib.md5(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def scene_index(splits: Iterable[CaptionSplit]) -> dict[str, Scene]:
    """``{image_digest(image): scene}`` over every image of ``splits`` that has a scene."""
    index: dict[str, Scene] = {}
    for split in splits:
        if split.scenes is None or not isinstance(split.images, np.ndarray):
            continue
        for image, scene in zip(split.images, split.scenes):
            index[image_digest(image)] = scene
    return index


def relation_description(scene: Scene, image_size: int, rnd: random.Random) -> str:
    """A true caption of ``scene`` that says where things are: two or three of its objects (random, in random
    order) in a template that states their relation ("there is a red circle over a blue square"); for a
    one-object scene, a template that states its region ("one red circle in the top left")."""
    objects = scene.objects
    if len(objects) == 1:
        return _captions_one(objects[0], image_size)[rnd.choice((2, 4, 7))]
    if len(objects) == 3 and rnd.random() < 0.5:
        return _template_three(rnd.choice((0, 3, 4)), *rnd.sample(objects, 3))
    return _template_two(rnd.choice((0, 1, 2)), *rnd.sample(objects, 2))


def _mentions(words: Sequence[str]) -> list[tuple[int, int]]:
    """(colour word index, shape word index) of every object a template caption names, in order."""
    out, i = [], 0
    while i < len(words):
        if words[i] in COLOURS:
            k = i + 1
            while k < len(words) and k - i <= 2 and words[k] in SIZES:
                k += 1
            if k < len(words) and words[k] in SHAPES:
                out.append((i, k))
                i = k + 1
                continue
        i += 1
    return out


def mention_centres(words: Sequence[str], scene: Scene, image_size: int) -> list[tuple[int, tuple[float, float]]]:
    """Where each object a caption names is: ``(index of its shape word in words, its centre (x, y) in [-1, 1], y
    down)`` for every (colour, size..., shape) mention of an object in ``scene``, in order; a mention of an object the
    scene lacks is left out. ``words`` may hold other strings (special tokens, punctuation): they are ignored. The
    targets of the readout's locate loss (`rlrefine.losses.locate_loss`), in the matching head's coordinates."""
    out = []
    for colour_at, shape_at in _mentions(words):
        j = scene.index_of(words[colour_at], words[shape_at])
        if j is not None:
            out.append((shape_at, _centre(scene.objects[j], image_size)))
    return out


def _centre(o: SceneObject, image_size: int) -> tuple[float, float]:
    """An object's centre (x, y) in [-1, 1], y down: what a matching head and the captioner's readout locate."""
    half = (image_size - 1) / 2
    return (o.x - half) / half, (o.y - half) / half


def _with_articles(words: list[str]) -> str:
    """The caption with every "a" / "an" agreeing with the word after it (a changed colour may start with a vowel)."""
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def false_statements(caption: str, scene: Scene, rnd: random.Random,
                     exclude: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """Captions that differ from a true template ``caption`` of ``scene`` in one place and are false for it, by kind
    (`FALSE_STATEMENT_KINDS`); a kind the caption has no false variant of is left out.

    * ``relation``: one position word inverted (above ↔ below, over ↔ under, left ↔ right, top ↔ bottom);
    * ``exchange``: two named objects trade places ("a red circle above a blue square" → "a blue square above a red
      circle"), kept only where that makes the caption false (`caption_holds`): a stated relation then no longer holds;
    * ``colour`` / ``shape``: one named object's colour / shape changed (wherever the caption names it) so that the pair
      is neither in the scene nor in ``exclude`` (e.g. the held-out pairs).
    """
    words = caption.split()
    out: dict[str, str] = {}
    spots = [i for i, w in enumerate(words) if w in _OPPOSITE]
    if spots:
        i = rnd.choice(spots)
        out["relation"] = " ".join(words[:i] + [_OPPOSITE[words[i]]] + words[i + 1:])
    mentions = _mentions(words)
    named = [m for m in mentions if m[0] == 0 or words[m[0] - 1] != "the"]  # not "... below the blue square"
    if len(named) > 1:
        (c1, s1), (c2, s2) = rnd.sample(named, 2)
        a, b = (words[c1], words[s1]), (words[c2], words[s2])
        new = list(words)
        for c, s in mentions:  # every mention of the two, "... below the blue square" too
            new[c], new[s] = {a: b, b: a}.get((words[c], words[s]), (words[c], words[s]))
        text = _with_articles(new)
        if not caption_holds(text, scene):
            out["exchange"] = text
    taken = {o.combo for o in scene.objects} | set(exclude)
    if named:
        c, s = rnd.choice(named)
        old = (words[c], words[s])
        for kind, options in (("colour", [(x, old[1]) for x in COLOURS]), ("shape", [(old[0], x) for x in SHAPES])):
            options = [p for p in options if p not in taken]
            if options:
                pick = rnd.choice(options)
                new = list(words)
                for c2, s2 in mentions:  # the object and "... below the <it>" alike
                    if (words[c2], words[s2]) == old:
                        new[c2], new[s2] = pick
                out[kind] = _with_articles(new)
    return out


# A relation's words by style, and those of the same direction on the other axis: "above" -> "left of" (the short
# templates), "over" -> "to the left of" (the "there is" templates)
_OTHER_AXIS = {("above",): ("left", "of"), ("below",): ("left", "of"), ("left", "of"): ("above",), ("right", "of"): ("above",),
               ("over",): ("to", "the", "left", "of"), ("under",): ("to", "the", "left", "of"),
               ("to", "the", "left", "of"): ("over",), ("to", "the", "right", "of"): ("over",)}
_FLIP = {"left": "right", "above": "below", "over": "under"}


def wrong_axis_statement(caption: str, scene: Scene) -> str | None:
    """The first relation a true template ``caption`` of ``scene`` states, moved to the other axis in the direction
    the two objects do lie there ("a red circle above a blue square" -> "a red circle left of a blue square" when the
    circle is above and a little left of the square), or None when the caption states no relation. False, because a
    relation names the dominant axis (`relation`), yet nearly true: the error a captioner that knows where each object
    is but not which offset is larger makes, and a reward has to tell apart from saying nothing."""
    words = caption.split()
    mentions = _mentions(words)
    for (c1, s1), (c2, s2) in zip(mentions, mentions[1:]):
        between = words[s1 + 1:c2]
        for start in range(len(between)):
            for span in _OTHER_AXIS:
                if tuple(between[start:start + len(span)]) != span:
                    continue
                i, j = scene.index_of(words[c1], words[s1]), scene.index_of(words[c2], words[s2])
                if i is None or j is None:
                    return None
                a, b = scene.objects[i], scene.objects[j]
                new = list(_OTHER_AXIS[span])
                if (span[-1] == "of" and b.y < a.y) or (span[-1] != "of" and b.x < a.x):  # a is below / right of b
                    new = [_FLIP.get(w, w) for w in new]
                at = s1 + 1 + start
                return " ".join(words[:at] + new + words[at + len(span):])
    return None


@dataclass
class MatchingExamples:
    """What a matching head (`rewards.matching`) learns from one image."""

    groups: list[tuple[str, list[str]]]  # (a true caption, captions that are false for the image)
    places: list[tuple[str, tuple[float, float]]]  # (a phrase naming one object, its centre (x, y) in [-1, 1], y down)


def matching_examples(scene: Scene, image_size: int, rnd: random.Random, relation_fraction: float = 0.5,
                      exclude: Sequence[tuple[str, str]] = (), axis_negatives: bool = False) -> MatchingExamples:
    """What a matching head learns to tell apart on one image (`MatchingExamples`):

    * a description that states where things are (`relation_description`) with probability ``relation_fraction``,
      else one that names every object (the ``complete`` templates), with its `false_statements` (of a renamed
      colour and a renamed shape, one);
    * a correct partial description, as people write them, with the same plus one misnamed object (`misnamed_pair`)
      and its inverted-relation and exchanged-objects statements: a true caption that leaves objects out is still true;
    * on a multi-object image, two objects joined by "and" with the same two in a false relation ("a red circle and a
      blue square" against "a red circle below a blue square"): saying less is true, saying where wrongly is false, so
      a reward that pays for stating a relation (``preference_relations``) can be kept from paying for a false one;
    * where each object is ("red circle" and its centre): the grounding that teaches the head to look at the object
      a phrase names before it compares positions.

    With ``axis_negatives``, every group whose true caption states a relation also holds that relation moved to the
    other axis (`wrong_axis_statement`), so that the head does not pay for "above" when the objects lie mostly side by
    side. Without it the draws are exactly those of earlier versions."""
    if rnd.random() < relation_fraction:
        true = relation_description(scene, image_size, rnd)
    elif len(scene.objects) == 1:
        true = rnd.choice(_captions_one(scene.objects[0], image_size))
    else:  # every object, a random template and order (most of them state a relation too)
        template = _template_two if len(scene.objects) == 2 else _template_three
        true = template(rnd.randrange(NUM_REFERENCES), *rnd.sample(scene.objects, len(scene.objects)))
    false = false_statements(true, scene, rnd, exclude)
    if "colour" in false and "shape" in false:  # one renamed object is enough: the dual encoder tells those apart (~0.99)
        del false[rnd.choice(("colour", "shape"))]
    axis = (lambda caption: [w] if axis_negatives and (w := wrong_axis_statement(caption, scene)) else [])  # noqa: E731
    groups = [(true, list(false.values()) + axis(true))]
    partial, misnamed = misnamed_pair(scene, image_size, rnd, exclude)
    false = false_statements(partial, scene, rnd, exclude)
    groups.append((partial, [misnamed, *(false[k] for k in ("relation", "exchange") if k in false), *axis(partial)]))
    if len(scene.objects) > 1:  # two objects joined by "and" are true, the same two with a false relation are not
        related, joined = relation_and_pair(scene, rnd)
        groups.append((joined, [false_statements(related, scene, rnd)["relation"], *axis(related)]))
    places = [(f"{o.colour} {o.shape}", _centre(o, image_size)) for o in scene.objects]
    return MatchingExamples(groups, places)

# ------------------------------------------------------------------------------------ grammar
def _grammar() -> tuple["re.Pattern[str]", ...]:
    """One compiled pattern per caption template (+ the label form), over space-separated words.

    Noun phrases carry named groups ``c<i>`` / ``s<i>`` (colour, shape) so `is_grammatical` can check
    that one caption never names the same object twice, as the generator never does."""
    vowel = [c for c in COLOURS if c[0] in "aeiou"]
    consonant = [c for c in COLOURS if c[0] not in "aeiou"]
    shape = "|".join(SHAPES)
    size = "|".join(SIZES)
    counter = iter(range(10**6))

    def np_(sized: bool) -> str:
        i = next(counter)
        if sized:
            return f"a (?:{size}) (?P<c{i}>{'|'.join(COLOURS)}) (?P<s{i}>{shape})"
        return f"(?:a (?P<c{i}>{'|'.join(consonant)})|an (?P<c{i}x>{'|'.join(vowel)})) (?P<s{i}>{shape})"

    rel = "(?:above|below|left of|right of)"
    alt = "(?:over|under|to the left of|to the right of)"
    region = "(?:in the (?:top|bottom) (?:left|right)|at the (?:top|bottom)|on the (?:left|right)|in the middle)"
    colour = "|".join(COLOURS)
    templates = [
        lambda: f"{np_(True)}",
        lambda: f"there is {np_(False)}",
        lambda: f"there is {np_(True)} {region}",
        lambda: f"an image with {np_(True)}",
        lambda: f"a picture of {np_(False)} {region}",
        lambda: f"{np_(False)} on a dark background",
        lambda: f"a single (?:{size}) (?:{colour}) (?:{shape})",
        lambda: f"one (?:{colour}) (?:{shape}) {region}",
        lambda: f"{np_(True)} {rel} {np_(True)}",
        lambda: f"there is {np_(False)} {alt} {np_(False)}",
        lambda: f"{np_(False)} {rel} {np_(False)}",
        lambda: f"an image with {np_(False)} and {np_(False)}",
        lambda: f"{np_(True)} and {np_(True)}",
        lambda: f"{np_(False)} {rel} {np_(False)} and {np_(False)}",
        lambda: f"{np_(True)} , {np_(True)} and {np_(True)}",
        lambda: f"an image with {np_(False)} , {np_(False)} and {np_(False)}",
        lambda: (lambda a, b, c: f"{a} {rel} {b} and {c} {rel} the (?P<cref>{colour}) (?P<sref>{shape})")(
            np_(False), np_(False), np_(False)),
        lambda: f"there is {np_(False)} and {np_(False)} {alt} {np_(False)}",
        lambda: f"(?:{colour}) (?:{shape})",  # label-only examples ("red circle")
    ]
    return tuple(re.compile(t() + r"\Z") for t in templates)


_GRAMMAR = _grammar()


def is_grammatical(text: str) -> bool:
    """True when ``text`` is a caption the shapes caption grammar produces: one of the reference
    templates (1, 2 or 3 objects, either reference style) or a label, with the right articles
    ("an orange", "a large"), no object named twice, and the "... the <colour> <shape>" of the
    longest template referring back to its second object. Whitespace and case are normalised."""
    words = " ".join(text.lower().split())
    for pattern in _GRAMMAR:
        m = pattern.match(words)
        if m is None:
            continue
        groups = m.groupdict()
        named = [((groups[k] or groups.get(k + "x")), groups["s" + k[1:]]) for k in groups
                 if re.fullmatch(r"c\d+", k)]
        if len(set(named)) != len(named):
            continue
        if groups.get("cref") is not None and (groups["cref"], groups["sref"]) != named[1]:
            continue
        return True
    return False


# ---------------------------------------------------------------------------------- rendering
def _allowed_combos(held_out: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    held = set(held_out)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]


def _shape_alpha(shape: str, r: int, supersample: int = 4) -> np.ndarray:
    """Antialiased coverage mask float32 [2r+1, 2r+1] of ``shape`` with radius ``r``."""
    n = (2 * r + 1) * supersample
    t = (np.arange(n) + 0.5) / supersample - (r + 0.5)  # pixel units from the centre
    u, v = np.meshgrid(t, t)  # u: x (right), v: y (down)
    if shape == "circle":
        m = u**2 + v**2 <= r**2
    elif shape == "square":
        m = np.maximum(abs(u), abs(v)) <= 0.82 * r
    elif shape == "diamond":
        m = abs(u) + abs(v) <= 1.05 * r
    elif shape == "triangle":  # apex up, vertices (0, -r), (+-0.95r, 0.75r)
        m = (v <= 0.75 * r) & (abs(u) <= 0.95 * r * (v + r) / (1.75 * r))
    elif shape == "cross":
        arm = 0.34 * r
        m = ((abs(u) <= arm) & (abs(v) <= r)) | ((abs(v) <= arm) & (abs(u) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = m.astype(np.float32).reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean(axis=(1, 3))
    return a


def _draw_radii(rng: np.random.Generator, shape: tuple[int, int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Size word index [n, k] (0 small, 1 large) and radius in pixels [n, k]."""
    size_idx = rng.integers(0, 2, size=shape)
    lo = np.array([_RADIUS_FRACTION[s][0] for s in SIZES])[size_idx]
    hi = np.array([_RADIUS_FRACTION[s][1] for s in SIZES])[size_idx]
    radii = np.maximum(2, np.rint(size * rng.uniform(lo, hi))).astype(np.int64)
    return size_idx, radii


def _place(
    rng: np.random.Generator, radii: np.ndarray, present: np.ndarray, size: int, tries: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer centres [N, k] by vectorised rejection sampling (inside the image, shapes apart,
    every pair dominant on one axis), plus a bool [N] of the rows not placed within ``tries``."""
    n, k = radii.shape
    xs = np.zeros((n, k), dtype=np.int64)
    ys = np.zeros((n, k), dtype=np.int64)
    todo = np.arange(n)
    for _ in range(tries):
        if todo.size == 0:
            break
        r = radii[todo]
        lo, hi = r + 1, size - 1 - r  # the mask [c-r, c+r] stays inside [0, size-1]
        xs[todo] = rng.integers(lo, hi)
        ys[todo] = rng.integers(lo, hi)
        ok = np.ones(todo.size, dtype=bool)
        p = present[todo]
        for i in range(k):
            for j in range(i + 1, k):
                dx = np.abs(xs[todo, i] - xs[todo, j]).astype(np.float64)
                dy = np.abs(ys[todo, i] - ys[todo, j]).astype(np.float64)
                far = dx**2 + dy**2 >= (_EXTENT * (r[:, i] + r[:, j]) + _MIN_GAP) ** 2
                clear = np.maximum(dx, dy) >= _DOMINANCE * np.minimum(dx, dy)
                ok &= ~(p[:, i] & p[:, j]) | (far & clear)
        todo = todo[~ok]
    failed = np.zeros(n, dtype=bool)
    failed[todo] = True
    return xs, ys, failed


def _layout(
    rng: np.random.Generator, present: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sizes, radii and centres for every image. An image whose objects do not fit after 50
    tries gets its sizes redrawn (crowded images lean slightly towards small objects)."""
    n, k = present.shape
    size_idx, radii = _draw_radii(rng, (n, k), size)
    xs, ys, failed = _place(rng, radii, present, size)
    for _ in range(100):
        if not failed.any():
            return size_idx, radii, xs, ys
        rows = np.flatnonzero(failed)
        size_idx[rows], radii[rows] = _draw_radii(rng, (rows.size, k), size)
        xs[rows], ys[rows], again = _place(rng, radii[rows], present[rows], size)
        failed[:] = False
        failed[rows[again]] = True
    raise RuntimeError(f"could not place the objects of {int(failed.sum())} images in {size}x{size} pixels")


def _render(
    rng: np.random.Generator,
    n: int,
    cfg: ShapesConfig,
    combos: np.ndarray,
    counts: np.ndarray,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[list[SceneObject]]]:
    """Draw sizes, positions and pixels for ``n`` images with the given combos [n, 3] (indices
    into the 30 colour–shape pairs, -1 where absent) and object counts [n]; the pixels go into
    ``out`` [n, size, size, 3] when given (saves a copy of the train array)."""
    size = cfg.image_size
    k = combos.shape[1]
    present = np.arange(k)[None, :] < counts[:, None]
    size_idx, radii, xs, ys = _layout(rng, present, size)

    # Dark, slightly tinted backgrounds with fixed-pattern noise: 32 tints x 8 noise patterns
    # = 256 tiles, drawn per image by a plain gather (a per-image broadcast add is 10x slower).
    tints = rng.integers(15, 50, size=(32, 1, 1, 1, 1)) + rng.integers(-5, 6, size=(32, 1, 1, 1, 3))
    noise = np.rint(rng.normal(0.0, 4.0, size=(1, 8, size, size, 1)))
    tiles = np.clip(tints + noise, 0, 255).astype(np.uint8).reshape(-1, size, size, 3)
    images = np.take(tiles, rng.integers(0, len(tiles), size=n), axis=0, out=out)  # [n, size, size, 3]

    all_combos = [(c, s) for c in COLOURS for s in SHAPES]
    palette = np.array([COLOURS[c] for c, _ in all_combos], dtype=np.float32)
    jitter = rng.integers(-12, 13, size=(n, k, 3)).astype(np.float32)
    rgb = np.clip(palette[np.maximum(combos, 0)] + jitter, 0, 255)  # [n, k, 3]
    shape_idx = np.where(present, np.maximum(combos, 0) % len(SHAPES), -1)
    pixels = images.reshape(-1, 3)  # a view: writes land in `images`
    # Blend one (object slot, shape, radius) group at a time: a gather, a blend and a scatter
    # over all images of the group. Slots are drawn in order, so later objects are on top.
    for j in range(k):
        for s_i, shape in enumerate(SHAPES):
            sel = shape_idx[:, j] == s_i
            for r in np.unique(radii[sel, j]):
                rows = np.flatnonzero(sel & (radii[:, j] == r))
                r = int(r)
                a = _shape_alpha(shape, r)[None, :, :, None]  # [1, 2r+1, 2r+1, 1]
                off = np.arange(-r, r + 1)
                box = off[:, None] * size + off[None, :]  # [2r+1, 2r+1] pixel offsets
                centre = (rows * size + ys[rows, j]) * size + xs[rows, j]
                lin = centre[:, None, None] + box[None]  # [g, 2r+1, 2r+1] flat pixel index
                patch = pixels[lin]  # [g, 2r+1, 2r+1, 3]
                col = rgb[rows, j][:, None, None, :]
                pixels[lin] = (patch * (1.0 - a) + col * a + 0.5).astype(np.uint8)

    objects: list[list[SceneObject]] = []
    for i in range(n):
        objects.append(
            [
                SceneObject(
                    shape=all_combos[combos[i, j]][1],
                    colour=all_combos[combos[i, j]][0],
                    size=SIZES[size_idx[i, j]],
                    x=int(xs[i, j]),
                    y=int(ys[i, j]),
                    radius=int(radii[i, j]),
                )
                for j in range(int(counts[i]))
            ]
        )
    return images, objects


def _draw_combos(
    rng: np.random.Generator, n: int, cfg: ShapesConfig, novel: bool, max_objects: int
) -> tuple[np.ndarray, np.ndarray]:
    """Object counts [n] and distinct combo indices [n, max_objects] (-1 where absent)."""
    all_combos = [(c, s) for c in COLOURS for s in SHAPES]
    held = np.array([all_combos.index(h) for h in cfg.held_out])
    counts = rng.integers(1, max_objects + 1, size=n)
    keys = rng.random((n, len(all_combos)))
    if novel:
        # Force one held-out combo per image (lowest key), the others from all 30 combos.
        forced = held[rng.integers(0, len(held), size=n)]
        keys[np.arange(n), forced] = -1.0
    else:
        keys[:, held] = np.inf  # never drawn
    combos = np.argsort(keys, axis=1, kind="stable")[:, :max_objects]
    # Shuffle object order within each image so the forced combo is not always first.
    order_keys = np.where(np.arange(max_objects)[None, :] < counts[:, None], rng.random((n, max_objects)), np.inf)
    combos = np.take_along_axis(combos, np.argsort(order_keys, axis=1, kind="stable"), axis=1)
    combos = np.where(np.arange(max_objects)[None, :] < counts[:, None], combos, -1)
    return counts, combos


def _generate_split(
    rng: np.random.Generator,
    n: int,
    cfg: ShapesConfig,
    name: str,
    novel: bool = False,
    label: bool = False,
    out: np.ndarray | None = None,
) -> CaptionSplit:
    max_objects = 1 if label else cfg.max_objects
    counts, combos = _draw_combos(rng, n, cfg, novel, max_objects)
    images, objects = _render(rng, n, cfg, combos, counts, out)
    rnd = random.Random(int(rng.integers(0, 2**63)))
    if label:
        captions = [[f"{objs[0].colour} {objs[0].shape}"] for objs in objects]
    else:
        write = _salient_captions if cfg.references == "salient" else _captions
        captions = [write(objs, cfg.image_size, rnd) for objs in objects]
    return CaptionSplit(
        images=images,
        captions=captions,
        scenes=[Scene.from_objects(objs) for objs in objects],
        image_ids=[f"{name}-{i:06d}" for i in range(n)],
        is_label=np.full(n, label, dtype=bool),
    )


def _concat(a: CaptionSplit, b: CaptionSplit, images: np.ndarray) -> CaptionSplit:
    """``a`` then ``b``, whose images were already rendered into ``images``."""
    return CaptionSplit(
        images=images,
        captions=a.captions + b.captions,
        scenes=(a.scenes or []) + (b.scenes or []),
        image_ids=list(a.image_ids) + list(b.image_ids),
        is_label=np.concatenate([a.is_label, b.is_label]),
    )


def generate_shapes(cfg: ShapesConfig | None = None) -> dict[str, CaptionSplit]:
    """Generate the splits ``train`` (captioned images, then the label-only examples), ``val``,
    ``test`` (i.i.d. with train) and ``test_novel`` (each image has a held-out combination)."""
    cfg = cfg or ShapesConfig()
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    num_label = int(round(cfg.label_fraction * cfg.num_train))
    size = cfg.image_size
    images = np.empty((cfg.num_train + num_label, size, size, 3), dtype=np.uint8)
    train = _generate_split(streams[0], cfg.num_train, cfg, "train", out=images[: cfg.num_train])
    if num_label > 0:
        label = _generate_split(streams[4], num_label, cfg, "train-label", label=True, out=images[cfg.num_train :])
        train = _concat(train, label, images)
    return {
        "train": train,
        "val": _generate_split(streams[1], cfg.num_val, cfg, "val"),
        "test": _generate_split(streams[2], cfg.num_test, cfg, "test"),
        "test_novel": _generate_split(streams[3], cfg.num_test_novel, cfg, "test_novel", novel=True),
    }
