"""Crash-safe resume (rlrefine/trainers/checkpoint.py + pretrain.py).

A `rlrefine pretrain` run killed with SIGKILL after its first checkpoint and continued with
``--resume`` must end with exactly the weights of an uninterrupted run of the same recipe (same
batches, z_0 noise, dropout masks, optimizer and LR-schedule state). Half-written checkpoints
(``step_X.tmp`` or a directory without trainer_state.json) must never be resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
STEPS = 30
TINY = [
    "device=cpu", "seed=3",
    "data.shapes.num_train=200", "data.shapes.num_val=8", "data.shapes.num_test=8", "data.shapes.num_test_novel=8",
    "data.max_caption_len=16",
    "model.encoder.kind=tiny_vit", "model.d_model=32", "model.encoder.width=32", "model.encoder.depth=1", "model.num_slots=4", "model.readout_layers=1",
    "model.dropout=0.1",  # dropout draws from the torch RNG: resume must restore it
    f"pretrain.steps={STEPS}", "pretrain.batch_size=8", "pretrain.warmup_steps=4", "pretrain.checkpoint_every=5",
    "pretrain.log_every=5", "pretrain.eval_every=1000", "pretrain.num_eval_images=4", "pretrain.num_log_images=0",
]


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlrefine.cli", "pretrain", "--config", str(RECIPE), f"run_dir={run_dir}", *TINY, *extra]


def _env() -> dict:
    # Same thread count in every run, so the float reductions are the same.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "pretrain" / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("step_*") if not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "pretrain" / "model" / "model.safetensors"))


def test_killed_run_resumes_to_identical_weights(tmp_path):
    ref_dir, crash_dir = tmp_path / "uninterrupted", tmp_path / "crashed"

    # Start the run that will be killed first, then the reference run beside it (2 cores).
    victim = subprocess.Popen(_cli(crash_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 60
    while not _complete_checkpoints(crash_dir):
        assert victim.poll() is None, "run ended before its first checkpoint:\n" + victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 60 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (crash_dir / "pretrain" / "model").exists(), "the killed run must not have finished"
    last = _complete_checkpoints(crash_dir)[-1]
    resumed_from = json.loads((last / "trainer_state.json").read_text())["step"]
    assert 0 < resumed_from < STEPS
    weights_at_crash = load_file(str(last / "model.safetensors"))

    # Debris a crash can leave (or a corrupt later checkpoint): resume must ignore both.
    ckpts = last.parent
    tmp_ckpt = ckpts / f"step_{resumed_from + 10:08d}.tmp"
    shutil.copytree(last, tmp_ckpt)
    no_state = ckpts / f"step_{resumed_from + 15:08d}"
    shutil.copytree(last, no_state)
    (no_state / "trainer_state.json").unlink()
    (no_state / "model.safetensors").write_bytes(b"half written")

    ref = subprocess.run(_cli(ref_dir), env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed = subprocess.run(_cli(crash_dir, "--resume"), env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stderr

    a, b = _weights(ref_dir), _weights(crash_dir)
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"
    # ...and the resumed run did train on from the checkpoint (the check is not vacuous).
    assert any(not torch.equal(weights_at_crash[k], a[k]) for k in weights_at_crash if k in a)
    assert not tmp_ckpt.exists(), "the next checkpoint save removes stale .tmp directories"


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)


def test_half_written_checkpoints_are_ignored(tmp_path):
    from accelerate import Accelerator

    from rlrefine.trainers.checkpoint import STATE_FILE, CheckpointManager

    acc = Accelerator(cpu=True)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    manager = CheckpointManager(tmp_path / "ckpt", acc)
    saved = manager.save(4, {"nonfinite_total": 0})
    weights_at_4 = {k: v.clone() for k, v in model.state_dict().items()}

    # A save killed before the rename, and a directory whose state file never got written.
    (tmp_path / "ckpt" / "step_00000008.tmp").mkdir()
    (tmp_path / "ckpt" / "step_00000008.tmp" / STATE_FILE).write_text(json.dumps({"step": 8}))
    (tmp_path / "ckpt" / "step_00000012").mkdir()
    (tmp_path / "ckpt" / "step_00000012" / "model.safetensors").write_bytes(b"\0" * 10)
    assert manager.latest() == saved

    with torch.no_grad():
        for t in model.parameters():
            t.add_(1.0)
    state, extra = manager.load()
    assert extra == {}
    assert state["step"] == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights_at_4[k])

    manager.save(6, {"nonfinite_total": 0})
    assert not (tmp_path / "ckpt" / "step_00000008.tmp").exists()
    assert manager.latest().name == "step_00000006"


def test_resume_without_checkpoint_is_named_error(tmp_path):
    from accelerate import Accelerator

    from rlrefine.trainers.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path / "none", Accelerator(cpu=True))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        manager.load()


# ------------------------------------------------------------- train-evaluator and distill-reward
MICRO_DATA = ["device=cpu", "seed=2", "data.shapes.num_train=96", "data.shapes.num_val=16", "data.shapes.num_test=8",
              "data.shapes.num_test_novel=8"]
MICRO_EVALUATOR = ["evaluator.steps=20", "evaluator.preference_steps=20", "evaluator.checkpoint_every=5",
                   "evaluator.batch_size=8", "evaluator.neighbour_refresh_every=10", "evaluator.eval_max_images=8",
                   "evaluator.log_every=5", "evaluator.warmup_steps=2"]
MICRO_STUDENT = ["distill.candidate_images=0", "distill.student.steps=30", "distill.student.checkpoint_every=5",
                 "distill.student.images_per_step=4", "distill.student.max_images=64", "distill.student.log_every=5",
                 "distill.student.extra_embedding_images=16", "distill.student.warmup_steps=2"]


def _stage_cli(command: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlrefine.cli", command, "--config", str(RECIPE), f"run_dir={run_dir}", *MICRO_DATA,
            *MICRO_EVALUATOR, *MICRO_STUDENT, *extra]


def _kill_after_checkpoint(cmd: list[str], stage_dir: Path, min_step: int, cwd: Path) -> int:
    """Run ``cmd``, SIGKILL it once a complete checkpoint of at least ``min_step`` exists; that checkpoint's step."""
    victim = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    deadline = time.time() + 120

    def steps() -> list[int]:
        d = stage_dir / "checkpoints"
        done = [p for p in d.glob("step_*") if not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file()] if d.is_dir() else []
        return [int(p.name.split("_")[1]) for p in done]

    while not any(s >= min_step for s in steps()):
        assert victim.poll() is None, "run ended before the checkpoint:\n" + victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"no checkpoint of step >= {min_step} within 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    return max(steps())


