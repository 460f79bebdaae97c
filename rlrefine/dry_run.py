"""`rlrefine run RECIPE --dry-run`: every stage of a recipe for a few steps on a handful of images,
with the user's real files, and the projected time and memory of the full run on this hardware.

Where it sits: beside `rlrefine.pipeline`, whose stage functions it runs (the same code a full run
runs, with the recipe's real models, files and settings) on a copy of the recipe that differs only
in what makes it short (`dry_run_config`): `data.max_images` images per split, `steps` optimizer
steps per training stage, no checkpoints or periodic validation, `evaluate.num_images` = the
handful, and the batch sizes capped at `batch`. Everything is written under `<run_dir>/dry_run/`
(wiped first), never into the run itself.

Batch sizes: on a GPU the dry run keeps the recipe's real batch sizes (`batch=None`), so peak
memory is the real one and an out-of-memory error shows up now. On a CPU a real-scale batch can take
many minutes per step (XE at batch 128 with K = 6 and the 49k BPE vocabulary materialises 4.4 GB
of logits; a DiCO step at 8 images, 6 layers × 5 beams, takes minutes on 2 cores), so the batches
are capped at `DRY_RUN_CPU_BATCH` = 2 images, and the seconds per step are scaled linearly to the recipe's batch size (compute-bound CPU time grows about linearly with the
batch; the peak memory columns are the ones measured at the capped batch).

Per stage it measures seconds per step (the mean over the steps after the first, which carries
one-off costs such as allocation), peak RAM (the process's peak resident set, reset before each
stage through /proc/self/clear_refs where Linux offers it) and peak CUDA memory where there is a
GPU. The projection of a training stage is its measured fixed cost (loading data, models and
rewards; saving) plus the recipe's steps × s/step (at the recipe's batch size); of the report, the
fixed cost (loading; METEOR / SPICE start-up) plus the recipe's `evaluate.num_images` × the seconds
per image (the slope between evaluations of the XE model on half and all of the handful), times the
number of models the report compares (all share the XE model's architecture and code path); of a
distill-reward stage (one per student a reward reads), the recipe's steps × s/step plus its setup and
held-out report (the captioner's candidates, the teacher's scores of the pairs), which grow with the
images: scaled from the dry run's handful to the recipe's max(max_images, candidate_images).
train-evaluator has no step hook: its s/step is the stage time over the steps, an upper bound. Not projected: the periodic validations inside training (`eval_every`) and
the end-of-training reports, which run at the dry run's handful of images.

The first broken piece stops the dry run with a `DryRunError` naming the stage and the cause (a
missing file, a checkpoint that does not fit its architecture, a corrupt image, or running out of
memory, with the setting to lower).
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from rlrefine.config import RecipeConfig

log = logging.getLogger(__name__)

__all__ = ["DRY_RUN_IMAGES", "DRY_RUN_STEPS", "DryRunError", "StageResult", "default_batch", "dry_run", "dry_run_config",
           "format_table"]

DRY_RUN_STEPS = 2
"""Optimizer steps per training stage: the first carries one-off costs, the second is timed."""
DRY_RUN_IMAGES = 8
"""Images kept per split."""
DRY_RUN_CPU_BATCH = 2
"""Images per step on a CPU (without a GPU a real-scale step at 8 images takes minutes on 2 cores)."""
_NEVER = 10**9  # an eval / checkpoint interval the dry run never reaches


class DryRunError(RuntimeError):
    """The dry run stopped at a broken piece; the message names the stage and what to fix."""


@dataclass
class StageResult:
    """One row of the dry-run table and of report.json."""

    stage: str
    seconds: float  # wall time of the dry stage
    batch_run: int | None = None  # batch size the dry steps ran at (images per step)
    full_batch: int | None = None  # the recipe's batch size (the projection scales s/step by full / run)
    steps_run: int | None = None  # optimizer steps (training stages) or images per model (report)
    s_per_step: float | None = None  # seconds per step at the recipe's batch size (report: per image and model)
    full_steps: int | None = None  # steps of the full recipe (report: images × models)
    projected_s: float | None = None  # projected wall time of the stage in the full recipe
    peak_ram_gb: float | None = None
    peak_cuda_gb: float | None = None
    note: str = ""


@dataclass
class _StepClock:
    """`on_step_end` hook: the time at the end of every optimizer step."""

    times: list[float] = field(default_factory=list)

    def __call__(self, **_: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def s_per_step(self) -> float | None:
        """Mean seconds per step after the first (None with fewer than two steps)."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


