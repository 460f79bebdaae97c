"""One training loop for every stage: setup -> step -> log -> checkpoint, the shape of a torchtune recipe.

Where it sits: `rlrefine.trainers`, under the four stages that train something (`pretrain`,
`finetune`, `train-evaluator`, `distill-reward`). A stage subclasses `TrainingLoop` and writes only
what is its own:

* ``setup(start_step)``: build the model(s), the optimizer, the LR schedule and the batch source for
  a run that starts at ``start_step`` (0, or the step of the checkpoint it resumes from); set
  ``self.model`` (the module whose parameters are trained, saved and restored), ``self.optimizer``
  and ``self.scheduler``;
* ``train_step(step) -> StepOutput``: one forward pass, returning the loss and what to log;
* ``after_update(step)`` (optional): anything that must follow an optimizer step (a clamp);
* ``validate(step)`` (optional): periodic evaluation on the main process;
* ``extra_state()`` / ``load_extra_state(state)`` (optional): state of the stage that accelerate
  does not checkpoint (a Python RNG, mined neighbours);
* ``finish(train_seconds) -> dict``: save the trained model and return the stage's report.

The loop owns everything the stages share: the `Accelerator` (devices, mixed precision, processes,
the TensorBoard tracker), `accelerate.prepare`, atomic checkpoints every ``checkpoint_every`` steps and
``--resume`` from the newest one (`CheckpointManager`), the non-finite guard (a step whose loss or
gradient is not finite is skipped on every process; after ``max_nonfinite_steps`` in a row the run stops
with a checkpoint and a message that says what to change), gradient clipping, the progress bar, the
scalars (averaged over processes), the hyper-parameters (written into the stage's one TensorBoard run),
and the stage's ``report.json`` with its data-issue counts (`DataIssues`: what the bad-data policy
skipped or changed, summed over processes) and skipped steps.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import accelerate
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_deepspeed_available, set_seed
from tqdm.auto import tqdm

from rlrefine.config import RecipeConfig, dump_recipe
from rlrefine.data.split import DataIssues
from rlrefine.trainers.checkpoint import CheckpointManager

log = logging.getLogger(__name__)

__all__ = ["AcceleratorSetupError", "LoopSettings", "NonFiniteGuard", "NonFiniteLossError", "StepOutput", "TrainingLoop",
           "all_processes", "log_hparams", "make_accelerator", "tensorboard_writer", "warmup_cosine"]


# ------------------------------------------------------------------------------------ schedules
def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up ``(step + 1) / warmup`` over `warmup` steps, then a cosine from 1 to
    ``min_ratio`` at step `total`: ``min_ratio + (1 − min_ratio) · ½(1 + cos(π · min(1, (step − warmup) /
    max(1, total − warmup))))``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------- accelerator
class AcceleratorSetupError(RuntimeError):
    """The launch asks for a scale-out this machine or environment cannot give (a package that is not installed,
    sharding without GPUs, processes that would each run alone); the message says what to change."""


def make_accelerator(stage_dir: str | Path, seed: int, device: str = "auto", threads: int | None = None,
                     mixed_precision: str = "no") -> Accelerator:
    """An Accelerator that logs to TensorBoard under `<stage_dir>/tb`, with every RNG seeded from ``seed``;
    ``device``: auto (CUDA when available), cpu or cuda; ``threads``: torch CPU threads (None: torch's choice).
    Raises `AcceleratorSetupError` where the launch configuration cannot run as asked (`_check_launch`)."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    _check_deepspeed_installed()
    _import_distributed_nn_before_the_group()
    _allow_another_precision(mixed_precision)
    acc = Accelerator(
        cpu=device == "cpu",
        mixed_precision=mixed_precision,
        log_with="tensorboard",
        project_dir=str(stage_dir),
        # batch_size is the global batch, sliced per process by `batch_stream`, so one training step
        # is one scheduler step whatever the number of processes (accelerate would otherwise step a
        # prepared scheduler num_processes times per optimizer step).
        step_scheduler_with_optimizer=False,
    )
    _check_launch(acc, device)
    set_seed(seed, device_specific=False)
    if threads is not None:
        torch.set_num_threads(threads)
    return acc


def _check_deepspeed_installed() -> None:
    """A DeepSpeed launch (recipes/accelerate/deepspeed_zero2.yaml sets ACCELERATE_USE_DEEPSPEED) needs the package."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not is_deepspeed_available():
        raise AcceleratorSetupError(
            "the accelerate config asks for DeepSpeed (distributed_type: DEEPSPEED, e.g. recipes/accelerate/"
            "deepspeed_zero2.yaml), and the deepspeed package is not installed: pip install deepspeed (it is not a "
            "dependency of rlrefine), or launch with recipes/accelerate/ddp.yaml or fsdp.yaml")


def _check_launch(acc: Accelerator, device: str) -> None:
    """Refuse what accelerate would otherwise do silently: run FSDP as plain data parallelism, or run each launched
    process alone.

    accelerate (1.16) makes an FSDP state only for GPU-like processes (`AcceleratorState`: FSDP is chosen inside
    the MULTI_GPU / MULTI_XPU / ... branch); a CPU process launched from recipes/accelerate/fsdp.yaml gets
    MULTI_CPU (DDP over gloo), and one that is not told it is on a CPU (``device: auto`` on a machine without a
    GPU) gets no process group at all, so every process would train and write the whole run by itself."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes == 1:
        raise AcceleratorSetupError(
            f"{launched} processes were launched but accelerate made a single-process run in each (device={device}, "
            f"{'no GPU' if not torch.cuda.is_available() else 'GPUs present'}): every process would train and write "
            "the whole run alone. On CPUs set device=cpu (gloo); on GPUs check CUDA_VISIBLE_DEVICES")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        raise AcceleratorSetupError(
            f"the accelerate config asks for FSDP (distributed_type: FSDP), but accelerate {accelerate.__version__} "
            f"made a {acc.distributed_type.value} run here: it shards only on GPUs (and other accelerators), so on "
            f"{acc.device.type} FSDP would silently be plain data parallelism. Launch with recipes/accelerate/ddp.yaml "
            "on CPUs (accelerate launch --multi_gpu --num_processes N ... device=cpu)")


def _allow_another_precision(mixed_precision: str) -> None:
    """Let a stage use another mixed precision than the previous stage of the same process.

    accelerate keeps one `AcceleratorState` per process and refuses an Accelerator whose mixed precision differs
    from the first one's, so `rlrefine run` with an fp32 evaluator stage and a bf16 pretrain stopped at pretrain.
    Every stage ends its accelerator (`end_training`) before the next one starts, so the mixed-precision state can
    be dropped; the process state (devices, the process group) is kept."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _import_distributed_nn_before_the_group() -> None:
    """Import `torch.distributed.nn` before accelerate creates the process group.

    Its functions take `group=group.WORLD` as a default argument, bound when the module is first
    imported. DDP imports it, so imported after the group exists it keeps the group alive after
    `destroy_process_group` until the interpreter is torn down. Then the gloo group's worker threads
    are destroyed mid-finalization and a finished two-process run sometimes aborts on exit
    ("terminate called without an active exception", exit code -6). Imported first, the default is
    None and the group goes when `end_training` destroys it.
    """
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.nn")


def all_processes(acc: Accelerator, flag: bool) -> bool:
    """True when `flag` is True on every process (one all-reduce; no communication on one process)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=acc.device)
    return float(acc.reduce(t, "sum").item()) == 0.0


