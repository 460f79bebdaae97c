"""Crash-safe training checkpoints.

A checkpoint is a directory `<stage_dir>/checkpoints/step_00000500/` holding what
`accelerate.Accelerator.save_state` writes (model, optimizer, scheduler, the RNG states of every
process) plus `trainer_state.json` (step, data position, counters) and, when the stage has any,
`extra_state.pt` (state accelerate does not hold, e.g. a Python RNG; `TrainingLoop.extra_state`). It is first written to
`step_00000500.tmp` and renamed only when complete, so a process killed mid-write leaves a `.tmp`
directory that `latest()` ignores (and the next save removes). Resuming loads the newest complete
checkpoint with `Accelerator.load_state`, which restores weights, optimizer, scheduler and RNGs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra_state.pt"


class CheckpointManager:
    def __init__(self, directory: str | Path, accelerator: Accelerator, keep: int = 2):
        self.directory = Path(directory)
        self.accelerator = accelerator
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        done = [p for p in self.directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]
        return sorted(done, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Half-written `.tmp` directories never count."""
        done = self._complete()
        return done[-1] if done else None

    @staticmethod
    def step_of(path: Path) -> int:
        """The step a checkpoint directory holds (read from its trainer state, without loading it)."""
        return int(json.loads((path / STATE_FILE).read_text())["step"])

    def save(self, step: int, state: dict, extra: dict | None = None) -> Path:
        """Write a checkpoint atomically (all processes call this; the main process renames)."""
        acc = self.accelerator
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f"step_{step:08d}.tmp"
        if acc.is_main_process:
            for stale in self.directory.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if extra:
                torch.save(extra, tmp / EXTRA_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self._complete()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint written: %s", final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path | None = None) -> tuple[dict, dict]:
        """Restore the newest (or the given) checkpoint; returns its trainer state (with `step`) and its
        extra state ({} when it has none)."""
        path = path or self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under '{self.directory}' to resume from; run without resume to start fresh")
        self.accelerator.load_state(str(path))
        state = json.loads((path / STATE_FILE).read_text())
        extra = torch.load(path / EXTRA_FILE, weights_only=False) if (path / EXTRA_FILE).is_file() else {}
        log.info("resumed from %s (step %d)", path, state["step"])
        return state, extra
