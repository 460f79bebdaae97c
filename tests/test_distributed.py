"""Two processes on CPU (gloo) through `accelerate launch`: the real `pretrain` and `finetune` of a tiny recipe.

Checks that both ranks run the same steps, take disjoint slices that together make the
single-process global batch, end every step with identical parameters (DDP all-reduce), and that
logging, checkpoint metadata, evaluation and the saved model come from the main process only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
BATCH = 8
OVERRIDES = [
    "device=cpu", "seed=5",
    "data.shapes.num_train=120", "data.shapes.num_val=6", "data.shapes.num_test=6", "data.shapes.num_test_novel=6",
    "data.max_caption_len=12",
    "model.encoder.kind=tiny_vit", "model.d_model=16", "model.encoder.width=16", "model.encoder.depth=1", "model.num_slots=2", "model.readout_layers=1",
    "model.num_refine_layers=2", "model.n_heads=2", "model.encoder.heads=2", "model.dropout=0.1",
    f"pretrain.steps={STEPS}", f"pretrain.batch_size={BATCH}", "pretrain.warmup_steps=1", "pretrain.checkpoint_every=2",
    "pretrain.log_every=1", "pretrain.eval_every=1000", "pretrain.num_eval_images=2", "pretrain.num_log_images=1",
]

# Runs on every rank: the real trainer (pretrain or finetune), with the on_step_end hook recording
# what each rank saw.
WORKER = r"""
import json, sys
from pathlib import Path
import torch
from rlrefine.config import load_recipe

out, stage = Path(sys.argv[1]), sys.argv[2]
cfg = load_recipe(sys.argv[3], sys.argv[4:])

def on_step_end(step, model, loss, accelerator, batch=None, rollout=None):
    rank = accelerator.process_index
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.save(flat, out / f"{stage}_params_rank{rank}_step{step}.pt")
    record = {"step": step, "world": accelerator.num_processes, "loss": float(loss)}
    if batch is not None:
        record.update(index=batch.index.tolist(), z0_seeds=batch.z0_seeds.tolist())
    if rollout is not None:
        record["captions"] = rollout.captions
    with open(out / f"{stage}_steps_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")

if stage == "pretrain":
    from rlrefine.trainers.pretrain import pretrain as train
else:
    from rlrefine.trainers.finetune import finetune as train
train(cfg, on_step_end=on_step_end)