# ------------------------------------------------------------------------------------ the recipe
def dry_run_config(cfg: RecipeConfig, steps: int = DRY_RUN_STEPS, images: int = DRY_RUN_IMAGES,
                   batch: int | None = None) -> RecipeConfig:
    """The recipe as the dry run runs it: same files, models and settings; `images` per split,
    `steps` per training stage, batch sizes capped at `batch` (None: as in the recipe), no
    checkpoints or periodic validation, run_dir = <run_dir>/dry_run."""
    cap = (lambda b: b) if batch is None else (lambda b: min(b, batch))
    d = cfg.model_dump()
    d["run_dir"] = str(cfg.run_path / "dry_run")
    d["data"]["max_images"] = images
    d["pretrain"].update(steps=steps, log_every=1, eval_every=_NEVER, checkpoint_every=_NEVER,
                         num_eval_images=images, num_log_images=min(d["pretrain"]["num_log_images"], images))
    short = dict(steps=steps, log_every=1, eval_every=_NEVER, checkpoint_every=_NEVER, num_eval_images=images)
    d["pretrain"]["batch_size"] = cap(d["pretrain"]["batch_size"])
    d["finetune"].update(short, batch_size=cap(d["finetune"]["batch_size"]))
    d["compare"]["seeds"] = 1  # one run per variant; the projection multiplies by the recipe's seeds
    for name in cfg.compare.variants:
        variant = {**d["compare"][name], **short}
        if "batch_size" in variant:
            variant["batch_size"] = cap(variant["batch_size"])
        d["compare"][name] = variant
    d["evaluator"].update(steps=steps, eval_every=0, eval_max_images=images, batch_size=cap(d["evaluator"]["batch_size"]),
                          preference_steps=min(d["evaluator"]["preference_steps"], steps))
    head = d["evaluator"]["matching_head"]
    head.update(steps=min(head["steps"], steps), batch_size=cap(head["batch_size"]))
    d["distill"] = _short_distill(d["distill"], steps, images, cap)
    for name, overrides in d["distill"]["extra_students"].items():  # a named student: its own sizes, shortened too
        full = cfg.distill.extra(name).model_dump()
        short = _short_distill(full, steps, images, cap)
        d["distill"]["extra_students"][name] = {
            **overrides, "candidate_images": short["candidate_images"],
            "student": {**overrides.get("student", {}), **{k: short["student"][k] for k in _SHORT_STUDENT + _SHORT_HEAD}},
            "text_student": {**overrides.get("text_student", {}), **{k: short["text_student"][k] for k in _SHORT_STUDENT}}}
    d["evaluate"]["num_images"] = images
    return RecipeConfig.model_validate(d)


_SHORT_STUDENT = ("steps", "max_images", "images_per_step", "timing_repeats")
_SHORT_HEAD = ("head_example_images", "matching_head")  # the image student's matching head and its examples


def _short_distill(d: dict, steps: int, images: int, cap: Callable[[int], int]) -> dict:
    """A dumped distill section with both students shortened: `steps` steps on `images` images, the held-out speed
    timed once."""
    d = {**d, "candidate_images": min(d["candidate_images"], images)}
    for key in ("student", "text_student"):
        d[key] = {**d[key], "steps": steps, "max_images": images, "images_per_step": cap(d[key]["images_per_step"]),
                  "timing_repeats": 1}
    head = d["student"]["matching_head"]  # the image student's own matching head (rewards.matching), if on
    d["student"] = {**d["student"], "head_example_images": min(d["student"]["head_example_images"], images),
                    "matching_head": {**head, "steps": min(head["steps"], steps), "batch_size": cap(head["batch_size"])}}
    return d


