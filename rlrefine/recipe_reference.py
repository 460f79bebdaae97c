"""The recipe reference, generated from the schema in `rlrefine.config` (so it cannot drift from it).

Where it sits: beside `rlrefine.config`, used by the `rlrefine config` command:

    rlrefine config recipes/tiny.yaml [key=value ...]   # the resolved recipe, every default, each key described
    rlrefine config --markdown > docs/recipe.md         # the reference page (a test checks it is current)

Descriptions come from the pydantic `Field(description=...)` of each key, a section's docstring for
the section itself, and for the dataclass sections shared with the `rewards` package
(`EvaluatorConfig`, `DistillConfig`) from `field(metadata={"help": ...})` or the field's trailing
`# comment` in its source.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rlrefine.config import RecipeConfig

REGENERATE = "rlrefine config --markdown > docs/recipe.md"


# --------------------------------------------------------------------------------- the schema
@dataclasses.dataclass
class KeyDoc:
    name: str
    annotation: Any
    default: Any  # PydanticUndefined when required
    description: str


def _doc_first_paragraph(cls) -> str:
    """The first paragraph of a class's own docstring ("" when it only inherits one)."""
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _dataclass_comments(cls) -> dict[str, str]:
    """Trailing `# comments` of a dataclass's field lines (or of their continuation lines); a subclass's own
    comments win over those of the classes it inherits fields from."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    return out


def _own_comments(cls) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    current = None
    body = source.splitlines()
    body = body[next((i for i, ln in enumerate(body) if ln.startswith("class ")), 0) + 1:]
    for line in body:
        m = re.match(r"^    (\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not line.strip().startswith("#"):
            current = m.group(1)
            if m.group(2):
                out[current] = m.group(2).strip()
        elif current and "#" in line and not line.strip().startswith("#") and current not in out:
            out[current] = line.split("#", 1)[1].strip()
        elif line.strip().startswith(("def ", "@")):
            break
    return out


def section_keys(cls) -> list[KeyDoc]:
    """Every key of a section class (pydantic model or dataclass), in definition order."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        docs = []
        for name, f in cls.model_fields.items():
            default = f.get_default(call_default_factory=True) if not f.is_required() else PydanticUndefined
            docs.append(KeyDoc(name, f.annotation, default, f.description or ""))
        return docs
    hints = typing.get_type_hints(cls)
    comments = _dataclass_comments(cls)
    docs = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = PydanticUndefined
        docs.append(KeyDoc(f.name, hints.get(f.name), default, f.metadata.get("help") or comments.get(f.name, "")))
    return docs


def _is_section(cls) -> bool:
    return isinstance(cls, type) and (issubclass(cls, BaseModel) or dataclasses.is_dataclass(cls))


def section_class(annotation) -> tuple[type | None, str]:
    """(section class, container) an annotation holds: container is "" (the section itself or
    Optional of it), "list" (list of sections) or "dict" (name -> section)."""
    if _is_section(annotation):
        return annotation, ""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args and _is_section(args[0]):
        return args[0], "list"
    if origin is dict and len(args) == 2 and _is_section(args[1]):
        return args[1], "dict"
    for a in args:  # Optional[Section]
        if _is_section(a):
            return a, ""
    return None, ""