def tensorboard_writer(acc: Accelerator):
    """The underlying `SummaryWriter` (for text, images and figures), or None off the main process."""
    if not acc.is_main_process:
        return None
    return acc.get_tracker("tensorboard", unwrap=True)


def log_hparams(writer, hparams: dict[str, Any]) -> None:
    """Write ``hparams`` (scalars and strings) into the run ``writer`` already writes to.

    `SummaryWriter.add_hparams` (and accelerate's ``init_trackers(config=...)``, which calls it) opens a
    second, timestamped run under the first, so TensorBoard listed every stage twice; the HPARAMS
    summaries written into the stage's own event file attach the values to its one run."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    values = {k: v for k, v in hparams.items() if isinstance(v, (int, float, str, bool))}
    file_writer = writer._get_file_writer()
    for summary in hparams_summary(values, {}):
        file_writer.add_summary(summary)


# ------------------------------------------------------------------------------- non-finite guard
class NonFiniteLossError(RuntimeError):
    """``max_nonfinite_steps`` non-finite losses (or gradients) in a row; a checkpoint was written."""


class NonFiniteGuard:
    """Backward + gradient clipping that skips a step whose loss or gradient is non-finite.

    The skip decision is the same on every process (a process that skipped backward would leave the
    others waiting in DDP's all-reduce): a step is skipped if any process is non-finite. After
    `limit` skipped steps in a row, a checkpoint is written and `NonFiniteLossError` says what to
    change (`advice`). `state["nonfinite_total"]` counts all skips (it is saved with checkpoints).
    ``grad_clip`` None measures the gradient norm without clipping (a multiplication by 1).
    """

    def __init__(self, acc: Accelerator, optimizer, save_checkpoint: Callable[[int], Path], state: dict, limit: int,
                 section: str, advice: str):
        self.acc, self.optimizer, self.save_checkpoint, self.state = acc, optimizer, save_checkpoint, state
        self.limit, self.section, self.advice = limit, section, advice
        self.run = 0

    def backward(self, step: int, loss: torch.Tensor, params, grad_clip: float | None) -> float | None:
        """The global (all-reduced) gradient norm, or None when the step must be skipped (no update)."""
        acc = self.acc
        grad_norm = None
        finite = all_processes(acc, bool(torch.isfinite(loss)))
        if finite:
            acc.backward(loss)
            grad_norm = acc.clip_grad_norm_(params, math.inf if grad_clip is None else grad_clip)
            finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.run = 0
            return float(grad_norm)
        self.run += 1
        self.state["nonfinite_total"] = self.state.get("nonfinite_total", 0) + 1
        what = f"non-finite gradient norm ({float(grad_norm)})" if grad_norm is not None else f"non-finite loss ({loss.item()})"
        log.warning("step %d: %s; step skipped, no update (%d in a row, %d in total)", step, what, self.run,
                    self.state["nonfinite_total"])
        acc.log({"train/nonfinite_steps": self.state["nonfinite_total"]}, step=step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.run >= self.limit:
            path = self.save_checkpoint(step)
            raise NonFiniteLossError(
                f"{self.run} non-finite losses/gradients in a row at step {step} ({self.section}.max_nonfinite_steps="
                f"{self.limit}); checkpoint written to {path}. {self.advice}, then continue with --resume.")
        return None


# ------------------------------------------------------------------------------------- the loop
@dataclass
class LoopSettings:
    """What the loop needs to know about a stage (read from the stage's recipe section)."""

    stage_dir: Path  # the stage's output folder: checkpoints/, tb/, report.json
    section: str  # the recipe section, named in messages ("pretrain", "finetune", "evaluator", "distill.student")
    steps: int
    log_every: int
    checkpoint_every: int
    seed: int = 0  # every RNG is seeded from it when the accelerator is made
    device: str = "auto"  # auto (CUDA when available), cpu or cuda
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    eval_every: int = 0  # 0: no periodic `validate`
    grad_clip: float | None = None  # None: the gradient norm is measured, never clipped
    max_nonfinite_steps: int = 10
    mixed_precision: str = "no"
    advice: str = "Lower the learning rate"  # what to change when the losses stay non-finite
    hparams: dict[str, Any] = field(default_factory=dict)  # written to TensorBoard's HPARAMS tab

    @classmethod
    def of_recipe(cls, cfg: RecipeConfig, stage: str, section: str, **fields: Any) -> "LoopSettings":
        """Settings of a stage of a recipe: its folder under run_dir, and the recipe's seed, device and threads."""
        return cls(stage_dir=cfg.run_path / stage, section=section, seed=cfg.seed, device=cfg.device, threads=cfg.threads,
                   **fields)


@dataclass
class StepOutput:
    """What `TrainingLoop.train_step` returns: the loss to back-propagate and what to log."""

    loss: torch.Tensor
    scalars: Callable[[], dict[str, Any]] | None = None  # called on logging steps: name -> value (averaged over processes)
    progress: Callable[[dict[str, float]], dict[str, str]] | None = None  # progress-bar postfix from the logged scalars
    hook: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for ``on_step_end`` (batch=, rollout=)


class TrainingLoop:
    """The loop every training stage runs; see the module docstring for what a stage provides."""

    model: torch.nn.Module  # what is trained and checkpointed (accelerate-prepared in `run`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def __init__(self, settings: LoopSettings, on_step_end: Callable[..., None] | None = None,
                 recipe: RecipeConfig | None = None, on_log: Callable[[dict[str, float], int], None] | None = None):
        """``recipe``: written beside the outputs (recipe.yaml) for provenance; ``on_step_end(step=, model=,
        loss=, accelerator=, ...)``: called on every process after each optimizer step (tests, debugging; under FSDP
        ``model``'s parameters are this process's shards);
        ``on_log(scalars, step)``: called with every logged set of scalars (on the main process)."""
        self.settings, self.on_step_end, self.recipe, self.on_log = settings, on_step_end, recipe, on_log
        self.stage_dir = Path(settings.stage_dir)
        self.issues = DataIssues()  # counted when the data is loaded (the same on every process)
        self.stream_issues = DataIssues()  # counted while reading batches (this process's slice)
        self.state: dict[str, Any] = {"nonfinite_total": 0}
        self.writer = None
        self._whole: torch.nn.Module | None = None  # under FSDP: a plain copy of the model (`whole_model`)

    # -- what a stage provides ------------------------------------------------------------------
    def setup(self, start_step: int) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> StepOutput:
        raise NotImplementedError

    def after_update(self, step: int) -> None:
        """Called after every optimizer step."""

    def validate(self, step: int) -> None:
        """Called every ``eval_every`` steps and after the last one, on the main process."""

    def stop_requested(self, step: int) -> bool:
        """True to end training after ``step`` (before ``steps``), e.g. on a time limit."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """Stage state that accelerate's checkpoint does not hold (saved with torch.save)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""

    def finish(self, train_seconds: float) -> dict:
        """Save the trained model (main process) and return the stage's report."""
        raise NotImplementedError

    # -- the model with whole parameters --------------------------------------------------------
    @property
    def whole_model(self) -> torch.nn.Module:
        """The trained module with whole parameters, for what runs outside its prepared forward (generation,
        validation, saving): the accelerate-unwrapped model itself, or under FSDP, whose unwrapped model holds only
        this process's shards, a plain copy whose weights `gather_model` refreshes (one more copy of the weights
        on every process: the price of generating and evaluating without collectives)."""
        if self._whole is not None:
            return self._whole
        return self.acc.unwrap_model(self.model) if hasattr(self, "acc") else self.model

    def gather_model(self) -> None:
        """Under FSDP, copy the full weights into `whole_model`: a collective, so every process calls it (the loop
        does before `validate` and `finish`; a stage before generating). Without sharding, nothing."""
        if self._whole is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self._whole.load_state_dict(get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True)))

    # -- the loop -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Set up, train (resuming from the newest checkpoint when asked), save; returns the report."""
        s = self.settings
        self.acc = acc = make_accelerator(self.stage_dir, s.seed, s.device, s.threads, s.mixed_precision)
        self.ckpt = CheckpointManager(self.stage_dir / "checkpoints", acc)
        latest = self.ckpt.latest() if resume else None
        start_step = self.ckpt.step_of(latest) if latest is not None else 0
        self.setup(start_step)
        if acc.distributed_type == DistributedType.FSDP:  # FSDP shards the module in place: keep a whole copy
            self._whole = copy.deepcopy(self.model).to(acc.device)
        self.model, self.optimizer, self.scheduler = acc.prepare(self.model, self.optimizer, self.scheduler)
        if latest is not None:
            self.state, extra = self.ckpt.load(latest)
            self.load_extra_state(extra)
        if acc.is_main_process and self.recipe is not None:
            dump_recipe(self.recipe, self.stage_dir / "recipe.yaml")
        acc.init_trackers("tb")
        self.writer = tensorboard_writer(acc)
        if self.writer is not None and s.hparams:
            log_hparams(self.writer, s.hparams)
        guard = NonFiniteGuard(acc, self.optimizer, self.save_checkpoint, self.state, s.max_nonfinite_steps, s.section,
                               s.advice)
        t0 = time.time()
        bar = tqdm(range(start_step, s.steps), desc=self.stage_dir.name, initial=start_step, total=s.steps,
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        for step in bar:
            out = self.train_step(step)
            grad_norm = guard.backward(step, out.loss, self.model.parameters(), s.grad_clip)
            if grad_norm is None:
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.after_update(step)
            if self.on_step_end is not None:
                self.on_step_end(step=step, model=acc.unwrap_model(self.model), loss=out.loss.detach(), accelerator=acc,
                                 **out.hook)
            if step % s.log_every == 0 or step == s.steps - 1:
                self._log(step, out, grad_norm, bar, (step + 1 - start_step) / max(time.time() - t0, 1e-9))
            if (s.eval_every and (step + 1) % s.eval_every == 0) or step == s.steps - 1:
                self.gather_model()
                if acc.is_main_process:
                    self.validate(step)
            if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                self.save_checkpoint(step + 1)
            if self.stop_requested(step):
                break
        bar.close()
        self._sum_stream_issues()
        log.info("%s: data issues: %s; non-finite steps skipped: %d", s.section, self.issues.summary(),
                 self.state.get("nonfinite_total", 0))
        self.gather_model()
        report = {}
        if acc.is_main_process:
            report = {"steps": s.steps, "train_seconds": round(time.time() - t0, 1), **self.finish(time.time() - t0),
                      "data_issues": self.issues.as_dict(), "nonfinite_steps": self.state.get("nonfinite_total", 0)}
            (self.stage_dir / "report.json").write_text(json.dumps(report, indent=1))
        acc.wait_for_everyone()
        acc.end_training()
        return report

    def save_checkpoint(self, step: int) -> Path:
        return self.ckpt.save(step, self.state, self.extra_state())

    def _log(self, step: int, out: StepOutput, grad_norm: float, bar, steps_per_s: float) -> None:
        """The step's scalars, each the mean over processes, plus the loop's own."""
        acc = self.acc
        scalars = {"train/loss": out.loss.detach(), **(out.scalars() if out.scalars is not None else {})}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(acc.device) for v in scalars.values()])
        scalars = dict(zip(scalars, acc.reduce(values, "mean").tolist()))
        scalars.update({"train/grad_norm": grad_norm, "train/lr": self.scheduler.get_last_lr()[0],
                        "train/steps_per_s": steps_per_s})
        acc.log(scalars, step=step)
        if self.on_log is not None and acc.is_main_process:
            self.on_log(scalars, step)
        bar.set_postfix(out.progress(scalars) if out.progress is not None else {"loss": f"{scalars['train/loss']:.3f}"})

    def _sum_stream_issues(self) -> None:
        """Add the batch readers' counts, summed over processes (each read its own slice), to `issues`."""
        counts = torch.tensor(list(self.stream_issues.as_dict().values()), device=self.acc.device)
        summed = self.acc.reduce(counts, "sum").tolist()
        self.issues.add(dict(zip(self.stream_issues.as_dict(), (int(x) for x in summed))))
