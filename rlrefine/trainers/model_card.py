"""Model cards: every saved model directory says where it came from (a generated README.md).

Where it sits: ``trainers`` (it reads the recipe); the captioner writes the card text it is given in
`save_pretrained`, so the card is part of the atomic save. A card holds: what the model is, the
rlrefine version and git commit (when the code runs from a git checkout; nothing when not), the
resolved recipe, and, once the model has been evaluated (`rlrefine evaluate` / the report stage),
its metrics between the ``METRICS_BEGIN`` / ``METRICS_END`` markers, replaced on each evaluation.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import yaml

CARD_NAME = "README.md"
METRICS_BEGIN = "<!-- metrics: written by the evaluation, replaced on every evaluation -->"
METRICS_END = "<!-- /metrics -->"


def package_version() -> str:
    """The installed rlrefine version ("unknown" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlrefine")
    except PackageNotFoundError:
        return "unknown"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding `path` (default: this package), "+dirty" when it has
    uncommitted changes; None when it is not a git checkout or git is missing."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True,
                               text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def metrics_block(metrics_md: str | None) -> str:
    body = metrics_md.strip() if metrics_md else "Not evaluated yet (`rlrefine evaluate --model <this dir>` fills this in)."
    return f"{METRICS_BEGIN}\n## Evaluation\n\n{body}\n{METRICS_END}"


def render_model_card(title: str, what: str, cfg=None, metrics_md: str | None = None) -> str:
    """The card's Markdown: title, description, provenance, metrics block, resolved recipe."""
    commit = git_commit()
    lines = [
        f"# {title}",
        "",
        what,
        "",
        f"* rlrefine {package_version()}, git commit {commit or 'unknown (not run from a git checkout)'}",
        f"* written {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        metrics_block(metrics_md),
        "",
    ]
    if cfg is not None:
        recipe = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        lines += ["## Recipe (resolved, every default filled in)", "", "```yaml", recipe.rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, title: str, what: str, cfg=None, metrics_md: str | None = None) -> Path:
    """Write (or overwrite) `<directory>/README.md`."""
    path = Path(directory) / CARD_NAME
    path.write_text(render_model_card(title, what, cfg, metrics_md))
    return path


def set_card_metrics(directory: str | Path, metrics_md: str) -> Path:
    """Put `metrics_md` into the card's metrics block (a card is created when there is none)."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return write_model_card(directory, Path(directory).name, "A model directory written by rlrefine.", None, metrics_md)
    text = path.read_text()
    start, end = text.find(METRICS_BEGIN), text.find(METRICS_END)
    if start < 0 or end < 0:
        text = text.rstrip() + "\n\n" + metrics_block(metrics_md) + "\n"
    else:
        text = text[:start] + metrics_block(metrics_md) + text[end + len(METRICS_END):]
    path.write_text(text)
    return path


def scalars_table(metrics: dict) -> str:
    """A two-column Markdown table of a report's scalar entries."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in rows])
