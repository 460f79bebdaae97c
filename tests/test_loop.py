"""The training loop's accelerator (rlrefine/trainers/loop.py `make_accelerator`): launches it refuses, with a message
that says what to do, instead of running something other than what was asked.

The environment variables are the ones `accelerate launch` sets from a config file (recipes/accelerate/*.yaml):
``ACCELERATE_USE_DEEPSPEED`` for ``distributed_type: DEEPSPEED``, ``ACCELERATE_USE_FSDP`` for FSDP, ``WORLD_SIZE``
for the number of processes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlrefine import cli
from rlrefine.trainers import loop
from rlrefine.trainers.loop import AcceleratorSetupError, make_accelerator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_state():
    """These accelerators are made under a launch's environment; leave no state behind for other tests."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=False)


def test_deepspeed_config_without_deepspeed_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(loop, "is_deepspeed_available", lambda: False)  # as where it is not installed
    with pytest.raises(AcceleratorSetupError, match=r"pip install deepspeed"):
        make_accelerator(tmp_path, seed=0, device="cpu")
    # through the command line: one line naming the package, exit code 2, when the stage makes its accelerator
    # (first thing in a stage's run; a tiny_vit encoder, so that no evaluator stage runs before it)
    argv = ["pretrain", "--config", str(REPO / "recipes" / "tiny.yaml"), f"run_dir={tmp_path / 'run'}", "device=cpu",
            "model.encoder.kind=tiny_vit"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "rlrefine: the accelerate config asks for DeepSpeed" in err and "pip install deepspeed" in err
    assert not (tmp_path / "run" / "pretrain" / "tokenizer").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_launching_the_deepspeed_config_without_deepspeed_stops_at_the_launcher(tmp_path):
    """`accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml` stops before rlrefine starts, with
    accelerate's own message naming the package (rlrefine's check above covers other launchers, e.g. torchrun)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "deepspeed_zero2.yaml"), "-m", "rlrefine.cli", "pretrain", "--config",
           str(REPO / "recipes" / "tiny.yaml"), f"run_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode != 0
    assert "install deepspeed" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_fsdp_that_would_not_shard_is_refused(tmp_path, monkeypatch):
    """A CPU process launched from fsdp.yaml gets no FSDP state from accelerate (it shards only on GPU-like
    devices): rlrefine refuses rather than silently training with plain data parallelism."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(AcceleratorSetupError, match=r"asks for FSDP.*plain data parallelism.*ddp.yaml"):
        make_accelerator(tmp_path, seed=0, device="cpu")


def test_launched_processes_that_would_each_run_alone_are_refused(tmp_path, monkeypatch):
    """Two processes launched (WORLD_SIZE=2) but no process group made (``device: auto`` without a GPU): each
    would train and write the whole run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(AcceleratorSetupError, match=r"2 processes were launched .* set device=cpu"):
        make_accelerator(tmp_path, seed=0, device="auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert make_accelerator(tmp_path, seed=0, device="auto").num_processes == 1  # one process asked, one made
