"""The `rlrefine` command line: one command per job, each reading a recipe.

    rlrefine run recipes/tiny.yaml                      # the whole pipeline, stages skipped when done
    rlrefine run recipes/coco_vitb32.yaml --dry-run paths.images=...   # check a setup, project the run
    rlrefine pretrain --config recipes/tiny.yaml pretrain.steps=200
    rlrefine config recipes/tiny.yaml [key=value ...]  # the resolved recipe, every key described
    rlrefine <command> --help                           # what a command does and its options

Every command takes `--config RECIPE` plus `dotted.key=value` overrides, validates the recipe before
anything heavy starts, and writes into the recipe's `run_dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rlrefine.config import RecipeConfig, RecipeError, load_recipe
from rlrefine.data.images import BadImageError
from rlrefine.methods import METHODS
from rewards.custom import RewardTargetError

log = logging.getLogger("rlrefine")

OVERRIDES_HELP = "recipe overrides as dotted.key=value, e.g. pretrain.steps=200 model.num_refine_layers=6"


def _pretrain(args, cfg: RecipeConfig) -> None:
    from rlrefine.trainers.pretrain import pretrain

    if cfg.model.encoder.kind == "evaluator" and not (cfg.run_path / "evaluator" / "open_clip_config.json").is_file():
        from rlrefine.trainers.evaluator import train_evaluator_stage

        log.info("model.encoder.kind is 'evaluator' and %s has none yet: training the evaluator first "
                 "(the train-evaluator stage)", cfg.run_path / "evaluator")
        train_evaluator_stage(cfg)
    pretrain(cfg, resume=args.resume)


def _finetune(args, cfg: RecipeConfig) -> None:
    from rlrefine.trainers.finetune import finetune

    finetune(cfg, resume=args.resume)


def _evaluate(args, cfg: RecipeConfig) -> None:
    from rlrefine.inference import default_model_dir
    from rlrefine.report import evaluate_checkpoint

    model_dir = Path(args.model) if args.model else default_model_dir(cfg)
    out_dir = Path(args.out) if args.out else cfg.run_path / "eval" / model_dir.parent.name
    result = evaluate_checkpoint(cfg, model_dir, model_dir.parent.name, out_dir, reference_dir=cfg.run_path / "pretrain" / "model")
    from rlrefine.evaluate import markdown_table

    print(markdown_table(result))
    print(f"written: {out_dir}/metrics.json, metrics.md, metrics.png")


def _caption(args, cfg: RecipeConfig) -> None:
    from rlrefine.inference import caption_folder, default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir(cfg)
    if args.layer in ("final", "all"):
        layers = None if args.layer == "final" else "all"
    else:
        try:
            layers = [int(x) for x in args.layer.split(",")]
        except ValueError:
            raise RecipeError(f"--layer '{args.layer}' is not an index, a comma list of indices, 'final' or 'all'") from None
    result = caption_folder(model_dir, Path(args.images), layers=layers, method=args.method, beams=args.beams,
                            image_size=cfg.data.image_size, max_len=cfg.finetune.max_len, bad_image=cfg.data.bad_image)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def _report(args, cfg: RecipeConfig) -> None:
    from rlrefine.report import report

    print(report(cfg))


def _run(args, cfg: RecipeConfig) -> None:
    from rlrefine.pipeline import run_pipeline

    run_pipeline(cfg, force=args.force, resume=args.resume)


def _config(args) -> int:
    from rlrefine.recipe_reference import annotated_yaml, markdown_reference

    if args.markdown:
        print(markdown_reference(), end="")
        return 0
    recipe, overrides = args.config, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).is_file():  # `rlrefine config key=value` (no recipe)
        recipe, overrides = None, [recipe, *overrides]
    print(annotated_yaml(load_recipe(recipe, overrides)), end="")
    return 0


def _train_evaluator(args, cfg: RecipeConfig) -> None:
    from rlrefine.trainers.evaluator import train_evaluator_stage

    train_evaluator_stage(cfg, resume=args.resume)


def _distill(args, cfg: RecipeConfig) -> None:
    from rlrefine.trainers.distill import distill_stage

    distill_stage(cfg, resume=args.resume, name=args.student)


COMMANDS = {
    "train-evaluator": (
        _train_evaluator, "train the learned CLIP-style evaluator (the teacher reward) on the recipe's data",
        "Trains a small open_clip dual encoder contrastively with hard negatives (attribute-swapped captions, captions "
        "of nearest images). Writes <run_dir>/evaluator (open_clip-loadable) and report.json with the "
        "swap accuracy (true caption preferred over one with a colour/shape swapped) and retrieval R@1; --resume "
        "continues a killed run from its last checkpoint.",
    ),
    "pretrain": (
        _pretrain, "teacher-forced (XE) pretraining of the refinement captioner",
        "Trains every refinement layer to caption the image (layer-weighted cross-entropy) with the latent "
        "graduality regulariser. Writes <run_dir>/pretrain/model (the captioner), report.json "
        "(per-layer val/test cross-entropy and grounded accuracy), TensorBoard logs (tensorboard --logdir <run_dir>) "
        "and checkpoints. With model.encoder.kind=evaluator (the embedded default) the run's learned evaluator "
        "is trained first when <run_dir>/evaluator does not exist yet.",
    ),
    "distill-reward": (
        _distill, "distil the teacher reward into a compact student that scores every layer's candidates",
        "Trains a small student (distill.student_kind: dual, both towers; text, an open_clip image tower kept and a small "
        "text tower) on references, the pretrained captioner's candidates from every layer and mined hard pairs "
        "(regression + listwise KL + hard-negative margin / text-embedding match). Writes <run_dir>/distill (--student "
        "NAME: the named student distill.extra_students.NAME, to <run_dir>/distill_NAME) and report.json with Spearman / "
        "Kendall vs the teacher, argmax and decision agreement and pairs/s of student vs teacher; --resume continues a "
        "killed run from its last checkpoint.",
    ),
    "finetune": (
        _finetune, f"fine-tuning with the reward at every refinement layer (finetune.method: {', '.join(METHODS)})",
        "Starts from <run_dir>/pretrain/model (finetune.init), generates n candidates per image at every layer as the "
        "method draws them, scores them with finetune.reward (default: the distilled student), shapes the rewards for "
        "graduality and length, and optimises the method's loss anchored to the frozen pretrained model. Writes "
        "<run_dir>/<finetune.output>/model, report.json and TensorBoard logs.",
    ),
    "evaluate": (
        _evaluate, "per-layer metrics, graduality G, layer score P and refinement score RS of a checkpoint",
        "Evaluates a captioner (--model DIR, default: the recipe's first fine-tuned variant) on evaluate.split at every "
        "layer: BLEU-4, ROUGE-L, CIDEr-D, the evaluator's score, text statistics, grounded accuracy (shapes), progress "
        "curves and G / P / RS. Writes metrics.json, metrics.md, metrics.png and captions_<split>.jsonl.",
    ),
    "caption": (
        _caption, "caption a folder of images at a chosen layer (or every layer) and print / write JSON",
        "Loads a captioner (--model DIR, default: the recipe's first fine-tuned variant) and captions every image in --images "
        "at --layer (e.g. 4, or 1,2,4, or all; default: the final layer K), greedy or beam search. Prints JSON "
        "{image file: {layer: caption}} and writes it to --out if given.",
    ),
    "report": (
        _report, "evaluate XE and every fine-tuned variant of the recipe side by side",
        "Writes <run_dir>/report/compare.md (the XE vs SCST vs DiCO table), compare.json and compare.png.",
    ),
}


def _add_dry_run(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dry-run", action="store_true", help=what)
    p.add_argument("--dry-run-batch", default="auto", metavar="N|full|auto",
                   help="batch size of the dry run's steps: auto (default) = the recipe's batch sizes where there is a GPU, "
                        "2 images on a CPU (s/step is scaled to the recipe's batch); full = the recipe's; N = at most N")


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
        description=f"Train refinement captioners and fine-tune them ({', '.join(METHODS)}) with a learned reward at every "
                    "refinement layer. Everything runs offline from local paths.",
        epilog="Start with: rlrefine run recipes/tiny.yaml   (the embedded shapes default, CPU, minutes)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the whole pipeline of a recipe (stages whose output exists are skipped)",
        description="Runs the recipe's stages in order: train-evaluator -> pretrain -> distill-reward -> finetune "
                    "(every `compare` variant) -> report; train-evaluator and distill-reward run only when the recipe "
                    "reads their output. A stage whose output already exists is skipped unless --force "
                    "is given; --resume continues a killed stage from its last checkpoint.",
    )
    _add_common(run, positional_config=True)
    run.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    _add_dry_run(run, "check the setup before a long run: every stage for a few steps on a handful of images per split, "
                          "with your real files and the recipe's real sizes, written only under <run_dir>/dry_run/; ends "
                          "with seconds per step, peak memory per stage and the projected wall time of the full recipe "
                          "(also in dry_run/report.json), or stops at the first broken piece and names it")
    config = sub.add_parser(
        "config", help="print a recipe resolved (every default filled in) with each key's description",
        description="Prints the recipe after overrides as YAML, every key with its value (defaults included) and its "
                    "description as a comment; the output loads back as the same recipe. --markdown prints the "
                    "reference of every key instead (docs/recipe.md is `rlrefine config --markdown > docs/recipe.md`).",
    )
    config.add_argument("config", nargs="?", metavar="RECIPE", help="recipe YAML (default: the built-in defaults)")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    config.add_argument("--markdown", action="store_true", help="print the reference of every recipe key (Markdown)")
    config.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for name, (_, short, long) in COMMANDS.items():
        p = sub.add_parser(name, help=short, description=long)
        _add_common(p)
        if name in DRY_RUN_STAGE:
            _add_dry_run(p, "run the recipe's stages up to this one for a few steps on a handful of images, with your "
                                "real files, under <run_dir>/dry_run/; print seconds per step, peak memory and the "
                                "projected time of the full recipe")
        if name == "caption":
            p.add_argument("--images", required=True, help="folder of images (jpg, png, webp, bmp)")
            p.add_argument("--model", help="captioner directory (default: <run_dir>/finetune_<first variant>/model)")
            p.add_argument("--layer", default="final", help="layer(s) to decode: an index, a comma list, 'final' or 'all'")
            p.add_argument("--method", default="greedy", choices=["greedy", "beam"])
            p.add_argument("--beams", type=int, default=3, help="beam size for --method beam (the best beam is printed)")
            p.add_argument("--out", help="write the JSON here too")
        if name == "distill-reward":
            p.add_argument("--student", metavar="NAME", help="the named student distill.extra_students.NAME (written to "
                                                              "<run_dir>/distill_NAME) instead of <run_dir>/distill")
        if name == "evaluate":
            p.add_argument("--model", help="captioner directory to evaluate (default: <run_dir>/finetune_<first variant>/model)")
            p.add_argument("--out", help="output directory (default: <run_dir>/eval/<model name>)")
    return parser


# the pipeline stage a command's --dry-run runs up to (rlrefine.dry_run)
DRY_RUN_STAGE = {"train-evaluator": "train-evaluator", "pretrain": "pretrain", "distill-reward": "distill-reward",
                 "finetune": "finetune", "evaluate": "report", "report": "report", "run": None}


def _dry_run_batch(value: str) -> int | str | None:
    """--dry-run-batch: "auto", "full" (None: the recipe's sizes) or a positive number of images."""
    if value in ("auto", "full"):
        return "auto" if value == "auto" else None
    if not value.isdigit() or int(value) < 1:
        raise RecipeError(f"--dry-run-batch '{value}' is not 'auto', 'full' or a positive number of images")
    return int(value)


def _dry_run(args, cfg: RecipeConfig) -> None:
    from rlrefine.dry_run import dry_run, format_table

    report = dry_run(cfg, until=DRY_RUN_STAGE[args.command], batch=_dry_run_batch(args.dry_run_batch))
    print(format_table(report))
    print(f"written: {report['dry_run_dir']}/report.json")


# Loggers whose INFO lines are ours; everything else shows warnings and errors only (below DEBUG).
OWN_LOGGERS = ("rlrefine", "rewards", "benchmarks", "__main__")
# Third-party loggers quietened at the source below DEBUG (open_clip logs on the root logger and is
# filtered by the console handler instead).
QUIET_LOGGERS = ("accelerate", "transformers", "torch.distributed", "PIL", "matplotlib", "tensorboard")
# Warnings known to be false for rlrefine's use, dropped below DEBUG:
KNOWN_FALSE_WARNINGS = (
    # accelerate.utils.other, on every checkpoint: the captioner ties its readout embedding and output
    # weights; safetensors stores the tensor once and the tie is restored on load (resume is tested).
    "Removed shared tensor",
)


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is written (captured stderr included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class ConsoleFilter(logging.Filter):
    """The default console: rlrefine's INFO lines, everyone's warnings and errors, minus the
    known false warnings. Third-party INFO (open_clip's "Parsing model identifier...", accelerate's
    "Saving current state...") is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN_LOGGERS
        if not own and record.levelno < logging.WARNING:
            return False
        if record.levelno < logging.ERROR and any(m in record.getMessage() for m in KNOWN_FALSE_WARNINGS):
            return False
        return True


def configure_logging(level: str = "INFO") -> None:
    """One console handler on the root logger, replacing any an earlier call installed.

    At DEBUG everything is shown, third-party lines included; at INFO (the default) and above the
    console keeps rlrefine's own lines and real warnings (`ConsoleFilter`), and the noisiest
    third-party loggers are set to WARNING so their INFO records are not even created.
    """
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_rlrefine_console", False)]:
        root.removeHandler(h)
    handler = _StderrHandler()
    handler._rlrefine_console = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    debug = logging.getLevelName(level) <= logging.DEBUG
    if not debug:
        handler.addFilter(ConsoleFilter())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)
    root.addHandler(handler)
    root.setLevel(level)


def _launch_errors() -> tuple[type[Exception], ...]:
    """`AcceleratorSetupError` once the training loop is imported (evaluated only when an error propagates, so
    commands that train nothing never import accelerate for it)."""
    loop = sys.modules.get("rlrefine.trainers.loop")
    return () if loop is None else (loop.AcceleratorSetupError,)


def main(argv: list[str] | None = None) -> int:
    from rlrefine.dry_run import DryRunError

    parser = build_parser()
    # overrides may also follow an option (`run RECIPE --dry-run paths.images=...`): argparse leaves those over
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    configure_logging(args.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        if args.command == "config":
            return _config(args)
        cfg = load_recipe(args.config, args.overrides)
        if getattr(args, "dry_run", False):
            _dry_run(args, cfg)
        else:
            (_run if args.command == "run" else COMMANDS[args.command][0])(args, cfg)
    except (RecipeError, DryRunError, *_launch_errors()) as exc:
        print(f"rlrefine: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, BadImageError, RewardTargetError) as exc:
        print(f"rlrefine: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