# ---------------------------------------------------------------------------------------- memory
def _reset_peaks() -> None:
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's lifetime peak (ru_maxrss)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_ram_gb() -> float:
    try:
        with open("/proc/self/status") as f:
            kb = int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1))
    except (OSError, AttributeError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb / 2**20


def _peak_cuda_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


# ---------------------------------------------------------------------------------------- stages
def _memory_setting(stage: str, cfg: RecipeConfig) -> str:
    """The setting to lower when `stage` runs out of memory, with its value."""
    if stage == "pretrain":
        return f"pretrain.batch_size (now {cfg.pretrain.batch_size})"
    if stage.startswith("finetune"):
        f = cfg.finetune
        return f"finetune.batch_size (now {f.batch_size}; or finetune.num_candidates, now {f.num_candidates})"
    if stage == "train-evaluator":
        return f"evaluator.batch_size (now {cfg.evaluator.batch_size})"
    if stage.startswith("distill-reward"):
        name = stage[len("distill-reward["):-1] if stage.endswith("]") else None
        d = cfg.distill if name is None else cfg.distill.extra(name)
        key = ("distill" if name is None else f"distill.extra_students.{name}") + \
            (".text_student" if d.student_kind == "text" else ".student")
        return f"{key}.images_per_step (now {d.active.images_per_step})"
    return f"evaluate.evaluator.batch_size (now {cfg.evaluate.evaluator.batch_size}) and the reward batch sizes"


def _measure(stage: str, cfg: RecipeConfig, fn: Callable[[], Any], reset: bool = True) -> tuple[float, Any]:
    """Run one dry stage; (seconds, result). Any failure becomes a DryRunError naming the stage.
    ``reset``: start the memory peaks afresh (False: the stage continues an earlier measurement)."""
    from rlrefine.data.images import BadImageError

    if reset:
        _reset_peaks()
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - every failure is reported with the stage that hit it
        if _is_oom(err):
            raise DryRunError(f"dry run stopped at stage '{stage}': out of memory ({type(err).__name__}); lower "
                              f"{_memory_setting(stage, cfg)}") from err
        if isinstance(err, BadImageError):
            hint = "" if "bad_image=skip" in str(err) else " (set data.bad_image=skip to skip unreadable images)"
            raise DryRunError(f"dry run stopped at stage '{stage}': {err}{hint}") from err
        if isinstance(err, FileNotFoundError):
            raise DryRunError(f"dry run stopped at stage '{stage}': missing file: {err}") from err
        raise DryRunError(f"dry run stopped at stage '{stage}': {type(err).__name__}: {err}") from err
    return time.perf_counter() - t0, result


def _training_row(stage: str, seconds: float, clock: _StepClock, full_steps: int, batch_run: int,
                  full_batch: int) -> StageResult:
    measured = clock.s_per_step()
    ran = len(clock.times)
    fixed = max(0.0, seconds - ran * measured) if measured is not None else seconds
    sps = None if measured is None else measured * full_batch / batch_run
    projected = None if sps is None else fixed + full_steps * sps
    note = f"s/step measured at batch {batch_run}, scaled to {full_batch}" if batch_run != full_batch else ""
    return StageResult(stage, seconds, batch_run, full_batch, ran, sps, full_steps, projected, _peak_ram_gb(),
                       _peak_cuda_gb(), note)


def _distill_row(stage: str, seconds: float, clock: _StepClock, full: Any, short: Any, images: int) -> StageResult:
    """A distill-reward row: the steps at the measured s/step (scaled to the recipe's images per step), plus the
    stage's setup and report (the captioner's candidates, the teacher's scores of every pair, the held-out report),
    which grow with the images: scaled by the recipe's max(max_images, candidate_images) over the dry run's images."""
    row = _training_row(stage, seconds, clock, full.active.steps, short.active.images_per_step, full.active.images_per_step)
    if row.s_per_step is None:
        return row
    fixed = max(0.0, seconds - len(clock.times) * clock.s_per_step())
    full_images = max(full.active.max_images or 0, full.candidate_images, images)
    row.projected_s = fixed * full_images / images + full.active.steps * row.s_per_step
    row.note = "; ".join(x for x in (row.note, f"setup and report scaled from {images} to {full_images} images") if x)
    return row


def _upper_bound_row(stage: str, seconds: float, steps: int, full_steps: int, batch_run: int,
                     full_batch: int) -> StageResult:
    sps = seconds / steps * full_batch / batch_run
    return StageResult(stage, seconds, batch_run, full_batch, steps, sps, full_steps, full_steps * sps, _peak_ram_gb(),
                       _peak_cuda_gb(), note="s/step includes setup (upper bound)")


def default_batch() -> int | None:
    """The dry run's batch cap: None (the recipe's batch sizes) where there is a GPU, else `DRY_RUN_CPU_BATCH`."""
    return None if torch.cuda.is_available() else DRY_RUN_CPU_BATCH


def dry_run(cfg: RecipeConfig, until: str | None = None, steps: int = DRY_RUN_STEPS,
            images: int = DRY_RUN_IMAGES, batch: int | None | str = "auto") -> dict:
    """Run every stage of `cfg` (up to and including the stage `until`, when given) as a dry run;
    writes and returns `<run_dir>/dry_run/report.json` (see the module docstring).

    ``batch``: cap on every batch size; "auto" = `default_batch` (the recipe's sizes on a GPU, the
    `DRY_RUN_CPU_BATCH` images on a CPU), None = the recipe's sizes."""
    from rlrefine.pipeline import stages
    from rlrefine.trainers.distill_stage import distill_stage
    from rlrefine.trainers.evaluator import train_evaluator_stage
    from rlrefine.trainers.finetune import finetune
    from rlrefine.trainers.pretrain import pretrain

    if steps < 2:
        raise ValueError(f"a dry run needs at least 2 steps per stage to time one (got {steps})")
    batch = default_batch() if batch == "auto" else batch
    dry = dry_run_config(cfg, steps, images, batch)
    names = [s.name for s in stages(cfg)]
    upto = [i for i, n in enumerate(names) if until is not None and (n == until or n.startswith(f"{until}["))]
    if until is not None and not upto:
        raise DryRunError(f"'{until}' is not a stage of this recipe (its stages: {', '.join(names)}); "
                          "train-evaluator and distill-reward run only when a reward or the encoder reads their output")
    todo = names if until is None else names[:upto[-1] + 1]
    if dry.run_path.exists():
        shutil.rmtree(dry.run_path)
    dry.run_path.mkdir(parents=True)
    rows: list[StageResult] = []
    t_start = time.perf_counter()
    for name in todo:
        log.info("dry run: %s ...", name)
        if name == "train-evaluator":
            seconds, _ = _measure(name, dry, lambda: train_evaluator_stage(dry))
            rows.append(_upper_bound_row(name, seconds, steps, cfg.evaluator.steps, dry.evaluator.batch_size,
                                         cfg.evaluator.batch_size))
        elif name == "pretrain":
            clock = _StepClock()
            seconds, _ = _measure(name, dry, lambda: pretrain(dry, on_step_end=clock))
            rows.append(_training_row(name, seconds, clock, cfg.pretrain.steps, dry.pretrain.batch_size,
                                      cfg.pretrain.batch_size))
        elif name.startswith("distill-reward"):
            student = name[len("distill-reward["):-1] if name.endswith("]") else None
            clock = _StepClock()
            seconds, _ = _measure(name, dry, lambda: distill_stage(dry, name=student, on_step_end=clock))
            full, short = (c.distill if student is None else c.distill.extra(student) for c in (cfg, dry))
            rows.append(_distill_row(name, seconds, clock, full, short, images))
        elif name == "finetune":
            full = cfg.finetune_variants()
            for variant, section in dry.finetune_variants().items():
                clock = _StepClock()
                stage = f"finetune[{variant}]"
                run_cfg = dry.model_copy(update={"finetune": section})
                seconds, _ = _measure(stage, run_cfg, lambda: finetune(run_cfg, on_step_end=clock))
                # the full run trains each variant once per seed (compare.seeds)
                rows.append(_training_row(stage, seconds, clock, full[variant].steps * cfg.compare.seeds, section.batch_size,
                                          full[variant].batch_size))
        elif name == "report":
            rows.extend(_dry_report(cfg, dry))
        log.info("dry run: %s done", name)
    report = _report_json(cfg, dry, rows, time.perf_counter() - t_start, steps, images, batch)
    (dry.run_path / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _dry_report(cfg: RecipeConfig, dry: RecipeConfig) -> list[StageResult]:
    """Evaluate the dry XE model as the report stage does, on half and on all of the handful; one row.

    Evaluation has a large fixed part (a METEOR / SPICE JVM per layer, the rewards' loading), so the
    seconds per image are the slope between the two sizes and the rest is fixed. Every model the
    report compares (XE and each fine-tuned variant) has the XE model's architecture and goes through
    the same code, so the projection is the XE model's cost times the number of models; evaluating
    each variant here too would double the dry run's longest stage and check nothing new."""
    from rlrefine.report import evaluate_checkpoint

    xe = dry.run_path / "pretrain" / "model"
    # XE and every variant's seeds, on the main split and each extra split
    n_models = (1 + len(dry.finetune_variants()) * cfg.compare.seeds) * (1 + len(set(cfg.evaluate.extra_splits) - {cfg.evaluate.split}))

    def evaluate(config: RecipeConfig, out: str) -> tuple[float, int]:
        timings: dict = {}
        _, result = _measure("report", config, lambda: evaluate_checkpoint(
            config, xe, "XE", dry.run_path / out / "XE", reference_dir=None, timings=timings), reset=False)
        return timings["eval_s"], int(result["num_images"])

    _reset_peaks()
    t0 = time.perf_counter()
    half = dry.model_copy(update={"evaluate": dry.evaluate.model_copy(update={"num_images": max(1, dry.evaluate.num_images // 2)})})
    t_half, n_half = evaluate(half, "report_calibration")
    t_full, n_full = evaluate(dry, "report")
    total = time.perf_counter() - t0
    if n_full > n_half and t_full > t_half:
        per_image, how = (t_full - t_half) / (n_full - n_half), "slope between two sizes"
    else:  # noise or too few images: the mean, an upper bound
        per_image, how = t_full / max(1, n_full), "mean, an upper bound"
    fixed = max(0.0, t_full - per_image * n_full) + (total - t_half - t_full) / 2  # scoring + loading, per model
    full = cfg.evaluate.num_images * n_models
    return [StageResult("report", total, None, None, n_full, per_image, full, n_models * fixed + full * per_image,
                        _peak_ram_gb(), _peak_cuda_gb(),
                        note=f"s/step = per image and model ({how}); XE evaluated, projected for {n_models} models")]


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _report_json(cfg: RecipeConfig, dry: RecipeConfig, rows: list[StageResult], seconds: float, steps: int,
                 images: int, batch: int | None) -> dict:
    projected = [r.projected_s for r in rows if r.projected_s is not None]
    return {
        "recipe_run_dir": cfg.run_dir,
        "dry_run_dir": dry.run_dir,
        "device": _device_name(),
        "steps_per_stage": steps,
        "images_per_split": images,
        "batch_cap": batch,
        "dry_run_seconds": round(seconds, 1),
        "stages": [asdict(r) for r in rows],
        "projected_total_s": round(sum(projected), 1),
        "projected_total_h": round(sum(projected) / 3600, 2),
    }


# ------------------------------------------------------------------------------------ the table
def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def format_table(report: dict) -> str:
    """The dry-run report as a Markdown table, one row per stage, and the projected total."""
    cap = "the recipe's batch sizes" if report["batch_cap"] is None else f"batches capped at {report['batch_cap']}"
    lines = [f"Dry run on {report['device']}: {report['steps_per_stage']} steps per training stage, "
             f"{report['images_per_split']} images per split, {cap}, {_duration(report['dry_run_seconds'])} in all.", "",
             "| stage | dry run | batch (dry / full) | s/step (full batch) | full steps | projected | peak RAM | peak GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["stages"]:
        gpu = "-" if r["peak_cuda_gb"] is None else f"{r['peak_cuda_gb']:.2f} GB"
        sps = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.3f}"
        batch = "-" if r["batch_run"] is None else f"{r['batch_run']} / {r['full_batch']}"
        lines.append(f"| {r['stage']} | {_duration(r['seconds'])} | {batch} | {sps} | {r['full_steps'] or '-'} | "
                     f"{_duration(r['projected_s'])} | {r['peak_ram_gb']:.2f} GB | {gpu} |")
    lines += ["", f"Projected wall time of the full recipe on this hardware: {_duration(report['projected_total_s'])} "
                  f"({report['projected_total_h']} h)."]
    notes = [f"{r['stage']}: {r['note']}" for r in report["stages"] if r["note"]]
    if notes:
        lines.append("Notes: " + "; ".join(notes) + ".")
    return "\n".join(lines)
