"""Two processes on CPU (gloo) through `accelerate launch`: the real `pretrain` and `finetune` of a tiny recipe.

Checks that both ranks run the same steps, take disjoint slices that together make the
single-process global batch, end every step with identical parameters (DDP all-reduce), and that
logging, checkpoint metadata, evaluation and the saved model come from the main process only.

The same two stages sharded (FSDP2, recipes/accelerate/fsdp.yaml with `use_cpu: true`) match the DDP runs.
accelerate 1.16 never makes an FSDP state for CPU processes (`AcceleratorState` chooses FSDP only inside its
GPU-family branch, so a CPU launch from fsdp.yaml is MULTI_CPU, i.e. DDP), while torch's `fully_shard` runs on
CPU over gloo; so the worker, and only the worker, promotes its CPU state to FSDP as accelerate does on GPUs,
and from there accelerate's own FSDP2 path (`fsdp2_prepare_model`, sharded checkpoints) runs. Without that
promotion rlrefine refuses the launch (`make_accelerator`; tests/test_loop.py).
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
import json, os, sys
from pathlib import Path
import torch
from rlrefine.config import load_recipe

out, stage = Path(sys.argv[1]), sys.argv[2]
cfg = load_recipe(sys.argv[3], sys.argv[4:])

if os.environ.get("RLREFINE_TEST_FSDP_ON_CPU") == "1":  # see the module docstring
    import accelerate
    import rlrefine.trainers.loop as loop
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def promoted(*args, **kwargs):
        made = accelerate.Accelerator(*args, **kwargs)
        (out / f"accelerate_made_rank{made.process_index}.txt").write_text(made.distributed_type.value)
        if made.distributed_type == DistributedType.MULTI_CPU:  # what AcceleratorState does for MULTI_GPU
            made.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* variables
            made.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        return made

    loop.Accelerator = promoted

def on_step_end(step, model, loss, accelerator, batch=None, rollout=None):
    rank = accelerator.process_index
    # under FSDP a parameter is this rank's shard (a DTensor): gather it whole (every rank calls this hook)
    flat = torch.cat([getattr(p, "full_tensor", p.detach)().detach().reshape(-1) for p in model.parameters()])
    torch.save(flat, out / f"{stage}_params_rank{rank}_step{step}.pt")
    record = {"step": step, "world": accelerator.num_processes, "loss": float(loss),
              "distributed_type": accelerator.distributed_type.value}
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
threads = []
for t in os.listdir("/proc/self/task"):
    try:
        threads.append(open(f"/proc/self/task/{t}/comm").read().strip())
    except FileNotFoundError:  # a thread that ended while we listed them
        pass
(out / f"{stage}_threads_rank{os.environ['RANK']}.json").write_text(json.dumps(threads))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _fsdp_cpu_config(tmp_path: Path) -> Path:
    """recipes/accelerate/fsdp.yaml as shipped, but for CPU processes."""
    text = (REPO / "recipes" / "accelerate" / "fsdp.yaml").read_text()
    assert "\nuse_cpu: false" in text
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(text.replace("\nuse_cpu: false", "\nuse_cpu: true"))
    return path


def _run_launch(tmp_path, stage: str, overrides: list[str], timeout: int, launch: list[str],
                env: dict | None = None) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(_free_port()),
           str(worker), str(tmp_path), stage, str(REPO / "recipes" / "tiny.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _launch_two_processes(tmp_path, stage: str, overrides: list[str], timeout: int, launch: list[str] = DDP_LAUNCH,
                          env: dict | None = None) -> list[list[dict]]:
    """`accelerate launch` of WORKER on 2 processes for `stage`; returns each rank's step records."""
    proc = _run_launch(tmp_path, stage, overrides, timeout, launch, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for r in (0, 1):  # Linux names the threads in /proc; gloo's are gloo_tcp_loop and pt_gloo_runloop
        threads = json.loads((tmp_path / f"{stage}_threads_rank{r}.json").read_text())
        if launch is DDP_LAUNCH:  # under FSDP2 on CPU (test-only) one gloo transport outlives the group: torch 2.14.1
            assert not [t for t in threads if "gloo" in t], f"rank {r}: the process group outlived {stage}: {threads}"
    return [[json.loads(line) for line in (tmp_path / f"{stage}_steps_rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]


def _params(tmp_path, stage: str, rank: int, step: int) -> torch.Tensor:
    return torch.load(tmp_path / f"{stage}_params_rank{rank}_step{step}.pt")


@pytest.fixture(scope="module")
def ddp_pretrain(tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """The two-process DDP pretrain run (its folder and each rank's step records), shared with the FSDP test."""
    tmp_path = tmp_path_factory.mktemp("ddp_pretrain")
    return tmp_path, _launch_two_processes(tmp_path, "pretrain", [f"run_dir={tmp_path / 'run'}", *OVERRIDES], timeout=150)


def test_two_process_pretrain_keeps_ranks_identical(ddp_pretrain):
    tmp_path, records = ddp_pretrain
    run_dir = tmp_path / "run"

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


FINETUNE = [f"finetune.steps={FINETUNE_STEPS}", f"finetune.batch_size={FINETUNE_BATCH}", "finetune.num_candidates=2",
            "finetune.max_len=10", "finetune.warmup_steps=0", "finetune.lr=1e-3", "finetune.log_every=1",
            "finetune.checkpoint_every=1", "finetune.eval_every=1000", "finetune.reward.kind=learned"]


@pytest.fixture(scope="module")
def ddp_finetune(tmp_path_factory) -> tuple[Path, list[list[dict]]]:
    """train-evaluator and pretrain in this process, then the two-process DDP `finetune` (DiCO) from them; shared
    with the FSDP test, which fine-tunes from the same XE model and reward."""
    from rlrefine.cli import main

    tmp_path = tmp_path_factory.mktemp("ddp_finetune")
    run_dir = tmp_path / "run"
    setup = [f"run_dir={run_dir}", "threads=1", *OVERRIDES, "evaluator.steps=2", "evaluator.preference_steps=2", "evaluator.batch_size=8",
             "evaluator.eval_max_images=8"]
    assert main(["train-evaluator", "--config", str(REPO / "recipes" / "tiny.yaml"), *setup]) == 0
    assert main(["pretrain", "--config", str(REPO / "recipes" / "tiny.yaml"), *setup]) == 0
    return tmp_path, _launch_two_processes(tmp_path, "finetune", [f"run_dir={run_dir}", *OVERRIDES, *FINETUNE], timeout=200)


def test_two_process_finetune_keeps_ranks_identical(ddp_finetune):
    """`finetune` (DiCO at every layer, learned reward, frozen reference) on two processes."""
    tmp_path, records = ddp_finetune
    run_dir = tmp_path / "run"

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


# ------------------------------------------------------------------ FSDP (sharded) against DDP
FSDP_ENV = {"RLREFINE_TEST_FSDP_ON_CPU": "1"}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_fsdp_matches_ddp(ddp_pretrain, ddp_finetune, tmp_path):
    """pretrain (3 steps, a sharded checkpoint at step 2) and DiCO fine-tuning (2 steps, generated from the gathered
    weights) under FSDP2 on two CPU processes, from the data, init and reward of the DDP runs above.

    Tolerance: parameters within 1e-5 absolute of DDP's after every step, losses within 1e-5 relative, the same
    captions. The two differ only in how gradients are summed over the ranks (reduce-scatter of flat shards vs
    DDP's bucketed all-reduce), i.e. in float32 rounding (≈ 6e-8 relative) passed through AdamW's normalised
    update (lr 1e-3 here); measured: 3.5e-7 after 3 pretrain steps (each step moves a weight by up to 1e-3), 1e-7
    after 2 DiCO steps, losses and captions identical."""
    launch = ["--config_file", str(_fsdp_cpu_config(tmp_path))]
    ddp_dir, ddp = ddp_pretrain
    run_dir = tmp_path / "run"
    fsdp = _launch_two_processes(tmp_path, "pretrain", [f"run_dir={run_dir}", *OVERRIDES], 150, launch, FSDP_ENV)
    # accelerate's own choice for a CPU launch of fsdp.yaml (module docstring), then the promoted state
    assert [(tmp_path / f"accelerate_made_rank{r}.txt").read_text() for r in (0, 1)] == ["MULTI_CPU"] * 2
    assert {r["distributed_type"] for rank in fsdp for r in rank} == {"FSDP"}
    assert {r["distributed_type"] for rank in ddp for r in rank} == {"MULTI_CPU"}
    for step in range(STEPS):
        for rank in (0, 1):
            assert fsdp[rank][step]["index"] == ddp[rank][step]["index"]  # the same batches
            assert fsdp[rank][step]["loss"] == pytest.approx(ddp[rank][step]["loss"], rel=1e-5)
        p_fsdp = _params(tmp_path, "pretrain", 0, step)
        assert torch.equal(p_fsdp, _params(tmp_path, "pretrain", 1, step))  # the gathered weights: one model
        torch.testing.assert_close(p_fsdp, _params(ddp_dir, "pretrain", 0, step), rtol=0, atol=1e-5)
    assert (_params(tmp_path, "pretrain", 0, STEPS - 1) - _params(tmp_path, "pretrain", 0, 0)).abs().max() > 1e-4  # it trained
    # the checkpoint is sharded (torch.distributed.checkpoint folders for the model and the optimizer)
    ckpt = run_dir / "pretrain" / "checkpoints" / "step_00000002"
    assert {"pytorch_model_fsdp_0", "optimizer_0", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    # the saved model is the whole one (gathered for the main process), with the readout's tied embedding
    w_fsdp, w_ddp = _weights(run_dir / "pretrain" / "model"), _weights(ddp_dir / "run" / "pretrain" / "model")
    assert w_fsdp.keys() == w_ddp.keys()
    for k in w_fsdp:
        torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=1e-5)

    ft_dir, ft_ddp = ddp_finetune
    ft = _launch_two_processes(tmp_path, "finetune", [f"run_dir={ft_dir / 'run'}", *OVERRIDES, *FINETUNE,
                                                      "finetune.output=finetune_fsdp"], 200, launch, FSDP_ENV)
    for step in range(FINETUNE_STEPS):
        for rank in (0, 1):
            assert ft[rank][step]["distributed_type"] == "FSDP"
            assert ft[rank][step]["captions"] == ft_ddp[rank][step]["captions"]
            assert ft[rank][step]["loss"] == pytest.approx(ft_ddp[rank][step]["loss"], rel=1e-5)
        torch.testing.assert_close(_params(tmp_path, "finetune", 0, step), _params(ft_dir, "finetune", 0, step),
                                   rtol=0, atol=1e-5)
    w_fsdp, w_ddp = _weights(ft_dir / "run" / "finetune_fsdp" / "model"), _weights(ft_dir / "run" / "finetune" / "model")
    for k in w_fsdp:
        torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=1e-5)


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