def _same_state(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and len(sa) > 10
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different}"


def _in_process(command: str, run_dir: Path) -> None:
    """The uninterrupted reference run, in this process (no interpreter start); one thread, as the subprocesses."""
    from rlrefine.cli import main

    assert main([command, "--config", str(RECIPE), f"run_dir={run_dir}", "threads=1", *MICRO_DATA, *MICRO_EVALUATOR,
                 *MICRO_STUDENT]) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One uninterrupted train-evaluator run: the reference of the evaluator's resume and the teacher of the student's."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    _in_process("train-evaluator", run_dir)
    return run_dir


def test_killed_train_evaluator_resumes_to_identical_weights(tmp_path, uninterrupted):
    """Killed in its text-only phase (after step 20 of 40: the image tower frozen, the optimizer restarted, the
    neighbours mined at step 20 held in the checkpoint), then resumed: the evaluator of an uninterrupted run."""
    crash_dir = tmp_path / "crashed"
    at = _kill_after_checkpoint(_stage_cli("train-evaluator", crash_dir), crash_dir / "evaluator", 25, tmp_path)
    assert 25 <= at < 40 and not (crash_dir / "evaluator" / "evaluator.pt").exists()
    resumed = subprocess.run(_stage_cli("train-evaluator", crash_dir, "--resume"), env=_env(), capture_output=True, text=True,
                             cwd=tmp_path, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _same_state(uninterrupted / "evaluator" / "evaluator.pt", crash_dir / "evaluator" / "evaluator.pt")
    report = json.loads((crash_dir / "evaluator" / "report.json").read_text())
    assert report["data_issues"]["bad_images"] == 0 and "swap_acc" in report


def test_killed_distill_reward_resumes_to_identical_weights(tmp_path, uninterrupted):
    ref_dir, crash_dir = tmp_path / "uninterrupted", tmp_path / "crashed"
    for d in (ref_dir, crash_dir):
        shutil.copytree(uninterrupted / "evaluator", d / "evaluator")
    at = _kill_after_checkpoint(_stage_cli("distill-reward", crash_dir), crash_dir / "distill", 10, tmp_path)
    assert 10 <= at < 30 and not (crash_dir / "distill" / "student.pt").exists()
    _in_process("distill-reward", ref_dir)
    resumed = subprocess.run(_stage_cli("distill-reward", crash_dir, "--resume"), env=_env(), capture_output=True,
                             text=True, cwd=tmp_path, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _same_state(ref_dir / "distill" / "student.pt", crash_dir / "distill" / "student.pt")
    a, b = (json.loads((d / "distill" / "student.json").read_text()) for d in (ref_dir, crash_dir))
    assert (a["w"], a["bias"]) == (b["w"], b["bias"])
