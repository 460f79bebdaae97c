"""The `rlrefine` command line: one command per job, each reading a recipe.

    rlrefine run recipes/tiny.yaml                      # the whole pipeline, stages skipped when done
    rlrefine pretrain --config recipes/tiny.yaml pretrain.steps=200
    rlrefine <command> --help                           # what a command does and its options

Every command takes `--config RECIPE` plus `dotted.key=value` overrides, validates the recipe before
anything heavy starts, and writes into the recipe's `run_dir`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rlrefine.config import RecipeConfig, RecipeError, load_recipe

log = logging.getLogger("rlrefine")

OVERRIDES_HELP = "recipe overrides as dotted.key=value, e.g. pretrain.steps=200 model.num_refine_layers=6"


# Each stage: (command name, one-line help, long description, output that marks it done, runner).
def _run_pretrain(cfg: RecipeConfig, resume: bool) -> dict:
    from rlrefine.trainers.pretrain import pretrain

    return pretrain(cfg, resume=resume)


STAGES = {
    "pretrain": (
        "teacher-forced (XE) pretraining of the refinement captioner",
        "Trains every refinement layer to caption the image (layer-weighted cross-entropy) with the latent "
        "graduality regulariser (DESIGN.md §2). Writes <run_dir>/pretrain/model (the captioner), "
        "report.json (per-layer val/test cross-entropy and grounded accuracy), TensorBoard logs and checkpoints.",
        "pretrain/model/config.json",
        _run_pretrain,
    ),
}


def _add_common(p: argparse.ArgumentParser, positional_config: bool = False) -> None:
    if positional_config:
        p.add_argument("config", metavar="RECIPE", help="recipe YAML, e.g. recipes/tiny.yaml")
    else:
        p.add_argument("--config", "-c", required=True, metavar="RECIPE", help="recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of the stage")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlrefine",
        description="Train refinement captioners and fine-tune them (DiCO, SCST) with a learned reward at every "
                    "refinement layer. Everything runs offline from local paths.",
        epilog="Start with: rlrefine run recipes/tiny.yaml   (the embedded shapes default, CPU, minutes)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the whole pipeline of a recipe (stages whose output exists are skipped)",
        description="Runs the recipe's stages in order: " + " -> ".join(STAGES) + ". A stage whose output already "
                    "exists is skipped unless --force is given.",
    )
    _add_common(run, positional_config=True)
    run.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    for name, (short, long, _, _) in STAGES.items():
        _add_common(sub.add_parser(name, help=short, description=long))
    return parser


def _stage_done(cfg: RecipeConfig, marker: str) -> bool:
    return (cfg.run_path / marker).exists()


def run_pipeline(cfg: RecipeConfig, force: bool, resume: bool) -> None:
    names = list(STAGES)
    for i, name in enumerate(names, 1):
        _, _, marker, runner = STAGES[name]
        if _stage_done(cfg, marker) and not force:
            log.info("[%d/%d] %s: output %s exists, skipped (use --force to redo)", i, len(names), name, cfg.run_path / marker)
            continue
        log.info("[%d/%d] %s ...", i, len(names), name)
        t0 = time.time()
        runner(cfg, resume)
        log.info("[%d/%d] %s done in %.0f s", i, len(names), name, time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        cfg = load_recipe(args.config, args.overrides)
        if args.command == "run":
            run_pipeline(cfg, force=args.force, resume=args.resume)
        else:
            STAGES[args.command][3](cfg, args.resume)
    except RecipeError as exc:
        print(f"rlrefine: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"rlrefine: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