# The stage destroyed its process group: no gloo thread may outlive it into interpreter shutdown.
import os
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
(out / f"{stage}_threads_rank{os.environ['RANK']}.json").write_text(json.dumps(threads))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(tmp_path, stage: str, overrides: list[str], timeout: int) -> list[list[dict]]:
    """`accelerate launch --num_processes 2` of WORKER for `stage`; returns each rank's step records."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(worker), str(tmp_path), stage, str(REPO / "recipes" / "tiny.yaml"), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in (0, 1):  # Linux names the threads in /proc; gloo's are gloo_tcp_loop and pt_gloo_runloop
        threads = json.loads((tmp_path / f"{stage}_threads_rank{r}.json").read_text())
        assert not [t for t in threads if "gloo" in t], f"rank {r}: the process group outlived {stage}: {threads}"
    return [[json.loads(line) for line in (tmp_path / f"{stage}_steps_rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]


def _params(tmp_path, stage: str, rank: int, step: int) -> torch.Tensor:
    return torch.load(tmp_path / f"{stage}_params_rank{rank}_step{step}.pt")


def test_two_process_pretrain_keeps_ranks_identical(tmp_path):
    run_dir = tmp_path / "run"
    records = _launch_two_processes(tmp_path, "pretrain", [f"run_dir={run_dir}", *OVERRIDES], timeout=150)

    # Same steps on both ranks, each knowing it is one of two.
    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == list(range(STEPS))
    assert all(r["world"] == 2 for rank in records for r in rank)

    # The two slices interleave into exactly the global batch a single process would draw.
    from rlrefine.config import load_recipe
    from rlrefine.data.batches import batch_stream
    from rlrefine.data.sources import load_splits
    from rlrefine.data.tokenizer import build_tokenizer

    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [f"run_dir={tmp_path / 'single'}", *OVERRIDES])
    splits = load_splits(cfg.data)
    tokenizer = build_tokenizer(cfg.tokenizer, splits["train"].all_captions())
    stream = batch_stream(splits["train"], tokenizer, BATCH, cfg.seed, 0, cfg.data.max_caption_len,
                          cfg.data.label_weight, cfg.data.image_size)
    for step in range(STEPS):
        single = next(stream)
        r0, r1 = records[0][step], records[1][step]
        assert len(r0["index"]) == len(r1["index"]) == BATCH // 2
        merged_index, merged_seeds = np.empty(BATCH, dtype=np.int64), np.empty(BATCH, dtype=np.int64)
        merged_index[0::2], merged_index[1::2] = r0["index"], r1["index"]
        merged_seeds[0::2], merged_seeds[1::2] = r0["z0_seeds"], r1["z0_seeds"]
        assert merged_index.tolist() == single.index.tolist()
        assert merged_seeds.tolist() == single.z0_seeds.tolist()

        # After every optimizer step the parameters are bit-identical on both ranks.
        assert torch.equal(_params(tmp_path, "pretrain", 0, step), _params(tmp_path, "pretrain", 1, step)), \
            f"ranks diverged at step {step}"
    assert not torch.equal(_params(tmp_path, "pretrain", 0, 0), _params(tmp_path, "pretrain", 0, STEPS - 1))

    stage = run_dir / "pretrain"
    # Checkpoint: one trainer_state.json (main), one RNG state per process.
    ckpt = stage / "checkpoints" / "step_00000002"
    assert (ckpt / "trainer_state.json").is_file()
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    # Model, report and TensorBoard events written once, by the main process.
    assert (stage / "model" / "model.safetensors").is_file()
    report = json.loads((stage / "report.json").read_text())
    assert report["steps"] == STEPS and report["data_issues"]["bad_images"] == 0
    events = list((stage / "tb").rglob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-1] for e in events if e.parent == stage / "tb"}) <= 1
    # The logged loss is the mean of the two ranks' losses (accelerate reduce), not rank 0's alone.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage / "tb"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    for step in range(STEPS):
        mean = (records[0][step]["loss"] + records[1][step]["loss"]) / 2
        assert abs(logged[step] - mean) < 1e-5, (step, logged[step], mean)
    # One scheduler step per training step (the batch size is global), as on one process.
    from rlrefine.trainers.pretrain import warmup_cosine

    p = cfg.pretrain
    lrs = {e.step: e.value for e in acc.Scalars("train/lr")}
    for step in range(STEPS):
        assert abs(lrs[step] - p.lr * warmup_cosine(step + 1, p.warmup_steps, p.steps, p.min_lr_ratio)) < 1e-9


FINETUNE_STEPS = 2
FINETUNE_BATCH = 4


def test_two_process_finetune_keeps_ranks_identical(tmp_path):
    """`finetune` (DiCO at every layer, learned reward, frozen reference) on two processes."""
    from rlrefine.cli import main

    run_dir = tmp_path / "run"
    setup = [f"run_dir={run_dir}", "threads=1", *OVERRIDES, "evaluator.steps=2", "evaluator.preference_steps=2", "evaluator.batch_size=8",
             "evaluator.eval_max_images=8"]
    assert main(["train-evaluator", "--config", str(REPO / "recipes" / "tiny.yaml"), *setup]) == 0
    assert main(["pretrain", "--config", str(REPO / "recipes" / "tiny.yaml"), *setup]) == 0

    ft = [f"finetune.steps={FINETUNE_STEPS}", f"finetune.batch_size={FINETUNE_BATCH}", "finetune.num_candidates=2",
          "finetune.max_len=10", "finetune.warmup_steps=0", "finetune.lr=1e-3", "finetune.log_every=1",
          "finetune.checkpoint_every=1", "finetune.eval_every=1000", "finetune.reward.kind=learned"]
    records = _launch_two_processes(tmp_path, "finetune", [f"run_dir={run_dir}", *OVERRIDES, *ft], timeout=200)

    assert [r["step"] for r in records[0]] == [r["step"] for r in records[1]] == list(range(FINETUNE_STEPS))
    assert all(r["world"] == 2 for rank in records for r in rank)
    for step in range(FINETUNE_STEPS):
        # each rank rolled out its own half of the batch: B/2 images x K layers x n candidates
        assert len(records[0][step]["captions"]) == FINETUNE_BATCH // 2 * 2 * 2
        assert torch.equal(_params(tmp_path, "finetune", 0, step), _params(tmp_path, "finetune", 1, step)), \
            f"ranks diverged at fine-tuning step {step}"
    assert not torch.equal(_params(tmp_path, "finetune", 0, 0),  # it did train
                           _params(tmp_path, "finetune", 0, FINETUNE_STEPS - 1))

    stage = run_dir / "finetune"
    assert (stage / "model" / "model.safetensors").is_file()
    assert json.loads((stage / "report.json").read_text())["steps"] == FINETUNE_STEPS
    ckpt = stage / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage / "tb"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    for step in range(FINETUNE_STEPS):  # the logged loss is the mean over both ranks
        mean = (records[0][step]["loss"] + records[1][step]["loss"]) / 2
        assert abs(logged[step] - mean) < 1e-5, (step, logged[step], mean)
    assert {"layer_1/reward", "layer_2/kl_ref", "layer_2/progress_target"} <= set(acc.Tags()["scalars"])


# ------------------------------------------------------------------ accelerate config files
@pytest.mark.parametrize("name, kind, sharding", [
    ("ddp", "MULTI_GPU", None),
    ("fsdp", "FSDP", ("fsdp_config", "fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP")),
    ("deepspeed_zero2", "DEEPSPEED", ("deepspeed_config", "zero_stage", 2)),
])
def test_accelerate_configs_parse(name, kind, sharding, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    path = REPO / "recipes" / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType(kind)
    assert cfg.num_machines == 1 and cfg.machine_rank == 0 and cfg.num_processes >= 2 and not cfg.use_cpu
    if sharding is not None:
        section, key, value = sharding
        assert getattr(cfg, section)[key] == value
    text = path.read_text()
    assert text.startswith("# ") and "accelerate launch --config_file" in text  # says how to run it
    assert "# main_process_ip:" in text and "# num_machines: 2" in text         # multi-node fields, commented
    # The loader has teeth: a misspelt key in the same file is rejected.
    bad = tmp_path / f"{name}.yaml"
    bad.write_text(text + "\nnum_proceses: 4\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config_from_file(str(bad))