def type_name(annotation) -> str:
    """`Literal['a', 'b']` -> "a | b", `int | None` -> "int or null", `list[int]` -> "list[int]"."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in rest) + " or null"
    if origin in (typing.Union,) or type(annotation).__name__ == "UnionType":
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is Ellipsis:
        return "..."
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _plain(value) -> Any:
    """JSON-like plain data of a value (sections dumped, tuples as lists)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flow_yaml(value) -> str:
    """One-line YAML of a value: `[1, 2]`, `{kind: learned}`, `null`, `runs/tiny`."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") and "\n" in text else text


# --------------------------------------------------------------------- `rlrefine config RECIPE`
def annotated_yaml(cfg: RecipeConfig, comment_column: int = 44) -> str:
    """The resolved recipe as YAML, every key with its value (defaults filled in) and its description
    as a comment. Loading the YAML back gives the same recipe."""
    rows: list[tuple[str, str]] = []

    def walk(values: dict, cls, indent: int) -> None:
        pad = " " * indent
        for key in section_keys(cls):
            value = values.get(key.name)
            sub, container = section_class(key.annotation)
            if sub is not None and container == "" and isinstance(value, dict):
                rows.append((f"{pad}{key.name}:", key.description or _doc_first_paragraph(sub)))
                walk(value, sub, indent + 2)
            elif sub is not None and container == "dict" and isinstance(value, dict) and value:
                rows.append((f"{pad}{key.name}:", key.description))
                for name, item in value.items():
                    rows.append((f"{pad}  {name}:", ""))
                    walk(item, sub, indent + 4)
            else:
                rows.append((f"{pad}{key.name}: {flow_yaml(value)}", key.description or (_doc_first_paragraph(sub) if sub else "")))
        declared = {key.name for key in section_keys(cls)}
        for name, item in values.items():  # a section's free-form entries (compare's variants)
            if name not in declared:
                rows.append((f"{pad}{name}: {flow_yaml(item)}", ""))

    walk(cfg.model_dump(mode="json"), RecipeConfig, 0)
    lines = []
    for text, comment in rows:
        if comment:
            text = text.ljust(comment_column) + "  # " + comment if len(text) < comment_column else text + "  # " + comment
        lines.append(text)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- docs/recipe.md
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_reference() -> str:
    """docs/recipe.md: one table per section (key, type, default, description), from the schema."""
    out = [
        "# Recipe reference",
        "",
        f"Generated from the schema in `rlrefine/config.py`; regenerate with `{REGENERATE}` (a test fails when",
        "this page is out of date). `rlrefine config RECIPE [key=value ...]` prints a recipe resolved, with every",
        "default and these descriptions as comments. Unknown keys are errors at every level; overrides use",
        "dotted keys (`finetune.reward.kind=cider`) and YAML values (`'compare.x={method: scst}'`).",
        "",
    ]
    from rlrefine.config import RewardSection, RewardTerm

    # Sections used under several keys are documented once, under a name of their own.
    shared = {RewardSection: "reward", RewardTerm: "reward.terms[]"}
    documented: dict[type, str] = dict(shared)

    def section(cls, path: str) -> None:
        documented[cls] = path
        title = f"`{path}`" if path else "Top level"
        out.extend([f"## {title}", ""])
        doc = cls.__dict__.get("__doc__") or ""
        if doc:
            out.extend(["\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n")), ""])
        if cls in shared:
            out.extend(["Used by `finetune.reward`, `distill.teacher`, `distill.image_tower`, `evaluate.evaluator`, "
                        "`evaluate.extra_rewards.<name>`, `compare.<name>.reward` and the terms of a `sum`." if path == "reward" else
                        "An item of `terms` (a `sum` reward).", ""])
        out.extend(["| key | type | default | description |", "|---|---|---|---|"])
        nested = []
        for key in section_keys(cls):
            sub, container = section_class(key.annotation)
            dotted = f"{path}.{key.name}" if path else key.name
            if sub is not None:
                where = documented.get(sub) if sub in documented else (dotted + {"": "", "list": "[]", "dict": ".<name>"}[container])
                kind = {"": "section", "list": "list of sections", "dict": "name -> section"}[container]
                default = "" if container == "" else flow_yaml(key.default)
                if container == "" and isinstance(key.default, BaseModel):
                    changed = {k: v for k, v in key.default.model_dump(mode="json").items()
                               if v != type(key.default)().model_dump(mode="json").get(k)} if _all_defaults(type(key.default)) else {}
                    default = flow_yaml(changed) if changed else ""
                desc = key.description or _doc_first_paragraph(sub)
                out.append(f"| `{key.name}` | {kind} (see `{where}`) | {_cell(default)} | {_cell(desc)} |")
                if sub not in documented and sub not in [s for s, _ in nested]:
                    nested.append((sub, where))
            else:
                default = "required" if key.default is PydanticUndefined else f"`{flow_yaml(key.default)}`"
                out.append(f"| `{key.name}` | {_cell(type_name(key.annotation))} | {_cell(default)} | {_cell(key.description)} |")
        out.append("")
        for sub, where in nested:
            if sub not in documented:
                section(sub, where)

    section(RecipeConfig, "")
    for cls, path in shared.items():
        documented.pop(cls)
        section(cls, path)
    return "\n".join(out).rstrip() + "\n"


def _all_defaults(cls) -> bool:
    """True when a section class can be built with no arguments (every key has a default)."""
    try:
        cls()
        return True
    except Exception:  # noqa: BLE001
        return False
